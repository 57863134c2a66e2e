"""The CPU measurement method itself, checked on a model whose bytes are known exactly."""

import torch

from dpplan.profiler.cpu_memory import CpuMemoryRecorder


def test_levels_are_exact_tensor_bytes():
    recorder = CpuMemoryRecorder().start()
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

    assert recorder.process_wide, "c10's FLAGS_caffe2_report_cpu_memory_usage was not found"
    build_end = timeline.mark_spans("build")[0][1]
    assert timeline.level_at(build_end) == param_bytes
    step_start, step_end = timeline.mark_spans("step")[0]
    # After the first AdamW step: parameters, exp_avg and exp_avg_sq, a 4-byte step per
    # parameter tensor, and the batch.
    assert timeline.level_at(step_end) == 3 * param_bytes + 4 * 4 + batch.numel() * 4
    assert timeline.peak_between(step_start, step_end) > timeline.level_at(step_end)
