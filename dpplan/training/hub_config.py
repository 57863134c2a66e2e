"""Find the Hugging Face ``config.json`` a MODEL argument names: a config file, a model
directory holding one, or a Hub model id (``org/name``).

A Hub id is looked up in the local Hugging Face cache first (``HF_HOME`` / ``HF_HUB_CACHE``,
as ``huggingface_hub`` resolves them), so a cached model is planned without the network; only
when it is not cached, and ``HF_HUB_OFFLINE`` is not set, is its ``config.json`` (that one
file, no weights) downloaded into the cache. Every failure is one ``ModelFileError`` line.
This module imports nothing heavy (no torch, no transformers).
"""

from __future__ import annotations

import logging
from pathlib import Path

from dpplan.training.model_file import ModelFileError

CONFIG_NAME = "config.json"
HF_EXTRA = 'pip install "dpplan[hf]"'
"""What installs transformers and huggingface_hub for planning models by name (pyproject.toml)."""


def find_config(model: str) -> Path:
    """The absolute path of the ``config.json`` that ``model`` names; raises ModelFileError."""
    path = Path(model)
    if path.is_file():
        if path.suffix != ".json":
            raise ModelFileError(f"model file must be a .py file or a Hugging Face config .json: {path}")
        return path.resolve()
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.is_file():
            raise ModelFileError(f"model directory {path} holds no {CONFIG_NAME} (a Hugging Face model directory has one)")
        return config.resolve()
    if path.suffix == ".json":
        raise ModelFileError(f"config file not found: {path}")
    return hub_config(model)


def hub_config(repo_id: str) -> Path:
    """``config.json`` of the Hub model ``repo_id``: from the cache, else downloaded unless offline."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        raise ModelFileError(f"{repo_id}: planning a Hugging Face model by name needs huggingface_hub: {HF_EXTRA}") from None
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelFileError(
            f"MODEL {repo_id!r} is not a model file (.py), a config.json, a model directory or a Hugging Face "
            "model id (org/name)"
        ) from None
    cached = huggingface_hub.try_to_load_from_cache(repo_id, CONFIG_NAME)
    if isinstance(cached, str):
        return Path(cached)
    not_local = f"{repo_id}: no such file or directory here"
    if cached is not None:  # the cache recorded that the repository has no config.json
        raise ModelFileError(f"{not_local}, and the Hub model {repo_id} has no {CONFIG_NAME} (Hugging Face cache)")
    if constants.is_offline_mode():
        raise ModelFileError(
            f"{not_local}, and the Hub model {repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            "while HF_HUB_OFFLINE is set: unset it to download its config.json, or pass a config.json"
        )
    return Path(_download_config(repo_id, not_local))


def _download_config(repo_id: str, not_local: str) -> str:
    """Download ``config.json`` alone; the Hub's answers as one line each."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub logs each retry of an unreachable Hub as a warning; the error below is the one line
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        return hf_hub_download(repo_id, CONFIG_NAME, library_name="dpplan")
    except GatedRepoError:  # before RepositoryNotFoundError, its base class
        raise ModelFileError(
            f"{repo_id} is a gated model: accept its terms on huggingface.co and log in (hf auth login), "
            "or pass a copy of its config.json"
        ) from None
    except RepositoryNotFoundError:
        raise ModelFileError(
            f"{not_local}, and the Hugging Face Hub has no model {repo_id} (or it is private: hf auth login)"
        ) from None
    except RevisionNotFoundError:
        raise ModelFileError(f"{repo_id}: the Hugging Face Hub has no main revision of this model") from None
    except RemoteEntryNotFoundError:
        raise ModelFileError(f"{repo_id}: the Hub model has no {CONFIG_NAME}") from None
    except (LocalEntryNotFoundError, OSError) as exc:  # no network, a proxy, a timeout, an HTTP error
        raise ModelFileError(
            f"{not_local}, its config.json is not in the Hugging Face cache, and the Hub cannot be reached "
            f"({_first_line(_root_cause(exc))}): pass a config.json, or copy the model's cache here"
        ) from None
    finally:
        hub_logger.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: huggingface_hub wraps a DNS or connection failure in its own."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 120 else text[:117].rstrip() + "..."

