"""sdltag.hashing: the one place files and bytes are hashed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from sdltag import hashing


def test_file_hash(tmp_path: Path) -> None:
    """XXH3-128 of the bytes (the reference test vector of "abc"), read in chunks, prefixed with its name."""
    (tmp_path / "a").write_bytes(b"abc")
    assert hashing.file_hash(tmp_path / "a") == "xxh3-128:06b05ab6733a618578af5f94892f3950"
    assert hashing.file_xxh3(tmp_path / "a") == "06b05ab6733a618578af5f94892f3950"
    big = bytes(range(256)) * 5000  # 1.28 MB: more than one read
    (tmp_path / "b").write_bytes(big)
    (tmp_path / "c").write_bytes(big[:-1] + b"\x00")
    assert hashing.file_hash(tmp_path / "b") == hashing.file_hash(tmp_path / "b", chunk=4096)
    assert hashing.file_hash(tmp_path / "b") != hashing.file_hash(tmp_path / "c")
    # the tag pipeline hashes the bytes it then decodes: the same digest as hashing the file
    assert hashing.bytes_hash(big) == hashing.file_hash(tmp_path / "b")
    assert hashing.bytes_hash(b"abc") == hashing.file_hash(tmp_path / "a")


def test_file_sha256(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    assert hashing.file_sha256(tmp_path / "a") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = bytes(range(256)) * 5000
    (tmp_path / "b").write_bytes(big)
    assert hashing.file_sha256(tmp_path / "b", chunk=4096) == hashlib.sha256(big).hexdigest()
    digest = hashing.hash_file(tmp_path / "b", hashlib.md5(usedforsecurity=False), chunk=1000)
    assert digest.hexdigest() == hashlib.md5(big, usedforsecurity=False).hexdigest()


def test_the_stores_and_the_model_checks_share_it() -> None:
    """One implementation: the model folder, the index's callers and the label cache's weights use these."""
    import sdltag.embedding.locate as locate
    import sdltag.modelfolder as modelfolder
    import sdltag.tagger as tagger

    assert modelfolder.file_sha256 is hashing.file_sha256 and locate.file_sha256 is hashing.file_sha256
    assert tagger.file_hash is hashing.file_hash and tagger.bytes_hash is hashing.bytes_hash
