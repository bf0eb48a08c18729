"""Exported models (config + safetensors), atomic writes and safe checkpoint loading.

An exported model is a directory::

    config.json        {"model_type": "PixelCNN", "config": {...}, "format_version": 1, ...}
    model.safetensors  the state dict (parameters and persistent buffers)

No pickle is ever read: exports are safetensors, Lightning checkpoints load with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from vqprior.config import Config

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# model_type -> "module:Class"; imported lazily so that loading one kind never imports the other.
MODEL_TYPES = {
    "VQVAE": "vqprior.models.vqvae:VQVAE",
    "PixelCNN": "vqprior.models.pixelcnn:PixelCNN",
}

M = TypeVar("M", bound="PretrainedMixin")


class CheckpointError(ValueError):
    """A checkpoint or exported model is missing, corrupt, unsafe or of the wrong kind."""


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def safe_torch_load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors; a pickle that runs code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        text = str(err)
        if "Unsupported global" in text or "not an allowed global" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"refused to load {path}: it holds pickled objects other than tensors "
                "(possibly unsafe); only vqprior/Lightning checkpoints are accepted"
            ) from None
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({first[:120]})") from None


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: str | os.PathLike[str]) -> str:
    """Hash of an exported model directory (config and weights): its identity for stage two."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update(file_sha256(path / name).encode())
    return digest.hexdigest()[:16]


def _read_export(path: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_dir():
        raise CheckpointError(f"{path} is not an exported model directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    cfg_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{path} is not an exported vqprior model: {f.name} is missing")
    try:
        meta = json.loads(cfg_file.read_text())
        model_type, config = meta["model_type"], meta["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{cfg_file} is corrupt or not a vqprior model config") from None
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_file} is corrupt or truncated ({err})") from None
    return model_type, config, state


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from one config."""

    model_type: ClassVar[str]
    config_class: ClassVar[type[Config]]
    config: Config

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into directory ``path`` atomically."""
        from safetensors.torch import save_file

        assert isinstance(self, nn.Module)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        with atomic_path(path / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"model_type": self.model_type})
        meta = {
            "model_type": self.model_type,
            "config": self.config.to_dict(),
            "format_version": FORMAT_VERSION,
            "vqprior_version": _version(),
        }
        atomic_write_text(path / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls: type[M], path: str | os.PathLike[str]) -> M:
        model = load_pretrained(path)
        if not isinstance(model, cls):
            raise CheckpointError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def load_pretrained(path: str | os.PathLike[str]) -> nn.Module:
    """Load an exported VQVAE or PixelCNN (in eval mode) from ``path``; no Lightning needed."""
    path = Path(path)
    model_type, config, state = _read_export(path)
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{path}: unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    module_name, cls_name = MODEL_TYPES[model_type].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    model = cls(cls.config_class.from_dict(config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.eval()


def _version() -> str:
    from vqprior import __version__

    return __version__
