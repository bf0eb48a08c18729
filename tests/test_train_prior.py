"""encode, train_prior (codes and pixels), generate and evaluate on configs/tiny."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vqprior.artifacts import load_codes
from vqprior.config import ConfigError
from vqprior.data import DataConfig, float_to_uint8, load_image_splits
from vqprior.io import CheckpointError, content_hash, load_pretrained
from vqprior.models.pixelcnn import PixelCNN
from vqprior.models.vqvae import VQVAE
from vqprior.train.codes import encode_codes
from vqprior.train.config import DeviceOptions
from vqprior.train.inference import evaluate, export, generate
from vqprior.train.stages import train_prior, train_vae

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
CPU = DeviceOptions(accelerator="cpu", devices="1", progress=False)


def tiny(name: str) -> dict[str, Any]:
    return yaml.safe_load((TINY / name).read_text())


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    train_vae(tiny("vae.yaml"), out, CPU)
    return out


@pytest.fixture(scope="module")
def other_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae2")
    train_vae(tiny("vae.yaml"), out, CPU, seed=1)
    return out


@pytest.fixture(scope="module")
def codes_dir(vae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("codes")
    files = encode_codes(vae_dir, tiny("vae.yaml")["data"], out)
    assert files == {s: out / f"{s}.safetensors" for s in ("train", "val", "test")}
    return out


@pytest.fixture(scope="module")
def codes_prior(vae_dir: Path, codes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prior_codes")
    cfg = {**tiny("prior_codes.yaml"), "vae": str(vae_dir)}
    train_prior(cfg, out, CPU, codes_dir=codes_dir)
    return out


def test_encode_stores_codes_of_every_split_with_the_vae_hash(
    vae_dir: Path, codes_dir: Path
) -> None:
    vae = load_pretrained(vae_dir / "model")
    assert isinstance(vae, VQVAE)
    splits = load_image_splits(DataConfig.from_dict(tiny("vae.yaml")["data"]))
    for split in ("train", "val", "test"):
        codes, labels, meta = load_codes(codes_dir / f"{split}.safetensors")
        ds = getattr(splits, split)
        assert meta["vae_hash"] == content_hash(vae_dir / "model")
        assert meta["num_codes"] == "16" and meta["grid"] == "4x4"
        assert "level" not in meta  # one level: implicit
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        assert torch.equal(codes, vae.encode(x))
        assert torch.equal(labels, torch.stack([ds[i][1] for i in range(len(ds))]))


def test_codes_prior_run_records_the_vae_and_exports_ema_weights(
    codes_prior: Path, vae_dir: Path, codes_dir: Path
) -> None:
    resolved = yaml.safe_load((codes_prior / "config.yaml").read_text())
    assert resolved["model"]["data"] == "codes"
    assert (
        resolved["model"]["num_codes"],
        resolved["model"]["height"],
        resolved["model"]["width"],
    ) == (16, 4, 4)
    assert resolved["model"]["num_classes"] == 10  # auto: the digits' classes
    record = json.loads((codes_prior / "model" / "vae.json").read_text())
    assert record["vae_hash"] == content_hash(vae_dir / "model")
    ckpt = torch.load(codes_prior / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["vae"]["vae_hash"] == record["vae_hash"]
    state = ckpt["state_dict"]
    prior = load_pretrained(codes_prior / "model")
    assert isinstance(prior, PixelCNN)
    differs = False
    for k, v in prior.state_dict().items():
        assert torch.equal(v, state[f"ema.module.{k}"]), k  # export = Polyak weights
        differs |= not torch.equal(v, state[f"model.{k}"])
    assert differs  # and they are not the raw weights
    assert list((codes_prior / "images").glob("samples_step*.png"))
    summary = json.loads((codes_prior / "summary.json").read_text())
    assert summary["global_step"] == 4
    bits, nats = summary["metrics"]["val/bits_per_image"], summary["metrics"]["val/nats_per_code"]
    assert bits == pytest.approx(nats * 16 / math.log(2), rel=1e-5)
    # the logged figure is the exported weights' fp32 likelihood of the val batches it covers
    codes, labels, _ = load_codes(codes_dir / "val.safetensors")
    n = (
        tiny("prior_codes.yaml")["train"]["val_batches"]
        * tiny("prior_codes.yaml")["train"]["batch_size"]
    )
    assert len(codes) > n  # val_batches caps validation to its first n code maps
    with torch.no_grad():
        recomputed = -prior.log_prob(codes[:n], labels[:n]).mean().item() / 16
    assert nats == pytest.approx(recomputed, rel=1e-5)


def test_export_of_prior_checkpoint_equals_run_export(codes_prior: Path, tmp_path: Path) -> None:
    out = export(codes_prior / "checkpoints" / "last.ckpt", tmp_path / "m")
    assert content_hash(out) == content_hash(codes_prior / "model")
    assert json.loads((out / "vae.json").read_text()) == json.loads(
        (codes_prior / "model" / "vae.json").read_text()
    )


def test_generate_writes_png_and_raw_samples_decoded_by_the_vae(
    codes_prior: Path, vae_dir: Path, tmp_path: Path
) -> None:
    png = tmp_path / "s.png"
    generate(codes_prior, vae_dir, num=6, out_png=png, seed=3, device="cpu")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = load_file(str(tmp_path / "s.safetensors"))
    assert raw["codes"].shape == (6, 4, 4) and raw["codes"].dtype == torch.int64
    assert raw["images"].shape == (6, 1, 8, 8) and raw["images"].dtype == torch.uint8
    assert raw["labels"].tolist() == [0, 1, 2, 3, 4, 5]  # conditional: labels in turn
    vae = load_pretrained(vae_dir / "model")
    assert isinstance(vae, VQVAE)
    assert torch.equal(raw["images"], float_to_uint8(vae.decode(raw["codes"])))
    generate(
        codes_prior, None, num=6, out_png=tmp_path / "t.png", seed=3, device="cpu"
    )  # VAE from vae.json
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["codes"], raw["codes"])
    generate(codes_prior, vae_dir, num=3, out_png=tmp_path / "l.png", label=7, device="cpu")
    assert load_file(str(tmp_path / "l.safetensors"))["labels"].tolist() == [7, 7, 7]


def test_generate_refuses_a_different_vae(
    codes_prior: Path, other_vae_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="not the one this prior was trained on"):
        generate(codes_prior, other_vae_dir, num=2, out_png=tmp_path / "s.png", device="cpu")
    assert not (tmp_path / "s.png").exists()


def test_train_prior_refuses_codes_of_another_vae(
    codes_dir: Path, other_vae_dir: Path, tmp_path: Path
) -> None:
    cfg = {**tiny("prior_codes.yaml"), "vae": str(other_vae_dir)}
    with pytest.raises(CheckpointError, match="different VAE"):
        train_prior(cfg, tmp_path, CPU, codes_dir=codes_dir)


def test_a_codes_prior_takes_its_vaes_data_but_for_the_keys_it_names(
    vae_dir: Path, codes_dir: Path, tmp_path: Path
) -> None:
    """A codes prior that names no data trains on its VAE's (as ``vqprior encode`` encodes it):
    the codes encoded from the VAE's data feed it as they are; a key it names wins."""
    from vqprior.train.rundir import recorded_data
    from vqprior.train.stages import resolve_prior_stage

    recorded = yaml.safe_load((vae_dir / "config.yaml").read_text())["data"]
    assert recorded_data(vae_dir) == recorded and recorded["limit"] == 64
    assert recorded_data(vae_dir / "model") == {}  # an export records no data
    prior = {k: v for k, v in tiny("prior_codes.yaml").items() if k != "data"}
    cfg = resolve_prior_stage({**prior, "vae": str(vae_dir)})[0]
    assert cfg.data.to_dict() == recorded
    named = resolve_prior_stage({**prior, "vae": str(vae_dir), "data": {"limit": 32}})[0]
    assert named.data.to_dict() == {**recorded, "limit": 32}
    summary = train_prior({**prior, "vae": str(vae_dir)}, tmp_path, CPU, codes_dir=codes_dir)
    assert summary["global_step"] == prior["train"]["max_steps"]
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"] == recorded


def test_train_prior_reencodes_when_cached_codes_are_stale(
    vae_dir: Path, other_vae_dir: Path, codes_dir: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "codes"
    cache.mkdir()
    for f in codes_dir.iterdir():  # codes of the first VAE, stale for the second
        (cache / f.name).write_bytes(f.read_bytes())
    cfg = {**tiny("prior_codes.yaml"), "vae": str(other_vae_dir)}
    cfg["train"]["max_steps"] = 1
    train_prior(cfg, tmp_path, CPU)
    _, _, meta = load_codes(cache / "train.safetensors")
    assert meta["vae_hash"] == content_hash(other_vae_dir / "model")


def test_evaluate_codes_prior_reports_the_prior_part_for_an_mse_vae(codes_prior: Path) -> None:
    result = evaluate(codes_prior, device="cpu")
    assert "bits_per_dim" not in result and "mse" in result["note"]
    assert result["prior_bits_per_dim"] == pytest.approx(result["prior_bits_per_image"] / 64)
    assert json.loads((codes_prior / "eval_test.json").read_text()) == result


def test_pixel_prior_trains_generates_and_evaluates(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_prior(tiny("prior_pixels.yaml"), out, CPU)
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["model"]["in_channels"], resolved["model"]["height"]) == (1, 8)
    assert resolved["model"]["num_classes"] == 0
    generate(out, num=4, out_png=tmp_path / "p.png", seed=0, device="cpu")
    raw = load_file(str(tmp_path / "p.safetensors"))
    assert set(raw) == {"images"} and raw["images"].shape == (4, 1, 8, 8)
    result = evaluate(out, device="cpu")
    prior = load_pretrained(out / "model")
    assert isinstance(prior, PixelCNN)
    test = load_image_splits(DataConfig.from_dict(resolved["data"])).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        expected = float(-prior.log_prob(x).sum()) / (x.numel() * math.log(2))
    assert result["bits_per_dim"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        generate(out, num=2, out_png=tmp_path / "q.png", label=1, device="cpu")


def test_bf16_training_validates_in_fp32_channels_last(tmp_path: Path) -> None:
    """Under bf16 autocast (the default on CPUs with native bf16) the model trains in
    channels-last memory, and the logged validation figure is the exported weights' fp32
    likelihood of the validation batches it covers."""
    out = tmp_path / "run"
    bf16 = DeviceOptions(accelerator="cpu", devices="1", progress=False, precision="bf16-mixed")
    summary = train_prior(tiny("prior_pixels.yaml"), out, bf16)
    assert summary["precision"] == "bf16-mixed"
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    conv = next(v for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.dtype == torch.float32
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    val = load_image_splits(DataConfig.from_dict(resolved["data"])).val
    n = min(len(val), 2 * 16)  # val_batches x batch_size
    x = torch.stack([val[i][0] for i in range(n)])
    prior = load_pretrained(out / "model")
    with torch.no_grad():
        fp32 = float(-prior.log_prob(x).mean()) / (prior.num_dims * math.log(2))
        with torch.autocast("cpu", torch.bfloat16):
            bf16_figure = float(-prior.log_prob(x).mean()) / (prior.num_dims * math.log(2))
    assert summary["metrics"]["val/bits_per_dim"] == pytest.approx(fp32, rel=1e-6)
    assert bf16_figure != pytest.approx(fp32, rel=1e-6)  # so the check above can tell them apart


def test_resumed_prior_refuses_a_changed_vae(codes_prior: Path, vae_dir: Path) -> None:
    record = codes_prior / "vae.json"
    original = record.read_text()
    record.write_text(json.dumps({**json.loads(original), "vae_hash": "0" * 16}))
    try:
        with pytest.raises(ValueError, match="was trained on codes of VAE"):
            train_prior({**tiny("prior_codes.yaml"), "vae": str(vae_dir)}, codes_prior, CPU)
    finally:
        record.write_text(original)


def test_prior_field_contradicting_the_vae_is_refused(vae_dir: Path, tmp_path: Path) -> None:
    cfg = {**tiny("prior_codes.yaml"), "vae": str(vae_dir)}
    cfg["model"]["num_codes"] = 32
    with pytest.raises(ConfigError, match="model.num_codes"):
        train_prior(cfg, tmp_path, CPU)


def test_ema_warms_up_so_short_runs_are_not_dominated_by_the_initial_weights() -> None:
    import torch

    from vqprior.train.prior import warmup_ema

    update = warmup_ema(0.999)
    ema, target = [torch.zeros(3)], [torch.ones(3)]
    for n in range(600):
        update(ema, target, torch.tensor(n + 1))
    # a plain 0.999 EMA would sit at 1 - 0.999**600 = 0.45 here
    assert float(ema[0][0]) > 0.95
    first = [torch.zeros(1)]
    update(first, [torch.ones(1)], torch.tensor(1))
    assert abs(float(first[0][0]) - (1 - 2 / 11)) < 1e-6  # decay (1 + n) / (10 + n) at n = 1


def test_two_stage_bits_per_dim_are_recomputed_from_the_models(tmp_path: Path) -> None:
    """evaluate's bound = prior nats of the encoded codes + the mixture decoder's nats of the
    image, recomputed here from the exported models with the plain functions (no summaries)."""
    from vqprior.nn.mixture import mixture_log_prob

    vae_cfg = tiny("vae_mixture.yaml")
    train_vae(vae_cfg, tmp_path / "vae", CPU)
    prior_cfg = {**tiny("prior_codes.yaml"), "vae": str(tmp_path / "vae")}
    train_prior(prior_cfg, tmp_path / "prior", CPU)
    result = evaluate(tmp_path / "prior", device="cpu")
    vae = load_pretrained(tmp_path / "vae" / "model")
    prior = load_pretrained(tmp_path / "prior" / "model")
    assert isinstance(vae, VQVAE) and isinstance(prior, PixelCNN)
    resolved = yaml.safe_load((tmp_path / "prior" / "config.yaml").read_text())
    test = load_image_splits(DataConfig.from_dict(resolved["data"])).test
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.stack([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        codes = vae.encode(x)
        cond = y if prior.config.num_classes else None
        prior_nats = float(-prior.log_prob(codes, cond).sum())
        params = vae.decoder(vae.quantizer.lookup(codes))
        dec_nats = float(-mixture_log_prob(x, params, vae.config.num_mixtures).sum())
    dims = x.numel()
    assert result["prior_bits_per_dim"] == pytest.approx(
        prior_nats / (dims * math.log(2)), rel=1e-5
    )
    assert result["decoder_bits_per_dim"] == pytest.approx(
        dec_nats / (dims * math.log(2)), rel=1e-5
    )
    assert result["bits_per_dim"] == pytest.approx(
        (prior_nats + dec_nats) / (dims * math.log(2)), rel=1e-5
    )


def test_priors_on_a_cpu_default_to_batch_8_else_32_and_a_set_batch_wins(
    vae_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PRIOR_CPU_TRAIN_DEFAULTS over PRIOR_TRAIN_DEFAULTS for priors (pixels and codes) trained
    on a CPU only: on a GPU (a stand-in CUDA here) they keep batch 32."""
    from vqprior.train.config import DeviceOptions
    from vqprior.train.stages import resolve_prior_stage

    data = tiny("prior_codes.yaml")["data"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    def batch(vae: str | None, device: DeviceOptions | None = None, **train: int) -> int:
        raw = {"data": data, "vae": vae, "train": train}
        return resolve_prior_stage(raw, device)[0].train.batch_size

    codes = str(vae_dir)
    assert (batch(None), batch(codes)) == (8, 8)  # auto, no GPU: the CPU
    gpu = DeviceOptions(accelerator="gpu")
    assert (batch(None, gpu), batch(codes, gpu)) == (32, 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto now picks CUDA
    assert (batch(codes), batch(codes, DeviceOptions(accelerator="cpu"))) == (32, 8)
    for vae in (None, codes):
        for device in (None, gpu, DeviceOptions(accelerator="cpu")):
            assert batch(vae, device, batch_size=5) == 5


def test_a_codes_prior_defaults_to_its_own_lr_on_every_device(vae_dir: Path) -> None:
    """CODES_PRIOR_TRAIN_DEFAULTS over PRIOR_TRAIN_DEFAULTS for codes priors only, under the
    device's batch; a named lr wins."""
    from vqprior.train.stages import (
        CODES_PRIOR_TRAIN_DEFAULTS,
        PRIOR_TRAIN_DEFAULTS,
        resolve_prior_stage,
    )

    data = tiny("prior_codes.yaml")["data"]

    def train(vae: str | None, device: DeviceOptions = CPU, **named: float) -> tuple:
        cfg = resolve_prior_stage({"data": data, "vae": vae, "train": named}, device)[0]
        return cfg.train.lr, cfg.train.batch_size

    codes, gpu = str(vae_dir), DeviceOptions(accelerator="gpu")
    assert CODES_PRIOR_TRAIN_DEFAULTS["lr"] == 1e-3 and PRIOR_TRAIN_DEFAULTS["lr"] == 3e-3
    assert (train(codes), train(codes, gpu)) == ((1e-3, 8), (1e-3, 32))
    assert (train(None), train(None, gpu)) == ((3e-3, 8), (3e-3, 32))
    assert train(codes, lr=5e-4) == (5e-4, 8)


def test_a_prior_resumed_on_another_device_keeps_the_batch_it_was_made_with(
    tmp_path: Path,
) -> None:
    """The batch default depends on the device (8 on a CPU, 32 on a GPU); a run dir's recorded
    batch wins over it, a named batch over both (and is then compared by check_run_dir)."""
    from vqprior.train.config import DeviceOptions
    from vqprior.train.rundir import check_run_dir, prepare_run_dir
    from vqprior.train.stages import resolve_prior_stage

    raw = {"data": {"name": "digits", "limit": 32}, "vae": None}
    cpu, gpu = DeviceOptions(accelerator="cpu"), DeviceOptions(accelerator="gpu")
    made = resolve_prior_stage(raw, cpu, tmp_path / "run")[0]
    assert made.train.batch_size == 8
    prepare_run_dir(tmp_path / "run", made.to_dict())
    again = resolve_prior_stage(raw, gpu, tmp_path / "run")[0]
    assert again.train.batch_size == 8 and again == made
    assert not check_run_dir(tmp_path / "run", again.to_dict())
    assert resolve_prior_stage(raw, gpu, tmp_path / "new")[0].train.batch_size == 32
    named = resolve_prior_stage({**raw, "train": {"batch_size": 32}}, gpu, tmp_path / "run")[0]
    with pytest.raises(ConfigError, match="train.batch_size is 8 there, 32 now"):
        check_run_dir(tmp_path / "run", named.to_dict())


def test_a_pixel_prior_without_an_architecture_defaults_to_pixelcnnpp_tiny() -> None:
    """PIXEL_PRIOR_MODEL_DEFAULTS apply to pixel priors whose config names no architecture and
    whose image sides are multiples of 4; any architecture field keeps the gated default."""
    from vqprior.train.stages import PIXEL_PRIOR_MODEL_DEFAULTS, resolve_prior_stage

    data = {"name": "digits", "limit": 20}
    cfg = resolve_prior_stage({"data": data, "vae": None})[0].model
    assert {k: getattr(cfg, k) for k in PIXEL_PRIOR_MODEL_DEFAULTS} == PIXEL_PRIOR_MODEL_DEFAULTS
    cfg = resolve_prior_stage({"data": data, "model": {"channels": 16}, "vae": None})[0].model
    assert (cfg.backbone, cfg.channels, cfg.nr_resnet) == ("pixelcnnpp", 16, 1)
    for named in ({"num_layers": 3}, {"backbone": "gated"}, {"head": "categorical"}):
        cfg = resolve_prior_stage({"data": data, "model": named, "vae": None})[0].model
        assert (cfg.backbone, cfg.channels) == ("gated", 64), named
    sides_of_6 = {**data, "image_size": 6}  # 6 is not a multiple of 4: no PixelCNN++ scales
    assert resolve_prior_stage({"data": sides_of_6, "vae": None})[0].model.backbone == "gated"
