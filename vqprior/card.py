"""Model cards: the ``README.md`` of an exported model, in the form the Hugging Face Hub reads.

:func:`model_card` is a pure function of plain dicts (the model's config, the run's config
and ``summary.json``, the VAE record of a codes prior) to markdown, so a run's card can be
rebuilt at any time. YAML front matter carries ``license``, ``library_name`` and ``tags``.

The card is not part of a model's identity: :func:`vqprior.io.content_hash` reads only the
config and the weights, so writing or refreshing a card never changes the hash that a
prior records of its VAE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

CARD_NAME = "README.md"
LICENSE = "mit"  # vqprior's licence; the data a model was trained on may add its own terms
LOCAL_ID = "path/to/model"  # the load snippet's target; a push puts the hub id in its place
# (metric name, label): the figures a card shows, by split, when the summary has them
FIGURES = (
    ("bits_per_dim", "bits/dim"),
    ("nats_per_dim", "nats/dim"),
    ("bits_per_image", "bits per code map"),
    ("nats_per_code", "nats/code"),
    ("recon_mse", "reconstruction MSE"),
    ("perplexity", "codebook perplexity"),
    ("perplexity_bottom", "codebook perplexity (bottom)"),
    ("perplexity_top", "codebook perplexity (top)"),
    ("codes_used", "codes used"),
    ("codes_used_bottom", "codes used (bottom)"),
    ("codes_used_top", "codes used (top)"),
    ("loss", "loss"),
)
SPLITS = ("val", "test", "train")

Dict = Mapping[str, Any]


def model_card(
    model_type: str,
    config: Dict,
    *,
    run_config: Dict | None = None,
    summary: Dict | None = None,
    vae: Dict | None = None,
    license: str = LICENSE,
    model_id: str = LOCAL_ID,
) -> str:
    """Markdown of the card of a ``model_type`` ("VQVAE" or "PixelCNN") built from ``config``.

    ``run_config`` (the run's ``config.yaml``) names the data, ``summary`` (its
    ``summary.json``) gives the figures, ``vae`` (a codes prior's ``vae.json``) the VAE it pairs
    with; ``model_id`` is what the load snippet passes to ``vqprior.load_pretrained``.
    """
    summary = summary or {}
    sections = [
        front_matter(model_type, config, license),
        f"# {title(model_type, config)}",
        describe(model_type, config, summary.get("image_shape") or (vae or {}).get("image_shape")),
        _data(run_config),
        _figures(summary, config.get("num_codes") if model_type == "VQVAE" else None),
        _vae(vae),
        _usage(model_type, config, model_id, vae),
        f"## Licence\n\n`{license}` (the `license` field above). Check the terms of the "
        "training data as well.",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"


def front_matter(model_type: str, config: Dict, license: str = LICENSE) -> str:
    """The YAML block the hub reads: licence, library and tags."""
    if model_type == "VQVAE":
        tags = ["vq-vae", "vqvae2"] if config.get("levels", 1) == 2 else ["vq-vae"]
    else:
        tags = ["pixelcnn", f"{config.get('data', 'pixels')}-prior"]
    meta = {
        "license": license,
        "library_name": "vqprior",
        "tags": ["vqprior", *tags, "image-generation", "pytorch", "safetensors"],
    }
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---"


def title(model_type: str, config: Dict) -> str:
    if model_type == "VQVAE":
        return "vqprior VQ-VAE-2" if config.get("levels", 1) == 2 else "vqprior VQ-VAE"
    return f"vqprior PixelCNN prior on {config.get('data', 'pixels')}"


def describe(model_type: str, config: Dict, image_shape: Any = None) -> str:
    """One paragraph: what the model is and its size."""
    if model_type == "VQVAE":
        return _describe_vae(config, image_shape)
    if model_type == "PixelCNN":
        return _describe_prior(config)
    return f"A vqprior model of type `{model_type}`."


def _describe_vae(cfg: Dict, image_shape: Any) -> str:
    k, ds, levels = cfg.get("num_codes"), cfg.get("downsample"), cfg.get("levels", 1)
    text = (
        f"A VQ-VAE: {cfg.get('in_channels')}-channel images in [-1, 1] to maps of discrete codes "
        f"and back. Codebook: {k} codes of dimension {cfg.get('code_dim')} "
        f"({cfg.get('codebook')} updates); encoder downsampling x{ds}; reconstruction loss "
        f"`{cfg.get('recon')}`."
    )
    grid = _grid(image_shape, ds)
    if levels == 2:
        tds = cfg.get("top_downsample")
        text += f" Two levels (VQ-VAE-2): a bottom map and a top map x{tds} coarser, {k} codes each"
        top = _grid([0, *grid], tds) if grid else None
        text += (
            f"; each {_hw(image_shape)} image gives {_hw(grid)} + {_hw(top)} maps." if top else "."
        )
    elif grid:
        text += f" Each {_hw(image_shape)} image gives a {_hw(grid)} code map."
    return text


def _describe_prior(cfg: Dict) -> str:
    size = f"{cfg.get('height')}x{cfg.get('width')}"
    if cfg.get("data") == "codes":
        what = f"{size} maps of {cfg.get('num_codes')} VQ-VAE codes (a K-way categorical head)"
    else:
        head = "discretized logistic mixture" if cfg.get("head") == "mixture" else "categorical"
        what = f"{cfg.get('in_channels')}-channel {size} images ({head} head)"
    if cfg.get("backbone") == "pixelcnnpp":
        body = (
            f"PixelCNN++ backbone, {cfg.get('channels')} channels, {cfg.get('num_scales')} "
            f"scales of {cfg.get('nr_resnet')} resnet blocks"
        )
    else:
        body = (
            f"gated backbone (vertical and horizontal stacks), {cfg.get('channels')} channels, "
            f"{cfg.get('num_layers')} layers"
        )
        if cfg.get("attention_every"):
            body += f", causal self-attention every {cfg.get('attention_every')} layers"
    classes = cfg.get("num_classes") or 0
    cond = f"conditioned on {classes} classes" if classes else "unconditional"
    return f"An autoregressive PixelCNN prior on {what}: {body}; {cond}."


def _grid(shape: Any, factor: Any) -> list[int] | None:
    """The [h, w] of a code map of a [c, H, W] image at downsampling ``factor``."""
    if not shape or not isinstance(factor, int) or len(shape) != 3:
        return None
    return [int(shape[1]) // factor, int(shape[2]) // factor]


def _hw(shape: Any) -> str:
    return "x".join(str(n) for n in list(shape)[-2:]) if shape else "?"


def _data(run_config: Dict | None) -> str:
    data = (run_config or {}).get("data")
    if not isinstance(data, Mapping):
        return ""
    lines = ["## Training data", "", f"- dataset: `{data.get('name')}`"]
    for key in ("path", "image_size", "limit", "level"):
        if data.get(key) is not None:
            lines.append(f"- {key}: `{data[key]}`")
    val, test = data.get("val_fraction"), data.get("test_fraction")
    lines.append(f"- held out: {val} val, {test} test (split seed {data.get('split_seed')})")
    if (run_config or {}).get("vae"):
        lines.append("- encoded to code maps by the VAE below")
    train = (run_config or {}).get("train")
    if isinstance(train, Mapping):
        lines.append(
            f"- training: batch {train.get('batch_size')}, lr {train.get('lr')}, "
            f"max_steps {train.get('max_steps') or 'unset'}, seed {train.get('seed')}"
        )
    return "\n".join(lines)


def _figures(summary: Dict, num_codes: Any = None) -> str:
    """A table of the run's figures (one column per split) and how the export was chosen."""
    metrics = summary.get("metrics") or {}
    of = f" (of {num_codes})" if num_codes else ""
    splits = [s for s in SPLITS if any(f"{s}/{name}" in metrics for name, _ in FIGURES)]
    rows = [
        f"| {label.replace('codes used', 'codes used' + of)} | "
        + " | ".join(_fmt(metrics.get(f"{s}/{name}")) for s in splits)
        + " |"
        for name, label in FIGURES
        if any(f"{s}/{name}" in metrics for s in splits)
    ]
    facts = [
        f"{key.replace('_', ' ')}: {_fmt(summary[key])}"
        for key in ("global_step", "num_parameters", "exported", "best_step", "best_val_loss")
        if summary.get(key) is not None
    ]
    if not rows and not facts:
        return ""
    out = ["## Results", ""]
    if rows:
        out += [f"| figure | {' | '.join(splits)} |", "|---" * (len(splits) + 1) + "|", *rows, ""]
    out += [f"- {fact}" for fact in facts]
    return "\n".join(out).rstrip()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _vae(vae: Dict | None) -> str:
    if not vae:
        return ""
    lines = [
        "## VAE",
        "",
        "This prior models the codes of one VQ-VAE; vqprior refuses a VAE with another hash.",
        "",
        f"- content hash: `{vae.get('vae_hash')}`",
        f"- trained at: `{vae.get('vae_path')}`",
        f"- codebook: {vae.get('num_codes')} codes, code map {_hw(vae.get('grid'))}",
    ]
    if vae.get("level"):
        lines.append(f"- level: `{vae['level']}` of a two-level VAE")
    return "\n".join(lines)


def _usage(model_type: str, config: Dict, model_id: str, vae: Dict | None) -> str:
    cls = "VQVAE" if model_type == "VQVAE" else "PixelCNN"
    code = [
        "import vqprior",
        "",
        f'model = vqprior.load_pretrained("{model_id}")  # an export dir, or a hub id (vqprior[hub])',
        f'model = vqprior.{cls}.from_pretrained("{model_id}")  # the same, typed',
    ]
    if model_type == "VQVAE":
        code += [
            "codes = model.encode(x)  # x: [b, c, H, W] in [-1, 1]",
            "x_hat = model.decode(codes)",
        ]
    elif config.get("data") == "codes":
        vae_path = (vae or {}).get("vae_path", "path/to/vae")
        code += [
            f'vae = vqprior.VQVAE.from_pretrained("{vae_path}")  # the VAE above',
            "images = vae.decode(model.sample(16))",
        ]
    else:
        code += ["images = model.sample(16)  # [16, c, H, W] in [-1, 1]"]
    return "## How to use\n\n```python\n" + "\n".join(code) + "\n```"


def for_hub(card: str, repo_id: str) -> str:
    """``card`` with the hub id ``repo_id`` as the load snippet's target."""
    return card.replace(f'"{LOCAL_ID}"', f'"{repo_id}"')
