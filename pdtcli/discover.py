"""Finding the training checkpoints in a folder (their order: `pdtcli.order`).

pdt's own outputs (`*.pdt.*`, and any path the store recorded as an output) and Lightning's
`last.ckpt` beside its step checkpoints are never training checkpoints. A file with a checkpoint
suffix that holds no tensors (`hparams.pt`) is passed over with a note, and `--files` globs
say which names are checkpoints when a folder holds other files with the same suffixes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from .formats import CHECKPOINT_SUFFIXES, OUTPUT_SUFFIXES, folder_format
from .formats.unread import unread_message
from .identity import stat_of

OUTPUT_TAG = ".pdt"
NUMBER = re.compile(r"(\d+)")
LIGHTNING_LAST = re.compile(r"last(-v\d+)?\.ckpt")  # ModelCheckpoint(save_last=True), versioned when taken


@dataclass(frozen=True)
class Candidate:
    path: Path
    name_step: int | None
    mtime: float
    size: int
    recorded_step: int | None = None


def located(path: Path) -> str:
    """How the store names a checkpoint or output: its folder resolved, its own name kept, so a
    link stays the link (and is never mistaken for, or written as, the file it points to)."""
    path = Path(path)
    return str(path.parent.resolve() / path.name)


def stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def name_step(path: Path) -> int | None:
    """The last number in the name (a file's stem), which is the step or epoch by convention."""
    numbers = NUMBER.findall(stem(path))
    return int(numbers[-1]) if numbers else None


def is_pdt_output(path: Path) -> bool:
    return OUTPUT_TAG + "." in path.name or path.stem.endswith(OUTPUT_TAG) or path.name.endswith(OUTPUT_TAG)


def output_name(newest: Path) -> Path:
    """Where the fused checkpoint goes by default: next to the newest, tagged as pdt's.

    The tag goes before a compound suffix that the format insists on (Keras loads only
    names ending in `.weights.h5`), else before the last suffix; a folder gets it at the end.
    """
    if newest.is_dir():
        return newest.with_name(newest.name + OUTPUT_TAG)
    for compound in OUTPUT_SUFFIXES:
        if newest.name.endswith(compound):
            return newest.with_name(f"{newest.name[: -len(compound)]}{OUTPUT_TAG}{compound}")
    return newest.with_name(f"{newest.stem}{OUTPUT_TAG}{newest.suffix}")


def is_checkpoint(path: Path) -> bool:
    """A file with a checkpoint suffix, or a folder in a checkpoint-folder format."""
    if path.is_dir():
        return folder_format(path) is not None
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


def list_checkpoints(folder: Path, known_outputs: set[str] = frozenset(),
                     files: tuple[str, ...] | None = None) -> list[Candidate]:
    """The checkpoints (files, or Trainer/DCP folders) directly in `folder`, unsorted: the
    order rule may need what is recorded inside, which is read only for unseen ones.
    `files`: globs on the name; only matching entries are checkpoints. Lightning's `last.ckpt`
    (`save_last`) is a copy of, or a link to, a checkpoint saved beside it: never one of its own
    while the folder holds other `.ckpt` files (it would enter the window twice)."""
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or is_pdt_output(path) or not is_checkpoint(path):
            continue
        if files and not any(fnmatchcase(path.name, pattern) for pattern in files):
            continue
        if located(path) in known_outputs:
            continue
        size, mtime = stat_of(path)
        found.append(Candidate(path, name_step(path), mtime, size))
    if any(not LIGHTNING_LAST.fullmatch(c.path.name) and c.path.suffix == ".ckpt" for c in found):
        found = [c for c in found if not LIGHTNING_LAST.fullmatch(c.path.name)]
    return found


def _readable_with_checkpoints(folder: Path, files: tuple[str, ...] | None) -> bool:
    try:
        return bool(list_checkpoints(folder, files=files))
    except OSError:  # a sub-folder we may not read is not one to suggest
        return False


def no_checkpoints_here(folder: Path, files: tuple[str, ...] | None = None) -> str | None:
    """Why `folder` cannot be a checkpoint folder (nothing in it looks like one): the checkpoints of a
    format pdt does not read that it holds (`formats.unread`), or is; else the sub-folders that do hold
    checkpoints, as a user who gave the parent folder needs; or None."""
    if list_checkpoints(folder, files=files):
        return None
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")
               and (not files or any(fnmatchcase(p.name, pattern) for pattern in files))]
    unread = unread_message(entries) or unread_message([folder])
    if unread:
        return unread
    where = f" matching --files {' '.join(files)}" if files else ""
    message = f"no checkpoints here{where} (files {', '.join(CHECKPOINT_SUFFIXES)}, or Trainer/DCP folders)"
    holding = sorted(f"{sub.name}/" for sub in folder.iterdir()
                     if sub.is_dir() and not sub.name.startswith(".") and not is_checkpoint(sub)
                     and _readable_with_checkpoints(sub, files))
    if holding:
        message += "; sub-folders that hold checkpoints: " + ", ".join(holding[:5]) + (" …" if len(holding) > 5 else "")
    return message
