from rich.console import Console

from dpplan.reports.profile_table import render_profile

MiB = 1 << 20


def test_cuda_table_names_the_three_numbers_and_the_gaps():
    measured = {
        "peak_allocated_bytes": 100 * MiB, "peak_reserved_bytes": 120 * MiB, "peak_nvml_bytes": 700 * MiB,
        "allocator_cache_bytes": 20 * MiB, "non_pytorch_bytes": 580 * MiB, "step_time_s": 0.25,
        "samples_per_s": 32.0, "tokens_per_s": 16384.0, "per_rank": [],
    }
    estimate = {"peak_allocated_bytes": 101 * MiB, "peak_reserved_bytes": 121 * MiB, "peak_bytes": 650 * MiB}
    document = {
        "device": {"type": "cuda", "description": "2 x NVIDIA H100 80GB HBM3 (1 node, nccl)"},
        "model": {"name": "m.py"},
        "config": {"batch_size": 4, "grad_accum": 1, "precision": "bf16-mixed", "optimizer": "adamw",
                   "warmup_steps": 1, "steps": 5},
        "out_dir": "runs/x",
        "runs": [
            {"strategy": "ddp", "status": "ok", "error": None, "measured": measured, "estimate": estimate,
             "error_pct": 1.0, "notes": []},
            {"strategy": "fsdp2", "status": "oom", "error": "batch 4 does not fit with fsdp2 on 2 GPUs (rank 0: ...)",
             "measured": {"per_rank": []}, "estimate": estimate, "error_pct": None, "notes": ["a note"]},
        ],
    }
    console = Console(width=200, record=True)
    render_profile(document, console)
    text = console.export_text()
    assert "100.00 MiB / 101.00 MiB" in text and "700.00 MiB / 650.00 MiB" in text
    assert "+1.00%" in text and "250.0" in text and "16.38K" in text
    assert "allocator cache (reserved - allocated) up to 20.00 MiB" in text
    assert "NCCL and other (NVML used - reserved) up to 580.00 MiB" in text
    assert "fsdp2: batch 4 does not fit" in text and "note: a note" in text
