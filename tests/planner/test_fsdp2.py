"""fully_shard (FSDP2): sharding, resharding after forward, offload. Byte-exact checks against
real runs are in tests/profiler/test_cpu_accuracy.py and benchmarks/accuracy.py."""

from pathlib import Path

import pytest

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.estimate import estimate


def plan(tiny_gpt, gpus, device="cuda", **options):
    options.setdefault("precision", "fp32")
    config = PlanConfig(run=RunSpec(model=tiny_gpt, **options), strategies=("fsdp2", "ddp"), gpus=gpus, device=device)
    return {(e.strategy, e.gpus): e for e in estimate(config).estimates}


def test_state_shrinks_with_the_shard_count(tiny_gpt):
    estimates = plan(tiny_gpt, (2, 8))
    ddp = estimates[("ddp", 2)].breakdown
    two, eight = estimates[("fsdp2", 2)].breakdown, estimates[("fsdp2", 8)].breakdown
    assert eight["optimizer"] < two["optimizer"] < ddp["optimizer"]
    # (parameters at the peak include the unsharded units in use, so they do not fall as 1/N)


def test_peak_below_ddp_and_falls_with_more_gpus(tiny_gpt):
    estimates = plan(tiny_gpt, (2, 8), device="cpu")
    assert estimates[("fsdp2", 8)].peak_bytes < estimates[("fsdp2", 2)].peak_bytes < estimates[("ddp", 2)].peak_bytes


def test_offload_moves_sharded_state_to_the_host(tiny_gpt):
    kept = plan(tiny_gpt, (4,))[("fsdp2", 4)]
    offloaded = plan(tiny_gpt, (4,), offload="optimizer+params")[("fsdp2", 4)]
    assert kept.host_bytes is None
    assert offloaded.breakdown["optimizer"] == 0
    assert offloaded.host_bytes > kept.breakdown["optimizer"]
    assert offloaded.peak_allocated_bytes < kept.peak_allocated_bytes


def test_a_model_with_a_scalar_parameter_is_refused_as_fsdp_refuses_it(write_model):
    """CLIP's logit_scale: FSDP1 and fully_shard raise at wrap time; the plan says so instead of
    planning a run that cannot start, and plans the other strategies."""
    path = write_model(
        """
        import torch
        class M(torch.nn.Module):
            def __init__(self):
                super().__init__(); self.fc = torch.nn.Linear(4, 4); self.scale = torch.nn.Parameter(torch.tensor(1.0))
            def forward(self, x):
                return (self.fc(x) * self.scale).sum()
        def build_model(): return M()
        def example_batch(b): return torch.randn(b, 4)
        """
    )
    plan = estimate(PlanConfig(run=RunSpec(model=path), strategies=("ddp", "fsdp-full", "fsdp2"), gpus=(2,), device="cpu"))
    assert [e.strategy for e in plan.estimates] == ["ddp"]
    assert "FSDP doesn't support scalar parameters: scale" in plan.unsupported["fsdp-full"]
    assert "fully_shard doesn't support scalar parameters: scale" in plan.unsupported["fsdp2"]
    with pytest.raises(ValueError, match="fully_shard doesn't support scalar parameters"):
        estimate(PlanConfig(run=RunSpec(model=path), strategies=("fsdp2",), gpus=(2,), device="cpu"))


def test_dim_0_padding_of_stacked_experts_is_named(tiny_gpt):
    """FSDP2 shards dim 0: the zoo Mixtral's experts (4 stacked rows) on 8 ranks are one row on
    every rank; the plan says so. The bundled-size GPT's parameters have rows to spare."""
    pytest.importorskip("transformers")
    mixtral = str(Path(__file__).parents[2] / "benchmarks" / "models" / "hf" / "mixtral.py")

    def notes(model):
        config = PlanConfig(run=RunSpec(model=model), strategies=("fsdp2",), gpus=(8,))
        return [n for n in estimate(config).estimates[0].notes if "shards dim 0" in n]

    (note,) = notes(mixtral)
    assert "experts.gate_up_proj [4, 256, 64] has fewer rows than its 8 shard ranks" in note
    assert notes(tiny_gpt) == []
