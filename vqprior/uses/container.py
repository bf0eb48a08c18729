"""The ``vqprior compress`` file format, the environment record its header holds, and the
fixed settings the coding runs under (:func:`coding_settings`).

::

    magic      8 bytes  b"VQPRIOR\\x1a"
    version    uint16 little-endian (FORMAT_VERSION)
    length     uint32 little-endian: bytes of the header
    header     UTF-8 JSON: model hashes and paths, image shape, names, labels, coding settings,
               the length (in 32-bit words) of each batch's range-coded stream, and (version
               2) ``env``, what determines the model's float outputs (:func:`environment`),
               and ``pixels_sha256``, the SHA-256 of the original uint8 pixels
    payload    the streams, uint32 little-endian words, one after another
    checksum   32 bytes: SHA-256 of everything before it

The header names the model level by level: ``levels`` (top first), ``prior_hashes`` and
``prior_paths`` (one per level), ``prior_hash`` (those hashes joined by ``+``),
``prior_path`` (the top prior), ``vae_hash`` and ``vae_path``. A one-level file without
``prior_paths`` (written before two-level models) reads as ``[prior_path]``. Version 1 files
(no ``env``, no pixel hash) are still read. A file that is too short, has
another magic or version, or whose checksum does not match is refused with one line
(:class:`CompressedFileError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vqprior.nn.precision import full_precision

MAGIC = b"VQPRIOR\x1a"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: no environment record and no pixel hash
_FIXED = struct.Struct("<HI")  # version, header length
_DIGEST = 32


class CompressedFileError(ValueError):
    """A compressed file that is corrupt, truncated, of another version or another model's, or
    that does not decode to the pixels it was made from."""


def pack(header: dict[str, Any], streams: list[np.ndarray], version: int = FORMAT_VERSION) -> bytes:
    """Header and uint32 streams -> the file's bytes (stream lengths go into the header)."""
    header = dict(header, streams=[int(len(s)) for s in streams])
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    payload = b"".join(np.asarray(s, dtype="<u4").tobytes() for s in streams)
    body = MAGIC + _FIXED.pack(version, len(head)) + head + payload
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes, where: str | Path) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The file's bytes -> (header, streams); a bad file raises CompressedFileError."""
    if len(data) < len(MAGIC) + _FIXED.size + _DIGEST or not data.startswith(MAGIC):
        if MAGIC.startswith(data[: len(MAGIC)]) and len(data) < len(MAGIC) + _FIXED.size + _DIGEST:
            raise CompressedFileError(f"{where} is truncated ({len(data)} bytes)")
        raise CompressedFileError(f"{where} is not a vqprior compressed file (no vqprior magic)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CompressedFileError(
            f"{where} is corrupt or truncated (checksum mismatch): recompress the images"
        )
    version, head_len = _FIXED.unpack_from(body, len(MAGIC))
    if version not in READABLE_VERSIONS:
        newer = " (written by a newer vqprior)" if version > FORMAT_VERSION else ""
        raise CompressedFileError(
            f"{where} has format version {version}{newer}; this vqprior reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    start = len(MAGIC) + _FIXED.size
    header = json.loads(body[start : start + head_len])
    if version >= 2 and not {"env", "pixels_sha256"} <= header.keys():
        raise CompressedFileError(f"{where} is corrupt (a version {version} header without env)")
    words = np.frombuffer(body[start + head_len :], dtype="<u4")
    offsets = np.cumsum([0, *header["streams"]])
    if offsets[-1] != len(words):
        raise CompressedFileError(f"{where} is corrupt (stream lengths do not match the payload)")
    streams = [words[a:b].astype(np.uint32) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return header, streams


def header_bytes(data: bytes) -> int:
    """Bytes of a packed file that are not payload (magic, header, checksum)."""
    (head_len,) = struct.unpack_from("<I", data, len(MAGIC) + 2)
    return len(MAGIC) + _FIXED.size + head_len + _DIGEST


def pixels_sha256(x8: torch.Tensor) -> str:
    """SHA-256 (hex) of uint8 images ``[N, C, H, W]`` in that (C-contiguous) order."""
    assert x8.dtype == torch.uint8
    return hashlib.sha256(x8.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo's model name) and machine, e.g. "Xeon (x86_64)"."""
    model = platform.processor()  # empty on Linux
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    return f"{model} ({platform.machine()})" if model else platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def environment(
    device: torch.device, dtypes: dict[str, torch.dtype], threads: int
) -> dict[str, Any]:
    """What determines the model's float outputs, and so the coding frequencies: software
    versions, the device and its name, CPU instruction set, the models' dtypes (``dtypes``,
    e.g. ``{"dtype": prior, "vae_dtype": vae}``), the intra-op thread count the
    distributions are computed with and (CUDA) the libraries and determinism settings."""
    from vqprior._version import __version__

    env: dict[str, Any] = {
        "vqprior": __version__,
        "torch": torch.__version__,
        "constriction": _version("constriction"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        **{k: str(v).removeprefix("torch.") for k, v in dtypes.items()},
    }
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if isa:  # an override of oneDNN's kernels (convolutions) changes the floats too
        env["onednn_max_cpu_isa"] = isa
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    else:
        env["device_name"] = _cpu_name() if device.type == "cpu" else device.type
    return env


@contextmanager
def coding_settings(threads: int, device: torch.device) -> Iterator[None]:
    """Run the coding path under fixed settings, restored afterwards: ``threads`` intra-op
    threads, autocast off, highest fp32 matmul precision and (CUDA) deterministic cuDNN
    without benchmark or TF32, so that the caller's settings do not change the floats."""
    threads_before, matmul_before = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(threads)
    torch.set_float32_matmul_precision("highest")
    cudnn = torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False
    )
    try:
        with cudnn, full_precision(device.type):
            yield
    finally:
        torch.set_num_threads(threads_before)
        torch.set_float32_matmul_precision(matmul_before)


def env_differences(recorded: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """``"key recorded (here value)"`` for each entry of the two records that differs."""
    return [
        f"{key} {recorded.get(key, 'unset')} (here {here.get(key, 'unset')})"
        for key in sorted(recorded.keys() | here.keys())
        if recorded.get(key) != here.get(key)
    ]


def mismatch_message(header: dict[str, Any], here: dict[str, Any], where: str, reason: str) -> str:
    """The one line for a file that does not decode to the pixels it was made from."""
    if "env" not in header:
        return (
            f"{where} (format version 1, which records neither its environment nor a pixel "
            f"hash) does not decode ({reason}): decompress with the vqprior, torch and machine "
            "that compressed it, or recompress the images"
        )
    diffs = env_differences(header["env"], here)
    if diffs:
        return (
            f"{where} does not decode to the compressed pixels ({reason}); it was compressed "
            f"under {', '.join(diffs)}: decompress on that machine type and software"
        )
    return (
        f"{where} does not decode to the compressed pixels ({reason}) although this machine "
        "and software match the ones it records: the payload was altered or damaged (or "
        "something unrecorded differs)"
    )
