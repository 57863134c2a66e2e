"""The profile command's choices and defaults, importable without the profiler itself (the
CLI builds its options from them at start-up)."""

DEFAULT_STRATEGIES = ("ddp", "fsdp-full")
PROFILE_DEVICES = ("auto", "cuda", "cpu")
MIN_SAMPLE_HZ = 50.0
"""GpuSampler's MIN_RATE_HZ, checked here so that a bad rate is a usage error before any launch
(gpu_sampler.py is imported only on CUDA runs)."""
