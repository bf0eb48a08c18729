"""One process per run directory: an advisory ``flock`` on ``<out>/.lock``.

A second vqprior process started on the same ``--out`` while the first still runs is refused
with one line; a crashed or killed run never leaves the lock stuck (the OS drops a ``flock``
when its holder dies; the pid written into the file is only there to name the holder).
Only rank zero locks: the other ranks of a DDP run share rank zero's directory. Within one
process the lock is re-entrant (a pipeline may hold a directory its stage also locks).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from vqprior.ranks import is_rank_zero

LOCK_NAME = ".lock"

_held: dict[Path, tuple[int, int]] = {}  # resolved lock file -> (fd, depth) in this process


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _holder_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return "?"
    return text if text.isdigit() else "?"


class RunLock:
    """``with RunLock(out):`` holds ``out``'s lock (creating ``out``) for the block.

    Raises :class:`RunLockedError` at once (never waits) when another process holds it.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out = Path(out_dir)
        self._file: Path | None = None

    def __enter__(self) -> RunLock:
        if not is_rank_zero():
            return self
        import fcntl

        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file: pass a directory for the run")
        self.out.mkdir(parents=True, exist_ok=True)
        path = (self.out / LOCK_NAME).resolve()
        if path in _held:
            fd, depth = _held[path]
            _held[path] = (fd, depth + 1)
            self._file = path
            return self
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            raise RunLockedError(
                f"another vqprior process is using {self.out} (pid {pid}); "
                "wait for it or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held[path] = (fd, 1)
        self._file = path
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._file is None:
            return
        fd, depth = _held.pop(self._file)
        if depth > 1:
            _held[self._file] = (fd, depth - 1)
        else:
            os.close(fd)  # closing the last descriptor releases the flock
        self._file = None
