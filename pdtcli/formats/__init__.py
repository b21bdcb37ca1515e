"""Checkpoint families behind one interface, and detection by suffix then by content."""

from __future__ import annotations

import struct
from pathlib import Path

from .. import identity
from ..errors import CheckpointError, NotACheckpoint, os_reason
from ..world import World
from .base import CheckpointFormat, CheckpointReader, Fuse, TensorInfo
from .convert import conversion_of, write_converted
from .flax_msgpack import FlaxFormat
from .hf_folder import HfFolderFormat
from .keras_archive import KerasArchiveFormat
from .keras_h5 import KerasFormat
from .numpy_npz import NpzFormat
from .orbax_step import OrbaxFormat
from .safetensors_file import SafetensorsFormat
from .torch_dcp import DcpFormat
from .torch_pickle import TorchFormat

# Files are sniffed by the formats that claim their suffix first, then by all others; a format
# whose magic bytes others share says so (`sniff_last`) and is tried after them.
FORMATS: tuple[CheckpointFormat, ...] = tuple(sorted(
    (SafetensorsFormat(), NpzFormat(), KerasFormat(), KerasArchiveFormat(), FlaxFormat(), TorchFormat()),
    key=lambda f: f.sniff_last))
FOLDER_FORMATS: tuple[CheckpointFormat, ...] = (DcpFormat(), HfFolderFormat(), OrbaxFormat())
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
        raise CheckpointError(f"cannot read: {os_reason(exc)}", path) from exc
    if not head:
        raise CheckpointError("empty file", path)
    by_suffix = [fmt for fmt in FORMATS if path.suffix.lower() in fmt.suffixes]
    for fmt in by_suffix + [fmt for fmt in FORMATS if fmt not in by_suffix]:
        if fmt.sniff(path, head):
            return fmt
    raise CheckpointError("not a checkpoint pdt can read (" + ", ".join(f.name for f in FORMATS) + ")", path)


def output_conversion(source: Path, out: Path) -> str | None:
    """How an output `out` fused from checkpoint `source` is written: None in `source`'s own format, else
    the conversion its suffix names (`convert.CONVERSIONS`); UsageError (exit 2) when it names neither."""
    return conversion_of(detect(source), Path(out), CHECKPOINT_SUFFIXES)


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


class _NoPart(CheckpointReader):
    """A rank's share of a one-file checkpoint that is not its own: nothing to read or write."""

    def tensors(self) -> list[TensorInfo]:
        return []

    def read(self, name: str):
        raise KeyError(name)

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        pass


def own_files(checkpoint: Path, world: World, layout: Path | None = None) -> list[Path]:
    """This rank's files of a checkpoint (to hash, or to sync once written): of a folder, its weight
    files by `world.owned` and every other file (an index, `.metadata`, optimizer state) on rank 0;
    a one-file checkpoint is rank 0's. `layout`: a folder laid out as `checkpoint` (an output being
    written), whose files to list instead."""
    where = Path(layout) if layout is not None else Path(checkpoint)
    if not Path(checkpoint).is_dir():
        return [where] if world.leader else []
    with open_checkpoint(checkpoint) as reader:
        weights = set(reader.weight_files())
    owned = set(world.owned(sorted(weights)))
    return [f for f in identity.files_of(where)
            if (rel := f.relative_to(where).as_posix()) in owned or (rel not in weights and world.leader)]


def checkpoint_digest(path: Path, world: World) -> str:
    """The content hash of a checkpoint; in a distributed step each rank hashes only its own files,
    and the ranks' hashes are combined into one (the same on every rank)."""
    if not world.active:
        return identity.sha256_path(path)
    return world.digest(identity.sha256_path(path, only=own_files(path, world)))


def open_share(path: Path, world: World) -> CheckpointReader:
    """The reader of this rank's share of a checkpoint (the whole of it outside a distributed step):
    the weight files `world.owned` gives it, or for a one-file checkpoint, all of it on rank 0."""
    reader = open_checkpoint(path)
    if not world.active:
        return reader
    files = reader.weight_files()
    if files:
        return reader.part(world.owned(files))
    if world.leader:
        return reader
    reader.close()
    return _NoPart(Path(path))


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
    "checkpoint_digest",
    "own_files",
    "open_checkpoint",
    "open_share",
    "output_conversion",
    "write_converted",
]
