"""`vqprior pipeline` on configs/tiny/pipeline.yaml through CliRunner: artefacts, skipping,
redoing what changed (and only that), --from, resuming an interrupted stage, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import yaml
from click.testing import CliRunner, Result
from lightning.pytorch.callbacks import Callback
from PIL import Image
from safetensors.torch import load_file

from vqprior.cli import cli
from vqprior.config import ConfigError
from vqprior.io import content_hash, file_sha256
from vqprior.pipeline.spec import load_pipeline
from vqprior.train import codes, inference, stages

ROOT = Path(__file__).resolve().parents[1]
PIPE = ROOT / "configs" / "tiny" / "pipeline.yaml"
DEV = ["--accelerator", "cpu", "--devices", "1"]
NAMES = ["vae", "codes", "prior_codes", "samples_codes", "eval_codes",
         "prior_pixels", "samples_pixels", "eval_pixels"]  # fmt: skip
PIXELS = ["prior_pixels", "samples_pixels", "eval_pixels"]


def pipeline(out: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["pipeline", str(PIPE), "--out", str(out), *DEV, *args])


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())["stages"]


def statuses(out: Path) -> dict[str, str]:
    summary = json.loads((out / "summary.json").read_text())
    return {s["name"]: s["status"] for s in summary["stages"]}


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("pipe") / "run"
    result = pipeline(out)
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture
def run(first: tuple[Path, Result], tmp_path: Path) -> Path:
    """A private copy of the finished run (keys name stages, not paths, so it stays valid)."""
    return Path(shutil.copytree(first[0], tmp_path / "run"))


class Spy:
    """Wraps the stage functions: records which stage folders ran (or makes any call fail)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        self.ran: list[str] = []
        for module, name, arg in (
            (stages, "train_vae", 1), (stages, "train_prior", 1), (codes, "encode_codes", 2),
            (inference, "generate", 3), (inference, "evaluate", None),
        ):  # fmt: skip
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name), name, arg, fail))

    def _wrap(self, fn: Any, name: str, arg: int | None, fail: bool) -> Any:
        def wrapped(*args: Any, **kw: Any) -> Any:
            if fail:
                raise AssertionError(f"{name} ran")
            result = fn(*args, **kw)
            folder = Path(args[arg]).parent if name == "generate" else args[arg] if arg else None
            self.ran.append(Path(folder).name if folder else f"evaluate:{Path(args[0]).name}")
            return result

        return wrapped


def test_first_run_writes_every_artefact(first: tuple[Path, Result]) -> None:
    out, result = first
    for i, name in enumerate(NAMES, 1):
        assert f"[{i}/8] " in result.stderr and f" {name} " in result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*NAMES, "manifest.json", "summary.md", "summary.json", "losses.png", ".lock"]
    )
    entries = manifest(out)
    assert list(entries) == NAMES and all(e["status"] == "done" for e in entries.values())
    for name in ("vae", "prior_codes", "prior_pixels"):  # recorded hashes are the exports'
        assert entries[name]["outputs"] == {"model": content_hash(out / name / "model")}
    assert (
        entries["samples_codes"]["outputs"]["samples.png"]
        == file_sha256(out / "samples_codes" / "samples.png")[:16]
    )
    assert entries["prior_codes"]["deps"] == {
        "vae": entries["vae"]["key"],
        "codes": entries["codes"]["key"],
    }
    assert not (out / "prior_codes" / "codes").exists()  # it trained on the encode stage's codes
    samples = load_file(str(out / "samples_codes" / "samples.safetensors"))
    assert samples["images"].shape == (10, 1, 8, 8)
    assert samples["labels"].tolist() == list(range(10))  # class-conditional: one per class
    with Image.open(out / "losses.png") as img:
        assert img.format == "PNG" and img.width > 3 * img.height  # three panels side by side
    summary = json.loads((out / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["ran"] * 8
    by_name = {s["name"]: s for s in summary["stages"]}
    assert 0 < by_name["vae"]["figures"]["val/recon_mse"] < 4
    assert by_name["eval_pixels"]["figures"]["bits_per_dim"] > 0
    for s in summary["stages"]:
        for png in s["images"]:
            assert (out / png).is_file()
    md = (out / "summary.md").read_text()
    assert all(f"| {name} |" in md for name in NAMES) and "samples_pixels/samples.png" in md


def test_second_run_skips_every_stage(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = manifest(run)
    Spy(monkeypatch, fail=True)
    result = pipeline(run)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("skipped (unchanged") == 8
    assert set(statuses(run).values()) == {"skipped"}
    assert manifest(run) == before


def test_changed_stage_reruns_with_its_dependents_only(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = manifest(run)
    spy = Spy(monkeypatch)
    result = pipeline(run, "--set", "prior_pixels.train.lr=1e-3")
    assert result.exit_code == 0, result.output
    assert spy.ran == ["prior_pixels", "samples_pixels", "evaluate:prior_pixels"]
    after = manifest(run)
    for name in NAMES:
        assert (after[name]["key"] != before[name]["key"]) == (name in PIXELS), name
    assert {n for n, s in statuses(run).items() if s != "skipped"} == set(PIXELS)
    stale = sorted(run.glob("prior_pixels.stale-*"))
    assert len(stale) == 1  # the old run is kept, untouched
    assert content_hash(stale[0] / "model") == before["prior_pixels"]["outputs"]["model"]
    assert "lr: 0.001" in (run / "prior_pixels" / "config.yaml").read_text()


def test_from_redoes_that_stage_and_every_later_one(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = manifest(run)
    spy = Spy(monkeypatch)
    result = pipeline(run, "--from", "samples_pixels")
    assert result.exit_code == 0, result.output
    assert spy.ran == ["samples_pixels", "evaluate:prior_pixels"]
    assert [s for s in statuses(run).values()] == ["skipped"] * 6 + ["redone"] * 2
    after = manifest(run)
    assert after["samples_pixels"]["key"] == before["samples_pixels"]["key"]  # same inputs
    (stale,) = run.glob("samples_pixels.stale-*")
    # same seed, same prior: the redone samples equal the old ones
    old, new = (load_file(str(d / "samples.safetensors")) for d in (stale, run / "samples_pixels"))
    assert old["images"].equal(new["images"])
    assert (
        after["samples_pixels"]["outputs"]["samples.png"] == file_sha256(stale / "samples.png")[:16]
    )


class Interrupt(RuntimeError):
    pass


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise Interrupt(f"killed at step {self.step}")


def test_interrupted_stage_resumes_from_its_checkpoint(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = stages.train_prior

    def killed(*args: Any, **kw: Any) -> Any:
        return original(*args, **{**kw, "callbacks": [*kw.get("callbacks", []), StopAt(3)]})

    monkeypatch.setattr(stages, "train_prior", killed)
    sets = ["--set", "prior_pixels.train.max_steps=8", "--set", "prior_pixels.train.seed=1"]
    result = pipeline(run, *sets)
    assert result.exit_code == 1  # a crash, whether the CLI reports it in one line or not
    assert "killed at step 3" in result.stderr + repr(result.exception)
    entry = manifest(run)["prior_pixels"]
    assert entry["status"] == "running"
    assert (run / "prior_pixels" / "checkpoints" / "last.ckpt").is_file()
    # as a version before train.adam_beta2 wrote it (priors now default to 0.95, not 0.999): the
    # stage still resumes, at the value its run recorded
    cfg_file = run / "prior_pixels" / "config.yaml"
    recorded = yaml.safe_load(cfg_file.read_text())
    assert recorded["train"].pop("adam_beta2") == 0.95
    cfg_file.write_text(yaml.safe_dump(recorded))
    monkeypatch.setattr(stages, "train_prior", original)
    result = pipeline(run, *sets)
    assert result.exit_code == 0, result.output
    assert statuses(run)["prior_pixels"] == "resumed" and "resuming an interrupted" in result.stderr
    after = manifest(run)["prior_pixels"]
    assert after["key"] == entry["key"] and after["status"] == "done"
    assert after["figures"]["global_step"] == 8
    logs = sorted(p.name for p in (run / "prior_pixels" / "logs").iterdir())
    assert logs == ["version_0", "version_1"]  # two launches of one run
    with open(run / "prior_pixels" / "logs" / "version_1" / "metrics.csv", newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert min(steps) == 2  # the second launch went on from the step-2 checkpoint
    assert len(list(run.glob("prior_pixels.stale-*"))) == 1  # only the first --set moved one


def test_longer_schedule_extends_the_stage_instead_of_redoing_it(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = manifest(run)
    spy = Spy(monkeypatch)
    result = pipeline(run, "--set", "prior_pixels.train.max_steps=8")  # 6 in the file
    assert result.exit_code == 0, result.output
    assert spy.ran == ["prior_pixels", "samples_pixels", "evaluate:prior_pixels"]
    assert "extending it from 6 to 8 steps" in result.stderr
    assert [statuses(run)[n] for n in PIXELS] == ["extended", "redone", "redone"]
    after = manifest(run)["prior_pixels"]
    assert after["key"] == before["prior_pixels"]["key"] and after["max_steps"] == 8
    assert after["figures"]["global_step"] == 8
    assert after["outputs"] != before["prior_pixels"]["outputs"]  # a new export
    assert not list(run.glob("prior_pixels.stale-*"))  # continued in place
    with open(run / "prior_pixels" / "logs" / "version_1" / "metrics.csv", newline="") as fh:
        steps = [int(row["step"]) for row in csv.DictReader(fh)]
    assert min(steps) >= 6  # the second launch went on from the end of the first
    result = pipeline(run, "--set", "prior_pixels.train.max_steps=4")  # shorter: redone
    assert result.exit_code == 0, result.output
    assert statuses(run)["prior_pixels"] == "redone"
    assert len(list(run.glob("prior_pixels.stale-*"))) == 1
    assert manifest(run)["prior_pixels"]["figures"]["global_step"] == 4


def test_second_pipeline_on_the_same_out_is_refused(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the first pipeline runs a stage, a second process on its --out stops at once."""
    seen: list[subprocess.CompletedProcess[str]] = []
    original = inference.generate

    def generate_and_race(*args: Any, **kw: Any) -> Any:
        cmd = [sys.executable, "-m", "vqprior", "pipeline", str(PIPE), "--out", str(run), *DEV]
        seen.append(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120))
        return original(*args, **kw)

    monkeypatch.setattr(inference, "generate", generate_and_race)
    before = (run / "manifest.json").read_text()
    result = pipeline(run, "--set", "samples_pixels.num=5")
    assert result.exit_code == 0, result.output
    (second,) = seen
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: another vqprior process is using")
    assert str(os.getpid()) in lines[0]  # it names the holder
    assert statuses(run)["samples_pixels"] == "redone"  # the first run went on undisturbed
    assert (run / "manifest.json").read_text() != before


def test_unknown_stage_or_key_is_one_line_exit_2(tmp_path: Path) -> None:
    for args, needle in (
        (["--set", "nope.train.lr=1"], "unknown stage 'nope'"),
        (["--set", "vae.train.lrr=1"], "train.lrr"),
        (["--set", "samples_codes.nun=3"], "unknown key 'nun'"),
        (["--from", "nope"], "--from nope"),
        (["--num-nodes", "2"], "torchrun or srun"),
    ):
        result = pipeline(tmp_path / "x", *args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert not (tmp_path / "x").exists()  # nothing ran, nothing was written


def write(tmp_path: Path, stages_yaml: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"out: {tmp_path / 'o'}\nstages:\n{stages_yaml}")
    return path


@pytest.mark.parametrize(
    ("stages_yaml", "needle"),
    [
        ("  p: {kind: generate, prior: later}\n  later: {kind: train-prior, config: "
         f"{ROOT}/configs/tiny/prior_pixels.yaml}}\n", "not an earlier train-prior stage"),
        (f"  v: {{kind: train-vae, config: {ROOT}/configs/tiny/vae.yaml}}\n"
         "  c: {kind: encode, vae: v, data: {limit: 32}}\n"
         f"  p: {{kind: train-prior, config: {ROOT}/configs/tiny/prior_codes.yaml, vae: v, codes: c}}\n",
         "data.limit is 64 here but 32 in encode stage c"),
        (f"  v: {{kind: train-vae, config: {ROOT}/configs/tiny/vae.yaml, model: {{chanels: 3}}}}\n",
         "model.chanels"),
        ("  v: {kind: train-gan}\n", "kind='train-gan'"),
        ("  v: {kind: train-vae, config: nowhere.yaml}\n", "config nowhere.yaml not found"),
    ],
)  # fmt: skip
def test_bad_pipeline_files_name_the_stage(tmp_path: Path, stages_yaml: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="^stage ") as err:
        load_pipeline(write(tmp_path, stages_yaml))
    assert needle in str(err.value)


def test_a_prior_stage_without_data_takes_its_vaes_and_matches_its_encode_stage(
    tmp_path: Path,
) -> None:
    """The codes check compares the data the prior stage trains on (its VAE stage's, but for
    the keys it names) with what the encode stage encoded."""
    tiny = f"{ROOT}/configs/tiny"
    prior = yaml.safe_load(Path(f"{tiny}/prior_codes.yaml").read_text())
    del prior["data"]
    (tmp_path / "prior.yaml").write_text(yaml.safe_dump(prior))
    stages = (
        f"  v: {{kind: train-vae, config: {tiny}/vae.yaml}}\n"
        "  c: {kind: encode, vae: v}\n"
        f"  p: {{kind: train-prior, config: {tmp_path}/prior.yaml, vae: v, codes: c}}\n"
    )
    load_pipeline(write(tmp_path, stages))  # the VAE's data: the same as the codes'
    with pytest.raises(ConfigError, match="data.limit is 32 here but 64 in encode stage c"):
        load_pipeline(write(tmp_path, stages.replace("codes: c}", "codes: c, data: {limit: 32}}")))


def test_the_manifest_records_an_unset_max_steps_as_the_default_bound(tmp_path: Path) -> None:
    """A stage without ``train.max_steps`` is recorded at the bound it has without a budget, so
    naming a larger one later extends it and naming 10,000 changes nothing."""
    from vqprior.pipeline.spec import max_steps
    from vqprior.train.config import DEFAULT_MAX_STEPS

    prior = f"{ROOT}/configs/tiny/prior_pixels.yaml"
    pipe = load_pipeline(write(tmp_path, (
        f"  unset: {{kind: train-prior, config: {prior}, train: {{max_steps: null}}}}\n"
        f"  named: {{kind: train-prior, config: {prior}, train: {{max_steps: 7}}}}\n"
        "  samples: {kind: generate, prior: named}\n"
    )))  # fmt: skip
    assert [max_steps(s) for s in pipe.stages] == [DEFAULT_MAX_STEPS, 7, None]


@pytest.mark.parametrize("name", ["quickstart", "mnist", "cifar10"])
def test_shipped_pipelines_are_valid(name: str) -> None:
    pipe = load_pipeline(ROOT / "pipelines" / f"{name}.yaml")
    kinds = [s.kind for s in pipe.stages]
    assert {"train-vae", "encode", "train-prior", "generate", "evaluate"} <= set(kinds)
    priors = [s for s in pipe.stages if s.kind == "train-prior"]
    assert {("vae" in s.refs) for s in priors} == {True, False}  # a codes and a pixel prior


def _levels_pipeline(levels: int) -> str:
    """A pipeline of a tiny VQ-VAE with ``levels`` levels, one prior per level, samples, bound."""
    tiny = f"{ROOT}/configs/tiny"
    vae = (f"  vae: {{kind: train-vae, config: {tiny}/vae_mixture.yaml, "
           f"model: {{levels: {levels}, top_downsample: 2}}}}\n")  # fmt: skip
    if levels == 1:
        priors = f"  prior: {{kind: train-prior, config: {tiny}/prior_codes.yaml, vae: vae}}\n"
        refs = "prior: prior"
    else:
        priors = "".join(
            f"  prior_{lv}: {{kind: train-prior, config: {tiny}/prior_codes.yaml, vae: vae, "
            f"data: {{level: {lv}}}}}\n"
            for lv in ("top", "bottom")
        )
        refs = "prior: prior_top, bottom_prior: prior_bottom"
    return (f"stages:\n{vae}{priors}  samples: {{kind: generate, {refs}, num: 4}}\n"
            f"  bound: {{kind: evaluate, {refs}}}\n")  # fmt: skip


@pytest.mark.parametrize("levels", [1, 2])
def test_pipeline_goes_to_samples_and_bound_for_every_level_count(
    tmp_path: Path, levels: int
) -> None:
    file = tmp_path / "levels.yaml"
    file.write_text(_levels_pipeline(levels))
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pipeline", str(file), "--out", str(out), *DEV])
    assert result.exit_code == 0, result.output
    assert set(statuses(out).values()) == {"ran"}
    samples = load_file(str(out / "samples" / "samples.safetensors"))
    assert samples["images"].shape == (4, 1, 8, 8)
    names = ["codes"] if levels == 1 else ["top_codes", "bottom_codes"]
    assert sorted(k for k in samples if k.endswith("codes")) == sorted(names)
    bound = json.loads((out / "bound" / "eval.json").read_text())
    parts = [k for k in bound if k.endswith("_bits_per_dim") and k != "bits_per_dim"]
    assert len(parts) == levels + 1  # every level's prior and the decoder
    assert bound["bits_per_dim"] == pytest.approx(sum(bound[k] for k in parts))
    summary = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert summary["bound"]["figures"]["bits_per_dim"] == pytest.approx(bound["bits_per_dim"])
    assert "samples/samples.png" in (out / "summary.md").read_text()
