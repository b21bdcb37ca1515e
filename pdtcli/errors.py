"""Errors that reach the user, each with the exit code the CLI documents.

Every error a user can cause carries the file it concerns, so that the CLI can print
one line naming the file and the problem, and scripts can branch on the exit code.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path


class PdtError(Exception):
    """Base of every expected failure; `exit_code` is what `pdt` exits with."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        # one line whatever a library put in it (HDF5's messages hold newlines)
        super().__init__(" ".join(line.strip() for line in message.splitlines() if line.strip()))

    def __str__(self) -> str:
        message = super().__str__()
        return f"{self.path}: {message}" if self.path is not None else message


class UsageError(PdtError):
    """Options that cannot work together, or a path that is not what the command takes."""

    exit_code = 2


class CheckpointError(PdtError):
    """A checkpoint that cannot be read or does not fit the window (corrupt, NaN, new layout)."""

    exit_code = 3


class NotACheckpoint(CheckpointError):
    """A file with a checkpoint's suffix that opens cleanly but holds no tensors (hparams.pt):
    passed over with a note rather than stopping every run."""


class StoreError(PdtError):
    """A store that belongs to another folder or model, is from a newer pdt, or is locked."""

    exit_code = 4


class OutputError(PdtError):
    """An output that exists (without --force) or cannot be written."""

    exit_code = 5


class DistributedError(PdtError):
    """Ranks of a torchrun step that cannot go on together: one failed or died, they see different
    folders, or the store was made by another number of ranks. Nothing is committed or published."""

    exit_code = 7


class StageMissing(PdtError):
    """A stage asked for what an earlier stage has not produced (apply before predict)."""

    exit_code = 6


# What the user can do about an operating-system error, by its errno: the "way out" of the one line.
_ACCESS = "run pdt as a user who may, or give this user access"
WAY_OUT = {
    errno.ENOSPC: "free space there and run again",
    errno.EDQUOT: "free space in your disk quota and run again",
    errno.EFBIG: "a file-size limit of this process stopped the write (`ulimit -f`); raise it and run again",
    errno.EMFILE: "this process may open no more files (`ulimit -n`); raise the limit and run again",
    errno.ENFILE: "the system may open no more files; run again when fewer are open",
    errno.EACCES: _ACCESS,
    errno.EPERM: _ACCESS,
    errno.EROFS: "the file system is mounted read-only",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "a folder stands where pdt expects a file; move it away",
    errno.EIO: "the disk or network file system failed (see `dmesg`); check it and run again",
}
UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})  # no writing here, whatever is tried


def os_reason(exc: OSError) -> str:
    """One line for an operating-system error: the errno's own text (not a library's message around it,
    such as HDF5's, which spans lines and names a temporary file) and the way out, when there is one."""
    code = exc.errno  # h5py's OSError carries one too, its text being HDF5's whole message
    text = os.strerror(code) if code else " ".join(str(exc).split())[:200] or type(exc).__name__
    way_out = WAY_OUT.get(code)
    return f"{text}; {way_out}" if way_out else text


def os_error(exc: OSError, kind: type[PdtError], what: str, path: str | Path | None = None) -> PdtError:
    """`exc` as a `kind` error: `<path>: <what>: <errno text>; <way out>`. `path` None names the file
    the operating system named, if any."""
    if path is None and isinstance(exc.filename, (str, bytes, os.PathLike)):
        path = os.fsdecode(exc.filename)
    return kind(f"{what}: {os_reason(exc)}", path)


@contextlib.contextmanager
def os_errors_as(kind: type[PdtError], what: str, path: str | Path | None = None) -> Iterator[None]:
    """Operating-system errors in the block become `kind` errors (`os_error`); pdt's own errors, raised
    by a narrower boundary inside, pass unchanged."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, kind, what, path) from exc
