"""DDP with 2 CPU processes (gloo) through the command line: every rank ends with the same weights.

Each run is a subprocess (Lightning's DDP launcher re-runs the command line for rank 1), with
``VQPRIOR_RANK_DUMP`` making every rank write its final and initial module state dicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vqprior.io import content_hash
from vqprior.pipeline.ddp import CALL_ENV, RANK_ENVS
from vqprior.train.rankdump import ENV_VAR

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


def run_cli(tmp_path: Path, dump: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``vqprior ARGS`` in a fresh process; the launcher is a script file so that Lightning can
    start rank 1 by re-running ``sys.argv``."""
    launcher = tmp_path / "launch_vqprior.py"
    launcher.write_text("from vqprior.cli import main\n\nmain()\n")
    env = {k: v for k, v in os.environ.items() if k not in (CALL_ENV, *RANK_ENVS, "WORLD_SIZE")}
    env.update({ENV_VAR: str(dump), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    proc = subprocess.run(
        [sys.executable, str(launcher), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load_ranks(dump: Path, suffix: str = "") -> tuple[dict, dict]:
    return (
        load_file(str(dump / f"rank0{suffix}.safetensors")),
        load_file(str(dump / f"rank1{suffix}.safetensors")),
    )


def assert_same_across_ranks(dump: Path, must_have: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Both ranks hold identical tensors, at the start and at the end; training changed them."""
    for suffix in (".start", ""):
        r0, r1 = load_ranks(dump, suffix)
        assert sorted(r0) == sorted(r1)
        for name in must_have:
            assert any(k.startswith(name) for k in r0), (name, sorted(r0))
        differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
        assert not differ, f"ranks differ ({suffix or 'end'}): {differ}"
    start, end = load_ranks(dump, ".start")[0], load_ranks(dump)[0]
    params = [k for k in end if end[k].is_floating_point() and "quantizer" not in k]
    changed = [k for k in params if not torch.equal(start[k], end[k])]
    assert len(changed) > len(params) // 2, f"training changed only {changed}"
    return end


# Settings under which 2 ranks with batch 8 each must equal 1 process with batch 16: no
# dead-code restarts (their candidates are drawn from rank zero's shard of the batch), and fp32
# (bf16 autocast, the default on CPUs with native bf16, rounds a batch of 16 differently).
EXACT = [
    "--set",
    "model.restart_dead_codes=false",
    "--set",
    "train.max_steps=3",
    "--precision",
    "32-true",
]
SINGLE = ["--accelerator", "cpu", "--devices", "1", "--set", "train.batch_size=16"]


def train_vae(
    tmp: Path, name: str, *device: str
) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    out, dump = tmp / name, tmp / f"{name}_dump"
    args = ["train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(out), *EXACT]
    return out, dump, run_cli(tmp, dump, *args, *device)


@pytest.fixture(scope="module")
def ddp_vae(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp_vae")
    out, dump, proc = train_vae(tmp, "vae", *DDP, "--set", "train.batch_size=8")
    reports = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(reports) == 1, proc.stdout  # rank zero reports, rank one stays quiet
    assert json.loads(reports[0])["global_step"] == 3
    return out, dump


def exported_state(out: Path, final: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module state the run exported: its final one, or best.ckpt's."""
    if json.loads((out / "summary.json").read_text())["exported"] == "final":
        return final
    return torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]


def test_vae_ranks_agree_on_weights_and_codebook(ddp_vae: tuple[Path, Path]) -> None:
    out, dump = ddp_vae
    end = assert_same_across_ranks(
        dump, ("model.encoder", "model.decoder", "model.quantizer.embed")
    )
    start = load_ranks(dump, ".start")[0]
    assert not torch.equal(start["model.quantizer.embed"], end["model.quantizer.embed"])
    exported = load_file(str(out / "model" / "model.safetensors"))
    chosen = exported_state(out, end)
    for k, v in exported.items():  # the export is rank zero's model
        assert torch.equal(v, chosen[f"model.{k}"]), k


def test_two_ranks_equal_one_process_on_the_whole_batch_with_or_without_strategy_ddp(
    ddp_vae: tuple[Path, Path], tmp_path: Path
) -> None:
    """Sums (codebook counts and sums) summed and gradients averaged over the ranks: the same
    codebook and weights as one process on the concatenated batch; ``--strategy auto`` with 2
    devices gets the very same DDP settings as ``--strategy ddp``."""
    _, ddp_dump = ddp_vae
    ddp = load_ranks(ddp_dump)[0]
    auto = ["--accelerator", "cpu", "--devices", "2", "--set", "train.batch_size=8"]
    _, auto_dump, _ = train_vae(tmp_path, "auto", *auto)
    for k, v in load_ranks(auto_dump)[0].items():
        assert torch.equal(v, ddp[k]), k
    _, single_dump, _ = train_vae(tmp_path, "single", *SINGLE)
    single = load_file(str(single_dump / "rank0.safetensors"))
    assert sorted(single) == sorted(ddp)
    for k, v in single.items():
        if v.is_floating_point():
            torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(ddp[k], v), k


def test_codes_prior_ranks_agree_including_ema(ddp_vae: tuple[Path, Path], tmp_path: Path) -> None:
    vae, _ = ddp_vae
    out, dump = tmp_path / "prior", tmp_path / "dump"
    run_cli(
        tmp_path, dump, "train-prior", "--config", str(TINY / "prior_codes.yaml"),
        "--vae", str(vae), "--out", str(out), *DDP,
    )  # fmt: skip
    end = assert_same_across_ranks(dump, ("model.", "ema.module.", "model.class_embed"))
    assert int(end["ema.n_averaged"]) == 4  # one EMA update per optimizer step
    assert json.loads((out / "vae.json").read_text())["vae_hash"] == content_hash(vae / "model")


def test_pipeline_under_ddp(tmp_path: Path) -> None:
    """Rank one joins every training stage of a pipeline; rank zero alone encodes and samples."""
    out, dump = tmp_path / "run", tmp_path / "dump"
    run_cli(tmp_path, dump, "pipeline", str(TINY / "pipeline_ddp.yaml"), "--out", str(out), *DDP)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["status"] for e in manifest["stages"].values()] == ["done"] * 4
    assert_same_across_ranks(dump, ("model.", "ema.module."))  # the last training stage
    assert (out / "samples" / "samples.png").is_file()
    proc = run_cli(
        tmp_path, dump, "pipeline", str(TINY / "pipeline_ddp.yaml"), "--out", str(out), *DDP
    )
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["skipped"] for s in summary["stages"]), proc.stderr[-2000:]
