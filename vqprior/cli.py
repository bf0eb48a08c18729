"""The ``vqprior`` command line: thin click commands over vqprior.train's stage functions.

A user error (bad config key or value, missing file, mismatched checkpoint, bad data) prints
one line ``error: <message>`` to stderr and exits with status 2; ``--debug`` shows the
traceback instead. A training run stopped by a non-finite loss exits with status 1.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml

from vqprior.cli_common import ExistingPath, bottom_prior_option, prior_option, vae_option
from vqprior.config import ConfigError, apply_overrides
from vqprior.host import keep_freed_memory
from vqprior.lock import RunLockedError
from vqprior.uses.cli import register as register_uses


class _EchoHandler(logging.Handler):
    """Log records to the current stderr (click.echo), so test runners can capture them."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line; for an error re-raised from a DataLoader worker
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), the
    original message."""
    text = str(err).strip()
    if isinstance(err, OSError) and err.strerror:  # "[Errno 28] ..." -> the message itself
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if "Original Traceback" in text and len(lines) > 1:
        cause = lines[-1]
        name = type(err).__name__
        return cause.split(f"{name}: ", 1)[1] if f"{name}: " in cause else cause
    return lines[0]


# user errors: a bad file, key, value, checkpoint or data (exit 2)
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError,
                                                 IsADirectoryError, NotADirectoryError,
                                                 RunLockedError)  # fmt: skip


class _Group(click.Group):
    """Turns errors into one line on stderr: exit status 2 for a user error (bad config, file,
    checkpoint or data), 1 for a failed run (non-finite loss, I/O failure, a bug: rerun with
    ``--debug`` for the traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        from vqprior.train.errors import NonFiniteLossError

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:
            if ctx.params.get("debug"):
                raise
            if isinstance(err, NonFiniteLossError) or not isinstance(err, _USER_ERRORS):
                code = 1
                line = _one_line(err)
                if not isinstance(err, (NonFiniteLossError, OSError)):
                    line = f"{line} ({type(err).__name__}; rerun with --debug for the traceback)"
            else:
                code, line = 2, _one_line(err)
            click.echo(f"error: {line}", err=True)
            ctx.exit(code)


def _load_config(path: str | None, sets: tuple[str, ...]) -> dict[str, Any]:
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML ({_one_line(err)})") from None
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or _one_line(err)
            raise ConfigError(f"cannot read config {path} ({reason})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a mapping with sections model, data, train")
    return apply_overrides(raw, sets)


def _device_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--accelerator", default="auto", show_default=True, help="cpu, gpu, auto, ..."
        ),
        click.option(
            "--devices", default="auto", show_default=True, help="a count or a list like 0,1"
        ),
        click.option("--num-nodes", type=int, default=1, show_default=True),
        click.option("--strategy", default="auto", show_default=True, help="auto, ddp, ..."),
        click.option(
            "--precision",
            default=None,
            help="default: bf16-mixed on CUDA and on CPUs with native bf16, else 32-true",
        ),
        click.option(
            "--compile/--no-compile", "compile_", default=False, help="torch.compile the model"
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _stage_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--config",
            "config_path",
            type=ExistingPath("config file", directory=False),
            help="a YAML in configs/",
        ),
        click.option(
            "--set", "sets", multiple=True, metavar="KEY=VALUE", help="dotted override, repeatable"
        ),
        click.option("--out", required=True, type=click.Path(), help="run directory"),
        click.option("--seed", type=int, default=None, help="overrides train.seed"),
    ]
    for option in reversed(options):
        f = option(f)
    return _device_options(f)


def _devices(kw: dict[str, Any]) -> Any:
    from vqprior.train.config import DeviceOptions

    return DeviceOptions(
        accelerator=kw["accelerator"],
        devices=str(kw["devices"]),
        num_nodes=kw["num_nodes"],
        strategy=kw["strategy"],
        precision=kw["precision"],
        compile=kw["compile_"],
    )


def _report(result: dict[str, Any]) -> None:
    if not result:  # a DDP worker rank: rank zero reports
        return
    click.echo(json.dumps(result, sort_keys=True, default=str))


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="show tracebacks and debug logs")
def cli(debug: bool) -> None:
    """vqprior: VQ-VAE + PixelCNN priors (train-vae -> encode -> train-prior -> generate)."""
    keep_freed_memory()  # full passes on a CPU: up to 2x (vqprior.host)
    log = logging.getLogger("vqprior")
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        handler = _EchoHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.WARNING)
    # plain progress lines of runs without a terminal (vqprior.train.callbacks.PlainProgress)
    logging.getLogger("vqprior.train.progress").setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        _quiet_lightning()


def _quiet_lightning() -> None:
    """Hide Lightning's start-up chatter (accelerator lines, tips) and known third-party
    deprecation notices; warnings about the run itself still show."""
    import warnings

    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.accelerators.cuda",
        "lightning.fabric.utilities.seed",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r".*TorchVision are deprecated.*")
    warnings.filterwarnings("ignore", message=r".*limit_val_batches=1.0.*")
    # an "epoch" is one pass of vqprior's resumable stream sampler; logging is per step anyway
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    # data.name=stream: litdata sizes each worker's part itself; its tensors are read-only views
    warnings.filterwarnings("ignore", message=r".*IterableDataset. has .__len__. defined.*")
    warnings.filterwarnings("ignore", message=r".*given buffer is not writable.*")


@cli.command("train-vae")
@_stage_options
def train_vae_cmd(
    config_path: str | None, sets: tuple[str, ...], out: str, seed: int | None, **kw: Any
) -> None:
    """Stage one: fit a VQ-VAE; rerun on the same --out to resume."""
    from vqprior.train.stages import train_vae

    _report(train_vae(_load_config(config_path, sets), out, _devices(kw), seed))


@cli.command("train-prior")
@_stage_options
@click.option("--vae", "vae_dir", default=None, help="train-vae run dir (same as --set vae=DIR)")
@click.option(
    "--codes",
    "codes_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="codes from `vqprior encode`",
)
def train_prior_cmd(
    config_path: str | None,
    sets: tuple[str, ...],
    out: str,
    seed: int | None,
    vae_dir: str | None,
    codes_dir: str | None,
    **kw: Any,
) -> None:
    """Stage two: fit a PixelCNN on a VAE's codes (vae set) or on pixels."""
    from vqprior.train.stages import train_prior

    cfg = _load_config(config_path, sets + ((f"vae={vae_dir}",) if vae_dir else ()))
    _report(train_prior(cfg, out, _devices(kw), seed, codes_dir=codes_dir))


_vae_option = vae_option
_prior_option = prior_option("train-prior run dir")
_bottom_prior_option = bottom_prior_option()
_inference_device_option = click.option(
    "--device", default=None, help="cpu or cuda (default: cuda when available)"
)


@cli.command("encode")
@_vae_option(required=True, help="train-vae run dir")
@click.option(
    "--config",
    "config_path",
    type=ExistingPath("config file", directory=False),
    help="YAML whose data section to encode",
)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="e.g. data.limit=100")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="directory for {train,val,test}.safetensors (or the shards)",
)
@click.option("--batch-size", type=int, default=256, show_default=True)
@_inference_device_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "shards"]),
    default="safetensors",
    show_default=True,
    help='shards: litdata streaming shards, written batch by batch (needs "vqprior[stream]")',
)
def encode_cmd(
    vae_dir: str,
    config_path: str | None,
    sets: tuple[str, ...],
    out: str,
    batch_size: int,
    device: str | None,
    fmt: str,
) -> None:
    """Encode a dataset into code maps with a trained VAE (data defaults to the VAE run's)."""
    from vqprior.train.rundir import recorded_data

    data = recorded_data(vae_dir, _load_config(config_path, sets).get("data"))
    if fmt == "shards":
        from vqprior.streaming import encode_shards

        _report(encode_shards(vae_dir, data, out, batch_size, device))
        return
    from vqprior.train.codes import encode_codes

    _report({k: str(v) for k, v in encode_codes(vae_dir, data, out, batch_size, device).items()})


@cli.command("shard")
@click.argument("images", type=click.Path())
@click.option(
    "-o", "--out", required=True, type=click.Path(file_okay=False), help="a new directory"
)
@click.option("--val-fraction", type=float, default=None, help="default 0.1 (as data.val_fraction)")
@click.option(
    "--test-fraction", type=float, default=None, help="default 0.1 (as data.test_fraction)"
)
@click.option("--split-seed", type=int, default=None, help="default 0 (as data.split_seed)")
@click.option("--image-size", type=int, default=None, help="resize + center-crop to this size")
@click.option("--channels", type=click.Choice(["1", "3"]), default=None, help="convert to 1 or 3")
@click.option("--chunk-bytes", default="64MB", show_default=True, help="litdata chunk size")
@click.option("--num-workers", type=int, default=0, show_default=True, help="decoding processes")
def shard_cmd(images: str, out: str, channels: str | None, **kw: Any) -> None:
    """Convert a folder of images or an .npz into litdata shards for data.name: stream.

    OUT gets train/, val/, test/ (the splits data.name: folder or npz would make) and
    vqprior.json; train with --set data.name=stream --set data.path=OUT."""
    from vqprior.streaming import write_image_shards

    _report(write_image_shards(images, out, channels=int(channels) if channels else None, **kw))


@cli.command("generate")
@_prior_option
@_bottom_prior_option
@_vae_option(required=False, help="train-vae run dir (codes prior)")
@click.option("--num", type=int, default=64, show_default=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="PNG path; raw samples go beside it",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--label", type=int, default=None, help="class label (conditional prior)")
@_inference_device_option
@click.option("--method", default="auto", show_default=True, help="sampler: auto or naive")
@click.option("--top-k", type=int, default=None, help="truncate to the k likeliest (categorical)")
@click.option("--top-p", type=float, default=None, help="nucleus sampling mass (categorical)")
@click.option("--guidance", type=float, default=None, help="classifier-free guidance scale")
def generate_cmd(**kw: Any) -> None:
    """Sample from a prior (decoding codes through the VAE) into a PNG grid and tensors."""
    from vqprior.train.inference import generate

    _report(generate(out_png=kw.pop("out"), **kw))


@cli.command("evaluate")
@_prior_option
@_bottom_prior_option
@_vae_option(required=False, help="train-vae run dir (codes prior: adds the decoder's bits)")
@click.option(
    "--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True
)
@click.option("--batch-size", type=int, default=256, show_default=True)
@_inference_device_option
def evaluate_cmd(**kw: Any) -> None:
    """Bits per dimension on a split (pixels prior, or prior + decoder for codes)."""
    from vqprior.train.inference import evaluate

    _report(evaluate(**kw))


@cli.command("export")
@click.argument("ckpt", type=click.Path())
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--out", default=None, type=click.Path(file_okay=False), help="same as DIR")
@click.option(
    "--onnx",
    is_flag=True,
    help='also write encoder/decoder.onnx (VAE) or prior.onnx and onnx.json; needs "vqprior[onnx]"',
)
def export_cmd(ckpt: str, out_dir: str | None, out: str | None, onnx: bool) -> None:
    """Turn a Lightning checkpoint into an exported model dir (safetensors): CKPT DIR.

    With --onnx CKPT may also be an exported model dir: its ONNX graphs go to DIR."""
    from vqprior.train.inference import export

    if (out_dir is None) == (out is None):
        raise click.UsageError("give the export directory once: vqprior export CKPT DIR")
    target = out_dir if out_dir is not None else out
    assert target is not None
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"checkpoint {ckpt} not found")
    if onnx:
        from vqprior.onnx_export import OnnxUnavailableError, require_onnx

        try:
            require_onnx()
        except OnnxUnavailableError as err:
            raise click.ClickException(str(err)) from None
    result: dict[str, Any] = {"model_dir": str(export(ckpt, target, onnx=onnx))}
    if onnx:
        result["onnx"] = sorted(str(p) for p in Path(target).glob("*.onnx"))
    _report(result)


@cli.command("push")
@click.argument("path", type=ExistingPath("model dir", directory=True))
@click.argument("repo_id")
@click.option("--message", default=None, help="commit message")
@click.option("--private", is_flag=True, default=None, help="create the repo private")
@click.option("--revision", default=None, help="branch to push to")
@click.option("--create-pr", is_flag=True, help="open a pull request instead of committing")
def push_cmd(
    path: str,
    repo_id: str,
    message: str | None,
    private: bool | None,
    revision: str | None,
    create_pr: bool,
) -> None:
    """Upload an exported model (a run dir or its model/ dir) to a Hugging Face Hub repo:
    PATH REPO_ID. Needs "vqprior[hub]"; the token comes from `hf auth login` or HF_TOKEN."""
    from vqprior.hub import is_hub_id, upload
    from vqprior.train.rundir import find_export

    if not is_hub_id(repo_id):
        raise ValueError(f"{repo_id!r} is not a hub id (user/name)")
    model_dir = find_export(path, "model")
    info = upload(
        model_dir,
        repo_id,
        commit_message=message,
        private=private,
        revision=revision,
        create_pr=create_pr,
    )
    _report({"model_dir": str(model_dir), "repo_id": repo_id, "commit": str(info)})


@cli.command("pipeline")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--set", "sets", multiple=True, metavar="STAGE.KEY=VALUE", help="e.g. vae.train.max_steps=50"
)
@click.option(
    "--out", default=None, type=click.Path(file_okay=False), help="run dir (default: the file's)"
)
@click.option("--from", "from_stage", default=None, metavar="STAGE", help="redo from this stage on")
@_device_options
def pipeline_cmd(
    file: str, sets: tuple[str, ...], out: str | None, from_stage: str | None, **kw: Any
) -> None:
    """Chain the stages a pipelines/*.yaml file describes, skipping finished ones."""
    try:
        from vqprior.pipeline import run_pipeline
    except ImportError as err:
        raise click.ClickException(f"the pipeline command is unavailable ({err})") from None
    stage_log = logging.getLogger("vqprior.pipeline")  # stage headers show without --debug
    stage_log.setLevel(min(logging.INFO, logging.getLogger("vqprior").getEffectiveLevel()))
    result = run_pipeline(
        file, overrides=list(sets), device=_devices(kw), out=out, from_stage=from_stage
    )
    if isinstance(result, dict) and result:
        _report({k: result[k] for k in ("out", "total_seconds", "losses_png") if k in result})


@cli.command("bench", add_help_option=False, context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_cmd(args: tuple[str, ...]) -> None:
    """Speed benchmarks (ratios against a baseline measured in the same run)."""
    try:
        from vqprior.bench import main as bench_main
    except ImportError as err:
        raise click.ClickException(f"the bench command is unavailable ({err})") from None
    bench_main(list(args))


register_uses(cli)  # score, complete, compress, decompress (vqprior.uses)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="vqprior")


if __name__ == "__main__":
    main()
