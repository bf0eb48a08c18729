"""The pipeline under DDP: rank zero plans and runs every stage; other ranks join its trainings.

Lightning's DDP launcher starts the other ranks (on this node) inside the first multi-device
``trainer.fit`` by re-running the same command line. Those ranks must not plan anything
(rank zero may already have moved folders aside or written the manifest): they take the
training call rank zero was making when they started from the environment variable
``VQPRIOR_PIPELINE_CALL``, run it, and then receive every later training call from rank
zero by broadcast, until rank zero broadcasts the end of the pipeline. Before such a
broadcast rank zero prepares the stage's run dir alone, so that the ranks' concurrent
preparations only read. Stages that do not train (encode, generate, evaluate) run on rank
zero only while the others wait (within the process group's timeout, 30 minutes by default).
Several nodes are not supported: there the other nodes' processes start outside rank zero.

A training call is a plain dict: ``{"kind", "cfg", "out", "codes_dir"}``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

from vqprior.config import ConfigError

logger = logging.getLogger(__name__)

CALL_ENV = "VQPRIOR_PIPELINE_CALL"
RANK_ENVS = ("NODE_RANK", "LOCAL_RANK", "RANK", "GROUP_RANK", "SLURM_PROCID")

Call = dict[str, Any]
Run = Callable[[Call], dict[str, Any]]


def _env_rank_nonzero() -> bool:
    for name in RANK_ENVS:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) != 0:
            return True
    return False


def is_worker() -> bool:
    """True in a rank that Lightning started for a pipeline's training stage."""
    return bool(os.environ.get(CALL_ENV)) and _env_rank_nonzero()


def check_launch(num_nodes: int) -> None:
    """Refuse launches this design cannot follow: several nodes, or ranks started externally."""
    if num_nodes > 1:
        raise ConfigError(
            "vqprior pipeline runs on one node (any number of --devices there); on several "
            "nodes run its stages with `vqprior train-vae`/`train-prior` under your launcher"
        )
    if _env_rank_nonzero() and not is_worker():
        raise ConfigError(
            "vqprior pipeline must be started as one process: Lightning starts the other "
            "ranks itself (pass --devices N --strategy ddp instead of torchrun/srun -n N)"
        )


def _group() -> Any:
    """torch.distributed when a process group of more than one rank is up, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def run_call(call: Call, run: Run, prepare: Callable[[Call], None]) -> dict[str, Any]:
    """Rank zero: hand ``call`` to the other ranks (if any), then run it here.

    When the other ranks are already up, ``prepare(call)`` first writes everything the stage
    function writes before training (config, VAE record, codes): all ranks then prepare the
    run dir at the same time, and with nothing left to write none of them can disturb a file
    that another is writing. (Ranks that Lightning starts inside the call come later anyway.)
    """
    dist = _group()
    if dist is not None:
        prepare(call)
        dist.broadcast_object_list([call], src=0)
        return run(call)
    # ranks that Lightning starts inside this call inherit the call through the environment
    os.environ[CALL_ENV] = json.dumps(call, default=str)
    try:
        return run(call)
    finally:
        os.environ.pop(CALL_ENV, None)


def finish() -> None:
    """Rank zero: tell the other ranks (if any) that no training call follows."""
    dist = _group()
    if dist is not None:
        dist.broadcast_object_list([None], src=0)


def serve(run: Run) -> None:
    """A worker rank: run the call it was started for, then each call rank zero broadcasts."""
    call: Call | None = json.loads(os.environ[CALL_ENV])
    while call is not None:
        logger.info("worker rank joins %s in %s", call["kind"], call["out"])
        run(call)
        dist = _group()
        if dist is None:
            return
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        call = box[0]
