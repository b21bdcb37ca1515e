"""Checkpoint formats pdt does not read, recognised by name so that a folder of them is named for what
it holds, with what to save instead or how to convert, rather than called empty.

One row per format, data only: a format that gains a reader leaves this table (its files are then
checkpoints, and `no_checkpoints_here` never reaches this). A row matches a file by its name
(`files`), or a folder holding, itself or in one of its sub-folders, a file named as in `holds`
(the Trainer puts DeepSpeed's `global_stepN/` inside `checkpoint-N/`; Orbax its items in `N/default/`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path


@dataclass(frozen=True)
class Unread:
    what: str  # one of them, as the message counts it ("DeepSpeed checkpoint folder")
    why: str  # what pdt does not read
    way_out: str  # what to save instead, or how to convert
    files: tuple[str, ...] = ()  # globs on the name of a file that is one
    holds: tuple[str, ...] = ()  # globs on the names of files a folder that is one holds


UNREAD = (
    Unread("DeepSpeed checkpoint folder", "pdt does not read DeepSpeed ZeRO shards",
           "convert with DeepSpeed's zero_to_fp32.py (saved beside them), or save full weights with "
           "stage3_gather_16bit_weights_on_model_save (the Trainer then writes model.safetensors)",
           holds=("*_model_states.pt", "*_optim_states.pt")),
    Unread("TensorFlow SavedModel folder", "pdt does not read TensorFlow graphs or checkpoints",
           "save the weights with Keras model.save_weights('NAME.weights.h5')", holds=("saved_model.pb",)),
    Unread("TensorFlow checkpoint", "pdt does not read TensorFlow checkpoints",
           "save the weights with Keras model.save_weights('NAME.weights.h5')", files=("*.index",)),
    Unread("GGUF file", "pdt does not read GGUF (an inference format, often quantised)",
           "run pdt on the training checkpoints it was converted from", files=("*.gguf",)),
    Unread("ONNX model", "pdt does not read ONNX (an export for inference)",
           "run pdt on the training checkpoints it was exported from", files=("*.onnx",)),
)


def _names(folder: Path) -> list[str]:
    try:
        return [entry.name for entry in folder.iterdir()]
    except OSError:  # a folder pdt may not list is named as nothing
        return []


def _holds(folder: Path, globs: tuple[str, ...]) -> bool:
    """Whether `folder`, or one of its sub-folders, holds a file named as one of `globs`."""
    if not globs:
        return False
    names = _names(folder)
    if any(fnmatchcase(name, glob) for name in names for glob in globs):
        return True
    return any(any(fnmatchcase(inner, glob) for inner in _names(folder / name) for glob in globs)
               for name in names if (folder / name).is_dir())


def kind_of(path: Path) -> Unread | None:
    """The unread format `path` is in, or None."""
    if path.is_dir():
        return next((row for row in UNREAD if _holds(path, row.holds)), None)
    return next((row for row in UNREAD if any(fnmatchcase(path.name, glob) for glob in row.files)), None)


def unread_message(entries: Iterable[Path]) -> str | None:
    """`found 3 DeepSpeed checkpoint folders (global_step10/, global_step20/ …): pdt does not read DeepSpeed
    ZeRO shards; convert with …` for the most frequent unread format among `entries`, or None."""
    found: dict[Unread, list[str]] = {}
    for path in sorted(entries):
        row = kind_of(path)
        if row is not None:
            found.setdefault(row, []).append(path.name + ("/" if path.is_dir() else ""))
    if not found:
        return None
    row, names = max(found.items(), key=lambda item: len(item[1]))
    shown = ", ".join(names[:2]) + (" …" if len(names) > 2 else "")
    return f"found {len(names)} {row.what}{'s' if len(names) > 1 else ''} ({shown}): {row.why}; {row.way_out}"
