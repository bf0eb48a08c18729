"""The ``vqprior compress`` file format.

::

    magic      8 bytes  b"VQPRIOR\\x1a"
    version    uint16 little-endian (FORMAT_VERSION)
    length     uint32 little-endian: bytes of the header
    header     UTF-8 JSON: model hashes and paths, image shape, names, labels, coding settings,
               and the length (in 32-bit words) of each batch's range-coded stream
    payload    the streams, uint32 little-endian words, one after another
    checksum   32 bytes: SHA-256 of everything before it

A file that is too short, has another magic or version, or whose checksum does not match is
refused with one line (:class:`CompressedFileError`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"VQPRIOR\x1a"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<HI")  # version, header length
_DIGEST = 32


class CompressedFileError(ValueError):
    """A compressed file that is corrupt, truncated, of another version or another model's."""


def pack(header: dict[str, Any], streams: list[np.ndarray]) -> bytes:
    """Header and uint32 streams -> the file's bytes (stream lengths go into the header)."""
    header = dict(header, streams=[int(len(s)) for s in streams])
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    payload = b"".join(np.asarray(s, dtype="<u4").tobytes() for s in streams)
    body = MAGIC + _FIXED.pack(FORMAT_VERSION, len(head)) + head + payload
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
    if version != FORMAT_VERSION:
        raise CompressedFileError(
            f"{where} has format version {version}; this vqprior reads version {FORMAT_VERSION}"
        )
    start = len(MAGIC) + _FIXED.size
    header = json.loads(body[start : start + head_len])
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
