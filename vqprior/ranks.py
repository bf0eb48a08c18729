"""One rank detector for the whole package (no torch.distributed or Lightning import needed).

A process is *rank zero* only if every launcher variable that names its place says 0:
torchrun / torch.distributed (``RANK``, ``LOCAL_RANK``, ``GROUP_RANK``), Lightning's own DDP
launcher (``LOCAL_RANK``, ``NODE_RANK``) and SLURM (``SLURM_PROCID``, ``SLURM_NODEID``,
``SLURM_LOCALID``). An initialised process group has the last word. Only rank zero writes or
cleans a run directory.
"""

from __future__ import annotations

import os
import sys

RANK_ENVS = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "SLURM_PROCID",
    "SLURM_NODEID",
    "SLURM_LOCALID",
)
WORLD_ENVS = ("WORLD_SIZE", "SLURM_NTASKS")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def global_rank() -> int:
    """This process's global rank: the process group's if one is initialised, else the
    launcher's (``RANK`` or ``SLURM_PROCID``), else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    for name in ("RANK", "SLURM_PROCID"):
        value = _env_int(name)
        if value is not None:
            return value
    return 0


def is_rank_zero() -> bool:
    """True only in the one process that may write and clean run directories."""
    if global_rank() != 0:
        return False
    return all((_env_int(name) or 0) == 0 for name in RANK_ENVS)


def launched_world_size() -> int:
    """Processes the launcher started in all (1 when no launcher variables are set)."""
    for name in WORLD_ENVS:
        value = _env_int(name)
        if value is not None:
            return value
    return 1
