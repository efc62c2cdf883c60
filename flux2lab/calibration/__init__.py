"""TeaCache calibration: record how input change predicts output change, fit the polynomial, diagnose it.

A run lives in one folder (`experiments/calibration/<name>/`): `record` writes `run.json` and the samples,
prompt by prompt, so an interrupted run resumes where it stopped; once every prompt is in, `fit_run` writes
`fit.json` and `fit.png`. `record` holds the recording and the samples on disk, `fit` the fit and its
diagnostics; the hook that measures the model output is `flux2lab.hooks.recorder`.
"""

from flux2lab.calibration.fit import (
    DEFAULT_THRESHOLDS,
    HELDOUT_FRACTION,
    fit_run,
    fit_samples,
    heldout_prompts,
    max_consecutive_skips,
    max_skipped_steps,
    plot_fit,
    polynomial_minimum,
    r_squared,
    skip_advice,
    skip_limits,
)
from flux2lab.calibration.record import (
    FIELDS,
    KINDS,
    RecordResult,
    Samples,
    merge_samples,
    parse_shard,
    read_rows,
    record,
    record_prompt,
    recording_recipe,
    run_metadata,
    shard_file,
)

__all__ = [
    "DEFAULT_THRESHOLDS", "FIELDS", "HELDOUT_FRACTION", "KINDS", "RecordResult", "Samples", "fit_run", "fit_samples",
    "heldout_prompts", "max_consecutive_skips", "max_skipped_steps", "merge_samples", "parse_shard", "plot_fit",
    "polynomial_minimum", "r_squared", "read_rows", "record", "record_prompt", "recording_recipe", "run_metadata",
    "shard_file", "skip_advice", "skip_limits",
]
