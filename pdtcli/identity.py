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

from .errors import CheckpointError

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


def version_of(path: Path) -> list[tuple[str, int, int, int]]:
    """What tells one version of a checkpoint from another without reading it: each file's name in the
    checkpoint, size, modification time (ns) and inode. A file saved over, cut short, replaced by a
    rename, added or removed changes it."""
    path = Path(path)
    versions = []
    for child in files_of(path):
        stat = child.stat()
        name = child.relative_to(path).as_posix() if child != path else ""
        versions.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return versions


class HeldStill:
    """A checkpoint that must stay one version while pdt reads it: what is taken from it (a snapshot,
    the carried-over content of an output) is kept only if `check()` finds it as it was when reading
    began, and, given the `size` and `mtime` a listing noted (its hash may date from then), as it was
    then. Training saving over a checkpoint pdt is reading is an ordinary event; a snapshot mixing two
    saves is not a state training was ever in."""

    def __init__(self, path: Path, size: int | None = None, mtime: float | None = None) -> None:
        self.path = Path(path)
        self.before = version_of(self.path)
        if size is not None and stat_of(self.path) != (size, mtime):
            self._changed()

    def check(self) -> None:
        if version_of(self.path) != self.before:
            self._changed()

    def _changed(self) -> None:
        raise CheckpointError("changed while pdt read it (is training still saving it?); nothing read from it was "
                              "kept: run pdt again once it is saved", self.path)


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
