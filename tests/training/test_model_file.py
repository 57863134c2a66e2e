import pytest

from dpplan.training.model_file import BUNDLED_MODEL, ModelFileError, build_module, load_model_file, split_model_argument


def test_bundled_model_is_the_default():
    spec = load_model_file(None)
    assert spec.path == BUNDLED_MODEL
    assert spec.name == "default_gpt.py"


def test_named_factory(write_model):
    path = write_model(
        """
        import torch
        def small(): return torch.nn.Linear(2, 2)
        def example_batch(b): return torch.zeros(b, 2)
        """
    )
    spec = load_model_file(f"{path}:small")
    assert spec.factory_name == "small"
    assert isinstance(build_module(spec), __import__("torch").nn.Linear)


def test_split_keeps_paths_with_colons_that_are_not_factories():
    assert split_model_argument("C:/models/m.py") == (__import__("pathlib").Path("C:/models/m.py"), "build_model")


def test_missing_file():
    with pytest.raises(ModelFileError, match="model file not found: nowhere.py"):
        load_model_file("nowhere.py")


def test_not_a_python_file(tmp_path):
    other = tmp_path / "model.txt"
    other.write_text("x")
    with pytest.raises(ModelFileError, match="must be a .py file"):
        load_model_file(str(other))


def test_syntax_error_names_file_and_line(write_model):
    path = write_model("import torch\ndef build_model(:\n    pass\n")
    with pytest.raises(ModelFileError, match=r"model.py:2: SyntaxError"):
        load_model_file(path)


def test_exception_while_importing_names_file_and_line(write_model):
    path = write_model("import torch\n\nraise RuntimeError('no data here')\n")
    with pytest.raises(ModelFileError, match=r"error importing model.py:3: RuntimeError: no data here"):
        load_model_file(path)


def test_no_factory(write_model):
    path = write_model("def example_batch(b): return None\n")
    with pytest.raises(ModelFileError, match=r"defines no function build_model\(\)"):
        load_model_file(path)


def test_named_factory_missing(write_model):
    path = write_model("def build_model(): pass\ndef example_batch(b): return None\n")
    with pytest.raises(ModelFileError, match=r"defines no function make_it\(\)"):
        load_model_file(f"{path}:make_it")


def test_no_example_batch(write_model):
    path = write_model("import torch\ndef build_model(): return torch.nn.Linear(2, 2)\n")
    with pytest.raises(ModelFileError, match="example_batch"):
        load_model_file(path)


def test_factory_returns_no_module(write_model):
    path = write_model("def build_model(): return 42\ndef example_batch(b): return None\n")
    spec = load_model_file(path)
    with pytest.raises(ModelFileError, match=r"build_model\(\) returned int, not a torch.nn.Module"):
        build_module(spec)


def test_factory_raises_names_file_and_line(write_model):
    path = write_model("def build_model():\n    return 1 / 0\ndef example_batch(b): return None\n")
    spec = load_model_file(path)
    with pytest.raises(ModelFileError, match=r"build_model\(\) failed: model.py:2: ZeroDivisionError"):
        build_module(spec)
