"""Hub-style models: save/from_pretrained round trips, hub ids from an offline cache laid out
as the hub's, one-line errors offline, push_to_hub through huggingface_hub's upload (mocked:
no test touches the network), and the model card of every export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

import vqprior
from vqprior import hub
from vqprior.card import CARD_NAME, LOCAL_ID, for_hub, model_card
from vqprior.cli import cli
from vqprior.io import CheckpointError, content_hash, load_pretrained
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig
from vqprior.train.config import DeviceOptions
from vqprior.train.stages import train_vae

huggingface_hub = pytest.importorskip("huggingface_hub")
hf_constants = pytest.importorskip("huggingface_hub.constants")

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
DEV = ["--accelerator", "cpu", "--devices", "1"]
REPO = "someone/tiny-prior"
REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs with the hub switched off, as a user offline would."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_vae() -> VQVAE:
    torch.manual_seed(0)
    return VQVAE(VQVAEConfig(in_channels=1, hidden_channels=8, res_channels=4, num_res_blocks=1,
                             downsample=2, num_codes=16, code_dim=4)).eval()  # fmt: skip


def tiny_prior(data: str = "pixels") -> PixelCNN:
    torch.manual_seed(1)
    if data == "codes":
        cfg = PixelCNNConfig(data="codes", num_codes=16, height=4, width=4, channels=8,
                             num_layers=2, num_classes=3)  # fmt: skip
    else:
        cfg = PixelCNNConfig(in_channels=1, height=6, width=6, channels=8, num_layers=2,
                             num_mixtures=2)  # fmt: skip
    return PixelCNN(cfg).eval()


def images(n: int = 4) -> torch.Tensor:
    """8-bit grey 8x8 images in [-1, 1]: [n, 1, 8, 8]."""
    levels = torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    return levels.float() * 2 / 255 - 1


@torch.no_grad()
def vae_outputs(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    codes = vae.encode(images())
    return {"codes": codes, "decoded": vae.decode(codes)}


@torch.no_grad()
def prior_outputs(prior: torch.nn.Module) -> dict[str, torch.Tensor]:
    cond = torch.tensor([0, 1, 2]) if prior.config.num_classes else None
    x = prior.sample(3, cond=cond, generator=torch.Generator().manual_seed(7))
    return {"sample": x, "log_prob": prior.log_prob(x, cond=cond, reduction="none")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def hub_cache(root: Path, export: Path, repo_id: str = REPO) -> Path:
    """The hub cache layout: models--{org}--{name}/snapshots/<commit>/... and refs/main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REV
    snapshot.mkdir(parents=True)
    for f in export.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return root


# --- round trips --------------------------------------------------------------------------


def test_vqvae_save_then_from_pretrained_gives_identical_outputs(tmp_path: Path) -> None:
    vae = tiny_vae()
    path = vae.save_pretrained(tmp_path / "vae")
    loaded = VQVAE.from_pretrained(path)
    assert loaded.config == vae.config
    assert_same(vae_outputs(vae), vae_outputs(loaded))
    assert_same(vae_outputs(vae), vae_outputs(vqprior.load_pretrained(str(path))))


@pytest.mark.parametrize("data", ["pixels", "codes"])
def test_pixelcnn_save_then_from_pretrained_gives_identical_outputs(
    tmp_path: Path, data: str
) -> None:
    prior = tiny_prior(data)
    path = prior.save_pretrained(tmp_path / "prior")
    assert sorted(p.name for p in path.iterdir()) == [CARD_NAME, "config.json", "model.safetensors"]
    assert_same(prior_outputs(prior), prior_outputs(PixelCNN.from_pretrained(path)))


def test_from_pretrained_of_the_other_class_is_one_line(tmp_path: Path) -> None:
    path = tiny_vae().save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="holds a VQVAE, not a PixelCNN"):
        PixelCNN.from_pretrained(path)


# --- hub ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cache_dir", "default_cache"])
def test_a_hub_id_loads_offline_from_a_hub_layout_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    prior = tiny_prior()
    cache = hub_cache(tmp_path / "cache", prior.save_pretrained(tmp_path / "export"))
    monkeypatch.chdir(tmp_path)  # no local dir named like the id
    if how == "cache_dir":
        loaded = PixelCNN.from_pretrained(REPO, cache_dir=cache)
    else:  # HF_HUB_CACHE, as huggingface_hub read it
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
        loaded = vqprior.load_pretrained(REPO)
    assert isinstance(loaded, PixelCNN)
    assert_same(prior_outputs(prior), prior_outputs(loaded))


def test_a_hub_id_loads_in_a_fresh_interpreter_with_hf_env_vars(tmp_path: Path) -> None:
    """The user's path: HF_HUB_CACHE and HF_HUB_OFFLINE=1 set before anything is imported."""
    vae = tiny_vae()
    cache = hub_cache(tmp_path / "cache", vae.save_pretrained(tmp_path / "export"))
    code = (
        "import sys, torch, vqprior\n"
        f"m = vqprior.VQVAE.from_pretrained({REPO!r})\n"
        "print(type(m).__name__, sum(float(p.sum()) for p in m.state_dict().values()))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    total = sum(float(p.sum()) for p in vae.state_dict().values())
    name, value = proc.stdout.split()
    assert name == "VQVAE" and float(value) == pytest.approx(total)


def test_a_hub_id_that_is_not_cached_offline_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        vqprior.load_pretrained("nobody/missing-model", cache_dir=tmp_path / "empty")
    line = str(err.value)
    assert "\n" not in line
    assert "nobody/missing-model" in line and "not cached" in line
    assert "hub cannot be reached" in line and "HF_HUB_OFFLINE" in line


def test_local_files_only_and_a_missing_revision_are_one_line(tmp_path: Path) -> None:
    cache = hub_cache(tmp_path / "cache", tiny_prior().save_pretrained(tmp_path / "export"))
    got = load_pretrained(REPO, cache_dir=cache, local_files_only=True, revision="main")
    assert isinstance(got, PixelCNN)
    with pytest.raises(CheckpointError, match=r"revision v2\) is not cached"):
        load_pretrained(REPO, cache_dir=cache, revision="v2")


def test_without_huggingface_hub_a_hub_id_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(
        CheckpointError, match=r'needs huggingface_hub: pip install "vqprior\[hub\]"'
    ):
        vqprior.load_pretrained(REPO)
    with pytest.raises(CheckpointError, match="needs huggingface_hub"):
        tiny_prior().push_to_hub(REPO)


def test_local_paths_never_go_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing dir named like an id is local; a missing path not shaped like one keeps the
    local error; neither imports the hub client."""
    monkeypatch.chdir(tmp_path)
    prior = tiny_prior()
    prior.save_pretrained(tmp_path / "someone" / "tiny-prior")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert_same(prior_outputs(prior), prior_outputs(load_pretrained(REPO)))
    for missing in (str(tmp_path / "nope" / "model"), "./nope/model", "nope"):
        with pytest.raises(CheckpointError, match="is not an exported model directory"):
            load_pretrained(missing)
    with pytest.raises(ValueError, match="revision='main' is for a hub id"):
        load_pretrained(REPO, revision="main")


@pytest.mark.parametrize(
    ("name", "ok"),
    [("user/name", True), ("Org-1/my_model.v2", True), ("a/b/c", False), ("/abs/path", False),
     ("./x/y", False), ("user/..", False), ("user", False), ("us--er/x", False)],
)  # fmt: skip
def test_is_hub_id(name: str, ok: bool) -> None:
    assert hub.is_hub_id(name) is ok


# --- push -------------------------------------------------------------------------------


class FakeApi:
    """Stands in for HfApi's network calls; records them and what the uploaded folder held."""

    calls: list[tuple[str, dict[str, Any]]]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeApi:
        self.calls, self.files = [], {}
        fake = self

        def create_repo(api: Any, repo_id: str, **kw: Any) -> str:
            fake.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api: Any, **kw: Any) -> str:
            fake.calls.append(("upload_folder", kw))
            fake.files = {p.name: p.read_bytes() for p in Path(kw["folder_path"]).iterdir()}
            return "commit-info"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        return self


def test_push_to_hub_uploads_the_export_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi().install(monkeypatch)
    prior = tiny_prior("codes")
    record = {"vae_hash": "abcd", "vae_path": "/runs/vae/model", "num_codes": 16, "grid": [4, 4]}
    got = prior.push_to_hub(REPO, private=True, extra_files={"vae.json": json.dumps(record)})
    assert got == "commit-info"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": REPO, "private": True, "exist_ok": True,
                               "repo_type": "model"}  # fmt: skip
    upload = api.calls[1][1]
    assert upload["repo_id"] == REPO and upload["repo_type"] == "model"
    assert upload["commit_message"] == "Upload vqprior PixelCNN"
    assert sorted(api.files) == [CARD_NAME, "config.json", "model.safetensors", "vae.json"]
    card = api.files[CARD_NAME].decode()
    assert f'vqprior.load_pretrained("{REPO}")' in card and LOCAL_ID not in card
    assert "`abcd`" in card  # the VAE record
    pushed = tmp_path / "pushed"  # what went up is an export that loads to the same model
    pushed.mkdir()
    for name, data in api.files.items():
        (pushed / name).write_bytes(data)
    assert_same(prior_outputs(prior), prior_outputs(load_pretrained(pushed)))


def test_upload_pushes_a_run_export_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi().install(monkeypatch)
    path = tiny_vae().save_pretrained(tmp_path / "model", extra_files={CARD_NAME: "# mine\n"})
    (path / ".README.md.x.tmp").write_text("left by a killed write")
    hub.upload(path, REPO, commit_message="first", revision="dev", create_pr=True)
    upload = api.calls[1][1]
    assert (upload["commit_message"], upload["revision"], upload["create_pr"]) == (
        "first",
        "dev",
        True,
    )
    assert sorted(api.files) == [CARD_NAME, "config.json", "model.safetensors"]
    assert api.files[CARD_NAME] == b"# mine\n"
    assert api.files["config.json"] == (path / "config.json").read_bytes()
    with pytest.raises(CheckpointError, match="not an exported"):
        hub.upload(tmp_path / "nothing", REPO)


def test_push_command_uploads_a_run_dirs_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = FakeApi().install(monkeypatch)
    run = tmp_path / "run"
    prior = tiny_prior("pixels")
    prior.save_pretrained(run / "model")
    args = ["push", str(run), REPO, "--message", "first", "--revision", "dev", "--private"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model_dir"] == str(run / "model") and report["repo_id"] == REPO
    assert api.calls[0][1]["private"] is True
    upload = api.calls[1][1]
    assert (upload["commit_message"], upload["revision"], upload["create_pr"]) == (
        "first",
        "dev",
        False,
    )
    assert sorted(api.files) == [CARD_NAME, "config.json", "model.safetensors"]
    assert api.files["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    ("where", "repo", "code", "message"),
    [
        ("missing", REPO, 2, "not found"),
        ("empty", REPO, 2, "no exported model at"),
        ("export", "not a hub id", 2, "is not a hub id"),
    ],
)
def test_push_command_refuses_bad_input_in_one_line_and_uploads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, repo: str, code: int, message: str
) -> None:
    api = FakeApi().install(monkeypatch)
    (tmp_path / "empty").mkdir()
    tiny_vae().save_pretrained(tmp_path / "export")
    result = CliRunner().invoke(cli, ["push", str(tmp_path / where), repo])
    assert result.exit_code == code and message in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert api.calls == []


# --- the card ---------------------------------------------------------------------------

SUMMARY = {
    "stage": "train-prior",
    "global_step": 400,
    "num_parameters": 5200,
    "exported": "best",
    "best_step": 300,
    "best_val_loss": 2.123456,
    "metrics": {"val/bits_per_dim": 3.14159, "train/bits_per_dim": 3.0, "val/loss": 2.1},
}
RUN = {"data": {"name": "cifar10", "limit": None, "val_fraction": 0.1, "test_fraction": 0.1,
                "split_seed": 0, "level": None},
       "train": {"batch_size": 64, "lr": 0.001, "max_steps": 400, "seed": 0}}  # fmt: skip


def front(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_is_what_the_hub_reads() -> None:
    card = model_card("PixelCNN", tiny_prior().config.to_dict(), license="apache-2.0")
    meta = front(card)
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "vqprior"
    assert {"vqprior", "pixelcnn", "pixels-prior"} <= set(meta["tags"])
    assert front(model_card("VQVAE", tiny_vae().config.to_dict()))["license"] == "mit"


def test_card_describes_a_pixel_prior_with_its_data_and_figures() -> None:
    cfg = PixelCNNConfig(in_channels=3, height=32, width=32, backbone="pixelcnnpp").to_dict()
    card = model_card("PixelCNN", cfg, run_config=RUN, summary=SUMMARY)
    assert "# vqprior PixelCNN prior on pixels" in card
    assert "3-channel 32x32 images (discretized logistic mixture head)" in card
    assert "PixelCNN++ backbone, 64 channels, 3 scales of 5 resnet blocks" in card
    assert "- dataset: `cifar10`" in card and "batch 64, lr 0.001" in card
    assert "| figure | val | train |" in card and "| bits/dim | 3.142 | 3 |" in card
    assert "- exported: best" in card and "- best step: 300" in card
    assert 'vqprior.PixelCNN.from_pretrained("path/to/model")' in card
    assert "## VAE" not in card


def test_card_of_a_codes_prior_names_its_vae_and_how_to_decode() -> None:
    record = {"vae_hash": "5a40ae161c79afe6", "vae_path": "/runs/vae/model", "num_codes": 16,
              "grid": [4, 4], "image_shape": [1, 8, 8], "level": "top"}  # fmt: skip
    summary = {"metrics": {"val/bits_per_image": 70.9, "val/nats_per_code": 3.07}}
    card = model_card("PixelCNN", tiny_prior("codes").config.to_dict(), summary=summary,
                      vae=record, run_config={**RUN, "vae": "/runs/vae"})  # fmt: skip
    assert "4x4 maps of 16 VQ-VAE codes" in card and "conditioned on 3 classes" in card
    assert "- content hash: `5a40ae161c79afe6`" in card and "level: `top`" in card
    assert 'vqprior.VQVAE.from_pretrained("/runs/vae/model")' in card
    assert "| bits per code map | 70.9 |" in card and "encoded to code maps" in card


def test_card_of_a_vae_gives_its_grid_and_codebook_figures() -> None:
    summary = {"image_shape": [1, 8, 8],
               "metrics": {"val/perplexity": 9.5, "val/codes_used": 12.0, "val/recon_mse": 0.01}}  # fmt: skip
    card = model_card("VQVAE", tiny_vae().config.to_dict(), summary=summary)
    assert "Codebook: 16 codes of dimension 4" in card and "downsampling x2" in card
    assert "Each 8x8 image gives a 4x4 code map." in card
    assert "| codebook perplexity | 9.5 |" in card and "| codes used (of 16) | 12 |" in card
    two = VQVAEConfig(levels=2, downsample=2, top_downsample=2).to_dict()
    card2 = model_card("VQVAE", two, summary={"image_shape": [3, 32, 32]})
    assert "VQ-VAE-2" in card2 and "each 32x32 image gives 16x16 + 8x8 maps" in card2


def test_for_hub_puts_the_id_in_the_load_snippet() -> None:
    card = model_card("VQVAE", tiny_vae().config.to_dict())
    assert f'"{LOCAL_ID}"' in card
    assert f'vqprior.VQVAE.from_pretrained("{REPO}")' in for_hub(card, REPO)


def test_the_card_is_outside_the_content_hash(tmp_path: Path) -> None:
    """A prior records its VAE's content hash: a (re)written card must not change it."""
    path = tiny_vae().save_pretrained(tmp_path / "vae")
    before = content_hash(path)
    (path / CARD_NAME).write_text("# refreshed card\n")
    assert content_hash(path) == before
    custom = tiny_vae().save_pretrained(tmp_path / "vae", extra_files={CARD_NAME: "# mine\n"})
    assert (custom / CARD_NAME).read_text() == "# mine\n" and content_hash(custom) == before


# --- a run's export ---------------------------------------------------------------------


def test_train_prior_leaves_a_card_in_model_and_keeps_the_vae_hash(tmp_path: Path) -> None:
    vae_run = tmp_path / "vae"
    train_vae(yaml.safe_load((TINY / "vae.yaml").read_text()), vae_run,
              DeviceOptions(accelerator="cpu", devices="1", progress=False))  # fmt: skip
    vae_card = (vae_run / "model" / CARD_NAME).read_text()
    assert "| codes used (of 16) |" in vae_card and "- dataset: `digits`" in vae_card
    vae_hash = content_hash(vae_run / "model")
    prior = tmp_path / "prior"
    args = ["train-prior", "--config", str(TINY / "prior_codes.yaml"), "--vae", str(vae_run)]
    result = CliRunner().invoke(cli, [*args, "--out", str(prior), *DEV])
    assert result.exit_code == 0, result.output
    card = (prior / "model" / CARD_NAME).read_text()
    summary = json.loads((prior / "summary.json").read_text())
    assert front(card)["library_name"] == "vqprior"
    assert "# vqprior PixelCNN prior on codes" in card and "- dataset: `digits`" in card
    bits = summary["metrics"]["val/bits_per_image"]
    assert f"| bits per code map | {bits:.4g} |" in card
    assert (
        f"- content hash: `{vae_hash}`" in card and f"global step: {summary['global_step']}" in card
    )
    (vae_run / "model" / CARD_NAME).write_text("# edited card\n")  # the VAE's card changes...
    png = tmp_path / "g.png"
    result = CliRunner().invoke(cli, ["generate", "--prior", str(prior), "--vae", str(vae_run),
                                      "--num", "2", "--out", str(png), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 0, result.output  # ...and the prior still accepts the VAE
    assert png.is_file()
