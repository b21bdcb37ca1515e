"""PyTorch distributed checkpoints (`torch.distributed.checkpoint.save`): a folder of
`.distcp` files described by a pickled `.metadata`.

pdt reads both without `torch.distributed` and without its load planner, because that
planner unpickles every non-tensor entry with `weights_only=False` and the metadata with
plain `pickle`: either would run code a checkpoint carries. Here the metadata goes through
an unpickler that admits only DCP's own record classes, torch sizes, dtypes and layouts;
tensor chunks are loaded with `weights_only=True`; non-tensor entries are never loaded.

A tensor is the union of its chunks (one per rank that held a shard), each a `torch.save`
record at a byte range of one `.distcp` file. The fused folder is a byte copy of the
input with each predicted chunk's record rewritten in place; a record re-saved with the
same shape, strides and dtype has the same length, so `.metadata` stays valid unchanged.
A tensor sharded along its first dimension (as FSDP saves) is read and fused one chunk at a
time, so memory holds one writer's shard of it, not the whole tensor.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import io
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..confine import member, refuse_links_out
from ..errors import CheckpointError
from ..lazy import torch
from . import base
from .base import PIECE_MARK, STEP_KEYS, CheckpointFormat, CheckpointReader, Fuse, TensorInfo, copy_bytes
from .torch_pickle import STATE_DICT_KEYS, archive_step

METADATA = ".metadata"
LIGHTNING_META = "meta.pt"  # Lightning's counters (global_step, epoch) beside the shards it saved with DCP
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATH_CLASSES = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}
# Entries under these top-level keys are optimizer state, never the model's weights.
_OPTIMIZER_PREFIXES = ("optim", "optimizer", "optimizers", "optimizer_states", "lr_scheduler", "scheduler")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata records and nothing else."""

    def find_class(self, module: str, name: str):
        allowed = (
            (module in _DCP_MODULES and not name.startswith("__"))
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in _PATH_CLASSES)
            or (module == "collections" and name == "OrderedDict")
        )
        found = super().find_class(module, name) if allowed else None
        if found is None or (module in _DCP_MODULES and not _record_class(found, module)):
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return found


def _record_class(found: object, module: str) -> bool:
    """DCP's own record types: dataclasses and enums defined in its modules, whose unpickling
    runs no constructor with arguments from the file (a module's imported names, such as
    `Tensor` or `FileSystemReader`, are refused)."""
    return (isinstance(found, type) and found.__module__ == module
            and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum)))


def read_metadata(folder: Path):
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(folder / METADATA, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refused {METADATA}: loading it would run code ({exc})", folder) from exc
    except (OSError, EOFError, ValueError, TypeError, AttributeError, ImportError, RecursionError, MemoryError) as exc:
        raise CheckpointError(f"corrupt or truncated {METADATA} ({type(exc).__name__}: {exc})", folder) from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{METADATA} is not DCP metadata", folder)
    return metadata


class DcpReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

        super().__init__(path)
        refuse_links_out(self.path)
        self._metadata = read_metadata(self.path)
        if not isinstance(self._metadata.storage_data, dict):
            raise CheckpointError(f"{METADATA} has no storage table", self.path)
        for storage in self._metadata.storage_data.values():
            member(self.path, getattr(storage, "relative_path", None), METADATA)
        tensors = {fqn: md for fqn, md in self._metadata.state_dict_metadata.items()
                   if isinstance(md, TensorStorageMetadata)}
        self._chunks = {}
        for fqn, md in tensors.items():
            try:
                self._chunks[fqn] = [(chunk, self._metadata.storage_data[MetadataIndex(fqn, chunk.offsets)])
                                     for chunk in md.chunks]
            except (KeyError, TypeError) as exc:
                raise CheckpointError(f"{METADATA} has no storage for a chunk of {fqn!r}", self.path) from exc
        model = _model_names(list(tensors))
        self._infos = [self._describe(fqn, tensors[fqn]) for fqn in model]
        self._by_name = {info.name: info for info in self._infos}

    def _describe(self, fqn: str, md) -> TensorInfo:
        size, dtype = tuple(md.size), getattr(md.properties, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not all(isinstance(d, int) and d >= 0 for d in size):
            raise CheckpointError(f"{METADATA} describes {fqn!r} with no valid size or dtype", self.path)
        return TensorInfo(fqn, size, dtype)

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def _load_record(self, fqn: str, storage) -> object:
        """One `torch.save` record of a `.distcp` file, loaded as data only."""
        if storage.transform_descriptors:
            raise CheckpointError(f"{fqn!r} is stored with transforms {list(storage.transform_descriptors)}, "
                                  "which pdt cannot rewrite", self.path)
        try:
            with open(member(self.path, storage.relative_path, METADATA), "rb") as handle:
                if not (isinstance(storage.offset, int) and isinstance(storage.length, int)
                        and storage.offset >= 0 and storage.length >= 0
                        and storage.offset + storage.length <= os.fstat(handle.fileno()).st_size):
                    raise CheckpointError(f"truncated: {fqn!r} runs past the end of {storage.relative_path}",
                                          self.path)
                handle.seek(storage.offset)
                record = handle.read(storage.length)
            if len(record) != storage.length:
                raise CheckpointError(f"truncated: {fqn!r} runs past the end of {storage.relative_path}", self.path)
            return torch.load(io.BytesIO(record), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load {fqn!r} from {storage.relative_path} ({reason})", self.path) from exc

    def _load_chunks(self, name: str) -> list[tuple[object, object, torch.Tensor]]:
        """(chunk, storage, tensor) for each rank's piece of a tensor."""
        loaded = []
        for chunk, storage in self._chunks[name]:
            tensor = self._load_record(name, storage)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"the record of {name!r} is not a tensor", self.path)
            loaded.append((chunk, storage, tensor))
        return loaded

    def _assemble(self, name: str, loaded: list[tuple[object, object, torch.Tensor]]) -> torch.Tensor:
        info = self._by_name[name]
        full = torch.empty(info.shape, dtype=info.dtype)
        for chunk, _, tensor in loaded:
            full[_region(chunk)] = tensor
        return full

    def read(self, name: str) -> torch.Tensor:
        return self._assemble(name, self._load_chunks(name))

    def _rows(self, name: str) -> list[tuple[object, object]] | None:
        """The tensor's chunks in order when each holds whole rows (sharded along the first dimension, as
        FSDP saves it), so that each is a run of the flat tensor and the tensor can be read and fused
        one chunk at a time; None for other layouts (they are assembled whole)."""
        shape = tuple(self._by_name[name].shape)
        if not shape:
            return None
        ordered = sorted(self._chunks[name], key=lambda item: tuple(item[0].offsets))
        row = 0
        for chunk, _ in ordered:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offsets) != len(shape) or offsets[0] != row or any(offsets[1:]) or sizes[1:] != shape[1:]:
                return None
            row += sizes[0]
        return ordered if row == shape[0] else None

    def _chunk_record(self, name: str, chunk, storage) -> torch.Tensor:
        tensor = self._load_record(name, storage)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(chunk.sizes):
            raise CheckpointError(f"the record of {name!r} is not a tensor of its chunk's size", self.path)
        return tensor

    def _row_pieces(self, name: str, ordered: list) -> Iterator[tuple[object, torch.Tensor, torch.Tensor, int, int]]:
        """(storage, record, its flat values, start, stop) for each piece of at most CHUNK_ELEMENTS of the
        chunks in `ordered`, loading one chunk's record at a time; a chunk with no elements gives one
        empty piece, so that its record is still visited. The flat values are a view of the record, or
        a copy where it was saved with other strides."""
        most = base.CHUNK_ELEMENTS
        for chunk, storage in ordered:
            stored = self._chunk_record(name, chunk, storage)
            flat = stored.reshape(-1)
            for start in range(0, max(flat.numel(), 1), most):
                yield storage, stored, flat, start, min(flat.numel(), start + most)

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """A tensor sharded by rows comes a chunk's piece at a time, so that at most one chunk (one writer
        rank's shard) is in memory; other layouts come whole."""
        ordered = self._rows(name)
        if ordered is None:
            yield self.read(name).reshape(-1)
            return
        for _, _, flat, start, stop in self._row_pieces(name, ordered):
            yield flat[start:stop]

    def recorded_step(self) -> int | None:
        """A top-level `step`/`epoch` entry, loaded as data only (the DCP bytes records are torch.save output), else
        that of Lightning's `meta.pt`, read as inert data."""
        for key in STEP_KEYS:
            for index, storage in self._metadata.storage_data.items():
                if index.fqn != key:
                    continue
                try:
                    value = self._load_record(key, storage)
                except CheckpointError as exc:  # an entry that is not plain data is not a step; a file that is
                    if isinstance(exc.__cause__, pickle.UnpicklingError):  # gone or cut short is said as such
                        return None
                    raise
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    value = value.item()
                return value if isinstance(value, int) and not isinstance(value, bool) else None
        meta = self.path / LIGHTNING_META
        return archive_step(meta) if meta.is_file() and not meta.is_symlink() else None

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        self.write_shared(out)
        wanted = [info.name for info in self._infos if fuse.wants(info.name)]
        self._copy_around(out, self.weight_files(), [storage for name in wanted for _, storage in self._chunks[name]])
        for name in wanted:
            ordered = self._rows(name)
            if ordered is not None and hasattr(fuse, "stream"):
                self._fuse_by_chunks(out, name, ordered, fuse)
                continue
            loaded = self._load_chunks(name)
            fused = fuse(name, self._assemble(name, loaded))
            for chunk, storage, stored in loaded:
                stored.copy_(fused[_region(chunk)])  # keeps the record's strides, so its length
                self._rewrite(out, name, storage, stored)

    def _fuse_by_chunks(self, out: Path, name: str, ordered: list, fuse: Fuse) -> None:
        """Fuse a tensor sharded by rows piece by piece, rewriting each chunk's record once its last piece
        is fused: memory holds one chunk, not the tensor."""
        pending: collections.deque = collections.deque()

        def pieces() -> Iterator[torch.Tensor]:
            for storage, stored, flat, start, stop in self._row_pieces(name, ordered):
                pending.append((storage, stored, flat, start, stop))
                yield flat[start:stop]

        for fused in fuse.stream(name, pieces()):
            storage, stored, flat, start, stop = pending.popleft()
            flat[start:stop].copy_(fused)
            if stop == flat.numel():
                if flat.data_ptr() != stored.data_ptr():
                    stored.copy_(flat.view(stored.shape))
                self._rewrite(out, name, storage, stored)

    def _copy_around(self, out: Path, files: list[str], replaced: list) -> None:
        """Copy `files` into `out`, all but the byte ranges of the `replaced` records, which are left
        as holes for `_rewrite` to fill: every output byte is written once, and the records that are
        rewritten are read once (to be fused), not also copied."""
        holes: dict[str, list[tuple[int, int]]] = {}
        for storage in replaced:
            holes.setdefault(storage.relative_path, []).append((storage.offset, storage.offset + storage.length))
        for relative in files:
            source, target = member(self.path, relative, METADATA), member(out, relative, METADATA)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(source, "rb") as src, open(target, "wb") as dst:
                size = os.fstat(src.fileno()).st_size
                dst.truncate(size)
                position = 0
                for start, stop in sorted(holes.get(relative, [])) + [(size, size)]:
                    if start > position:
                        src.seek(position)
                        dst.seek(position)
                        copy_bytes(src, dst, start - position)
                    position = max(position, stop)

    def _rewrite(self, out: Path, name: str, storage, stored: torch.Tensor) -> None:
        """Save a chunk's record, which now holds the fused values, at its byte range in its `.distcp` file."""
        buffer = io.BytesIO()
        torch.save(stored, buffer)
        if buffer.tell() != storage.length:
            raise CheckpointError(f"the re-saved record of {name!r} changed length", self.path)
        with open(member(out, storage.relative_path, METADATA), "r+b") as handle:
            handle.seek(storage.offset)
            handle.write(buffer.getbuffer())

    def weight_files(self) -> list[str]:
        return sorted({storage.relative_path for storage in self._metadata.storage_data.values()})

    def part(self, files: list[str]) -> DcpPart:
        return DcpPart(self, files)

    def write_shared(self, out: Path) -> None:
        weights = set(self.weight_files())
        shutil.copytree(self.path, out, ignore=lambda folder, names: [
            n for n in names if (Path(folder) / n).relative_to(self.path).as_posix() in weights])

    def close(self) -> None:
        self._chunks = {}


class DcpPart(CheckpointReader):
    """The chunks of the model's tensors that `files` hold, each a tensor of its own: a piece named
    `name@offsets` when the tensor has several chunks (as FSDP saves it), else by its own name.
    Written by copying those files into the output folder and rewriting the pieces' records."""

    def __init__(self, whole: DcpReader, files: list[str]) -> None:
        super().__init__(whole.path)
        self._whole, self._files = whole, sorted(files)
        for relative in self._files:  # found now, before this rank's step writes anything
            if not member(self.path, relative, METADATA).is_file():
                raise CheckpointError(f"{METADATA} lists {relative}, which is missing", self.path)
        self._pieces: dict[str, tuple[object, object]] = {}
        self._infos = []
        for info in whole.tensors():
            chunks = whole._chunks[info.name]
            for chunk, storage in chunks:
                if storage.relative_path in files:
                    name = info.name if len(chunks) == 1 else f"{info.name}{PIECE_MARK}" + ",".join(
                        str(o) for o in chunk.offsets)
                    self._pieces[name] = (chunk, storage)
                    self._infos.append(TensorInfo(name, tuple(chunk.sizes), info.dtype))

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def _load(self, name: str) -> torch.Tensor:
        chunk, storage = self._pieces[name]
        return self._whole._chunk_record(name, chunk, storage)

    def read(self, name: str) -> torch.Tensor:
        return self._load(name)

    def recorded_step(self) -> int | None:
        return self._whole.recorded_step()

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        wanted = [name for name in self._pieces if fuse.wants(name)]
        self._whole._copy_around(out, self._files, [self._pieces[name][1] for name in wanted])
        for name in wanted:
            stored = self._load(name)
            stored.copy_(fuse(name, stored))
            self._whole._rewrite(out, name, self._pieces[name][1], stored)

    def close(self) -> None:
        self._whole.close()


def _region(chunk) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes, strict=True))


def _model_names(names: list[str]) -> list[str]:
    """The model's tensors: those under the usual state-dict key, else all but optimizer state."""
    for key in STATE_DICT_KEYS:
        under = [n for n in names if n.startswith(f"{key}.")]
        if under:
            return under
    return [n for n in names if n.split(".", 1)[0] not in _OPTIMIZER_PREFIXES]


class DcpFormat(CheckpointFormat):
    name = "torch-dcp"

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and (path / METADATA).is_file()

    def open(self, path: Path) -> CheckpointReader:
        return DcpReader(path)
