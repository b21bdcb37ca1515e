"""Errors that reach the user, each with the exit code the CLI documents.

Every error a user can cause carries the file it concerns, so that the CLI can print
one line naming the file and the problem, and scripts can branch on the exit code.
"""

from __future__ import annotations

from pathlib import Path


class PdtError(Exception):
    """Base of every expected failure; `exit_code` is what `pdt` exits with."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(message)

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
