"""`vqprior pipeline` under an external launcher: two "nodes" of one CPU process each (gloo).

Each node is a subprocess given what torchrun or a cluster sets (``MASTER_ADDR``,
``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``NODE_RANK``, ``LOCAL_RANK``); ``VQPRIOR_RANK_DUMP``
makes every rank write its module's weights at the start and end of each training stage.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from vqprior.pipeline.ddp import CALL_ENV, RANK_ENVS
from vqprior.train.rankdump import ENV_VAR

ROOT = Path(__file__).resolve().parents[1]
PIPE = ROOT / "configs" / "tiny" / "pipeline_ddp.yaml"
NODES = ["--num-nodes", "2", "--devices", "1", "--accelerator", "cpu", "--strategy", "ddp"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_nodes(
    out: Path, dump: Path, *args: str, rank1: tuple[str, ...] = ()
) -> list[subprocess.CompletedProcess[str]]:
    """Both nodes at once, as a launcher would start them (``rank1``: extra arguments of
    node 1); wait for both."""
    base = {k: v for k, v in os.environ.items() if k not in (CALL_ENV, *RANK_ENVS)}
    base.update({ENV_VAR: str(dump), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                 "LOCAL_RANK": "0"})  # fmt: skip
    cmd = [sys.executable, "-m", "vqprior", "pipeline", str(PIPE), "--out", str(out), *NODES]
    procs = [
        subprocess.Popen(
            [*cmd, *args, *(rank1 if r else ())],
            cwd=ROOT,
            env={**base, "RANK": str(r), "NODE_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def test_two_nodes_run_the_pipeline_once_and_train_together(tmp_path: Path) -> None:
    out, dump = tmp_path / "run", tmp_path / "dump"
    rank0, rank1 = launch_nodes(out, dump)
    for proc in (rank0, rank1):
        assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone reports, plans and writes; rank 1 joined both training stages
    assert [ln for ln in rank0.stdout.splitlines() if ln.startswith("{")]
    assert not rank1.stdout.strip(), rank1.stdout
    assert rank1.stderr.count("rank joins ") == 2 and "[1/4]" not in rank1.stderr
    assert rank0.stderr.count("[1/4]") == 2  # its header and its result
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert [e["status"] for e in manifest.values()] == ["done"] * 4
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ran"] * 4
    assert sorted(p.name for p in out.iterdir() if p.name[0] != ".") == sorted(
        ["vae", "codes", "prior", "samples", "manifest.json", "summary.json", "summary.md",
         "losses.png"]
    )  # fmt: skip
    for stage in ("vae", "prior"):  # one launch of each training stage wrote logs
        assert sorted(p.name for p in (out / stage / "logs").iterdir()) == ["version_0"]
    assert (out / "samples" / "samples.png").is_file()
    # both ranks trained the last stage from the same start to the same end
    for suffix in (".start", ""):
        r0, r1 = (load_file(str(dump / f"rank{r}{suffix}.safetensors")) for r in (0, 1))
        assert sorted(r0) == sorted(r1) and any(k.startswith("ema.module.") for k in r0)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), suffix
    start, end = (load_file(str(dump / f"rank0{s}.safetensors")) for s in (".start", ""))
    assert not torch.equal(start["ema.n_averaged"], end["ema.n_averaged"])


def test_nodes_that_resolve_another_pipeline_all_stop_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = launch_nodes(out, tmp_path / "dump", rank1=("--set", "samples.num=3"))
    for proc in procs:
        assert proc.returncode == 2, proc.stderr[-3000:]
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert len(lines) == 1 and "rank 1 resolved another pipeline than rank 0" in lines[0]
    assert not out.exists()
