"""Click commands of the uses: score, complete, compress, decompress.

:mod:`vqprior.cli` adds them to the ``vqprior`` group with :func:`register` (this module
does not import it); the heavy imports happen when a command runs, so ``vqprior --help`` stays
fast.
"""

from __future__ import annotations

import json
from typing import Any

import click

from vqprior.cli_common import bottom_prior_option, prior_option, vae_option


def _report(result: dict[str, Any]) -> None:
    click.echo(json.dumps(result, sort_keys=True, default=str))


def _options() -> tuple[Any, Any, Any, Any]:
    prior = prior_option("train-prior run dir (or exported model dir); a two-level VAE's top prior")
    vae = vae_option(False, "train-vae run dir (codes prior; default: the one the prior records)")
    device = click.option("--device", default=None, help="cpu (default) or cuda")
    return prior, bottom_prior_option(), vae, device


def register(group: click.Group) -> None:
    """Add score, complete, compress and decompress to ``group``."""
    prior_opt, bottom_opt, vae_opt, device_opt = _options()

    @group.command("score")
    @prior_opt
    @bottom_opt
    @vae_opt
    @click.option(
        "--images", required=True, help="a folder of image files or an .npz (x uint8 [N,H,W,C])"
    )
    @click.option("--out", default="scores", show_default=True, type=click.Path(file_okay=False))
    @click.option("--batch-size", type=int, default=64, show_default=True)
    @click.option("--heatmaps/--no-heatmaps", default=True, show_default=True)
    @device_opt
    def score_cmd(**kw: Any) -> None:
        """Per-image bits/dim into OUT/scores.csv and per-element NLL heatmaps into
        OUT/heatmaps/ (codes prior: per code, upsampled to the image).

        Columns: name, bits_per_dim, png_bits_per_dim, complexity_corrected (= bits_per_dim
        minus the PNG size in bits/dim, Serra et al. 2020) and, through a VAE, each level's
        bits given the levels above (prior_bits for one level; top_bits, bottom_bits for
        two: --prior TOP --bottom-prior BOTTOM), decoder_bits, total_bits. A two-level model
        writes a heatmap per level (OUT/heatmaps/top/, OUT/heatmaps/bottom/). The default OOD
        score is complexity_corrected (higher = more out-of-distribution). Images are
        converted to the prior's channels and resized to its size.
        """
        from vqprior.uses.score import score

        _report(score(**kw))

    @group.command("compress")
    @prior_opt
    @bottom_opt
    @vae_opt
    @click.argument("images")
    @click.option("-o", "--out", "out_file", required=True, type=click.Path(dir_okay=False))
    @click.option("--batch-size", type=int, default=16, show_default=True)
    @device_opt
    def compress_cmd(**kw: Any) -> None:
        """Losslessly compress IMAGES (a folder of images or an .npz, exactly the model's
        size and channels) with the model into one file: a pixel prior codes the pixels;
        through a VAE each level's codes under its prior given the levels above (two levels:
        --prior TOP --bottom-prior BOTTOM), then the pixels under the VAE's mixture decoder
        given every level. The file records every prior and the VAE, so decompress FILE -o DIR
        needs nothing else. decompress is exact on the same machine type and software, else
        one clear line (the file records both and the pixels' hash)."""
        from vqprior.uses.compress import compress

        _report(compress(**kw))

    @group.command("decompress")
    @click.argument("file")
    @click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
    @click.option("--prior", "prior_dir", default=None, help="default: the prior the file records")
    @click.option(
        "--bottom-prior",
        "bottom_prior_dir",
        default=None,
        help="default: the bottom prior the file records (two-level VAE)",
    )
    @click.option("--vae", "vae_dir", default=None, help="default: the VAE the file records")
    @device_opt
    def decompress_cmd(**kw: Any) -> None:
        """Decompress FILE into PNGs in OUT (named after the originals; .npz: 00000.png, ...).
        A file written with another model is refused."""
        from vqprior.uses.compress import decompress

        _report(decompress(**kw))

    @group.command("complete")
    @prior_opt
    @bottom_opt
    @vae_opt
    @click.option("--images", required=True, help="a folder of image files or an .npz")
    @click.option(
        "--keep",
        required=True,
        help="top:N (keep the top N rows, 1 <= N < height), left:N (the left N columns, "
        "1 <= N < width) or box:r0,c0,r1,c1 (REMOVE that box, rows r0..r1-1, columns "
        "c0..c1-1, inside the image and not all of it; keep the rest)",
    )
    @click.option(
        "--out", default="completions.png", show_default=True, type=click.Path(dir_okay=False)
    )
    @click.option("--samples", type=int, default=4, show_default=True, help="completions per image")
    @click.option(
        "--limit", type=int, default=8, show_default=True, help="images used (the first N)"
    )
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option("--temperature", type=float, default=1.0, show_default=True)
    @click.option(
        "--label",
        type=int,
        default=None,
        help="class label in [0, classes) for every image (conditional prior; default: the "
        ".npz labels y); an unconditional prior refuses it",
    )
    @device_opt
    def complete_cmd(**kw: Any) -> None:
        """Keep part of each image (codes prior: of its code map), sample the rest: a PNG grid
        with one row per image: original, masked input (removed part gray), completions.

        Only the masked input reaches the model. Through a VAE (two levels: --prior TOP
        --bottom-prior BOTTOM) the masked input is encoded into every level, a code is kept
        when all its pixels are kept, and the levels are completed top first."""
        from vqprior.uses.complete import complete

        _report(complete(**kw))
