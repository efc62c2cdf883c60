"""Every diffusers ModelHook flux2lab attaches: TeaCache, per-block CUDA graphs, the calibration recorder."""
