"""Hashes of files and bytes, in one place.

Two kinds, for two jobs:

- **sha256** where a hash is an identity that must hold: a model's ONNX graph (``model_id``),
  text-model and backbone weights checked before they are loaded, imported checkpoints.
- **XXH3-128** where a hash only recognises the same photo again (a renamed or copied file
  in the index, the feature cache of a frozen backbone), never against an adversary: 0.02 ms
  for a 1 MB JPEG against 0.54 ms for sha256, time the decode threads spend decoding instead.

Files are read in 1 MiB chunks, so a hash never holds a whole file in memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol, TypeVar

CHUNK = 1 << 20
CONTENT_HASH_NAME = "xxh3-128"  # the prefix of ``file_hash`` values (the index stores it)


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


D = TypeVar("D", bound=_Digest)


def hash_file(path: Path | str, digest: D, chunk: int = CHUNK) -> D:
    """Feed a file's bytes to ``digest`` (any object with ``update``) in chunks; returns it."""
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest


def file_sha256(path: Path | str, chunk: int = CHUNK) -> str:
    """The sha256 of a file's bytes, hex."""
    return hash_file(path, hashlib.sha256(), chunk).hexdigest()


def file_xxh3(path: Path | str, chunk: int = CHUNK) -> str:
    """The XXH3-128 digest of a file's bytes, hex (no prefix)."""
    import xxhash

    return hash_file(path, xxhash.xxh3_128(), chunk).hexdigest()


def file_hash(path: Path | str, chunk: int = CHUNK) -> str:
    """The content hash of an image as the index stores it: ``xxh3-128:`` and the hex digest.

    The prefix names the algorithm: indexes written before it hold bare sha256 digests, which
    simply never match (their files are still found by path, size and mtime).
    """
    return f"{CONTENT_HASH_NAME}:{file_xxh3(path, chunk)}"


def bytes_hash(data: bytes) -> str:
    """``file_hash`` of a file already read into memory (the tag pipeline decodes from the same bytes)."""
    import xxhash

    return f"{CONTENT_HASH_NAME}:{xxhash.xxh3_128_hexdigest(data)}"
