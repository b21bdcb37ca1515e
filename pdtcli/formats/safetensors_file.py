"""Single-file safetensors: read one tensor on demand, write the fused copy streaming.

The fused copy has the same names, shapes and dtypes, so its header is byte-identical
to the input's; the writer copies the header and then each tensor's bytes in file
order, replacing predicted ones. Memory stays at one tensor, whatever the file size.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import weakref
from collections.abc import Iterator
from pathlib import Path

from ..errors import CheckpointError, os_reason
from ..lazy import TorchDtypes, torch
from ..rawio import WriteBehind, read_into
from . import base
from .base import (
    STEP_KEYS,
    CheckpointFormat,
    CheckpointReader,
    Fuse,
    TensorInfo,
    copy_bytes,
    no_duplicate_keys,
)

# safetensors' dtype codes, by the names of the shared table (`base.DTYPES`)
_DTYPES = TorchDtypes({
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"})
_MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[int, dict]:
    """Return (header length, parsed header), refusing truncated or malformed files."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) < 8:
                raise CheckpointError("not a safetensors file (shorter than its header)", path)
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER, size - 8):
                raise CheckpointError("not a safetensors file (header length out of range)", path)
            header = json.loads(handle.read(length), object_pairs_hook=no_duplicate_keys(path, "its header"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"corrupt safetensors header ({type(exc).__name__})", path) from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read: {os_reason(exc)}", path) from exc
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header (not a JSON object)", path)
    data_size = size - 8 - length
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if entry is not None and not isinstance(entry, dict):
                raise CheckpointError("corrupt safetensors header (__metadata__ is not an object)", path)
            continue
        _check_entry(name, entry, data_size, path)
        spans.append((*entry["data_offsets"], name))
    spans.sort()
    for (_, stop, first), (start, _, second) in itertools.pairwise(spans):
        if start < stop:  # the fused copy would write both in full, shifting every later byte
            raise CheckpointError(f"corrupt safetensors header (tensors {first!r} and {second!r} overlap)", path)
    return length, header


def _check_entry(name: str, entry: object, data_size: int, path: Path) -> None:
    """One tensor's header entry: a dtype pdt knows, a shape, and offsets inside the data whose
    length matches shape and dtype (so a crafted header cannot point reads or writes astray)."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"corrupt safetensors header (the entry of {name!r} is not an object)", path)
    offsets, shape, dtype = entry.get("data_offsets"), entry.get("shape"), entry.get("dtype")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise CheckpointError(f"corrupt safetensors header ({name!r} has no valid data_offsets)", path)
    if not (isinstance(shape, list) and all(_count(d) for d in shape)) or dtype not in _DTYPES:
        raise CheckpointError(f"corrupt safetensors header ({name!r} has no valid shape or dtype)", path)
    start, stop = offsets
    numel = 1
    for dim in shape:
        numel *= dim
    if stop > data_size:
        raise CheckpointError(f"truncated: tensor {name!r} runs past the end of the file", path)
    if stop - start != numel * _DTYPES[dtype].itemsize:
        raise CheckpointError(f"corrupt safetensors header ({name!r}: its offsets do not match its shape)", path)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._header_len, self._header = read_header(self.path)
        self._entries = sorted(
            ((name, entry) for name, entry in self._header.items() if name != "__metadata__"),
            key=lambda item: item[1]["data_offsets"][0],
        )
        self._fd: int | None = None

    def tensors(self) -> list[TensorInfo]:
        infos = []
        for name, entry in self._entries:
            dtype = _DTYPES.get(entry["dtype"])
            if dtype is None:
                raise CheckpointError(f"tensor {name!r} has unsupported dtype {entry['dtype']}", self.path)
            infos.append(TensorInfo(name, tuple(entry["shape"]), dtype))
        return infos

    def _elements(self, name: str, first: int, last: int) -> torch.Tensor:
        """Elements first..last of a tensor in its flat order, read by byte range (the header's offsets
        were checked against the file's size when it was opened)."""
        entry = self._header[name]
        dtype = _DTYPES[entry["dtype"]]
        out = torch.empty(last - first, dtype=dtype)
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"cannot read: {os_reason(exc)}", self.path) from exc
            self._closer = weakref.finalize(self, os.close, self._fd)  # a reader dropped without close()
        position = 8 + self._header_len + entry["data_offsets"][0] + first * dtype.itemsize
        if out.numel() and not read_into(self._fd, memoryview(out.view(torch.uint8).numpy()), position):
            raise CheckpointError(f"truncated: tensor {name!r} runs past the end of the file", self.path)
        return out

    def read(self, name: str) -> torch.Tensor:
        shape = tuple(int(d) for d in self._header[name]["shape"])
        return self._elements(name, 0, math.prod(shape)).reshape(shape)

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """Consecutive runs of at most CHUNK_ELEMENTS elements, so that memory does not grow with the
        tensor (pass 2 and ingest take flat pieces of any length)."""
        numel = math.prod(int(d) for d in self._header[name]["shape"])
        most = base.CHUNK_ELEMENTS  # read at the call, so a test can make it small
        for start in range(0, max(numel, 1), most):
            yield self._elements(name, start, min(numel, start + most))

    def recorded_step(self) -> int | None:
        metadata = self._header.get("__metadata__") or {}
        for key in STEP_KEYS:
            value = metadata.get(key)
            if value is not None and str(value).isdigit():
                return int(value)
        return None

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        with open(self.path, "rb") as src, open(out, "wb") as file, WriteBehind(file) as dst:
            copy_bytes(src, dst, 8 + self._header_len)
            base = 8 + self._header_len
            position = 0
            for name, entry in self._entries:
                start, stop = entry["data_offsets"]
                if start > position:  # padding the writer of the input put there
                    src.seek(base + position)
                    copy_bytes(src, dst, start - position)
                if not fuse.wants(name):
                    src.seek(base + start)
                    copy_bytes(src, dst, stop - start)
                else:
                    pieces = fuse.stream(name, self.chunks(name)) if hasattr(fuse, "stream") else [
                        fuse(name, self.read(name))]
                    written = 0
                    for piece in pieces:
                        data = piece.contiguous().reshape(-1).view(torch.uint8).numpy()
                        dst.write(memoryview(data))
                        written += data.nbytes
                    if written != stop - start:
                        raise CheckpointError(f"fused tensor {name!r} changed size", self.path)
                position = stop

    def close(self) -> None:
        if self._fd is not None:
            self._closer()
            self._fd = None


class SafetensorsFormat(CheckpointFormat):
    name = "safetensors"
    suffixes = (".safetensors",)

    def sniff(self, path: Path, head: bytes) -> bool:
        if len(head) < 9:
            return False
        (length,) = struct.unpack("<Q", head[:8])
        return 0 < length < _MAX_HEADER and head[8:9] == b"{"

    def open(self, path: Path) -> CheckpointReader:
        return SafetensorsReader(path)
