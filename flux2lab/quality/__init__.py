"""Recipe A against recipe B on the same prompts and seeds: paired images, metrics with CIs, a grid."""

from flux2lab.quality.comparison import DEFAULT_METRICS, Comparison, compare, default_metrics

__all__ = ["DEFAULT_METRICS", "Comparison", "compare", "default_metrics"]
