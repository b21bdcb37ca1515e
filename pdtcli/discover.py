"""Finding the training checkpoints in a folder, in training order.

Order is by the step number in the file name (natural order: epoch_9 before epoch_10),
then by the step recorded in the file, then by modification time. pdt's own outputs
(`*.pdt.*`, and any path the store recorded as an output) are never training checkpoints.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .formats import CHECKPOINT_SUFFIXES

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
    """The last number in the file name's stem, which is the step or epoch by convention."""
    numbers = _NUMBER.findall(path.stem)
    return int(numbers[-1]) if numbers else None


def is_pdt_output(path: Path) -> bool:
    return OUTPUT_TAG + "." in path.name or path.stem.endswith(OUTPUT_TAG)


def output_name(newest: Path) -> Path:
    """Where the fused checkpoint goes by default: next to the newest, tagged as pdt's.

    The tag goes before a compound suffix that the framework insists on (Keras loads only
    names ending in `.weights.h5`), else before the last suffix.
    """
    for compound in COMPOUND_SUFFIXES:
        if newest.name.endswith(compound):
            return newest.with_name(f"{newest.name[: -len(compound)]}{OUTPUT_TAG}{compound}")
    return newest.with_name(f"{newest.stem}{OUTPUT_TAG}{newest.suffix}")


def list_checkpoints(folder: Path, known_outputs: set[str] = frozenset()) -> list[Candidate]:
    """The checkpoint files directly in `folder`, oldest first."""
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES or is_pdt_output(path):
            continue
        if str(path.resolve()) in known_outputs:
            continue
        stat = path.stat()
        found.append(Candidate(path, name_step(path), stat.st_mtime, stat.st_size))
    found.sort(key=lambda c: (*order_key(c.name_step, c.mtime), c.path.name))
    return found
