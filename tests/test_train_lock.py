"""The run lock: a second process on the same --out is refused; a killed holder frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from vqprior.cli import cli
from vqprior.lock import LOCK_NAME, RunLock, RunLockedError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
HOLD = """
import sys, time
from vqprior.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(out: Path) -> subprocess.Popen[str]:
    """A process that holds ``out``'s lock until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def train_vae(out: Path) -> object:
    return CliRunner().invoke(
        cli,
        ["train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(out),
         "--set", "train.max_steps=1", "--accelerator", "cpu", "--devices", "1"],
    )  # fmt: skip


def test_second_process_is_refused_and_a_killed_holder_frees_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "run"
    holder = hold(out)
    try:
        result = train_vae(out)
        assert result.exit_code == 2, result.output  # type: ignore[attr-defined]
        lines = result.stderr.strip().splitlines()  # type: ignore[attr-defined]
        assert lines == [
            f"error: another vqprior process is using {out} (pid {holder.pid}); "
            "wait for it or choose another --out"
        ]
        assert not (out / "config.yaml").exists()  # refused before touching the run dir
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)  # left behind, harmless
    result = train_vae(out)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    assert (out / "model" / "model.safetensors").is_file()


def test_lock_is_reentrant_in_one_process_and_released_on_exit(tmp_path: Path) -> None:
    with RunLock(tmp_path), RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    holder = hold(tmp_path)  # the lock is free again: another process gets it
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"), RunLock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_other_ranks_do_not_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = hold(tmp_path)
    try:
        monkeypatch.setenv("LOCAL_RANK", "1")
        with RunLock(tmp_path):  # rank one shares rank zero's directory
            pass
    finally:
        holder.kill()
        holder.wait()
