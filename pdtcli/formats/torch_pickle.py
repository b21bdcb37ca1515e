"""PyTorch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`): a state dict, or a dict holding one.

`torch.save` writes a zip archive: the pickle `data.pkl` and one stored (uncompressed) member
`data/<key>` per storage. pdt reads `data.pkl` with an unpickler of its own that executes nothing
(`pickle_reader`): torch's tensor globals become records of where each tensor lies, every other
global an inert placeholder, so a checkpoint holding a loss module, an `argparse.Namespace` or a
config object is read like any other. Tensor values are read by byte range (`os.preadv`) from the
storage members, never through a memory map (a mapped file that training cuts short meanwhile kills
the reader with SIGBUS, where a read returns short and is one error).

The fused copy is the archive copied byte for byte with only the bytes of predicted tensors
replaced, and the CRC-32 of each member that changed written again: the pickle, other storages,
optimizer state and every object beside the weights are carried over exactly, and names that shared
a storage (tied weights) still do. A name that is an exact alias of an earlier one is predicted once,
under the first; views that overlap in part, or storages that an unknown object uses, are carried.

A pickle in torch's legacy (pre-zip) format is loaded with `torch.load(weights_only=True)`, which
refuses anything that needs code, and is written with `torch.save` after the fused values are
copied into its tensors (so sharing holds there too).
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, NotACheckpoint, os_reason
from ..lazy import torch
from ..rawio import read_into
from . import base
from .base import STEP_KEYS, CheckpointFormat, CheckpointReader, Fuse, TensorInfo, unique_names
from .pickle_reader import Opaque, StorageRef, TensorRef, View, graph, load_inert

# Where training code usually keeps the model's weights inside a checkpoint dict.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module", "model_state", "net", "network")


def load_pickle(path: Path) -> Any:
    """Load a legacy (pre-zip) torch checkpoint as data only; refuse anything that needs code to load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(
            "refused: a legacy (pre-zip) torch pickle that needs code to load; pdt reads those as data only "
            f"({detail.strip()}); re-save it with a current torch.save", path) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"corrupt or truncated PyTorch checkpoint ({reason})", path) from exc


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor | TensorRef) for v in value.values())


def find_state_dict(obj: Any) -> tuple[str, ...]:
    """The key path of the model's state dict inside a loaded checkpoint (() for the root)."""
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return (key,)
        if _is_state_dict(obj):
            return ()
    raise NotACheckpoint("holds no model state dict (looked at the top level and under "
                         + ", ".join(STATE_DICT_KEYS) + ")")


def _entries(mapping: Mapping, prefix: str = "", shown: str = "") -> Iterator[tuple[str, str, Any]]:
    """(name, key path as written in Python, tensor) of every tensor, nested dicts joined with '.'."""
    for key, value in mapping.items():
        name, where = f"{prefix}{key}", f"{shown}[{key!r}]"
        if isinstance(value, torch.Tensor | TensorRef):
            yield name, where, value
        elif isinstance(value, Mapping):
            yield from _entries(value, f"{name}.", where)


def _state_dict(obj: Any, path: Path) -> Mapping:
    """The model's state dict inside a loaded checkpoint (NotACheckpoint naming `path` if none)."""
    try:
        key_path = find_state_dict(obj)
    except NotACheckpoint as exc:
        raise NotACheckpoint(str(exc), path) from None
    for key in key_path:
        obj = obj[key]
    return obj


def _step(obj: Any) -> int | None:
    if isinstance(obj, Mapping):
        for key in STEP_KEYS:
            value = obj.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


# ---- storage shared between names --------------------------------------------------------------


def shared_storage(names: dict[str, View], others: list[tuple[str, View]], opaque: dict[object, str]
                   ) -> dict[str, str]:
    """Why each state-dict tensor (`names`, in file order) that pdt must not predict on its own is carried.

    A name with the very view of an earlier name is that tensor under a second name (tied weights): it
    is predicted once, under the first, and keeps sharing its storage. Views of one storage that
    overlap without being the same, an expanded view, and a storage that an object pdt does not know
    (`opaque`: storage -> what uses it) holds are carried as stored: a fused copy of one would change
    the other. `others`: the tensors outside the state dict (optimizer state, ...), which only count
    when they share a storage with a name.
    """
    reasons: dict[str, str] = {}
    by_storage: dict[object, list[tuple[str, View]]] = {}
    for name, view in [*names.items(), *others]:
        by_storage.setdefault(view.storage, []).append((name, view))
    for name, view in names.items():
        if not view.numel:
            continue
        if view.storage in opaque:
            reasons[name] = f"its storage is also used by {opaque[view.storage]}, which pdt does not know"
            continue
        if not view.dense():
            reasons[name] = "its elements overlap in storage (an expanded view)"
            continue
        start, stop = view.span()
        for other, seen in by_storage[view.storage]:
            if other == name:
                break
            if seen == view and other in names:
                reasons[name] = (f"tied to {other!r} (one storage): predicted once, as {other!r}" if other not in
                                 reasons else f"tied to {other!r} (one storage), carried as it is")
                break
        else:
            overlapping = next((other for other, seen in by_storage[view.storage] if other != name and seen != view
                                and seen.numel and seen.span()[0] < stop and start < seen.span()[1]), None)
            if overlapping is not None:
                reasons[name] = f"shares part of its storage with {overlapping!r} (a view of it)"
    return reasons


# ---- the zip archive ---------------------------------------------------------------------------

_LOCAL, _CENTRAL, _DESCRIPTOR = 0x04034B50, 0x02014B50, 0x08074B50
# The highest value of each version record of a torch.save archive that pdt knows: torch 2.13 writes
# `version` 3 (its loader reads up to 10, TorchScript's) and `.format_version` 1. A higher one is a
# layout a newer torch wrote, which pdt's reader would misread.
KNOWN_VERSIONS = {"version": 10, ".format_version": 1}


@dataclass(frozen=True)
class Member:
    """A stored member of the archive: where its bytes lie, and where its CRC-32 is written."""

    data: int  # file offset of its first byte
    size: int
    crcs: tuple[int, ...]  # file offsets of the 4-byte CRC-32 fields that name it


def _u(raw: bytes, at: int, fmt: str) -> int:
    return struct.unpack_from(fmt, raw, at)[0]


def read_archive(path: Path, fd: int) -> tuple[str, dict[str, Member], zipfile.ZipFile]:
    """The archive's folder prefix ("archive/"), its members by name, and the open ZipFile.

    Every member pdt reads or writes must be stored uncompressed, as torch.save stores them; the CRC
    fields are those of the local header (unless a data descriptor holds it), the data descriptor
    and the central directory entry.
    """
    # on the descriptor held open: the file the reads will be of, whatever its name now (owns no descriptor)
    archive = zipfile.ZipFile(open(fd, "rb", closefd=False))  # noqa: SIM115
    infos = archive.infolist()
    pkl = [info.filename for info in infos if info.filename.endswith("/data.pkl") and info.filename.count("/") == 1]
    if len(pkl) != 1:
        archive.close()
        raise CheckpointError("a zip archive, but not one torch.save wrote (no single <archive>/data.pkl)", path)
    size = os.fstat(fd).st_size
    directory = os.pread(fd, size - archive.start_dir, archive.start_dir)
    central, at = {}, 0
    for _ in infos:
        if _u(directory, at, "<I") != _CENTRAL:
            raise CheckpointError("corrupt zip archive (a central directory entry is not where it should be)", path)
        name_len, extra, comment = (_u(directory, at + k, "<H") for k in (28, 30, 32))
        central[directory[at + 46:at + 46 + name_len].decode("utf-8", "replace")] = archive.start_dir + at + 16
        at += 46 + name_len + extra + comment
    members = {}
    for info in infos:
        local = os.pread(fd, 30, info.header_offset)
        if len(local) < 30 or _u(local, 0, "<I") != _LOCAL:
            raise CheckpointError(f"corrupt zip archive (the local header of {info.filename!r} is missing)", path)
        data = info.header_offset + 30 + _u(local, 26, "<H") + _u(local, 28, "<H")
        if info.compress_type != zipfile.ZIP_STORED or data + info.file_size > size:
            raise CheckpointError(f"corrupt or compressed zip member {info.filename!r} (torch.save stores them "
                                  "uncompressed)", path)
        crcs = [central[info.filename]] if info.filename in central else []
        if info.flag_bits & 0x08:  # the CRC follows the data, after an optional signature
            signed = os.pread(fd, 4, data + info.file_size) == struct.pack("<I", _DESCRIPTOR)
            crcs.append(data + info.file_size + (4 if signed else 0))
        else:
            crcs.append(info.header_offset + 14)
        members[info.filename] = Member(data, info.file_size, tuple(crcs))
    return pkl[0].removesuffix("data.pkl"), members, archive


def load_archive(path: Path, fd: int) -> tuple[str, dict[str, Member], Any]:
    """The archive's folder prefix, its members by name, and its pickle read as inert data (`pickle_reader`):
    nothing in it runs. CheckpointError for an archive that is corrupt, cut short or from a big-endian machine."""
    try:
        prefix, members, archive = read_archive(path, fd)
        with archive:
            if f"{prefix}byteorder" in members and archive.read(f"{prefix}byteorder").strip() != b"little":
                raise CheckpointError("saved on a big-endian machine; pdt reads little-endian archives", path)
            _check_versions(archive, prefix, path)
            return prefix, members, load_inert(archive.read(f"{prefix}data.pkl"))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise CheckpointError(f"corrupt or truncated PyTorch checkpoint ({type(exc).__name__}: {exc})"[:300],
                              path) from exc
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError,
            struct.error) as exc:
        raise CheckpointError(f"corrupt data.pkl in the archive ({type(exc).__name__}: {exc})"[:300], path) from exc


def archive_step(path: Path) -> int | None:
    """The step a torch.save archive records at its top level (`STEP_KEYS`), read as inert data: Lightning keeps
    its checkpoint's counters in `meta.pt` beside the shards of a distributed checkpoint. CheckpointError when it
    cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CheckpointError(f"cannot read: {os_reason(exc)}", path) from exc
    try:
        return _step(load_archive(path, fd)[2])
    finally:
        os.close(fd)


def _crc(fd: int, member: Member, path: Path) -> int:
    """The CRC-32 of a member's bytes as they are in the file now, read in bounded pieces."""
    crc, done = 0, 0
    piece = bytearray(min(member.size, 1 << 24))
    while done < member.size:
        view = memoryview(piece)[:min(len(piece), member.size - done)]
        if not read_into(fd, view, member.data + done):
            raise CheckpointError("truncated while pdt wrote its fused copy", path)
        crc, done = zlib.crc32(view, crc), done + len(view)
    return crc


def _check_versions(archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
    """Refuse (CheckpointError) an archive whose version records are newer than `KNOWN_VERSIONS`."""
    names = set(archive.namelist())
    for record, known in KNOWN_VERSIONS.items():
        if f"{prefix}{record}" not in names:
            continue
        text = archive.read(f"{prefix}{record}").strip()
        if not text.isdigit() or int(text) > known:
            raise CheckpointError(f"torch archive format {record} {text.decode(errors='replace')[:20]!r} is newer "
                                  f"than pdt reads (up to {known}): a torch newer than pdt knows saved it; upgrade pdt",
                                  path)


class TorchReader(CheckpointReader):
    """A torch.save zip archive, read without executing its pickle."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"cannot read: {os_reason(exc)}", self.path) from exc
        try:
            self._load()
            self._survey()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        """The archive's members and its pickle, read as inert data (`pickle_reader`)."""
        self._prefix, self._members, self._obj = load_archive(self.path, self._fd)

    def _survey(self) -> None:
        """The state dict's tensors, which of them are predicted (see `shared_storage`), and the objects of
        unknown classes, from one walk over everything the pickle holds."""
        tensors = unique_names(_entries(_state_dict(self._obj, self.path)), "nested keys are joined with '.'",
                               self.path)
        in_state = {id(ref) for ref in tensors.values()}
        others, opaque, self._objects = [], {}, []
        for where, node, parent in graph(self._obj):
            if isinstance(node, TensorRef) and id(node) not in in_state:
                others.append((where, self._view(where, node)))
            elif isinstance(node, StorageRef) and not isinstance(parent, TensorRef):
                opaque.setdefault(node.key, f"{where} ({type(parent).__name__})")
            elif isinstance(node, Opaque) or isinstance(node, type) and issubclass(node, Opaque):
                self._objects.append({"where": where, "type": node.global_name()})
        self._views = {name: self._view(name, ref) for name, ref in tensors.items()}
        carried = shared_storage(self._views, others, opaque)
        self._carried = [(self._info(name), why) for name, why in carried.items()]
        self._names = [name for name in self._views if name not in carried]

    def _view(self, where: str, ref: TensorRef) -> View:
        """The view of a tensor record, checked against its storage member (a crafted pickle cannot point
        reads or writes outside the storage's bytes)."""
        view = ref.view()
        member = self._members.get(f"{self._prefix}data/{view.storage}") if view is not None else None
        if view is None or member is None or (view.numel and view.span()[1] > member.size):
            raise CheckpointError(f"corrupt tensor record at {where} (its storage member is missing, or the "
                                  "tensor runs past it)", self.path)
        return view

    def _info(self, name: str) -> TensorInfo:
        view = self._views[name]
        return TensorInfo(name, view.shape, view.dtype)

    def tensors(self) -> list[TensorInfo]:
        return [self._info(name) for name in self._names]

    def carried(self) -> list[tuple[TensorInfo, str]]:
        return list(self._carried)

    def objects(self) -> list[dict]:
        return list(self._objects)

    def _where(self, name: str) -> tuple[View, int]:
        """A tensor's view and the file offset of its storage's first byte."""
        view = self._views[name]
        return view, self._members[f"{self._prefix}data/{view.storage}"].data

    def _span(self, name: str) -> torch.Tensor:
        """The storage bytes from the tensor's first element to its last, read from the file."""
        view, data = self._where(name)
        start, stop = view.span()
        raw = torch.empty(stop - start, dtype=torch.uint8)
        self._read(name, raw, data + start)
        return raw

    def _read(self, name: str, out: torch.Tensor, position: int) -> None:
        try:
            complete = read_into(self._fd, memoryview(out.view(torch.uint8).numpy()), position)
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor {name!r}: {os_reason(exc)}", self.path) from exc
        if not complete:
            raise CheckpointError(f"truncated while pdt read it: tensor {name!r} runs past the end of the file "
                                  "(is training still saving it?)", self.path)

    def read(self, name: str) -> torch.Tensor:
        """The tensor's bytes read from the file into memory of its own (see the module's docstring)."""
        view = self._views[name]
        if not view.numel:
            return torch.empty(view.shape, dtype=view.dtype)
        start = view.span()[0] // view.dtype.itemsize
        stride = view.stride
        return self._span(name).view(view.dtype).as_strided(view.shape, stride, view.offset - start)

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """Consecutive flat runs of at most CHUNK_ELEMENTS elements of a contiguous tensor (the whole of
        any other), so that memory does not grow with the tensor."""
        view, data = self._where(name)
        if not view.contiguous():
            yield self.read(name).reshape(-1)
            return
        most = base.CHUNK_ELEMENTS  # read at the call, so a test can make it small
        for first in range(0, max(view.numel, 1), most):
            out = torch.empty(min(view.numel, first + most) - first, dtype=view.dtype)
            self._read(name, out, data + (view.offset + first) * view.dtype.itemsize)
            yield out

    def recorded_step(self) -> int | None:
        return _step(self._obj)

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        """The archive copied, then each predicted tensor's bytes written over in the copy and the CRC-32
        of each member that changed written again (see the module's docstring)."""
        # from the descriptor the values were read through: the file read, whatever its name holds now
        with open(self._fd, "rb", closefd=False) as src, open(out, "wb") as dst:
            src.seek(0)  # the descriptor's position is where reading the archive's directory left it
            shutil.copyfileobj(src, dst, 1 << 24)
        changed = set()
        fd = os.open(out, os.O_RDWR)
        try:
            for name in self._names:
                if fuse.wants(name):
                    self._write_one(fd, name, fuse)
                    changed.add(self._views[name].storage)
            for key in changed:
                member = self._members[f"{self._prefix}data/{key}"]
                crc = struct.pack("<I", _crc(fd, member, self.path))
                for at in member.crcs:
                    os.pwrite(fd, crc, at)
        finally:
            os.close(fd)

    def _write_one(self, fd: int, name: str, fuse: Fuse) -> None:
        """A tensor's fused values into its place in the copy: streamed for a contiguous tensor, else
        written into its span of storage bytes, the bytes between its elements as they were."""
        view, data = self._where(name)
        if view.contiguous() and hasattr(fuse, "stream"):
            position = data + view.offset * view.dtype.itemsize
            for piece in fuse.stream(name, self.chunks(name)):
                raw = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
                _write(fd, raw, position)
                position += raw.nbytes
            return
        fused = fuse(name, self.read(name))
        span = self._span(name)
        start = view.span()[0] // view.dtype.itemsize
        span.view(view.dtype).as_strided(view.shape, view.stride, view.offset - start).copy_(fused)
        _write(fd, span.numpy(), data + view.span()[0])

    def close(self) -> None:
        self._obj = None
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


def _write(fd: int, raw: Any, position: int) -> None:
    """All of a byte array at `position` of `fd`."""
    view = memoryview(raw).cast("B")
    while view:
        done = os.pwrite(fd, view, position)
        view, position = view[done:], position + done


class LegacyTorchReader(CheckpointReader):
    """A pickle in torch's legacy (pre-zip) format, loaded whole as data only."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._obj = load_pickle(self.path)
        self._tensors: dict[str, torch.Tensor] = unique_names(
            _entries(_state_dict(self._obj, self.path)), "nested keys are joined with '.'", self.path)
        names = {name: _memory_view(t) for name, t in self._tensors.items()}
        state = {id(t) for t in self._tensors.values()}
        others = [(where, _memory_view(node)) for where, node, _ in graph(self._obj)
                  if isinstance(node, torch.Tensor) and id(node) not in state]
        carried = shared_storage(names, others, {})
        self._carried = [(TensorInfo(name, tuple(self._tensors[name].shape), self._tensors[name].dtype), why)
                         for name, why in carried.items()]
        self._names = [name for name in self._tensors if name not in carried]

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(name, tuple(self._tensors[name].shape), self._tensors[name].dtype) for name in self._names]

    def carried(self) -> list[tuple[TensorInfo, str]]:
        return list(self._carried)

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def recorded_step(self) -> int | None:
        return _step(self._obj)

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        """torch.save of the checkpoint with the fused values copied into its predicted tensors: every
        name of a storage sees them, and torch.save keeps the storage one."""
        for name in self._names:
            if fuse.wants(name):
                tensor = self._tensors[name]
                tensor.copy_(fuse(name, tensor.clone()))
        # through a Python file: given a path, torch's zip writer reports a full disk as a RuntimeError
        # ("unexpected pos" in inline_container.cc) without its errno; Python's file raises the OSError
        with open(out, "wb") as handle:
            torch.save(self._obj, handle)

    def close(self) -> None:
        self._obj = None
        self._tensors = {}


def _memory_view(tensor: torch.Tensor) -> View:
    return View(tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.storage_offset(), tuple(tensor.shape),
                tuple(tensor.stride()))


class TorchFormat(CheckpointFormat):
    name = "torch"
    suffixes = (".pt", ".pth", ".bin", ".ckpt", ".tar")
    sniff_last = True  # a pickle's first byte and a zip's magic are shared with msgpack maps and .npz

    def sniff(self, path: Path, head: bytes) -> bool:
        return head[:2] == b"PK" or head[:1] == b"\x80"

    def open(self, path: Path) -> CheckpointReader:
        return open_torch(path)


def open_torch(path: Path) -> CheckpointReader:
    """The reader of a torch.save zip archive, or of a legacy pickle."""
    return TorchReader(path) if zipfile.is_zipfile(path) else LegacyTorchReader(path)
