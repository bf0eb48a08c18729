"""The run directory of a training stage: layout, config check, JSON files, metrics.csv.

No Lightning here: inference, encoding and the pipeline use these helpers too.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from vqprior.card import CARD_NAME, model_card
from vqprior.config import ConfigError
from vqprior.io import CONFIG_NAME, atomic_path, atomic_write_text
from vqprior.ranks import is_rank_zero
from vqprior.train.config import PER_INVOCATION, TrainConfig, recorded_steps

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
LAST_CKPT = "last.ckpt"
BEST_CKPT = "best.ckpt"
MODEL_DIR = "model"
IMAGES_DIR = "images"
# what a run dir may hold besides config.yaml (a cache of codes may be put there beforehand)
RUN_ENTRIES = frozenset(
    {
        CKPT_DIR,
        MODEL_DIR,
        IMAGES_DIR,
        "codes",
        "logs",
        "tensorboard",
        "metrics.csv",
        "summary.json",
        "vae.json",
    }
)
# config keys a finished run may raise on a rerun to train longer (see check_run_dir)
EXTENDABLE = ("train.max_steps",)
# train keys added after runs were made, with the value those runs used without naming it: a
# run dir whose config.yaml lacks one is the same run as a config holding that value
ADDED_TRAIN_KEYS: dict[str, Any] = {"adam_beta2": 0.999}


def _first_difference(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any]:
    """The first dotted key at which two nested dicts differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            if old.get(key, "<absent>") != new.get(key, "<absent>"):
                return _first_difference(
                    old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}."
                )
    return prefix.rstrip("."), old, new


def _plain(resolved: dict[str, Any]) -> Any:
    """``resolved`` as it reads back from YAML (tuples become lists, ...), without the
    :data:`PER_INVOCATION` train keys."""
    plain = yaml.safe_load(yaml.safe_dump(resolved, sort_keys=False))
    if isinstance(plain, dict) and isinstance(plain.get("train"), dict):
        plain["train"] = {k: v for k, v in plain["train"].items() if k not in PER_INVOCATION}
    return plain


def _with_added_keys(old: Any, new: Any) -> Any:
    """A run dir's config with the :data:`ADDED_TRAIN_KEYS` it lacks and ``new`` has, at
    their old values."""
    try:
        added = {k: v for k, v in ADDED_TRAIN_KEYS.items() if k in new["train"]}
        return {**old, "train": {**added, **old["train"]}}
    except (KeyError, TypeError):
        return old


def _recorded_section(run_dir: str | Path | None, section: str) -> dict[str, Any] | None:
    """One section of the ``config.yaml`` a run dir records (None: no such file or section)."""
    cfg_file = None if run_dir is None else Path(run_dir) / "config.yaml"
    if cfg_file is None or not cfg_file.is_file():
        return None
    old = _read_run_config(cfg_file)
    found = old.get(section) if isinstance(old, dict) else None
    return dict(found) if isinstance(found, dict) else None


def recorded_data(vae_dir: str | Path, named: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data keys ``named`` over the data section a train-vae run dir records (what the VAE
    was trained on): the data of a codes prior and of ``vqprior encode``. An exported model
    dir records no data (``{}`` under ``named``)."""
    return {**(_recorded_section(vae_dir, "data") or {}), **(named or {})}


def recorded_train(out: Path | None) -> dict[str, Any]:
    """The train settings the run dir ``out`` records in its ``config.yaml`` (with the
    :data:`ADDED_TRAIN_KEYS` it lacks, at their old values); ``{}`` for a new run. A stage
    resolves its train keys over these where its config names none, so a rerun resumes the run
    as it was made: a default changed since (a new version, or a default of another device)
    never makes it a different run. What the config names is compared (:func:`check_run_dir`)."""
    train = _recorded_section(out, "train")
    if train is None:
        return {}
    known = {f.name for f in fields(TrainConfig)}  # a newer version's key: refused as a change
    return {k: v for k, v in {**ADDED_TRAIN_KEYS, **train}.items() if k in known}


def _extended(old: Any, new: Any) -> bool:
    """True when ``new`` equals ``old`` but for a larger ``train.max_steps`` (unset counts as
    the bound it has without a budget, :func:`recorded_steps`)."""
    try:
        before, after = old["train"]["max_steps"], new["train"]["max_steps"]
        larger = recorded_steps(after) > recorded_steps(before)
    except (KeyError, TypeError, ValueError):
        return False
    same_otherwise = {**old, "train": {**old["train"], "max_steps": after}} == new
    return same_otherwise and larger


def check_run_dir(out: Path, resolved: dict[str, Any]) -> bool:
    """Refuse (one line) an ``out`` that is a file, holds a different run's config, or holds
    other files than a run's and no ``config.yaml`` (not a run dir). Writes nothing.

    Returns True when ``out`` holds this run with a smaller ``train.max_steps``: the run is
    extended (it resumes from its last checkpoint and trains on to the new ``max_steps``).
    """
    resolved = _plain(resolved)
    cfg_file = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: pass a directory for the run")
    if cfg_file.is_file():
        old = _with_added_keys(_plain(_read_run_config(cfg_file)), resolved)
        if old == resolved:
            return False
        if _extended(old, resolved):
            return True
        key, a, b = _first_difference(old, resolved)
        raise ConfigError(
            f"{out} holds a different run ({key} is {a!r} there, {b!r} now): "
            f"use another --out, or delete {out} to start over"
        )
    if out.is_dir():
        foreign = sorted(
            p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and p.name[0] != "."
        )
        if foreign:
            raise ConfigError(
                f"--out {out} is not empty ({', '.join(foreign[:3])}) and is not a vqprior run "
                "(no config.yaml): use a new or empty directory"
            )
    return False


def prepare_run_dir(out: Path, resolved: dict[str, Any]) -> Path | None:
    """Write ``config.yaml`` (or check it matches ``resolved``); return a checkpoint to resume.

    Refuses what :func:`check_run_dir` refuses; an extended run (a larger ``max_steps``)
    gets the new ``config.yaml``. Temp files that a killed run left behind are removed.
    Call it holding the run's :class:`vqprior.lock.RunLock`.
    """
    last = out / CKPT_DIR / LAST_CKPT
    if not is_rank_zero():
        # a DDP child re-runs the command while rank 0 is already training: it must neither
        # write nor clean up (it could delete rank 0's checkpoint temp file mid-write)
        return last if last.is_file() else None
    extended = check_run_dir(out, resolved)
    cfg_file = out / "config.yaml"
    if extended or not cfg_file.is_file():
        if extended:
            steps = recorded_steps(resolved["train"]["max_steps"])
            logger.info("extending %s to train.max_steps=%s", out, steps)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg_file, yaml.safe_dump(_plain(resolved), sort_keys=False))
    remove_stale_temps(out, out / CKPT_DIR, out / "codes", out / MODEL_DIR)
    if last.is_file():
        logger.info("resuming from %s", last)
        return last
    return None


def _read_run_config(cfg_file: Path) -> Any:
    try:
        return yaml.safe_load(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"cannot read {cfg_file} ({reason}): fix it, or use another --out"
        ) from None


def remove_stale_temps(*dirs: Path) -> list[Path]:
    """Delete temp files and staging dirs (``.<name>.*.tmp``) that a killed run left in ``dirs``.

    An export set aside mid-swap (``.<name>.old-*.tmp``) is kept: it may be the only copy, and
    the next successful save removes it.
    """
    removed = []
    for d in dirs:
        if not d.is_dir():
            continue
        for p in d.glob(".*.tmp"):
            if ".old-" in p.name:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        logger.info("removed %d temp files left by an interrupted run", len(removed))
    return removed


def flatten_metrics(out: Path) -> Path | None:
    """Merge every ``logs/version_*/metrics.csv`` into one ``metrics.csv``: a row per step.

    Later launches (resumes) win for a step they share with earlier ones.
    """
    files = sorted(
        (out / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    if not files:
        return None
    rows: dict[int, dict[str, str]] = {}
    columns: list[str] = ["step"]
    for f in files:
        fresh: dict[int, dict[str, str]] = {}
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                step = int(float(row.get("step") or 0))
                values = {k: v for k, v in row.items() if k and v not in ("", None)}
                fresh.setdefault(step, {}).update(values)
                columns += [k for k in values if k not in columns]
        for step, values in fresh.items():
            rows[step] = values if step not in rows else {**rows[step], **values}
    target = out / "metrics.csv"
    with atomic_path(target) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for step in sorted(rows):
            writer.writerow({**rows[step], "step": step})
    return target


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_model_card(out: Path, summary: dict[str, Any]) -> Path | None:
    """(Re)write the card ``<out>/model/README.md`` from the export's config and ``vae.json``,
    the run's ``config.yaml`` (the data) and ``summary`` (the figures); None without an export.

    The card is outside the model's content hash (:func:`vqprior.io.content_hash`), so a
    refreshed card never changes the identity that a prior records of its VAE.
    """
    model = out / MODEL_DIR
    if not (model / CONFIG_NAME).is_file():
        return None
    meta = read_json(model / CONFIG_NAME)
    cfg_file, vae_file = out / "config.yaml", model / "vae.json"
    card = model_card(
        str(meta.get("model_type")),
        meta.get("config") or {},
        run_config=_read_run_config(cfg_file) if cfg_file.is_file() else None,
        summary=summary,
        vae=read_json(vae_file) if vae_file.is_file() else None,
    )
    atomic_write_text(model / CARD_NAME, card)
    return model / CARD_NAME


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def find_export(path: str | Path, what: str) -> Path:
    """An exported model dir: ``path`` itself or ``path/model`` (a run dir)."""
    p = Path(path)
    if (p / MODEL_DIR / "config.json").is_file():
        return p / MODEL_DIR
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"{what} {p} not found")
    raise FileNotFoundError(
        f"no exported {what} at {p}: pass a run dir (holding model/) or an exported model dir"
    )
