"""Calibration of the step caches that need one: TeaCache (record how input change predicts output change, fit
the polynomial, diagnose it) and MagCache (its per-step magnitude ratios), in one uncached pass.

A run lives in one folder (`experiments/calibration/<name>/`): `record` writes `run.json`, the samples and
MagCache's ratios, prompt by prompt, so an interrupted run resumes where it stopped; once every prompt is in, it
writes `mag_ratios.json` (`mag_ratios_from_fit` reads it) and `fit_run` writes `fit.json` and `fit.png`.
`record` holds the recording and the samples and ratios on disk, `fit` the fit and its diagnostics; the hooks
that measure the model output and the block stack's residual are `flux2lab.hooks.recorder`.
"""

from flux2lab.calibration.fit import (
    DEFAULT_THRESHOLDS,
    HELDOUT_FRACTION,
    check_degree,
    check_ret_steps,
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
    MAG_RATIOS,
    RecordResult,
    Samples,
    check_resume,
    mag_ratios_from_fit,
    merge_samples,
    parse_shard,
    ratios_file,
    read_rows,
    record,
    record_prompt,
    recording_recipe,
    run_metadata,
    shard_file,
    write_mag_ratios,
)

__all__ = [
    "DEFAULT_THRESHOLDS", "FIELDS", "HELDOUT_FRACTION", "KINDS", "MAG_RATIOS", "RecordResult", "Samples", "check_degree",
    "check_resume", "check_ret_steps", "fit_run", "fit_samples", "heldout_prompts", "mag_ratios_from_fit",
    "max_consecutive_skips", "max_skipped_steps", "merge_samples", "parse_shard", "plot_fit", "polynomial_minimum",
    "r_squared", "ratios_file", "read_rows", "record", "record_prompt", "recording_recipe", "run_metadata",
    "shard_file", "skip_advice", "skip_limits", "write_mag_ratios",
]
