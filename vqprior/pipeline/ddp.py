"""The pipeline on several devices and nodes: rank zero plans, writes and runs every stage; the
other ranks join its training stages.

Two ways to start the ranks:

- **Lightning starts them** (one process, ``--devices N --strategy ddp``): its DDP launcher
  starts the other ranks of this node inside the first multi-device ``trainer.fit`` by
  re-running the same command line. Those ranks must not plan anything (rank zero may
  already have moved folders aside or written the manifest): they take the training call
  rank zero was making when they started from the environment variable
  ``VQPRIOR_PIPELINE_CALL`` (:func:`is_worker`), run it, and then receive every later call
  from rank zero by broadcast.
- **A launcher starts them** (torchrun, ``srun``, or the variables set by hand: ``WORLD_SIZE``
  or ``SLURM_NTASKS`` > 1; any number of nodes, ``--num-nodes``/``--devices`` as for a
  training stage): :func:`join` brings the process group up at once, through the same
  Lightning strategy the training stages use (so Lightning reads the launcher's variables),
  and :func:`agree` has every rank load and check the pipeline file and compare it with the
  others' (one bad or different file stops all ranks with one line). Rank zero then runs the
  pipeline while the other ranks :func:`serve`, starting with the first broadcast call.

Either way only rank zero (:func:`vqprior.ranks.is_rank_zero`) writes, moves or cleans
anything, and a message is one of: a training call ``{"kind", "cfg", "out", "codes_dir"}``
(every rank runs it; rank zero first writes what the stage function writes before it trains,
so that the ranks' own preparations only read), ``None`` (the pipeline is done) or
``{"abort": message}`` (rank zero failed outside a training stage). Stages that do not train
(encode, generate, evaluate) run on rank zero while the others wait for the next message,
within the process group's timeout (30 minutes by default). The run directory must be on a
file system that every node sees (the ranks read the VAE, the codes and the checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from vqprior.config import ConfigError
from vqprior.ranks import RANK_ENVS as _RANK_ENVS
from vqprior.ranks import WORLD_ENVS, is_rank_zero, launched_world_size

logger = logging.getLogger("vqprior.pipeline")

CALL_ENV = "VQPRIOR_PIPELINE_CALL"
RANK_ENVS = (*_RANK_ENVS, *WORLD_ENVS)  # what a launcher sets (tests clear these)

Call = dict[str, Any]
Run = Callable[[Call], dict[str, Any]]


class RankFailed(RuntimeError):
    """Rank zero stopped the pipeline; this rank stops too (the message is rank zero's)."""


def is_worker() -> bool:
    """True in a rank that Lightning started for a pipeline's training stage."""
    return bool(os.environ.get(CALL_ENV)) and not is_rank_zero()


def launched_externally() -> bool:
    """True when a launcher (torchrun, srun) started several processes of this pipeline."""
    return not is_worker() and launched_world_size() > 1


def check_launch(num_nodes: int) -> None:
    """Refuse a single-process launch that cannot work: several nodes, or a lone nonzero rank."""
    how = "start one process per device with torchrun or srun (WORLD_SIZE/SLURM_NTASKS set)"
    if num_nodes > 1:
        raise ConfigError(f"--num-nodes {num_nodes}: on several nodes {how}")
    if not is_rank_zero():
        raise ConfigError(
            "this process is a nonzero rank but no launcher says how many there are: "
            f"{how}, or run one process with --devices N --strategy ddp"
        )


def _group() -> Any:
    """torch.distributed when a process group of more than one rank is up, else None."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def leave() -> None:
    """Tear this process's group down before it exits on an error all ranks share."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def join(device: Any) -> Any:
    """Bring up the process group of externally started ranks (as a training stage would)."""
    import lightning as L

    from vqprior.train.common import resolve_strategy

    if _group() is None:
        trainer = L.Trainer(
            accelerator=device.accelerator, devices=device.trainer_devices(),
            num_nodes=device.num_nodes, strategy=resolve_strategy(device.strategy),
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        )  # fmt: skip
        if trainer.world_size != launched_world_size():
            raise ConfigError(
                f"the launcher started {launched_world_size()} processes but --num-nodes "
                f"{device.num_nodes} x --devices {device.devices} make {trainer.world_size}"
            )
        trainer.strategy.setup_environment()  # init_process_group from the launcher's variables
    dist = _group()
    assert dist is not None
    return dist


def agree(load: Callable[[], Any], describe: Callable[[Any], Any]) -> Any:
    """Every rank calls ``load()``; all get its result or all raise (their own error first).

    ``describe(result)`` must be JSON: the ranks compare its hash, so a different pipeline
    file, ``--set`` or ``--out`` on one node stops every rank before anything is written.
    """
    dist = _group()
    assert dist is not None
    result, failure = None, None
    try:
        result = load()
        text = json.dumps(describe(result), sort_keys=True, default=str)
        mine = "ok:" + hashlib.sha256(text.encode()).hexdigest()
    except Exception as err:  # every rank must reach the exchange, whatever went wrong
        mine, failure = f"error:{_first_line(err)}", err
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine)
    if failure is not None:
        raise failure
    for rank, view in enumerate(views):
        if view.startswith("error:"):
            raise ConfigError(f"rank {rank}: {view.split(':', 1)[1]}")
        if view != views[0]:
            raise ConfigError(
                f"rank {rank} resolved another pipeline than rank 0 (file, --set or --out "
                "differ between the processes): start every process with the same command"
            )
    return result


class Leader:
    """Rank zero's side: hands every training call to the other ranks, then runs it here."""

    def __init__(self) -> None:
        self.in_call = False  # True while the ranks train together (a failure there is shared)

    def run_call(self, call: Call, run: Run, prepare: Callable[[Call], None]) -> dict[str, Any]:
        """Run ``call`` on every rank (``prepare(call)`` first, when the ranks are up).

        With the other ranks already up, ``prepare`` writes everything the stage function
        writes before training (config, VAE record, codes): all ranks then prepare the run
        dir at the same time, and with nothing left to write none of them can disturb a file
        another is writing. (Ranks that Lightning starts inside the call come later anyway.)
        """
        dist = _group()
        if dist is not None:
            prepare(call)
            dist.broadcast_object_list([call], src=0)
            self.in_call = True
            result = run(call)
            self.in_call = False
            return result
        # ranks that Lightning starts inside this call inherit the call through the environment
        os.environ[CALL_ENV] = json.dumps(call, default=str)
        self.in_call = True
        try:
            result = run(call)
        finally:
            os.environ.pop(CALL_ENV, None)
        self.in_call = False
        return result

    def finish(self) -> None:
        """Tell the other ranks (if any) that no training call follows."""
        dist = _group()
        if dist is not None:
            dist.broadcast_object_list([None], src=0)

    def abort(self, err: BaseException) -> None:
        """Rank zero failed: release the waiting ranks (not within a shared training call,
        where the other ranks fail or stop with it by themselves)."""
        dist = _group()
        if dist is None or self.in_call:
            return
        try:
            dist.broadcast_object_list([{"abort": _first_line(err)}], src=0)
        except RuntimeError:  # the others are gone already
            logger.debug("could not tell the other ranks that rank 0 failed", exc_info=True)


def serve(run: Run, first: Call | None = None) -> None:
    """A nonzero rank: run ``first`` (a Lightning-started rank's call), then each call rank
    zero broadcasts, until it says the pipeline is done (or failed)."""
    call = first if first is not None else _receive()
    while call is not None:
        logger.info("rank joins %s in %s", call["kind"], call["out"])
        run(call)
        if _group() is None:
            return
        call = _receive()
    leave()  # rank 0 sends nothing more; a live gloo group can abort this process's exit


def _receive() -> Call | None:
    dist = _group()
    assert dist is not None
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    message = box[0]
    if isinstance(message, dict) and "abort" in message:
        raise RankFailed(f"rank 0 failed: {message['abort']}")
    return message


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def spawned_call() -> Call:
    """The training call a Lightning-started rank was started for."""
    call: Call = json.loads(os.environ[CALL_ENV])
    return call
