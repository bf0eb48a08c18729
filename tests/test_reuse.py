"""Reuse without Lightning: exported models load in a process where lightning and click cannot
be imported, and give the same anomaly maps and samples; exports are replaced as a unit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import vqprior
from vqprior import io as vio
from vqprior.io import CheckpointError, load_pretrained
from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.models.vqvae import VQVAE, VQVAEConfig

# huggingface_hub: an optional extra, needed only for hub ids and push_to_hub
BLOCKED = ("lightning", "pytorch_lightning", "lightning_fabric", "click", "huggingface_hub")

# Run in a fresh interpreter: importing the blocked packages raises ImportError.
CHILD = """
import sys

BLOCKED = {blocked!r}


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test")
        return None


sys.meta_path.insert(0, Block())
import torch
from safetensors.torch import load_file, save_file

import vqprior

vae = vqprior.load_pretrained({vae!r})          # a VQVAE export (model/ of a train-vae run)
prior = vqprior.load_pretrained({prior!r})      # a codes prior on that VAE
pixels = vqprior.load_pretrained({pixels!r})    # a pixel prior
x = load_file({inputs!r})["x"]                  # images [b, 1, 8, 8] in [-1, 1]
with torch.no_grad():
    codes = vae.encode(x)                                      # long [b, h, w]
    code_map = -prior.log_prob(codes, reduction="none")        # nats per code [b, h, w]
    pixel_map = -pixels.log_prob(x, reduction="none")          # nats per pixel [b, 1, 8, 8]
    sampled = prior.sample(3, generator=torch.Generator().manual_seed(7))
    images = vae.decode(sampled)                               # [3, 1, 8, 8]
    pixel_samples = pixels.sample(3, generator=torch.Generator().manual_seed(7))
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
save_file(dict(code_map=code_map, pixel_map=pixel_map, sampled=sampled, images=images,
               pixel_samples=pixel_samples, codes=codes), {out!r})
"""


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The child runs with one thread; so does the parent's reference computation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int, seed: int) -> torch.Tensor:
    """Random 8-bit grey 8x8 images in [-1, 1]: [n, 1, 8, 8]."""
    levels = torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    return levels.float() * 2 / 255 - 1


def fit(model: torch.nn.Module, loss: Any, steps: int = 3) -> None:
    """A few AdamW steps, so that the weights are not the initial ones."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    model.eval()


def tiny_models() -> tuple[VQVAE, PixelCNN, PixelCNN]:
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(in_channels=1, hidden_channels=8, res_channels=4, num_res_blocks=1,
                            downsample=2, num_codes=16, code_dim=4))  # fmt: skip
    x = images(16, seed=1)
    fit(vae, lambda: vae(x).loss)
    with torch.no_grad():
        codes = vae.encode(x)
    prior = PixelCNN(PixelCNNConfig(data="codes", num_codes=16, height=4, width=4, channels=8,
                                    num_layers=2))  # fmt: skip
    fit(prior, lambda: -prior.log_prob(codes).mean())
    pixels = PixelCNN(PixelCNNConfig(in_channels=1, height=8, width=8, channels=8, num_layers=2,
                                     num_mixtures=2))  # fmt: skip
    fit(pixels, lambda: -pixels.log_prob(x).mean())
    return vae, prior, pixels


def test_exported_models_score_and_sample_without_lightning_or_click(
    tmp_path: Path, one_thread: None
) -> None:
    vae, prior, pixels = tiny_models()
    dirs = {k: str(m.save_pretrained(tmp_path / k / "model"))
            for k, m in (("vae", vae), ("prior", prior), ("pixels", pixels))}  # fmt: skip
    x = images(4, seed=2)
    vio.write_dir(tmp_path / "in", {"x.safetensors": _safetensors({"x": x})})
    out = tmp_path / "out.safetensors"
    code = CHILD.format(blocked=BLOCKED, inputs=str(tmp_path / "in" / "x.safetensors"),
                        out=str(out), **dirs)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(out))
    with torch.no_grad():
        codes = vae.encode(x)
        sampled = prior.sample(3, generator=torch.Generator().manual_seed(7))
        want = {
            "codes": codes,
            "code_map": -prior.log_prob(codes, reduction="none"),
            "pixel_map": -pixels.log_prob(x, reduction="none"),
            "sampled": sampled,
            "images": vae.decode(sampled),
            "pixel_samples": pixels.sample(3, generator=torch.Generator().manual_seed(7)),
        }
    assert want["code_map"].shape == (4, 4, 4) and want["pixel_map"].shape == (4, 1, 8, 8)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def test_blocker_really_blocks() -> None:
    """The control: in the child, importing lightning fails."""
    code = CHILD.split("import torch")[0].format(blocked=BLOCKED) + "import lightning\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "lightning is blocked" in proc.stderr


@pytest.mark.parametrize(
    "cfg",
    [
        dict(in_channels=3, height=6, width=6, channels=6, num_layers=2, num_mixtures=2),
        dict(in_channels=1, height=6, width=6, channels=6, num_layers=2, head="categorical",
             num_bins=16, num_classes=3),
        dict(in_channels=1, height=8, width=8, backbone="pixelcnnpp", channels=6, nr_resnet=1,
             num_scales=2, dropout=0.5, num_mixtures=2),
    ],
    ids=["gated-mixture-rgb", "gated-categorical-cond", "pixelcnnpp-dropout"],
)  # fmt: skip
def test_pixel_prior_round_trip_gives_identical_log_prob_and_samples(
    tmp_path: Path, cfg: dict[str, Any]
) -> None:
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(**cfg))
    k = model.config.num_classes
    cond = torch.arange(2) % k if k else None
    x = model.sample(2, cond=cond, generator=torch.Generator().manual_seed(1))  # valid inputs
    fit(model, lambda: -model.log_prob(x, cond).mean())
    loaded = load_pretrained(model.save_pretrained(tmp_path / "m"))
    assert isinstance(loaded, PixelCNN) and loaded.config == model.config and not loaded.training
    assert torch.equal(
        loaded.log_prob(x, cond, reduction="none"), model.log_prob(x, cond, reduction="none")
    )
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(
        loaded.sample(2, cond=cond, generator=gen()), model.sample(2, cond=cond, generator=gen())
    )


def test_vae_and_codes_prior_round_trip_together(tmp_path: Path) -> None:
    vae, prior, _ = tiny_models()
    vae2 = load_pretrained(vae.save_pretrained(tmp_path / "vae"))
    prior2 = load_pretrained(prior.save_pretrained(tmp_path / "prior"))
    assert isinstance(vae2, VQVAE) and isinstance(prior2, PixelCNN)
    x = images(3, seed=4)
    with torch.no_grad():
        codes = vae.encode(x)
        assert torch.equal(vae2.encode(x), codes)
        assert torch.equal(
            prior2.log_prob(codes, reduction="none"), prior.log_prob(codes, reduction="none")
        )
        gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
        s = prior.sample(2, generator=gen())
        assert torch.equal(prior2.sample(2, generator=gen()), s)
        assert torch.equal(vae2.decode(s), vae.decode(s))


# ---- exports are replaced as a unit -----------------------------------------------------


def small(channels: int = 4, seed: int = 0) -> PixelCNN:
    torch.manual_seed(seed)
    return PixelCNN(
        PixelCNNConfig(in_channels=1, height=4, width=4, channels=channels, num_layers=1)
    )


def files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def same_model(a: PixelCNN, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_failure_mid_save_leaves_the_previous_export_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = small(seed=0).save_pretrained(tmp_path / "m", extra_files={"vae.json": "{}"})
    before = files(path)
    write = vio._write_file

    def dies_half_way(target: Path, data: bytes) -> None:
        if target.name == vio.WEIGHTS_NAME:
            write(target, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        write(target, data)

    monkeypatch.setattr(vio, "_write_file", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        small(channels=8, seed=1).save_pretrained(path)
    monkeypatch.undo()
    assert files(path) == before
    assert same_model(small(seed=0), load_pretrained(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging dir left behind


def test_a_crash_between_the_renames_still_loads_the_previous_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = small(seed=0).save_pretrained(tmp_path / "m")
    replace = os.replace

    def crash_before_swap_in(src: Any, dst: Any) -> None:
        if ".new-" in Path(src).name:
            raise KeyboardInterrupt  # the process dies after moving the old export aside
        replace(src, dst)

    monkeypatch.setattr(vio.os, "replace", crash_before_swap_in)
    with pytest.raises(KeyboardInterrupt):
        small(channels=8, seed=1).save_pretrained(path)
    monkeypatch.undo()
    assert not path.exists()
    assert same_model(small(seed=0), load_pretrained(path))  # found where it was set aside
    new = small(channels=8, seed=1)
    assert same_model(new, load_pretrained(new.save_pretrained(path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # the old one is cleaned up


def test_a_reader_never_mixes_two_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save that swaps the dir while a load is between its two files: the load sees one save
    (the weights of a 4-channel model under an 8-channel config would not even load)."""
    old, new = small(channels=4, seed=0), small(channels=8, seed=1)
    path = old.save_pretrained(tmp_path / "m")
    real_open, swapped = os.open, []

    def open_then_swap(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        fd = real_open(name, flags, *args, **kwargs)
        if name == vio.CONFIG_NAME and not swapped:  # config read from the old dir, next: weights
            swapped.append(True)
            monkeypatch.setattr(vio.os, "open", real_open)
            new.save_pretrained(path)
        return fd

    monkeypatch.setattr(vio.os, "open", open_then_swap)
    loaded = load_pretrained(path)
    assert swapped
    assert isinstance(loaded, PixelCNN)
    assert same_model(new, loaded) or same_model(old, loaded)


def test_save_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "sub").mkdir()
    with pytest.raises(CheckpointError, match="holds other files"):
        small().save_pretrained(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="plain file name"):
        small().save_pretrained(tmp_path / "m", extra_files={"../x": "no"})


def test_export_holds_config_weights_card_and_extra_files(tmp_path: Path) -> None:
    model = small()
    path = model.save_pretrained(tmp_path / "m", extra_files={"vae.json": '{"vae_hash": "x"}'})
    assert sorted(files(path)) == ["README.md", "config.json", "model.safetensors", "vae.json"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["model_type"] == "PixelCNN" and meta["config"] == model.config.to_dict()
    card = (path / "README.md").read_text()  # the card: front matter, the VAE record
    assert card.startswith("---\nlicense: mit\nlibrary_name: vqprior\n") and "`x`" in card
    again = model.save_pretrained(tmp_path / "m")  # an export is replaced as a whole
    assert sorted(files(again)) == ["README.md", "config.json", "model.safetensors"]
    assert vqprior.PixelCNN.from_pretrained(again).config == model.config
