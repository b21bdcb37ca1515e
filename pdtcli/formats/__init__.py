"""Checkpoint families behind one interface, and detection by suffix then by content."""

from __future__ import annotations

import struct
from pathlib import Path

from ..errors import CheckpointError, NotACheckpoint
from .base import CheckpointFormat, CheckpointReader, Fuse, TensorInfo
from .flax_msgpack import FlaxFormat
from .hf_folder import HfFolderFormat
from .keras_h5 import KerasFormat
from .numpy_npz import NpzFormat
from .safetensors_file import SafetensorsFormat
from .torch_dcp import DcpFormat
from .torch_pickle import TorchFormat

# Files are sniffed by the formats that claim their suffix first, then by all others; a format
# whose magic bytes others share says so (`sniff_last`) and is tried after them.
FORMATS: tuple[CheckpointFormat, ...] = tuple(sorted(
    (SafetensorsFormat(), NpzFormat(), KerasFormat(), FlaxFormat(), TorchFormat()), key=lambda f: f.sniff_last))
FOLDER_FORMATS: tuple[CheckpointFormat, ...] = (DcpFormat(), HfFolderFormat())
CHECKPOINT_SUFFIXES = tuple(s for fmt in FORMATS for s in fmt.suffixes)
OUTPUT_SUFFIXES = tuple(s for fmt in FORMATS for s in fmt.output_suffixes)
RUNNING_STATS = tuple(p for fmt in FORMATS + FOLDER_FORMATS for p in fmt.running_stats)
BIAS_NAMES = tuple(p for fmt in FORMATS + FOLDER_FORMATS for p in fmt.bias_names)


def folder_format(path: Path) -> CheckpointFormat | None:
    """The format of a checkpoint folder, or None when `path` is not one."""
    return next((fmt for fmt in FOLDER_FORMATS if fmt.sniff(Path(path), b"")), None)


def detect(path: Path) -> CheckpointFormat:
    """The format of `path`, by its suffix when that is unambiguous, else by its first bytes."""
    path = Path(path)
    if path.is_dir():
        found = folder_format(path)
        if found is None:
            raise CheckpointError("not a checkpoint folder pdt can read (" + ", ".join(
                f.name for f in FOLDER_FORMATS) + ")", path)
        return found
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise CheckpointError(f"cannot read: {exc.strerror or exc}", path) from exc
    if not head:
        raise CheckpointError("empty file", path)
    by_suffix = [fmt for fmt in FORMATS if path.suffix.lower() in fmt.suffixes]
    for fmt in by_suffix + [fmt for fmt in FORMATS if fmt not in by_suffix]:
        if fmt.sniff(path, head):
            return fmt
    raise CheckpointError("not a checkpoint pdt can read (" + ", ".join(f.name for f in FORMATS) + ")", path)


# What a parser of untrusted bytes raises on input it cannot make sense of (deep nesting, a
# field of the wrong type, a size out of range); pdt reports it as a bad checkpoint.
_PARSE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError, MemoryError,
                 OverflowError, struct.error)


def open_checkpoint(path: Path) -> CheckpointReader:
    """An open reader; a file that opens cleanly but holds no tensors is NotACheckpoint."""
    fmt = detect(path)
    try:
        reader = fmt.open(Path(path))
    except _PARSE_ERRORS as exc:
        raise CheckpointError(f"cannot read it as {fmt.name} ({type(exc).__name__}: {exc})"[:300], path) from exc
    if not reader.tensors():
        reader.close()
        raise NotACheckpoint("holds no tensors", path)
    return reader


__all__ = [
    "CHECKPOINT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "RUNNING_STATS",
    "BIAS_NAMES",
    "FOLDER_FORMATS",
    "FORMATS",
    "CheckpointFormat",
    "CheckpointReader",
    "Fuse",
    "TensorInfo",
    "detect",
    "folder_format",
    "open_checkpoint",
]
