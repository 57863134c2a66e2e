"""The CPU measurement method itself, checked on a model whose bytes are known exactly."""

import gc

import torch

from dpplan.profiler.cpu_memory import CpuMemoryRecorder


def test_levels_are_exact_tensor_bytes():
    # The accounting is process-wide and, once switched on (an earlier test may have), counts
    # every tensor allocated since, in this pytest process too: levels are measured from the
    # level at the start, with the garbage collector held still so nothing older is freed meanwhile.
    gc.collect()
    gc.disable()
    try:
        recorder = CpuMemoryRecorder(keep_allocations=True).start()
        with recorder.mark("build"):
            model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters())
        batch = torch.randn(16, 256)
        with recorder.mark("step"):
            model(batch).float().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        timeline = recorder.stop()
    finally:
        gc.enable()
    build_start, build_end = timeline.mark_spans("build")[0]
    first = next(a for a in timeline.allocations if a.time_ns >= build_start)
    before = first.total_bytes - first.delta_bytes  # the level just before the build allocated

    assert recorder.process_wide, "c10's FLAGS_caffe2_report_cpu_memory_usage was not found"
    assert timeline.level_at(build_end) - before == param_bytes
    step_start, step_end = timeline.mark_spans("step")[0]
    # After the first AdamW step: parameters, exp_avg and exp_avg_sq, a 4-byte step per
    # parameter tensor, and the batch.
    assert timeline.level_at(step_end) - before == 3 * param_bytes + 4 * 4 + batch.numel() * 4
    assert timeline.peak_between(step_start, step_end) > timeline.level_at(step_end)
