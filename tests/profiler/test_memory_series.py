import numpy as np
import pytest

from dpplan.profiler.cpu_memory import MemoryTimeline
from dpplan.profiler.gpu_sampler import GpuSample
from dpplan.profiler.memory_series import cpu_series, cuda_series, decimate, line


def test_decimate_keeps_every_interval_extreme_in_time_order():
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 10, 5000))
    values = rng.integers(0, 1000, 5000)
    values[1234] = 5000  # a single-sample spike
    values[4321] = -7  # and a single-sample trough
    kept_times, kept_values = decimate(times, values, max_points=50)
    assert len(kept_times) <= 100
    assert kept_times == sorted(kept_times)
    assert max(kept_values) == 5000 and min(kept_values) == -7
    assert times[1234] in kept_times and times[4321] in kept_times
    # Each kept point is a real reading, not an average.
    real = dict(zip(times.tolist(), values.tolist()))
    assert all(real[t] == v for t, v in zip(kept_times, kept_values))


def test_short_series_pass_whole_and_bad_input_is_refused():
    assert decimate([0.0, 1.0, 2.0], [5, 6, 7], max_points=10) == ([0.0, 1.0, 2.0], [5, 6, 7])
    with pytest.raises(ValueError, match="differ in length"):
        decimate([0.0, 1.0], [1], max_points=10)
    with pytest.raises(ValueError, match="max_points"):
        decimate([0.0], [1], max_points=0)


def test_line_keeps_each_steps_own_peak():
    # Two steps; step 0 peaks at 100, step 1 at 90, each with many readings.
    times = np.linspace(0, 2, 4001)
    values = np.where(times < 1, 10, 20)
    values[500], values[3500] = 100, 90
    series = line("x", times, values, step_starts_s=[0.0, 1.0], max_points=20)
    kept = list(zip(series["time_s"], series["bytes"]))
    assert max(v for t, v in kept if t < 1) == 100
    assert max(v for t, v in kept if t >= 1) == 90
    assert len(kept) <= 40


def test_cpu_series_starts_at_the_first_step_with_the_level_left_by_the_build():
    ns = 1_000_000_000
    timeline = MemoryTimeline(
        time_ns=np.array([0, 1 * ns, 2 * ns, 3 * ns, 4 * ns, 5 * ns]),
        total_bytes=np.array([50, 80, 200, 80, 300, 80]),
        marks=[("build", 0, ns // 2), ("step0", ns // 2 + ns, 3 * ns + ns // 2), ("step1", 3 * ns + ns // 2, 6 * ns)],
    )
    series = cpu_series(timeline, warmup_steps=1, num_steps=2)
    assert series["step_starts_s"] == [0.0, 2.0] and series["end_s"] == 4.5
    allocated = series["lines"]["allocated"]
    assert allocated["time_s"] == [0.0, 0.5, 1.5, 2.5, 3.5, 4.5]
    assert allocated["bytes"] == [80, 200, 80, 300, 80, 80]


def test_cuda_series_keeps_only_readings_inside_the_steps():
    samples = [GpuSample(t, used, 0, 1000, 50) for t, used in [(9.0, 1), (10.5, 400), (11.5, 500), (13.0, 9)]]
    points = [(9.5, 1, 2), (10.2, 100, 200), (10.8, 150, 256), (12.5, 3, 4)]
    series = cuda_series(origin_s=10.0, step_starts_s=[10.0, 11.0], end_s=12.0, warmup_steps=1,
                         torch_points=points, nvml_samples=samples)
    assert series["step_starts_s"] == [0.0, 1.0] and series["end_s"] == 2.0
    assert series["lines"]["nvml_used"]["bytes"] == [400, 500]
    assert series["lines"]["allocated"]["bytes"] == [100, 150]
    assert series["lines"]["reserved"]["bytes"] == [200, 256]
    assert series["lines"]["allocated"]["time_s"] == pytest.approx([0.2, 0.8])


def test_cuda_series_without_nvml_has_torch_lines_only():
    series = cuda_series(origin_s=0.0, step_starts_s=[0.0], end_s=1.0, warmup_steps=0,
                         torch_points=[(0.5, 10, 20)], nvml_samples=[])
    assert set(series["lines"]) == {"allocated", "reserved"}
