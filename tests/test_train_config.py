"""Stage configs, the data-dependent field rules, the lr schedule and metrics flattening."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from vqprior.config import ConfigError
from vqprior.data import DataConfig
from vqprior.models.pixelcnn import PixelCNNConfig
from vqprior.models.vqvae import VQVAEConfig
from vqprior.train.config import (
    DeviceOptions,
    TrainConfig,
    check_sections,
    fill_field,
    fill_num_classes,
)
from vqprior.train.module import lr_lambda
from vqprior.train.rundir import check_run_dir, flatten_metrics, prepare_run_dir

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = [  # stage configs; configs/tiny/pipeline*.yaml are pipeline files (tests/test_pipeline.py)
    p
    for p in sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("tiny/*.yaml"))
    if not p.name.startswith("pipeline")
]
DATA_FIELDS = ("in_channels", "height", "width", "num_codes", "num_classes", "data")


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_is_valid(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    stage = "prior" if path.name.startswith("prior") else "vae"
    check_sections(raw, stage)
    DataConfig.from_dict(raw["data"])
    TrainConfig.from_dict(raw["train"])
    model = {
        k: v for k, v in raw["model"].items() if k not in DATA_FIELDS or v not in (None, "auto")
    }
    (VQVAEConfig if stage == "vae" else PixelCNNConfig).from_dict(model)


def test_unknown_sections_and_model_keys_are_named() -> None:
    with pytest.raises(ConfigError, match="unknown config key optim"):
        check_sections({"model": {}, "optim": {}}, "vae")
    with pytest.raises(ConfigError, match="unknown config key vae"):
        check_sections({"vae": "x"}, "vae")
    with pytest.raises(ConfigError, match="model.num_layer "):
        check_sections({"model": {"num_layer": 3}}, "prior")
    with pytest.raises(ConfigError, match="train.bacth_size"):
        TrainConfig.from_dict({"bacth_size": 3}, prefix="train.")


def test_fill_rules() -> None:
    model: dict[str, Any] = {"height": "auto", "width": None, "in_channels": 3}
    fill_field(model, "height", 8, "the images")
    fill_field(model, "width", 8, "the images")
    fill_field(model, "num_codes", 16, "the VAE")  # absent -> filled
    fill_field(model, "in_channels", 3, "the images")  # explicit and equal -> kept
    assert model == {"height": 8, "width": 8, "in_channels": 3, "num_codes": 16}
    with pytest.raises(ConfigError, match="model.in_channels=3 does not match"):
        fill_field(model, "in_channels", 1, "the images")
    for given, want in (("auto", 10), (None, 10), (0, 0), (10, 10)):
        m = {"num_classes": given}
        fill_num_classes(m, 10)
        assert m["num_classes"] == want
    m = {}
    fill_num_classes(m, 10)
    assert m == {}  # absent: the model default (unconditional)
    with pytest.raises(ConfigError, match="num_classes"):
        fill_num_classes({"num_classes": 5}, 10)


def test_train_config_validation() -> None:
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")
    assert TrainConfig.from_dict({"lr": "1e-3"}).lr == 1e-3


def test_lr_schedule_warmup_then_cosine_to_zero() -> None:
    f = lr_lambda(TrainConfig(lr_schedule="cosine", warmup_steps=4, max_steps=104))
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(54) == pytest.approx(0.5) and f(104) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(4, 104))
    const = lr_lambda(TrainConfig(max_steps=10))
    assert {const(s) for s in range(10)} == {1.0}


def test_default_precision_is_bf16_only_where_bf16_is_native(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch

    from vqprior.train import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(config, "native_cpu_bf16", lambda: False)
    assert DeviceOptions().resolved_precision() == "32-true"
    monkeypatch.setattr(config, "native_cpu_bf16", lambda: True)  # AVX512-BF16 or AMX
    assert DeviceOptions().resolved_precision() == "bf16-mixed"
    assert DeviceOptions(accelerator="cpu").resolved_precision() == "bf16-mixed"
    assert DeviceOptions(precision="32-true").resolved_precision() == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # e.g. a V100
    assert DeviceOptions().resolved_precision() == "32-true"
    assert DeviceOptions(accelerator="cpu").resolved_precision() == "bf16-mixed"
    assert DeviceOptions(precision="bf16-mixed").resolved_precision() == "bf16-mixed"
    assert DeviceOptions(devices="2").trainer_devices() == 2
    assert DeviceOptions(devices="0,1").trainer_devices() == "0,1"


def test_a_run_is_on_the_cpu_when_asked_or_auto_finds_no_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DeviceOptions.on_cpu follows Lightning's auto (CUDA, then MPS, then the CPU), with
    stand-in devices; a CPU-bf16 machine training on MPS gets no CPU bf16 default."""
    import torch

    from vqprior.train import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(config, "native_cpu_bf16", lambda: True)
    on_cpu = {a: DeviceOptions(accelerator=a).on_cpu() for a in ("auto", "cpu", "gpu", "mps")}
    assert on_cpu == {"auto": True, "cpu": True, "gpu": False, "mps": False}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert not DeviceOptions().on_cpu() and DeviceOptions(accelerator="cpu").on_cpu()
    assert DeviceOptions().resolved_precision() == "32-true"  # auto trains on MPS here
    assert DeviceOptions(accelerator="cpu").resolved_precision() == "bf16-mixed"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not DeviceOptions().on_cpu()


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True)
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def test_flatten_metrics_merges_rows_per_step_and_resumes_win(tmp_path: Path) -> None:
    _write(tmp_path / "logs/version_0/metrics.csv", [
        {"step": 0, "train/loss": 3.0}, {"step": 1, "train/loss": 2.0},
        {"step": 1, "val/loss": 2.5}, {"step": 2, "train/loss": 9.0},
    ])  # fmt: skip
    _write(
        tmp_path / "logs/version_1/metrics.csv",
        [{"step": 2, "train/loss": 1.5}, {"step": 3, "train/loss": 1.0}],
    )
    flatten_metrics(tmp_path)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert rows[1]["train/loss"] == "2.0" and rows[1]["val/loss"] == "2.5"
    assert float(rows[2]["train/loss"]) == 1.5  # the resumed launch redid step 2
    assert math.isclose(float(rows[3]["train/loss"]), 1.0)


def test_prepare_run_dir_names_the_first_differing_key(tmp_path: Path) -> None:
    cfg = {"model": {"channels": 8}, "train": {"lr": 0.1}}
    assert prepare_run_dir(tmp_path, cfg) is None
    assert prepare_run_dir(tmp_path, cfg) is None  # same config: fine (nothing to resume yet)
    with pytest.raises(ConfigError, match=r"model.channels is 8 there, 16 now"):
        prepare_run_dir(tmp_path, {"model": {"channels": 16}, "train": {"lr": 0.1}})


@pytest.mark.parametrize(
    ("strategy", "devices", "nodes", "ddp"),
    [("ddp", "1", 1, True), ("auto", "2", 1, True), ("auto", "0,1", 1, True),
     ("auto", "1", 2, True), ("auto", "1", 1, False), ("ddp_spawn", "2", 1, False)],
)  # fmt: skip
def test_ddp_settings_do_not_depend_on_how_ddp_was_asked_for(
    strategy: str, devices: str, nodes: int, ddp: bool
) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from vqprior.train.trainer import resolve_strategy

    opts = DeviceOptions(accelerator="cpu", devices=devices, num_nodes=nodes, strategy=strategy)
    found = resolve_strategy(opts)
    if ddp:  # plain DDP without buffer broadcast (the usage counters are per rank)
        assert type(found) is DDPStrategy and found._ddp_kwargs == {"broadcast_buffers": False}
    else:
        assert found == strategy


def test_a_larger_max_steps_extends_a_run_and_nothing_else_does(tmp_path: Path) -> None:
    cfg = {"model": {"channels": 8}, "train": {"lr": 0.1, "max_steps": 10}}
    assert not check_run_dir(tmp_path, cfg)
    prepare_run_dir(tmp_path, cfg)
    longer = {"model": {"channels": 8}, "train": {"lr": 0.1, "max_steps": 20}}
    assert check_run_dir(tmp_path, longer)  # an extension
    prepare_run_dir(tmp_path, longer)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == longer
    assert not check_run_dir(tmp_path, longer)  # now the same run
    for other in (
        {"model": {"channels": 8}, "train": {"lr": 0.1, "max_steps": 5}},
        {"model": {"channels": 8}, "train": {"lr": 0.2, "max_steps": 40}},
        {"model": {"channels": 9}, "train": {"lr": 0.1, "max_steps": 40}},
    ):
        with pytest.raises(ConfigError, match="holds a different run"):
            check_run_dir(tmp_path, other)


def test_an_unset_max_steps_compares_as_the_default_bound(tmp_path: Path) -> None:
    """Unset (null) is the bound a run has without a budget, 10,000: a named larger bound
    extends it, a smaller one is refused; a run with a named bound is extended by unsetting it
    only when that bound was smaller than 10,000."""

    def run(steps: int | None) -> dict:
        return {"model": {"channels": 8}, "train": {"lr": 0.1, "max_steps": steps}}

    prepare_run_dir(tmp_path / "a", run(None))
    assert not check_run_dir(tmp_path / "a", run(None))
    assert check_run_dir(tmp_path / "a", run(20_000))
    with pytest.raises(ConfigError, match="max_steps is None there, 9000 now"):
        check_run_dir(tmp_path / "a", run(9_000))
    prepare_run_dir(tmp_path / "b", run(500))
    assert check_run_dir(tmp_path / "b", run(None))
    prepare_run_dir(tmp_path / "c", run(20_000))
    with pytest.raises(ConfigError, match="holds a different run"):
        check_run_dir(tmp_path / "c", run(None))


def test_priors_default_to_the_schedule_chosen_per_second_and_the_vae_keeps_its_own() -> None:
    from vqprior.train.stages import PRIOR_TRAIN_DEFAULTS, resolve_prior_stage, resolve_vae_stage

    data = {"name": "digits", "limit": 32}
    cfg = resolve_prior_stage({"data": data, "vae": None})[0]
    assert cfg.train.lr == PRIOR_TRAIN_DEFAULTS["lr"] == 3e-3
    schedule = (cfg.train.batch_size, cfg.train.lr_schedule, cfg.train.warmup_steps)
    assert schedule == (8, "cosine", 50) and cfg.train.ema_decay == 0.0  # a pixel prior: batch 8
    assert cfg.train.adam_beta2 == PRIOR_TRAIN_DEFAULTS["adam_beta2"] == 0.95
    assert resolve_prior_stage({"data": data, "train": {"lr": 5e-4}})[0].train.lr == 5e-4
    assert resolve_vae_stage({"data": data})[0].train.lr == 3e-4
    assert resolve_vae_stage({"data": data})[0].train.adam_beta2 == 0.999


def test_recorded_train_is_what_a_run_dir_records_that_this_version_knows(tmp_path: Path) -> None:
    from vqprior.train.rundir import ADDED_TRAIN_KEYS, recorded_train

    assert recorded_train(None) == recorded_train(tmp_path / "new") == {}
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"train": {"lr": 0.1, "from_a_newer_version": 3}}))
    assert recorded_train(tmp_path) == {**ADDED_TRAIN_KEYS, "lr": 0.1}  # the newer key: refused
    with pytest.raises(ConfigError, match="from_a_newer_version is 3 there"):  # as a change
        check_run_dir(tmp_path, {"train": {**ADDED_TRAIN_KEYS, "lr": 0.1}})
    cfg.write_text("- not\n- a run's config\n")
    assert recorded_train(tmp_path) == {}
    cfg.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="cannot read"):
        recorded_train(tmp_path)


def test_a_run_dir_from_before_a_train_key_existed_is_the_same_run_at_its_old_value(
    tmp_path: Path,
) -> None:
    from vqprior.train.rundir import ADDED_TRAIN_KEYS

    now = TrainConfig().to_dict()
    before = {k: v for k, v in now.items() if k not in ADDED_TRAIN_KEYS}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": before}))
    assert not check_run_dir(tmp_path, {"train": {**before, **ADDED_TRAIN_KEYS}})
    for key, old_value in ADDED_TRAIN_KEYS.items():  # the value those runs used, and no other
        assert now[key] == old_value
        with pytest.raises(ConfigError, match=f"train.{key}"):
            check_run_dir(tmp_path, {"train": {**now, key: old_value / 2}})


def test_adam_beta2_reaches_the_optimiser_and_is_range_checked() -> None:
    from vqprior.train.module import configure_adamw

    param = torch.nn.Parameter(torch.zeros(3))
    opt = configure_adamw([param], TrainConfig(adam_beta2=0.95))["optimizer"]
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="adam_beta2"):
            TrainConfig(adam_beta2=bad)
