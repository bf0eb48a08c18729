"""Exported models on the Hugging Face Hub: a hub id resolves to a cached snapshot, an export
directory is pushed as a model repo (config.json, model.safetensors, vae.json, README.md).

huggingface_hub is an optional extra (``pip install "vqprior[hub]"``), imported only inside
:func:`download` and :func:`upload`: ``import vqprior`` and loading a local export never
import it. A hub snapshot has the layout of an export directory, so it loads the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from vqprior.card import CARD_NAME, for_hub, model_card
from vqprior.io import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, PretrainedMixin, load_pretrained

INSTALL = 'pip install "vqprior[hub]"'
# what a model repo may hold that a load needs: config, weights, the VAE record, the card
ALLOW_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, "*.json", CARD_NAME]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_TRUE = {"1", "ON", "YES", "TRUE"}


def is_hub_id(name: str) -> bool:
    """``"user/name"``: a namespace and a repo name of the hub's characters, nothing else."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def _require(purpose: str) -> ModuleType:
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"{purpose} needs huggingface_hub: {INSTALL}") from None
    return huggingface_hub


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub itself reads it once, at import)."""
    _require("the hub")
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def download(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local snapshot of hub model ``repo_id`` (from the cache when offline), downloaded
    into the hub cache (``cache_dir``, else ``HF_HUB_CACHE``) when needed.

    Raises :class:`CheckpointError` with one line: not cached and the hub unreachable, no such
    repo or revision, an invalid id.
    """
    hf = _require(f"{repo_id} is not a local directory; loading it from the Hugging Face Hub")
    from huggingface_hub import errors

    no_network = local_files_only or offline()
    where = f"hub model {repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = hf.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=no_network,
            allow_patterns=ALLOW_PATTERNS,
            library_name="vqprior",
        )
    except errors.LocalEntryNotFoundError as err:  # before HfHubHTTPError: a subclass in 0.x
        if isinstance(err, getattr(errors, "IncompleteSnapshotError", ())):  # 2.x
            raise CheckpointError(
                f"{where}: the cached copy is incomplete and the hub cannot be reached; "
                "download it again online"
            ) from None
        if no_network:
            why = "local_files_only" if local_files_only else "HF_HUB_OFFLINE is set"
        else:
            why = f"no network: {type(err.__cause__ or err).__name__}"
        raise CheckpointError(
            f"{repo_id} is not a local directory, and {where} is not cached and the hub cannot "
            f"be reached ({why}): download it once online, or pass an export directory"
        ) from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{where}: no such revision on the hub") from None
    except errors.RepositoryNotFoundError:  # also gated or private without a token
        raise CheckpointError(
            f"{where} does not exist on the hub, or needs a token (log in, or pass token=...)"
        ) from None
    except (errors.HFValidationError, errors.HfHubHTTPError, OSError) as err:
        raise CheckpointError(f"cannot download {where} ({_first_line(err)})") from None
    return Path(folder)


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0][:160] if lines else type(err).__name__


def push(
    model: PretrainedMixin,
    repo_id: str,
    *,
    extra_files: Mapping[str, str | bytes] | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """``model.save_pretrained`` (with ``extra_files``, e.g. a codes prior's ``vae.json``) into
    a temp directory, then :func:`upload` it to ``repo_id``."""
    _require(f"pushing {repo_id} to the Hugging Face Hub")  # before the save
    with tempfile.TemporaryDirectory(prefix="vqprior-save-") as tmp:
        folder = model.save_pretrained(Path(tmp) / "model", extra_files=extra_files)
        return upload(
            folder,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


def upload(
    path: str | os.PathLike[str],
    repo_id: str,
    *,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Push the export directory ``path`` to hub model repo ``repo_id`` (created if missing);
    returns huggingface_hub's ``CommitInfo``.

    The export must load; what goes up is its files with the card's load snippet naming
    ``repo_id`` (a card is generated for an export that has none).
    """
    hf = _require(f"pushing {repo_id} to the Hugging Face Hub")
    model = load_pretrained(path)  # refuse to push what would not load
    api = hf.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="vqprior-push-") as tmp:
        _stage(Path(path), Path(tmp), repo_id)
        message = commit_message or f"Upload vqprior {type(model).__name__}"
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                repo_type="model",
                commit_message=message,
                revision=revision,
                create_pr=create_pr,
            )
        except (hf.errors.HfHubHTTPError, OSError) as err:
            raise CheckpointError(f"cannot push {path} to {repo_id} ({_first_line(err)})") from None


def _stage(src: Path, dst: Path, repo_id: str) -> None:
    """Copy (or hard-link) the export's plain files into ``dst``; its card names ``repo_id``."""
    for f in sorted(src.iterdir()):
        if f.name.startswith(".") or not f.is_file() or f.name == CARD_NAME:
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    card = src / CARD_NAME
    if card.is_file():
        text = card.read_text()
    else:
        meta = json.loads((src / CONFIG_NAME).read_text())
        vae = dst / "vae.json"
        record = json.loads(vae.read_text()) if vae.is_file() else None
        text = model_card(meta["model_type"], meta["config"], vae=record)
    (dst / CARD_NAME).write_text(for_hub(text, repo_id))
