"""Exported models (config + safetensors), atomic writes and safe checkpoint loading.

An exported model is a directory::

    config.json        {"model_type": "PixelCNN", "config": {...}, "format_version": 1, ...}
    model.safetensors  the state dict (parameters and persistent buffers)
    README.md          the model card (vqprior.card); not part of the content hash
    vae.json           a codes prior's record of its VAE

No pickle is ever read: exports are safetensors, Lightning checkpoints load with
``weights_only=True``. A hub id ("user/name") loads through :mod:`vqprior.hub`, which
imports the optional huggingface_hub only then.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from vqprior.card import CARD_NAME, model_card
from vqprior.config import Config, ConfigError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# model_type -> "module:Class"; imported lazily so that loading one kind never imports the other.
MODEL_TYPES = {
    "VQVAE": "vqprior.models.vqvae:VQVAE",
    "PixelCNN": "vqprior.models.pixelcnn:PixelCNN",
}

M = TypeVar("M", bound="PretrainedMixin")
_DIR_FD = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")  # POSIX: read via a dir fd


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
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_error(path: Path, err: OSError) -> OSError:
    """One line for a failed atomic write (a full disk, no permission): what was not written,
    why, and that the previous version was left in place. Same errno, so same OSError kind."""
    reason = err.strerror or str(err) or type(err).__name__
    return OSError(
        err.errno, f"cannot write {path} ({reason}); the previous version, if any, is left in place"
    )


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
    # through a Python file object: a full disk raises OSError(ENOSPC), not a RuntimeError
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(obj, fh)


def safe_torch_load(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors; a pickle that runs code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "pickle protocol 4": the error says it all
            return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError as err:
        raise CheckpointError(f"cannot read checkpoint {path} ({err.strerror or err})") from None
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(_load_error(path, str(err), type(err).__name__)) from None


def _load_error(path: Path, text: str, kind: str) -> str:
    """One line for a failed ``torch.load(weights_only=True)`` of ``path``."""
    if "Weights only load failed" in text or "Unsupported global" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f"it would import {found.group(1)}" if found else "it holds pickled objects"
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
        if not found and detail:
            what += f" ({detail.group(1).strip()[:80]})"
        return (
            f"refused to load {path}: {what}, not only tensors and plain values "
            "(possibly unsafe); only vqprior/Lightning checkpoints are accepted"
        )
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0][:120] if lines else kind
    return f"checkpoint {path} is corrupt or truncated ({first})"


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_hash(path: str | os.PathLike[str]) -> str:
    """Hash of an exported model directory (config and weights): its identity for stage two.

    Only ``config.json`` and ``model.safetensors`` count: the card (README.md) and vae.json
    may be written or refreshed at any time without changing the identity a prior records.
    """
    digest = hashlib.sha256()
    for data in _read_files(Path(path), (CONFIG_NAME, WEIGHTS_NAME)):  # both of one save
        digest.update(hashlib.sha256(data).hexdigest().encode())
    return digest.hexdigest()[:16]


def _read_files(path: Path, names: tuple[str, ...]) -> list[bytes]:
    """The bytes of ``names`` in directory ``path``, all from the same directory instance.

    The directory is opened once and the files are read relative to it, so a concurrent
    :meth:`PretrainedMixin.save_pretrained` that swaps ``path`` cannot mix two saves.
    """
    if not _DIR_FD:
        return [(path / name).read_bytes() for name in names]
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = []
        for name in names:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as fh:
                out.append(fh.read())
        return out
    finally:
        os.close(dir_fd)


def _export_dir(path: Path) -> Path:
    """``path``, or the previous export that a save interrupted mid-swap set aside."""
    if path.exists():
        return path
    olds = sorted(path.parent.glob(f".{path.name}.old-*.tmp")) if path.parent.is_dir() else []
    complete = [d for d in olds if (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()]
    if complete:
        logger.warning("%s is missing (a save was interrupted); loading %s", path, complete[-1])
        return complete[-1]
    return path


def _read_export(path: Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    path = _export_dir(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not an exported model directory (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    for _ in range(3):  # a file vanishing under us means a save swapped the dir: read again
        try:
            cfg_bytes, weights = _read_files(path, (CONFIG_NAME, WEIGHTS_NAME))
            break
        except FileNotFoundError as err:
            missing = Path(err.filename or "").name or "a file"
            if not path.is_dir() or not (path / missing).is_file():
                raise CheckpointError(
                    f"{path} is not an exported vqprior model: {missing} is missing"
                ) from None
        except OSError as err:
            raise CheckpointError(f"cannot read {path} ({err.strerror or err})") from None
    else:
        raise CheckpointError(f"{path} kept changing while it was read: try again")
    try:
        meta = json.loads(cfg_bytes)
        model_type, config = meta["model_type"], meta["config"]
        if not isinstance(config, dict):
            raise TypeError("config is not a mapping")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(
            f"{path / CONFIG_NAME} is corrupt or not a vqprior model config"
        ) from None
    try:
        state = load_bytes(weights)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path / WEIGHTS_NAME} is corrupt or truncated ({err})") from None
    return model_type, config, state


def _check_replaceable(path: Path) -> None:
    """Refuse to replace a directory that is not an exported model (a run dir, a home dir)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(f"cannot save a model to {path}: it is a file")
    entries = list(path.iterdir())
    is_export = (path / CONFIG_NAME).is_file() or (path / WEIGHTS_NAME).is_file()
    if entries and (not is_export or any(e.is_dir() for e in entries)):
        names = ", ".join(sorted(e.name for e in entries)[:3])
        raise CheckpointError(
            f"cannot save a model to {path}: it holds other files ({names}); "
            "use a new or empty directory"
        )


def replace_dir(staging: Path, path: Path) -> None:
    """Move the complete directory ``staging`` to ``path``, replacing any old ``path`` as a unit.

    The old directory is renamed aside (``.<name>.old-*.tmp``) and removed only once the new
    one is in place; a crash in between leaves it there, where :func:`load_pretrained` finds it.
    """
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}.tmp")
        os.replace(path, old)
    os.replace(staging, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.old-*.tmp"):  # from an interrupted save
        shutil.rmtree(stale, ignore_errors=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_dir(path: str | os.PathLike[str], files: Mapping[str, bytes]) -> Path:
    """Create or replace directory ``path`` holding exactly ``files`` (name -> bytes), as a unit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", suffix=".tmp", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; give the usual mode
        for name, data in files.items():
            _write_file(staging / name, data)
            os.chmod(staging / name, 0o666 & ~umask)
        _fsync_dir(staging)
        replace_dir(staging, path)
    except OSError as err:
        raise write_error(path, err) from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from one config."""

    model_type: ClassVar[str]
    config_class: ClassVar[type[Config]]
    config: Config

    def save_pretrained(
        self, path: str | os.PathLike[str], extra_files: Mapping[str, str | bytes] | None = None
    ) -> Path:
        """Write ``config.json``, ``model.safetensors``, a model card ``README.md`` (and
        ``extra_files``, name -> content; a ``README.md`` there replaces the generated card)
        into directory ``path`` as one unit.

        The files go to a temp sibling directory, are fsynced, and the directory is swapped in
        for ``path`` (:func:`replace_dir`): a crash or error at any moment leaves the previous
        export whole. An existing ``path`` must be an exported model (or empty); it is replaced
        as a whole, files of the old export included.
        """
        from safetensors.torch import save as save_bytes

        assert isinstance(self, nn.Module)
        path = Path(path)
        _check_replaceable(path)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        config = self.config.to_dict()
        meta = {
            "model_type": self.model_type,
            "config": config,
            "format_version": FORMAT_VERSION,
            "vqprior_version": _version(),
        }
        files: dict[str, bytes] = {
            WEIGHTS_NAME: save_bytes(state, metadata={"model_type": self.model_type}),
            CONFIG_NAME: (json.dumps(meta, indent=2) + "\n").encode(),
        }
        for name, data in (extra_files or {}).items():
            if name in files or Path(name).name != name or name.startswith("."):
                raise ValueError(
                    f"extra_files: {name!r} must be a plain file name, not {sorted(files)}"
                )
            files[name] = data.encode() if isinstance(data, str) else bytes(data)
        if CARD_NAME not in files:
            vae = _json_object(files.get("vae.json"))
            files[CARD_NAME] = model_card(self.model_type, config, vae=vae).encode()
        write_dir(path, files)
        return path

    @classmethod
    def from_pretrained(
        cls: type[M], dir_or_hub_id: str | os.PathLike[str], **hub_options: Any
    ) -> M:
        """Load an export directory or a hub id ("user/name"); ``hub_options``: see
        :func:`load_pretrained`."""
        model = load_pretrained(dir_or_hub_id, **hub_options)
        if not isinstance(model, cls):
            raise CheckpointError(
                f"{dir_or_hub_id} holds a {type(model).__name__}, not a {cls.__name__}"
            )
        return model

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Save this model and push it to hub model repo ``repo_id`` (created if missing); needs
        ``pip install "vqprior[hub]"`` and a login. ``options``: ``extra_files``,
        ``commit_message``, ``private``, ``token``, ``revision``, ``create_pr``
        (:func:`vqprior.hub.push`). Returns huggingface_hub's ``CommitInfo``."""
        from vqprior.hub import push

        assert isinstance(self, nn.Module)
        return push(self, repo_id, **options)


def _json_object(data: bytes | None) -> dict[str, Any] | None:
    try:
        found = json.loads(data) if data else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return found if isinstance(found, dict) else None


def _names_hub_model(name: str | os.PathLike[str], path: Path) -> bool:
    """``name`` is shaped like a hub id ("user/name") and no such local export exists."""
    if not isinstance(name, str) or _export_dir(path).exists():
        return False
    from vqprior.hub import is_hub_id

    return is_hub_id(name)


def load_pretrained(
    dir_or_hub_id: str | os.PathLike[str],
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """Load an exported VQVAE or PixelCNN (in eval mode); no Lightning needed.

    ``dir_or_hub_id``: an export directory, or a hub id ("user/name", no such local path)
    taken from the hub cache (``cache_dir``, else ``HF_HUB_CACHE``) or downloaded; a hub id
    needs ``pip install "vqprior[hub]"``, and ``HF_HUB_OFFLINE=1`` or ``local_files_only``
    keep it off the network. Raises :class:`CheckpointError` (one line naming the problem) for
    a missing, corrupt or mismatched export, or a hub id neither cached nor reachable.
    """
    path = Path(dir_or_hub_id)
    if _names_hub_model(dir_or_hub_id, path):
        from vqprior.hub import download

        path = download(
            str(dir_or_hub_id),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
    elif revision is not None:
        raise ValueError(f"revision={revision!r} is for a hub id, and {path} is a local path")
    model_type, config, state = _read_export(path)
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{path}: unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}"
        )
    module_name, cls_name = MODEL_TYPES[model_type].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    try:
        model = cls(cls.config_class.from_dict(config))
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG_NAME}: {err}") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        detail = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), "")
        raise CheckpointError(
            f"{path}: weights do not match the config ({detail[:160] or 'shape mismatch'})"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.eval()


def _version() -> str:
    from vqprior._version import __version__

    return __version__
