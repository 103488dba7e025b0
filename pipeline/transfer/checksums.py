"""SHA-256 computed while data streams, and file references that carry it."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import ChecksumMismatch

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class FileRef:
    """A file in the task store: its path relative to the store root, SHA-256 and size."""

    path: str
    sha256: str
    size: int

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileRef:
        return cls(path=str(data["path"]), sha256=str(data["sha256"]), size=int(data["size"]))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def copy_hashed(src: BinaryIO, dst: BinaryIO) -> tuple[str, int]:
    """Copy a stream, returning the SHA-256 and size of what was copied."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def verify(ref: FileRef, sha256: str, size: int) -> None:
    """Raise ChecksumMismatch unless size and SHA-256 match the reference."""
    if size != ref.size or sha256 != ref.sha256:
        raise ChecksumMismatch(
            f"{ref.path}: expected {ref.size} bytes sha256 {ref.sha256[:12]}…, "
            f"got {size} bytes sha256 {sha256[:12]}…"
        )


def copy_file_hashed(src: Path, dst: Path) -> tuple[str, int]:
    with src.open("rb") as fin, dst.open("wb") as fout:
        result = copy_hashed(fin, fout)
    shutil.copystat(src, dst)
    return result
