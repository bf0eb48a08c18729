"""Click helpers shared by the ``vqprior`` commands (:mod:`vqprior.cli`) and the uses'
commands (:mod:`vqprior.uses.cli`); it imports neither, so both can import it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["ExistingPath", "bottom_prior_option", "prior_option", "vae_option"]


class ExistingPath(click.Path):
    """A path that must exist: a missing one is a user error (one line, exit 2), not a usage
    message."""

    def __init__(self, what: str, directory: bool) -> None:
        super().__init__(file_okay=not directory, dir_okay=directory)
        self.what, self.directory = what, directory

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"{self.what} {path} not found")
        if self.directory and not path.is_dir():
            raise NotADirectoryError(f"{self.what} {path} is a file, expected a directory")
        if not self.directory and path.is_dir():
            raise IsADirectoryError(f"{self.what} {path} is a directory, expected a file")
        return super().convert(value, param, ctx)


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def prior_option(help: str) -> Decorator:
    """``--prior`` (a train-prior run dir or export dir), required."""
    kind = ExistingPath("prior run dir", directory=True)
    return click.option("--prior", "prior_dir", required=True, type=kind, help=help)


def bottom_prior_option() -> Decorator:
    """``--bottom-prior``: a two-level VAE's bottom prior (``--prior`` is then the top one)."""
    kind = ExistingPath("bottom prior run dir", directory=True)
    return click.option(
        "--bottom-prior",
        "bottom_prior_dir",
        default=None,
        type=kind,
        help="two-level VAE: the bottom prior's run dir (--prior is then the top prior)",
    )


def vae_option(required: bool, help: str) -> Decorator:
    """``--vae``: a train-vae run dir."""
    kind = ExistingPath("VAE run dir", directory=True)
    return click.option("--vae", "vae_dir", required=required, default=None, type=kind, help=help)
