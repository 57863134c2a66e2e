"""--deepspeed-config: a user's DeepSpeed file read into the run it describes, "auto" filled as
Hugging Face's Trainer fills it, every key planned or refused by name; and what its settings
change in the plan. Real DeepSpeed runs of these files: tests/profiler/test_cpu_accuracy.py."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpplan.config import PlanConfig, RunSpec
from dpplan.planner.deepspeed_config import merge_with_flags, read_deepspeed_config, resolve_for_model
from dpplan.planner.estimate import estimate
from dpplan.planner.strategies.zero_settings import ZeroSettings
from dpplan.planner.strategies.zero_stage3 import sub_group_numels

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "deepspeed_configs"
FLAGS = {"strategies": ("ddp",), "precision": "bf16-mixed", "offload": "none", "optimizer": "adamw",
         "batch_size": 4, "grad_accum": 2}


def write(tmp_path, config: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_hf_zero3_file_with_auto_values():
    run = read_deepspeed_config(str(CONFIGS / "hf_zero3_auto.json"))
    assert run.strategy == "zero3" and run.precision is None and run.offload == "none"
    assert run.optimizer == "adamw" and run.batch_size is None and run.grad_accum is None
    assert run.zero.overlap_comm is True
    assert set(run.zero.hidden_size_auto) == {"reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold"}
    settings = merge_with_flags(run, FLAGS, set(), (8,))
    assert settings["strategies"] == ("zero3",)
    assert (settings["precision"], settings["batch_size"], settings["grad_accum"]) == ("bf16-mixed", 4, 2)
    # HfTrainerDeepSpeedConfig.trainer_config_finalize: hidden^2, 0.9 hidden^2, 10 hidden
    model = SimpleNamespace(config=SimpleNamespace(hidden_size=64))
    zero = resolve_for_model(settings["zero"], model)
    assert (zero.reduce_bucket_size, zero.prefetch_bucket_size, zero.param_persistence_threshold) == (4096, 3686, 640)
    assert zero.hidden_size_auto == ()


def test_auto_needs_a_hidden_size():
    run = read_deepspeed_config(str(CONFIGS / "hf_zero2_auto.json"))
    with pytest.raises(ValueError, match="no config.hidden_size"):
        resolve_for_model(run.zero, SimpleNamespace())


def test_precision_sections(tmp_path):
    def precision(config):
        return read_deepspeed_config(write(tmp_path, {"zero_optimization": {"stage": 2}, **config}))

    assert precision({}).precision == "fp32"
    assert precision({"bf16": {"enabled": True}}).precision == "bf16-mixed"
    assert precision({"fp16": {"enabled": True}}).precision == "fp16-mixed"
    autocast = precision({"torch_autocast": {"enabled": True, "dtype": "float16"}})
    assert autocast.precision == "fp16-mixed" and autocast.zero.torch_autocast
    # a model already in bf16 under the "bf16" section
    bf16 = merge_with_flags(precision({"bf16": {"enabled": True}}), {**FLAGS, "precision": "bf16"}, set(), (2,))
    assert bf16["precision"] == "bf16"


@pytest.mark.parametrize(("config", "message"), [
    ({"zero_optimization": {"stage": 2}, "amp": {"enabled": True}}, '"amp" is not planned'),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"},
                            "offload_optimizer": {"device": "nvme"}}}, "NVMe offload"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, r"ZeRO\+\+ quantized weights"),
    ({"zero_optimization": {"stage": 3, "mics_shard_size": 8}}, "MiCS"),
    ({"zero_optimization": {"stage": 2, "contiguous_gradients": False}}, "non-contiguous"),
    ({"zero_optimization": {"stage": 2, "some_new_knob": 1}}, "zero_optimization.some_new_knob"),
    ({"zero_optimization": {"stage": 0}}, "stage 0 is data parallelism"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "fp16": {"enabled": True}}, "at most one"),
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "Lamb"}}, "'Lamb' is not planned"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "stage-3 option"),
])
def test_what_is_not_planned_is_named(tmp_path, config, message):
    with pytest.raises(ValueError, match=message):
        read_deepspeed_config(write(tmp_path, config))


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        read_deepspeed_config(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        read_deepspeed_config(str(tmp_path / "bad.json"))


def test_flags_typed_against_the_file_are_errors(tmp_path):
    run = read_deepspeed_config(write(tmp_path, {
        "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1, "train_batch_size": 32,
    }))
    assert merge_with_flags(run, FLAGS, set(), (4,))["batch_size"] == 8  # the file's, over a default flag
    with pytest.raises(ValueError, match="--batch-size 4 contradicts"):
        merge_with_flags(run, FLAGS, {"batch_size"}, (4,))
    with pytest.raises(ValueError, match="--strategy ddp contradicts"):
        merge_with_flags(run, FLAGS, {"strategies"}, (4,))
    with pytest.raises(ValueError, match="train_batch_size 32"):
        merge_with_flags(run, FLAGS, set(), (8,))


def test_bucket_size_and_overlap_change_the_zero2_plan(tiny_gpt):
    def peak(zero):
        run = RunSpec(model=tiny_gpt, precision="fp32", zero=zero)
        config = PlanConfig(run=run, strategies=("zero2",), gpus=(2,), device="cpu")
        return estimate(config).estimates[0].peak_bytes

    default = peak(ZeroSettings())
    small = peak(ZeroSettings(reduce_bucket_size=100_000))
    doubled = peak(ZeroSettings(reduce_bucket_size=100_000, overlap_comm=True))
    # the default bucket is 5e8 fp32 elements, whatever the model size
    assert default - small > 1.9e9
    # overlap_comm: a second bucket buffer (stage_1_and_2.py setup_buckets)
    assert doubled - small == 100_000 * 4


def test_settings_only_for_deepspeed_stages(tiny_gpt):
    with pytest.raises(ValueError, match="apply to zero1, zero2 and zero3 only"):
        PlanConfig(run=RunSpec(model=tiny_gpt, zero=ZeroSettings(reduce_bucket_size=10)), strategies=("ddp",))
    with pytest.raises(ValueError, match="torch_autocast needs"):
        PlanConfig(run=RunSpec(model=tiny_gpt, precision="fp32", zero=ZeroSettings(torch_autocast=True)), strategies=("zero2",))


def test_sub_groups_follow_deepspeed():
    # stage3.py _create_fp16_sub_groups: parameters added until a group reaches sub_group_size
    assert sub_group_numels([10, 20, 30], 1_000) == [60]
    assert sub_group_numels([10, 20, 30, 5], 25) == [30, 30, 5]
