"""``vqprior pipeline``: chain the stages of a ``pipelines/*.yaml`` file, skipping finished ones.

Each stage runs in ``<out>/<stage>/`` through the library's stage functions. The manifest
``<out>/manifest.json`` records, per stage, its key (a hash of its resolved config, less a
training stage's ``train.max_steps``, and of the keys and output hashes of the stages it
reads), its ``max_steps``, status, times and output hashes. Only rank zero writes anything,
holding ``<out>/.lock`` (:class:`vqprior.lock.RunLock`): a second pipeline on the same run
directory is refused. A rerun

- skips a finished stage whose key (and ``max_steps``) is unchanged and whose outputs remain;
- resumes an interrupted stage (same key) in place: training restarts from its last checkpoint;
- extends a training stage whose only change is a larger ``train.max_steps`` in place: it
  trains on from its last checkpoint (a smaller one redoes it); the stages that read it are
  redone;
- redoes a stage whose key changed, which changes the keys of the stages that read it, so they
  are redone too; the old folder is moved aside to ``<stage>.stale-<timestamp>``;
- with ``from_stage``, redoes that stage and every stage after it.

At the end ``<out>/summary.md``, ``<out>/summary.json`` and ``<out>/losses.png`` show the key
figures of every stage (see :mod:`vqprior.pipeline.report`). See :mod:`vqprior.pipeline.spec`
for the file format and :mod:`vqprior.pipeline.ddp` for multi-device runs.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from vqprior.config import ConfigError
from vqprior.io import atomic_write_text, content_hash, file_sha256
from vqprior.lock import RunLock
from vqprior.pipeline import ddp, report
from vqprior.pipeline.spec import Pipeline, Stage, load_pipeline, max_steps, stage_key
from vqprior.ranks import is_rank_zero
from vqprior.train.config import DeviceOptions

logger = logging.getLogger("vqprior.pipeline")  # the stage headers the CLI shows

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
OUTPUT_FILES = {
    "encode": ("train.safetensors", "val.safetensors", "test.safetensors"),
    "generate": ("samples.png", "samples.safetensors"),
    "evaluate": ("eval.json",),
}


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        return {"format_version": FORMAT_VERSION, "stages": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err}): move it away to start over") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise ConfigError(f"{path} is not a pipeline manifest: move it away to start over")
    return data


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=2, default=str) + "\n"  # stages in pipeline order
    atomic_write_text(out / MANIFEST, text)


def _output_paths(stage: Stage, folder: Path) -> list[Path]:
    if stage.training:
        return [folder / "model" / "config.json", folder / "model" / "model.safetensors"]
    return [folder / name for name in OUTPUT_FILES[stage.kind]]


def _output_hashes(stage: Stage, folder: Path) -> dict[str, str]:
    if stage.training:
        return {"model": content_hash(folder / "model")}
    return {p.name: file_sha256(p)[:16] for p in _output_paths(stage, folder)}


def _move_aside(folder: Path) -> Path:
    """Rename ``folder`` to ``<folder>.stale-<timestamp>`` (a free name); return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.stale-{stamp}")
    n = 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.stale-{stamp}-{n}"), n + 1
    folder.rename(target)
    return target


def _train(call: ddp.Call, device: DeviceOptions) -> dict[str, Any]:  # on every rank
    from vqprior.train import stages

    if call["kind"] == "train-vae":
        return stages.train_vae(call["cfg"], call["out"], device)
    return stages.train_prior(call["cfg"], call["out"], device, codes_dir=call["codes_dir"])


def _prepare(call: ddp.Call, device: DeviceOptions) -> None:
    """Write what the training stage function writes before it trains (see ddp.run_call)."""
    from vqprior.train import codes, common, stages

    out = Path(call["out"])
    if call["kind"] == "train-vae":
        common.prepare_run_dir(out, stages.resolve_vae_stage(call["cfg"], out)[0].to_dict())
        return
    cfg, splits, vae, record = stages.resolve_prior_stage(call["cfg"], device, out)
    common.prepare_run_dir(out, cfg.to_dict())
    if vae is None or record is None:
        return
    if not (out / codes.VAE_RECORD).is_file():
        common.write_json(out / codes.VAE_RECORD, record)
    if call["codes_dir"] is None:  # every level's codes in <out>/codes, as train_prior reads them
        dev = device.data_device()
        codes.level_codes(vae, record, splits, cfg.data, out, None, dev)


def _execute(
    pipe: Pipeline, stage: Stage, folder: Path, device: DeviceOptions, leader: ddp.Leader
) -> dict[str, Any]:
    """Run one stage into ``folder`` (a training stage on every rank); return its key figures."""
    from vqprior.train import codes, inference

    dirs = {k: str(pipe.out / v) for k, v in stage.refs.items()}
    cfg, dev = stage.config, device.data_device()
    if stage.training:
        call = {
            "kind": stage.kind,
            "cfg": {
                **copy.deepcopy(cfg),
                **({"vae": dirs.get("vae")} if stage.kind == "train-prior" else {}),
            },
            "out": str(folder),
            "codes_dir": dirs.get("codes"),
        }
        summary = leader.run_call(call, lambda c: _train(c, device), lambda c: _prepare(c, device))
        return report.training_figures(stage.kind, folder, summary, pipe.out)
    folder.mkdir(parents=True, exist_ok=True)
    if stage.kind == "encode":
        codes.encode_codes(dirs["vae"], cfg["data"], folder, cfg["batch_size"], dev)
        return report.encode_figures(folder)
    if stage.kind == "generate":
        png = folder / "samples.png"
        inference.generate(dirs["prior"], dirs.get("vae"), cfg["num"], png, cfg["seed"],
                           cfg["temperature"], cfg["label"], dev, cfg["method"],
                           bottom_prior_dir=dirs.get("bottom_prior"))  # fmt: skip
        return {"num": cfg["num"], "images": [str(png.relative_to(pipe.out))]}
    result = inference.evaluate(
        dirs["prior"], dirs.get("vae"), cfg["split"], cfg["batch_size"], dev,
        bottom_prior_dir=dirs.get("bottom_prior"),
    )  # fmt: skip
    atomic_write_text(folder / "eval.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return {k: v for k, v in result.items() if k != "num_examples"}


class _Runner:
    """Walks the stages in order, keeping the manifest on disk current after every change."""

    def __init__(
        self, pipe: Pipeline, device: DeviceOptions, from_index: int | None, leader: ddp.Leader
    ) -> None:
        self.pipe, self.device, self.from_index, self.leader = pipe, device, from_index, leader
        self.out = pipe.out
        self.manifest = read_manifest(self.out)
        self.manifest.update(format_version=FORMAT_VERSION, pipeline=str(pipe.file))
        self.done: dict[str, dict[str, Any]] = {}
        self.rows: list[dict[str, Any]] = []

    def save(self) -> None:
        _write_manifest(self.out, self.manifest)

    def run(self, i: int, stage: Stage) -> None:
        n, name = len(self.pipe.stages), stage.name
        key, steps = stage_key(stage, self.done), max_steps(stage)
        entry = self.manifest["stages"].get(name)
        folder = self.out / name
        forced = self.from_index is not None and i >= self.from_index
        header = f"[{i + 1}/{n}] {stage.kind} {name}"
        if self._finished(entry, key, steps, stage, folder) and not forced:
            logger.info("%s: skipped (unchanged since %s)", header, entry["finished"])
            self.done[name] = entry
            self._row(i, stage, entry, "skipped", 0.0)
            return
        status = self._prepare(entry, key, steps, folder, forced, header)
        started = time.time()
        self.manifest["stages"][name] = {
            "kind": stage.kind, "key": key, "status": "running", "started": _now(),
            "deps": {d: self.done[d]["key"] for d in stage.deps},
            **({"max_steps": steps} if steps is not None else {}),
        }  # fmt: skip
        self.save()
        figures = _execute(self.pipe, stage, folder, self.device, self.leader)
        seconds = round(time.time() - started, 2)
        entry = {
            **self.manifest["stages"][name],
            "status": "done", "finished": _now(), "seconds": seconds,
            "outputs": _output_hashes(stage, folder), "figures": figures,
        }  # fmt: skip
        self.manifest["stages"][name] = self.done[name] = entry
        self.save()
        logger.info(
            "%s: %s in %.1f s: %s", header, status, seconds, report.headline(stage.kind, figures)
        )
        self._row(i, stage, entry, status, seconds)

    @staticmethod
    def _finished(
        entry: dict[str, Any] | None, key: str, steps: int | None, stage: Stage, folder: Path
    ) -> bool:
        if not entry or entry.get("status") != "done" or entry.get("key") != key:
            return False
        if entry.get("max_steps") != steps:
            return False
        return all(p.is_file() for p in _output_paths(stage, folder))

    def _prepare(
        self,
        entry: dict[str, Any] | None,
        key: str,
        steps: int | None,
        folder: Path,
        forced: bool,
        header: str,
    ) -> str:
        """Decide ran/resumed/extended/redone; move a folder that holds other work aside.

        Same key: an interrupted run with the same ``max_steps`` resumes, a run (finished or
        not) with a smaller one is extended in place; a larger one, or any other change, is
        redone (a trained run cannot be shortened).
        """
        entry = entry or {}
        same_key = folder.exists() and entry.get("key") == key and not forced
        before = entry.get("max_steps")
        if same_key and entry.get("status") == "running" and before == steps:
            logger.info("%s -> %s (resuming an interrupted run)", header, folder)
            return "resumed"
        if same_key and steps is not None and isinstance(before, int) and before < steps:
            logger.info(
                "%s -> %s (extending it from %d to %d steps)", header, folder, before, steps
            )
            return "extended"
        if folder.exists():
            stale = _move_aside(folder)
            why = "forced by --from" if forced else "its inputs or config changed"
            logger.info(
                "%s -> %s (%s; the old folder is kept as %s)", header, folder, why, stale.name
            )
            return "redone"
        logger.info("%s -> %s", header, folder)
        return "ran"

    def _row(
        self, i: int, stage: Stage, entry: dict[str, Any], status: str, seconds: float
    ) -> None:
        figures = dict(entry.get("figures") or {})
        self.rows.append({
            "index": i + 1, "name": stage.name, "kind": stage.kind, "status": status,
            "skipped": status == "skipped", "seconds": seconds,
            "recorded_seconds": entry.get("seconds"), "finished": entry.get("finished"),
            "key": entry["key"], "dir": stage.name, "images": figures.pop("images", []),
            "figures": figures,
        })  # fmt: skip


def run_pipeline(
    file: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    device: DeviceOptions | None = None,
    out: str | Path | None = None,
    from_stage: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline ``file`` (``overrides``: ``STAGE.key=value``); return the summary.

    ``out`` replaces the file's run directory; ``from_stage`` redoes that stage and every
    later one. On a nonzero DDP rank this joins rank zero's trainings and returns ``{}``
    (see :mod:`vqprior.pipeline.ddp`).
    """
    device = device or DeviceOptions()

    def train(call: ddp.Call) -> dict[str, Any]:
        return _train(call, device)

    def plan() -> tuple[Pipeline, int | None]:
        return _plan(file, overrides, out, from_stage)

    if ddp.is_worker():
        ddp.serve(train, ddp.spawned_call())
        return {}
    if ddp.launched_externally():
        ddp.join(device)
        try:
            pipe, from_index = ddp.agree(plan, _describe)
        except BaseException:
            ddp.leave()  # every rank raises here; a live gloo group can abort the exit (SIGABRT)
            raise
        if not is_rank_zero():
            ddp.serve(train)
            return {}
    else:
        ddp.check_launch(device.num_nodes)
        pipe, from_index = plan()
    leader = ddp.Leader()
    try:
        with RunLock(pipe.out):  # a second pipeline on this --out is refused in one line
            return _run(pipe, from_index, device, leader)
    except BaseException as err:
        leader.abort(err)  # ranks waiting for the next message stop too
        raise


def _plan(
    file: str | Path, overrides: list[str] | tuple[str, ...], out: str | Path | None,
    from_stage: str | None,
) -> tuple[Pipeline, int | None]:  # fmt: skip
    pipe = load_pipeline(file, overrides, out)
    from_index = pipe.index(from_stage, f"--from {from_stage}") if from_stage is not None else None
    return pipe, from_index


def _describe(plan: tuple[Pipeline, int | None]) -> Any:
    """What every rank must agree on (not the file's path: checkouts may live elsewhere)."""
    pipe, from_index = plan
    stages = [[s.name, s.kind, s.config, s.refs] for s in pipe.stages]
    return {"out": str(pipe.out), "from": from_index, "stages": stages}


def _run(
    pipe: Pipeline, from_index: int | None, device: DeviceOptions, leader: ddp.Leader
) -> dict[str, Any]:
    """Rank zero: every stage in order, then the summary."""
    pipe.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runner = _Runner(pipe, device, from_index, leader)
    for i, stage in enumerate(pipe.stages):
        runner.run(i, stage)
    leader.finish()
    return _finish(pipe, runner, started)


def _finish(pipe: Pipeline, runner: _Runner, started: float) -> dict[str, Any]:
    training = {s.name: pipe.out / s.name for s in pipe.stages if s.training}
    losses = report.plot_losses(pipe.out, training)
    summary = {
        "pipeline": str(pipe.file),
        "out": str(pipe.out),
        "finished": _now(),
        "total_seconds": round(time.time() - started, 2),
        "stages": runner.rows,
        "losses_png": losses.name if losses else None,
        "manifest": MANIFEST,
    }
    report.write_summary(pipe.out, summary)
    logger.info("pipeline done in %.1f s: %s", summary["total_seconds"], pipe.out / "summary.md")
    return summary
