"""Click helpers shared by the ``vqprior`` commands (:mod:`vqprior.cli`) and the uses'
commands (:mod:`vqprior.uses.cli`); it imports neither, so both can import it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

__all__ = ["ExistingPath"]


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
