"""What a pipeline run shows: key figures per stage, summary.md/json and losses.png."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from vqprior.io import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

VAE_FIGURES = ("recon_mse", "perplexity", "codes_used", "bits_per_dim", "loss")
PRIOR_FIGURES = ("nats_per_code", "bits_per_image", "nats_per_dim", "bits_per_dim", "loss")


def _rel(path: str | Path, out: Path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(out)) if p.is_relative_to(out) else str(p)


def _latest_image(folder: Path, prefix: str, out: Path) -> list[str]:
    found = sorted((folder / "images").glob(f"{prefix}_step*.png"))
    return [_rel(found[-1], out)] if found else []


def _pick(metrics: dict[str, float], names: tuple[str, ...]) -> dict[str, float]:
    """``val/<name>`` when logged, else ``train/<name>``."""
    picked = {}
    for name in names:
        for split in ("val", "train"):
            if f"{split}/{name}" in metrics:
                picked[f"{split}/{name}"] = metrics[f"{split}/{name}"]
                break
    return picked


def training_figures(kind: str, folder: Path, summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """Key figures of a train-vae/train-prior run dir from its summary.json and config.yaml."""
    metrics = summary.get("metrics", {})
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    figures: dict[str, Any] = {
        "global_step": summary.get("global_step"),
        "num_parameters": summary.get("num_parameters"),
    }
    for name in ("best_val_loss", "best_step", "exported"):  # which weights the export holds
        if summary.get(name) is not None:
            figures[name] = summary[name]
    if kind == "train-vae":
        figures.update(_pick(metrics, VAE_FIGURES))
        figures["num_codes"] = cfg["model"]["num_codes"]
        used = figures.get("val/codes_used", figures.get("train/codes_used"))
        if used is not None:
            figures["codebook_usage"] = used / cfg["model"]["num_codes"]
        figures["images"] = _latest_image(folder, "recon", out)
    else:
        figures.update(_pick(metrics, PRIOR_FIGURES))
        figures["data"] = cfg["model"]["data"]
        figures["images"] = _latest_image(folder, "samples", out)
    return figures


def encode_figures(folder: Path) -> dict[str, Any]:
    """Examples per split, the code-map grid and codebook usage on the train split."""
    from vqprior.artifacts import load_codes

    figures: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        codes, _, meta = load_codes(folder / f"{split}.safetensors")
        figures[f"{split}_examples"] = len(codes)
        if split == "train":
            k = int(meta["num_codes"])
            counts = torch.bincount(codes.flatten(), minlength=k).double()
            p = counts / counts.sum().clamp_min(1)
            entropy = -(p * p.clamp_min(1e-30).log()).sum()
            figures.update(
                grid=meta["grid"],
                num_codes=k,
                codes_used=int((counts > 0).sum()),
                perplexity=float(entropy.exp()),
            )
    return figures


def loss_curves(folder: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``train/loss`` and ``val/loss`` from a run dir's metrics.csv: name -> (steps, values)."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    path = folder / "metrics.csv"
    if not path.is_file():
        return curves
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for name in ("train/loss", "val/loss"):
                value = row.get(name)
                if value not in (None, ""):
                    steps, values = curves.setdefault(name, ([], []))
                    steps.append(float(row["step"]))
                    values.append(float(value))
    return curves


def plot_losses(out: Path, folders: dict[str, Path]) -> Path | None:
    """``<out>/losses.png``: one panel of loss curves per training stage (None: nothing drawn).

    A diagnostic: any failure (no matplotlib, an unreadable metrics.csv, a full disk) is one
    logged line and None, never the pipeline's error."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: skipping losses.png")
        return None
    try:
        return _draw_losses(out, folders, Figure)
    except Exception as err:
        logger.warning("skipped losses.png (%s: %s)", type(err).__name__, err)
        return None


def _draw_losses(out: Path, folders: dict[str, Path], Figure: Any) -> Path | None:  # noqa: N803
    curves = {name: loss_curves(folder) for name, folder in folders.items()}
    curves = {name: c for name, c in curves.items() if c}
    if not curves:
        return None
    fig = Figure(figsize=(4.5 * len(curves), 3.4), layout="constrained")
    axes = fig.subplots(1, len(curves), squeeze=False)[0]
    for ax, (name, stage_curves) in zip(axes, curves.items(), strict=True):
        for label, (steps, values) in stage_curves.items():
            style = "-" if label.startswith("train") else "o-"
            ax.plot(steps, values, style, label=label, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    target = out / "losses.png"
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return target


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _get(figures: dict[str, Any], name: str) -> Any:
    """``val/<name>``, else ``train/<name>``, else ``<name>`` (None when absent)."""
    for key in (f"val/{name}", f"train/{name}", name):
        if key in figures:
            return figures[key]
    return None


def _digest(figures: dict[str, Any], parts: list[tuple[str, str]]) -> list[str]:
    """``parts``: (figure name, format with {v}); the figures that are present, formatted."""
    return [fmt.format(v=_fmt(v)) for name, fmt in parts if (v := _get(figures, name)) is not None]


BEST = [("best_val_loss", "best val loss {v}"), ("best_step", "at step {v}")]  # the export's
DIGESTS: dict[str, list[tuple[str, str]]] = {
    "train-vae": [
        ("global_step", "{v} steps"),
        ("recon_mse", "recon MSE {v}"),
        ("codes_used", "codes used {v}"),
        ("num_codes", "of {v}"),
        ("perplexity", "perplexity {v}"),
        ("bits_per_dim", "{v} bits/dim"),
        *BEST,
    ],
    "train-prior": [
        ("global_step", "{v} steps"),
        ("nats_per_code", "{v} nats/code"),
        ("bits_per_image", "{v} bits/image"),
        ("bits_per_dim", "{v} bits/dim"),
        *BEST,
    ],
    "encode": [
        ("train_examples", "{v} train"),
        ("val_examples", "{v} val"),
        ("test_examples", "{v} test maps"),
        ("grid", "of {v}"),
        ("codes_used", "codes used {v}"),
        ("num_codes", "of {v}"),
        ("perplexity", "perplexity {v}"),
    ],
    "generate": [("num", "{v} samples")],
    "evaluate": [
        ("split", "{v}:"),
        ("bits_per_dim", "{v} bits/dim"),
        ("prior_bits_per_dim", "prior {v} bits/dim"),
        ("decoder_bits_per_dim", "decoder {v} bits/dim"),
        ("prior_bits_per_code", "prior {v} bits/code"),
    ],
}


def headline(kind: str, figures: dict[str, Any]) -> str:
    """A one-line digest of a stage's key figures (validation figures when logged)."""
    return (
        ", ".join(_digest(figures, DIGESTS.get(kind, [])))
        .replace(", of ", " of ")
        .replace(", at step ", " at step ")
        .replace(":,", ":")
    )


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``<out>/summary.json`` and a readable ``<out>/summary.md`` (both written atomically)."""
    atomic_write_text(
        out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n"
    )
    lines = [
        f"# Pipeline {Path(summary['pipeline']).name}",
        "",
        f"Run directory `{out}`, finished {summary['finished']}, "
        f"{summary['total_seconds']:.1f} s this run.",
        "",
        "| # | stage | kind | status | seconds | key figures |",
        "|---|---|---|---|---|---|",
    ]
    images: list[str] = []
    for s in summary["stages"]:
        secs = f"{s['seconds']:.1f}"
        if s["skipped"]:
            secs = f"0 (took {s['recorded_seconds']:.1f})"
        figs = headline(s["kind"], s["figures"]).replace("|", "/")
        lines.append(
            f"| {s['index']} | {s['name']} | {s['kind']} | {s['status']} | {secs} | {figs} |"
        )
        images += [f"![{s['name']}]({p})" for p in s["images"]]
    if images:
        lines += ["", "## Images", "", *images]
    if summary.get("losses_png"):
        lines += ["", "## Losses", "", f"![losses]({summary['losses_png']})"]
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
