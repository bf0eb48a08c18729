"""Runs over time: extending a finished run, progress lines without a terminal, a full disk."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner, Result

import vqprior.io
from vqprior.cli import cli

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
PROGRESS = "INFO vqprior.train.progress: "


def train_vae(out: Path, *sets: str) -> Result:
    args = ["train-vae", "--config", str(TINY / "vae.yaml"), "--out", str(out),
            "--accelerator", "cpu", "--devices", "1"]  # fmt: skip
    for s in sets:
        args += ["--set", s]
    return CliRunner().invoke(cli, args)


def state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def error_lines(result: Result) -> list[str]:
    return [ln for ln in result.stderr.strip().splitlines() if not ln.startswith(PROGRESS)]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("runs") / "vae"
    result = train_vae(out, "train.max_steps=3")
    assert result.exit_code == 0, result.output
    return out, result


def test_progress_lines_without_a_terminal(three_steps: tuple[Path, Result]) -> None:
    _, result = three_steps  # CliRunner's stderr is not a terminal: no bar, plain lines
    lines = [ln[len(PROGRESS) :] for ln in result.stderr.splitlines() if ln.startswith(PROGRESS)]
    assert [ln.split(",")[0] for ln in lines] == [
        "step 1/3 (33%)", "step 2/3 (66%)", "step 3/3 (100%)", "step 3/3 (100%)"
    ]  # fmt: skip
    assert all("loss " in ln and " img/s" in ln and " left" in ln for ln in lines)
    assert lines[-1].endswith("(done)") and "\r" not in result.stderr  # no progress bar


def test_rerun_with_more_steps_extends_the_run(
    three_steps: tuple[Path, Result], tmp_path: Path
) -> None:
    out, _ = three_steps
    result = train_vae(out, "train.max_steps=6")
    assert result.exit_code == 0, result.output
    extended = state(out / "checkpoints" / "last.ckpt")
    assert extended["global_step"] == 6
    assert "max_steps: 6" in (out / "config.yaml").read_text()
    straight = tmp_path / "straight"
    assert train_vae(straight, "train.max_steps=6").exit_code == 0
    reference = state(straight / "checkpoints" / "last.ckpt")
    # it resumed (an exact resume of a constant-lr run): the very weights of an uninterrupted run
    for k, v in reference["state_dict"].items():
        assert torch.equal(v, extended["state_dict"][k]), k


def test_an_extension_that_changes_anything_else_is_refused(
    three_steps: tuple[Path, Result],
) -> None:
    out, _ = three_steps
    before = (out / "config.yaml").read_text()
    for sets in (("train.max_steps=9", "train.lr=0.1"), ("train.max_steps=2",)):
        result = train_vae(out, *sets)
        assert result.exit_code == 2
        (line,) = error_lines(result)
        assert line.startswith("error: ") and "holds a different run" in line
    assert (out / "config.yaml").read_text() == before


def test_a_rerun_keeps_what_its_run_recorded_where_the_config_names_nothing(
    three_steps: tuple[Path, Result], tmp_path: Path
) -> None:
    """A run made under other defaults (an older version: another lr, no adam_beta2 key yet)
    is still the same run: the keys the config does not name keep their recorded values (the
    tiny config names lr, not grad_clip), and
    a larger max_steps extends it. A named value is compared, and refused where it differs."""
    out = tmp_path / "vae"
    shutil.copytree(three_steps[0], out)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    recorded["train"]["grad_clip"] = 0.5  # not TrainConfig's default
    del recorded["train"]["adam_beta2"]
    (out / "config.yaml").write_text(yaml.safe_dump(recorded))
    longer = recorded["train"]["max_steps"] + 2  # 3, or 6 after the extension test
    result = train_vae(out, f"train.max_steps={longer}")
    assert result.exit_code == 0, result.output
    assert state(out / "checkpoints" / "last.ckpt")["global_step"] == longer
    train = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (train["grad_clip"], train["adam_beta2"], train["max_steps"]) == (0.5, 0.999, longer)
    for named in ("train.grad_clip=1.0", "train.adam_beta2=0.95"):
        result = train_vae(out, f"train.max_steps={longer}", named)
        (line,) = error_lines(result)
        assert result.exit_code == 2 and named.split("=")[0] in line, line


def _full_disk(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_after_some_bytes(obj: Any, fh: Any, *args: Any, **kwargs: Any) -> None:
    fh.write(b"half a checkpoint")
    _full_disk()


@pytest.mark.parametrize("what", ["checkpoint", "export"])
def test_a_full_disk_keeps_the_previous_files_and_ends_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    out = tmp_path / "vae"
    assert train_vae(out, "train.max_steps=2").exit_code == 0
    written = out / ("checkpoints" if what == "checkpoint" else "model")
    kept = {p: p.read_bytes() for p in written.iterdir()}
    if what == "checkpoint":
        monkeypatch.setattr(torch, "save", _full_disk_after_some_bytes)
    else:
        monkeypatch.setattr(vqprior.io, "_write_file", _full_disk)
    result = train_vae(out, "train.max_steps=4")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert line.startswith("error: cannot write ") and "No space left on device" in line
    assert "the previous version, if any, is left in place" in line
    for path, data in kept.items():
        assert path.read_bytes() == data, path
    leftovers = [p for p in out.rglob(".*") if p.name != ".lock"]
    assert not leftovers  # no temp file or staging dir left behind
