"""Models by name: Hugging Face configs (a config.json, a model directory, a Hub id from the cache
or downloaded), timm:NAME and torchvision:NAME, turned into the model-file contract."""

import http.server
import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

transformers = pytest.importorskip("transformers", reason="models by name need transformers (pip install \"dpplan[hf]\")")
import torch  # noqa: E402

from dpplan.cli import main  # noqa: E402
from dpplan.training.model_by_name import Labels, default_seq_len, head_loss  # noqa: E402
from dpplan.training.model_file import ModelFileError, build_module, example_batch_for, load_model_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DECODER = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 64}
ENCODER = {"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "intermediate_size": 128, "max_position_embeddings": 64}
TOWER = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
CONFIGS = {
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": False, **DECODER},
    "llama_tied": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True, **DECODER},
    "t5": {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 1000, "d_model": 64,
           "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4, "decoder_start_token_id": 0},
    "bert_without_architectures": {"model_type": "bert", **ENCODER},
    "bert_classifier": {"model_type": "bert", "architectures": ["BertForSequenceClassification"], **ENCODER,
                        "id2label": {"0": "a", "1": "b", "2": "c"}},
    "vit": {"model_type": "vit", "architectures": ["ViTForImageClassification"], **TOWER, "image_size": 32,
            "patch_size": 4, "id2label": {str(i): str(i) for i in range(10)}},
    "resnet": {"model_type": "resnet", "architectures": ["ResNetForImageClassification"], "embedding_size": 16,
               "hidden_sizes": [16, 32], "depths": [1, 1], "layer_type": "basic"},
    "whisper": {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"], "vocab_size": 1000,
                "num_mel_bins": 80, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 4,
                "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
                "max_source_positions": 100, "max_target_positions": 48, "pad_token_id": 0, "bos_token_id": 1,
                "eos_token_id": 2, "decoder_start_token_id": 1},
    "wav2vec2": {"model_type": "wav2vec2", "architectures": ["Wav2Vec2ForCTC"], "vocab_size": 32, **TOWER,
                 "conv_dim": [32] * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4},
    "clip": {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 64,
             "text_config": {**TOWER, "vocab_size": 1000, "max_position_embeddings": 32, "bos_token_id": 1,
                             "eos_token_id": 2, "pad_token_id": 0},
             "vision_config": {**TOWER, "image_size": 32, "patch_size": 4}},
}


def write_config(folder: Path, name: str, **changes) -> Path:
    """``folder/name/config.json`` from CONFIGS[name] (a config as the Hub holds it: a few keys)."""
    directory = folder / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps({**CONFIGS[name], **changes}))
    return path


def transformers_model(path: Path):
    """The model transformers itself builds from the config, independently of dpplan."""
    config = transformers.AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        return getattr(transformers, config.architectures[0])(config)


def meta_batch(spec, batch_size=2, seq_len=None):
    with torch.device("meta"):
        return example_batch_for(spec, batch_size, seq_len)


def estimate_json(*args):
    result = CliRunner().invoke(main, ["estimate", *map(str, args), "--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# ---- the parameter count and the plan ---------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "llama_tied"])
def test_estimate_by_config_counts_the_parameters_transformers_counts(tmp_path, name):
    """`dpplan estimate dir/config.json --strategy ddp --gpus 2`: exit 0, and the parameter count
    is transformers' own, tied embeddings once (Llama ties lm_head to embed_tokens here)."""
    path = write_config(tmp_path, name)
    data = estimate_json(path, "--strategy", "ddp", "--gpus", "2")
    model = transformers_model(path)
    expected = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (name == "llama_tied")
    assert data["model"]["num_params"] == expected
    assert data["model"]["name"] == str(path)
    assert data["model"]["seq_len"] == 64  # max_position_embeddings 64, under the 2048 cap
    assert [e["strategy"] for e in data["estimates"]] == ["ddp"] and data["estimates"][0]["gpus"] == 2


def test_tied_embeddings_are_counted_once(tmp_path):
    """The same Llama tied and untied: the plans differ by exactly one vocab x hidden matrix."""
    tied = estimate_json(write_config(tmp_path, "llama_tied"), "--strategy", "single", "--gpus", "1")
    untied_path = write_config(tmp_path / "untied", "llama_tied", tie_word_embeddings=False)
    untied = estimate_json(untied_path, "--strategy", "single", "--gpus", "1")
    assert untied["model"]["num_params"] - tied["model"]["num_params"] == DECODER["vocab_size"] * DECODER["hidden_size"]
    assert untied["model"]["num_params"] == sum(p.numel() for p in transformers_model(untied_path).parameters())


def test_seq_len_reaches_a_model_by_name(tmp_path):
    directory = write_config(tmp_path, "qwen2").parent
    short = estimate_json(directory, "--strategy", "single", "--gpus", "1", "--seq-len", "16", "--batch-size", "2")
    assert (short["model"]["seq_len"], short["model"]["tokens_per_micro_batch"]) == (16, 32)
    batch = meta_batch(load_model_file(str(directory)), 3, seq_len=24)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 24)


def test_a_vision_model_is_planned_without_tokens(tmp_path):
    path = write_config(tmp_path, "vit")
    data = estimate_json(path.parent, "--strategy", "single", "--gpus", "1")
    assert data["model"]["seq_len"] is None and data["model"]["tokens_per_micro_batch"] is None
    assert data["model"]["num_params"] == sum(p.numel() for p in transformers_model(path).parameters())


# ---- which class, which batch ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, model_class, inputs",
    [
        ("qwen2", "Qwen2ForCausalLM", {"input_ids": (2, 64), "labels": (2, 64)}),
        ("t5", "T5ForConditionalGeneration", {"input_ids": (2, 2048), "labels": (2, 2048)}),  # no position limit
        ("bert_without_architectures", "BertForMaskedLM", {"input_ids": (2, 64), "labels": (2, 64)}),
        ("bert_classifier", "BertForSequenceClassification", {"input_ids": (2, 64), "labels": (2,)}),
        ("vit", "ViTForImageClassification", {"pixel_values": (2, 3, 32, 32), "labels": (2,)}),
        ("resnet", "ResNetForImageClassification", {"pixel_values": (2, 3, 224, 224), "labels": (2,)}),
        ("whisper", "WhisperForConditionalGeneration", {"input_features": (2, 80, 200), "labels": (2, 32)}),
        ("wav2vec2", "Wav2Vec2ForCTC", {"input_values": (2, 16000), "labels": (2, 16)}),
        ("clip", "CLIPModel", {"input_ids": (2, 32), "pixel_values": (2, 3, 32, 32), "return_loss": None}),
    ],
)
def test_each_kind_of_model_gets_a_batch_its_head_trains_on(tmp_path, name, model_class, inputs):
    """The class from config.architectures (a masked LM where none is named), the inputs its
    main_input_name asks for (shapes on the meta device, at the default sequence), and labels
    that give the head's own loss: the tiny model run for real on CPU (HF models read values
    that the plain meta device does not have; the planner's fake device computes them)."""
    spec = load_model_file(str(write_config(tmp_path, name)))
    assert spec.factory_name == model_class
    batch = meta_batch(spec)
    assert {key: getattr(value, "shape", None) for key, value in batch.items()} == inputs
    model = build_module(spec)
    assert type(model).__name__ == model_class and model.training
    takes_tokens = "input_ids" in batch or name == "whisper"  # a shorter sequence runs faster
    real_batch = example_batch_for(spec, 2, 16 if takes_tokens else None)
    output = model(**real_batch)
    assert output.loss is not None and torch.isfinite(output.loss)
    assert head_loss(output, real_batch) is output.loss
    assert getattr(model.config, "use_cache", False) is False  # no KV cache in training


def test_a_bare_model_trains_on_the_mean_of_its_output(tmp_path):
    spec = load_model_file(str(write_config(tmp_path, "bert_classifier", architectures=["BertModel"])))
    batch = example_batch_for(spec, 2, 8)
    assert set(batch) == {"input_ids"}
    output = build_module(spec)(**batch)
    assert torch.equal(head_loss(output, batch), output.last_hidden_state.float().mean())


@pytest.mark.parametrize(
    "model_type, limits, expected",
    [
        ("roberta", {"max_position_embeddings": 514}, 512),  # 512 tokens + RoBERTa's padding offset of 2
        ("llama", {"max_position_embeddings": 64}, 64),
        ("qwen2", {"max_position_embeddings": 131072}, 2048),  # a long context: capped
        ("gpt2", {"n_positions": 1000}, 512),
        ("mamba", {}, 2048),  # a state-space model: no position limit
    ],
)
def test_default_seq_len_is_a_power_of_two_within_the_position_limit(model_type, limits, expected):
    assert default_seq_len(transformers.AutoConfig.for_model(model_type, **limits)) == expected


def test_seq_len_for_images_is_refused(tmp_path):
    spec = load_model_file(str(write_config(tmp_path, "vit")))
    with pytest.raises(ModelFileError, match=r"--seq-len 128: ViTForImageClassification takes pixel_values, not token"):
        meta_batch(spec, seq_len=128)


def test_labels_follow_the_head():
    from dpplan.training.model_by_name import labels_of

    assert labels_of(transformers.LlamaForCausalLM) is Labels.TOKENS
    assert labels_of(transformers.BertForTokenClassification) is Labels.TOKEN_CLASSES
    assert labels_of(transformers.LlamaModel) is Labels.NONE


# ---- one line, exit 2 -------------------------------------------------------------------------


def cli_error(*args) -> str:
    result = CliRunner().invoke(main, ["estimate", *map(str, args)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_unknown_model_type(tmp_path):
    path = write_config(tmp_path, "qwen2", model_type="qwen99")
    assert "does not know model_type 'qwen99'" in cli_error(path)
    custom = write_config(tmp_path / "custom", "qwen2", model_type="qwen99", auto_map={"AutoConfig": "x.Config"})
    assert "brings its own code, which dpplan does not run" in cli_error(custom)


def test_config_transformers_rejects(tmp_path):
    path = write_config(tmp_path, "llama_tied", num_attention_heads=5)  # transformers' config validation
    assert "not a multiple of the number of attention heads" in cli_error(path)


def test_config_transformers_cannot_build(tmp_path):
    line = cli_error(write_config(tmp_path, "qwen2", hidden_act="no_such_activation"), "--strategy", "single", "--gpus", "1")
    assert "transformers cannot build Qwen2ForCausalLM from this config: KeyError: 'no_such_activation'" in line


def test_broken_and_incomplete_config_files(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_type": "llama",')
    assert "broken.json: not valid JSON: line 1" in cli_error(broken)
    untyped = tmp_path / "untyped.json"
    untyped.write_text('{"hidden_size": 64}')
    assert "untyped.json: no model_type" in cli_error(untyped)


def test_paths_that_name_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "holds no config.json" in cli_error(tmp_path / "empty")
    assert "config file not found" in cli_error(tmp_path / "missing.json")
    assert "is not a model file (.py), a config.json, a model directory or a Hugging Face model id" in cli_error("./no/such/dir")
    (tmp_path / "notes.txt").write_text("x")
    assert "must be a .py file or a Hugging Face config .json" in cli_error(tmp_path / "notes.txt")


def test_without_transformers_the_extra_is_named(tmp_path, monkeypatch):
    """A missing transformers (an import that fails, as in an environment without the extra)."""
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelFileError, match=r'needs transformers: pip install "dpplan\[hf\]"'):
        load_model_file(str(write_config(tmp_path, "qwen2")))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ModelFileError, match=r'needs huggingface_hub: pip install "dpplan\[hf\]"'):
        load_model_file("org/model")


# ---- the Hugging Face cache and the Hub, in a fresh process with the user's environment -------


def write_cache(cache: Path, repo_id: str, config: dict | None, commit: str = "0123abcd" * 5) -> Path:
    """The layout huggingface_hub writes: refs/main names a commit, snapshots/<commit>/ holds
    the files; a file known missing is an empty file under .no_exist/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    if config is None:
        (repo / ".no_exist" / commit).mkdir(parents=True, exist_ok=True)
        (repo / ".no_exist" / commit / "config.json").write_text("")
        return repo
    path = repo / "snapshots" / commit / "config.json"
    path.write_text(json.dumps(config))
    return path


FIND_CONFIG = """
import sys
from dpplan.training.hub_config import find_config
from dpplan.training.model_file import ModelFileError
try:
    print(find_config(sys.argv[1]))
except ModelFileError as exc:
    print("error:", exc)
"""


def find_config_in_process(model: str, **env) -> str:
    """What ``find_config`` answers in a fresh process with ``env`` (huggingface_hub reads
    HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT when it is imported)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(env, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", FIND_CONFIG, model], env=environment, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_cached_hub_model_is_planned_offline(tmp_path):
    """`dpplan estimate org/name` with HF_HUB_OFFLINE=1 and the config in HF_HUB_CACHE: the real CLI."""
    cached = write_cache(tmp_path / "hub", "tiny-org/tiny-qwen2", CONFIGS["qwen2"])
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "dpplan.cli", "estimate", "tiny-org/tiny-qwen2", "--strategy", "single",
                           "--gpus", "1", "--json", "-"], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)["model"]
    assert (model["name"], model["path"]) == ("tiny-org/tiny-qwen2", str(cached))
    assert model["num_params"] == sum(p.numel() for p in transformers_model(cached).parameters())


def test_hf_home_locates_the_cache(tmp_path):
    cached = write_cache(tmp_path / "home" / "hub", "tiny-org/tiny-qwen2", CONFIGS["qwen2"])
    assert find_config_in_process("tiny-org/tiny-qwen2", HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1") == str(cached)


def test_offline_and_not_cached_is_one_line(tmp_path):
    line = find_config_in_process("Qwen/Qwen2.5-7B", HF_HUB_CACHE=str(tmp_path / "empty"), HF_HUB_OFFLINE="1")
    assert line.startswith("error: Qwen/Qwen2.5-7B: no such file or directory here")
    assert "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE is set" in line


def test_a_config_known_missing_in_the_cache(tmp_path):
    write_cache(tmp_path / "hub", "tiny-org/weights-only", None)
    line = find_config_in_process("tiny-org/weights-only", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    assert line == "error: tiny-org/weights-only: no such file or directory here, and the Hub model " \
                   "tiny-org/weights-only has no config.json (Hugging Face cache)"


class FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's file endpoint (``/{repo}/resolve/{revision}/{file}``) for one repository holding
    only a config.json; any other repository answers as the Hub does for an unknown one. The
    network is the edge here: no test reaches huggingface.co."""

    config = json.dumps(CONFIGS["qwen2"]).encode()
    served = "/tiny-org/served/resolve/main/config.json"
    requests: list[str] = []

    def answer(self, with_body: bool):
        type(self).requests.append(self.path)
        if self.path == self.served:
            self.send_response(200)
            self.send_header("X-Repo-Commit", "f" * 40)
            self.send_header("ETag", '"config-etag"')
            self.send_header("Content-Length", str(len(self.config)))
            self.end_headers()
            if with_body:
                self.wfile.write(self.config)
            return
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")  # what huggingface_hub reads as RepositoryNotFoundError
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):  # noqa: N802 (http.server's names)
        self.answer(False)

    def do_GET(self):  # noqa: N802
        self.answer(True)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    FakeHub.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_online_only_config_json_is_downloaded(tmp_path, fake_hub):
    cache = tmp_path / "hub"
    path = find_config_in_process("tiny-org/served", HF_HUB_CACHE=str(cache), HF_ENDPOINT=fake_hub)
    assert Path(path).parent.parent == cache / "models--tiny-org--served" / "snapshots"
    assert json.loads(Path(path).read_text()) == CONFIGS["qwen2"]
    assert {p for p in FakeHub.requests if "/resolve/" in p} == {FakeHub.served}
    # the second time it is in the cache: nothing is asked of the Hub
    FakeHub.requests = []
    assert find_config_in_process("tiny-org/served", HF_HUB_CACHE=str(cache), HF_ENDPOINT=fake_hub) == path
    assert not [p for p in FakeHub.requests if "/resolve/" in p]


def test_online_an_unknown_model_is_one_line(tmp_path, fake_hub):
    line = find_config_in_process("tiny-org/no-such-model", HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=fake_hub)
    assert line == "error: tiny-org/no-such-model: no such file or directory here, and the Hugging Face Hub has no " \
                   "model tiny-org/no-such-model (or it is private: hf auth login)"


# ---- timm and torchvision ----------------------------------------------------------------------


@pytest.mark.parametrize("library, name", [("timm", "resnet18"), ("torchvision", "resnet18")])
def test_image_classifier_libraries(library, name):
    try:
        __import__(library)
    except Exception as exc:  # PyPI's torchvision raises beside a CPU build of torch; timm imports torchvision
        pytest.skip(f"{library} does not import here ({type(exc).__name__}: {exc}): not installed with the test "
                    "extra, since PyPI's torchvision (which timm imports) does not import beside a CPU build of torch")
    spec = load_model_file(f"{library}:{name}")
    batch = meta_batch(spec)
    assert batch.shape == (2, 3, 224, 224)
    with torch.device("meta"):
        model = build_module(spec)
        loss = spec.loss_fn(model(batch), batch)
    assert loss.shape == () and sum(p.numel() for p in model.parameters()) == 11_689_512  # ResNet-18 (He et al. 2016)
    assert spec.name == f"{library}:{name}"


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_a_missing_image_library_is_one_line(library):
    if importlib.util.find_spec(library) is not None:
        pytest.skip(f"{library} is installed")
    with pytest.raises(ModelFileError, match=rf"^{library}:resnet18 needs {library}"):
        load_model_file(f"{library}:resnet18")
