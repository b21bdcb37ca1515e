"""Finding the training checkpoints in a folder, in training order.

Order is by the step number in the file name (natural order: epoch_9 before epoch_10),
then by the step recorded in the file, then by modification time. pdt's own outputs
(`*.pdt.*`, and any path the store recorded as an output) are never training checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .formats import CHECKPOINT_SUFFIXES, folder_format
from .identity import stat_of

OUTPUT_TAG = ".pdt"
COMPOUND_SUFFIXES = (".weights.h5",)
_NUMBER = re.compile(r"(\d+)")


@dataclass(frozen=True)
class Candidate:
    path: Path
    name_step: int | None
    mtime: float
    size: int


def order_key(step: int | None, mtime: float) -> tuple:
    """Training order: numbered names by number, then unnumbered ones, ties by modification time."""
    return (step is None, step if step is not None else 0, mtime)


def name_step(path: Path) -> int | None:
    """The last number in the name (a file's stem), which is the step or epoch by convention."""
    numbers = _NUMBER.findall(path.name if path.is_dir() else path.stem)
    return int(numbers[-1]) if numbers else None


def is_pdt_output(path: Path) -> bool:
    return OUTPUT_TAG + "." in path.name or path.stem.endswith(OUTPUT_TAG) or path.name.endswith(OUTPUT_TAG)


def output_name(newest: Path) -> Path:
    """Where the fused checkpoint goes by default: next to the newest, tagged as pdt's.

    The tag goes before a compound suffix that the framework insists on (Keras loads only
    names ending in `.weights.h5`), else before the last suffix; a folder gets it at the end.
    """
    if newest.is_dir():
        return newest.with_name(newest.name + OUTPUT_TAG)
    for compound in COMPOUND_SUFFIXES:
        if newest.name.endswith(compound):
            return newest.with_name(f"{newest.name[: -len(compound)]}{OUTPUT_TAG}{compound}")
    return newest.with_name(f"{newest.stem}{OUTPUT_TAG}{newest.suffix}")


def is_checkpoint(path: Path) -> bool:
    """A file with a checkpoint suffix, or a folder in a checkpoint-folder format."""
    if path.is_dir():
        return folder_format(path) is not None
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


def list_checkpoints(folder: Path, known_outputs: set[str] = frozenset()) -> list[Candidate]:
    """The checkpoints (files, or Trainer/DCP folders) directly in `folder`, oldest first."""
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or is_pdt_output(path) or not is_checkpoint(path):
            continue
        if str(path.resolve()) in known_outputs:
            continue
        size, mtime = stat_of(path)
        found.append(Candidate(path, name_step(path), mtime, size))
    found.sort(key=lambda c: (*order_key(c.name_step, c.mtime), c.path.name))
    return found
