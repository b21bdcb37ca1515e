"""What identifies a checkpoint on disk: its size, modification time and content hash.

A checkpoint is a file or, for Hugging Face Trainer and PyTorch DCP, a folder. For a
folder the size is the sum of its files, the time the newest of them, and the hash
covers every file's relative name and bytes, so a copied folder is a duplicate and a
folder that gained, lost or changed a file is not the one that was ingested.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Union

_CHUNK = 8 << 20
Digest = Union[str, Future, None]  # a SHA-256, one being computed (`Hashes`), or none (not hashed)


def files_of(path: Path) -> list[Path]:
    """The regular files that make up a checkpoint, in a stable order."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file())


def stat_of(path: Path) -> tuple[int, float]:
    """(size in bytes, newest modification time) of a checkpoint file or folder."""
    path = Path(path)
    if not path.is_dir():
        stat = path.stat()
        return stat.st_size, stat.st_mtime
    size, mtime = 0, path.stat().st_mtime
    for child in files_of(path):
        stat = child.stat()
        size += stat.st_size
        mtime = max(mtime, stat.st_mtime)
    return size, mtime


def unchanged(path: Path, size: int, mtime: float) -> bool:
    """Whether `path` still has the size and modification time a store record noted for it."""
    path = Path(path)
    return path.exists() and stat_of(path) == (size, mtime)


def sha256_path(path: Path, only: list[Path] | None = None) -> str:
    """The SHA-256 of a file's bytes, or of a folder's relative file names and bytes (`only`: of
    these of its files, one rank's share)."""
    path = Path(path)
    folder = path.is_dir()
    digest = hashlib.sha256()
    for child in files_of(path) if only is None else only:
        if folder:
            digest.update(child.relative_to(path).as_posix().encode() + b"\0")
        with open(child, "rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()


class Hashes:
    """Checkpoint hashes computed on a thread of their own, so that hashing a checkpoint overlaps
    reading its values: hashlib releases the GIL while it digests a block. One thread, in the
    order submitted (the order of ingest). Leaving the `with` block drops the hashes no one waited
    for (an ingest that failed), after the one being computed finishes."""

    def __enter__(self) -> Hashes:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdt-sha256")
        return self

    def submit(self, path: Path) -> Future:
        return self._pool.submit(sha256_path, path)

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
