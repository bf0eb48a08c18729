"""Freed host memory kept for reuse (vqprior.host): every CLI command and training stage."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vqprior import host

_LOOP = """
import resource, sys, torch
from vqprior.host import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
x = torch.ones(2 << 20)  # 8 MiB
def step():  # activations of 64 MiB allocated, then freed at once
    ys = [x * k for k in range(8)]
    del ys
step(), step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    # glibc's starting thresholds (128 KiB), pinned: by default it raises them as blocks are
    # freed, so how often the default faults depends on the heap's history (4k, 6k and 163k
    # faults in three runs on one machine); keep_freed_memory's mallopt overrides these
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_without_page_faults() -> None:
    default, kept = _faults("default"), _faults("keep")
    # by default the 64 MiB go back to the kernel and fault in again (~16k pages a step, 163k
    # in all); kept, they are reused (0 faults, at worst a few thousand)
    assert kept * 2 < default, (kept, default)
    assert kept < 20_000, kept


def test_a_no_op_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host.sys, "platform", "darwin")
    assert host.keep_freed_memory() is False


def test_every_training_stage_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from vqprior.train import trainer as trainer_mod

    calls: list[str] = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: calls.append("kept") or True)

    class StubTrainer:  # stands in for a Lightning Trainer: records the order of events
        is_global_zero = False

        def fit(self, *args: object, **kwargs: object) -> None:
            calls.append("fit")
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        trainer_mod.run_training(StubTrainer(), None, None, None, Path("."), False)  # type: ignore[arg-type]
    assert calls == ["kept", "fit"]


def test_every_cli_command_keeps_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's group runs it before any command (score, compress, generate, ...)."""
    from click.testing import CliRunner

    from vqprior import cli as cli_mod

    calls: list[str] = []
    monkeypatch.setattr(cli_mod, "keep_freed_memory", lambda: calls.append("kept") or True)
    result = CliRunner().invoke(cli_mod.cli, ["decompress", "missing.vqz", "out"])
    assert result.exit_code != 0 and calls == ["kept"]
