"""``vqprior bench --baseline-tree DIR``: this source tree against another, one run, interleaved.

Each measurement is a fresh subprocess running the same small worker (below) with ``DIR`` or
this tree first on ``PYTHONPATH``; the worker uses only ``PixelCNN``/``VQVAE`` and their
configs, which every version has. Subprocesses alternate (baseline, candidate, baseline, ...)
and every ratio is the median over the repeats of the paired ratios, so slow drifts of the
shared machine's load cancel out.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vqprior.bench.train import TINY_DROPOUT, TRAIN_MODELS

log = logging.getLogger(__name__)

WORKER = r"""
import json, statistics, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig
torch.manual_seed(0)
gen = torch.Generator().manual_seed(1)
b = spec["batch"]
if spec["kind"] == "vqvae":
    model = VQVAE(VQVAEConfig(**spec["config"]))
    loss_fn = lambda x: model(x).loss
else:
    model = PixelCNN(PixelCNNConfig(**spec["config"]))
    loss_fn = lambda x: -model.log_prob(x, reduction="mean")
if spec["kind"] == "prior" and model.config.data == "codes":
    x = torch.randint(model.config.num_codes, (b, model.config.height, model.config.width), generator=gen)
else:
    x = torch.rand(b, 3, 32, 32, generator=gen) * 2 - 1
bf16 = spec["precision"] == "bf16"
if bf16:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
times = []
if spec["job"] == "sample":
    model.eval()
    for _ in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model.sample(b, generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - t0)
else:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(spec["steps"] + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = loss_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
print(json.dumps({"seconds": statistics.median(times[1:])}))
"""


@dataclass
class ABRow:
    model: str
    job: str  # train | sample
    precision: str  # the candidate's
    base_precision: str
    batch: int
    base_images_per_s: float
    images_per_s: float
    ratio: float  # candidate speed / baseline speed, median of paired repeats


def this_tree() -> Path:
    return Path(__file__).resolve().parents[2]  # vqprior/bench/ab.py -> the tree


def run_worker(tree: Path, spec: dict) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=tree,
    )
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench worker in {tree} failed: {tail}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def _spec(name: str, job: str, precision: str, batch: int, steps: int, threads: int) -> dict:
    kind, config = TRAIN_MODELS[name]
    if name == "pixelcnnpp-tiny":
        config = {**config, "dropout": TINY_DROPOUT}
    return {
        "kind": kind,
        "config": config,
        "job": job,
        "precision": precision,
        "batch": batch,
        "steps": steps,
        "threads": threads,
    }


def compare_trees(
    baseline: Path,
    models: Sequence[str],
    precisions: Sequence[str],
    batch: int,
    steps: int,
    repeats: int,
    threads: int,
    job: str = "train",
) -> list[ABRow]:
    """For each model and precision: the baseline and the candidate in that precision, all arms
    alternating, so that each ratio isolates the code (bf16 against bf16)."""
    if not (baseline / "vqprior").is_dir():
        raise ValueError(f"--baseline-tree {baseline} holds no vqprior package")
    rows = []
    for name in models:
        arms = [(tree, p) for p in precisions for tree in (baseline, this_tree())]
        times: list[list[float]] = [[] for _ in arms]
        for _ in range(repeats):
            for i, (tree, precision) in enumerate(arms):
                spec = _spec(name, job, precision, batch, steps, threads)
                times[i].append(run_worker(tree, spec))
                log.info("%s %s %s: %.3f s", name, tree, precision, times[i][-1])
        for k, precision in enumerate(precisions):
            base, cand = times[2 * k], times[2 * k + 1]
            paired = statistics.median(b / c for b, c in zip(base, cand, strict=True))
            rows.append(
                ABRow(
                    name,
                    job,
                    precision,
                    precision,
                    batch,
                    batch / statistics.median(base),
                    batch / statistics.median(cand),
                    paired,
                )
            )
    return rows


def format_ab(rows: Sequence[dict], baseline: str) -> list[str]:
    lines = [
        f"this tree vs --baseline-tree {baseline} (eager, same precision), alternating subprocesses",
        f"{'model':<22}{'job':<7}{'variant':<9}{'batch':>6}{'base img/s':>12}{'img/s':>9}{'ratio':>8}",
    ]
    for r in rows:
        lines.append(
            f"{r['model']:<22}{r['job']:<7}{r['precision']:<9}{r['batch']:>6}"
            f"{r['base_images_per_s']:>12.2f}{r['images_per_s']:>9.2f}{r['ratio']:>7.2f}x"
        )
    return lines
