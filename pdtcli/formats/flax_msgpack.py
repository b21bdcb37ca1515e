"""Flax/JAX state bytes (`flax.serialization.to_bytes`, `.msgpack`): a msgpack tree of arrays.

Flax writes a nested map whose leaves are msgpack extension objects: code 1 is an array,
packed as (shape, dtype name, raw bytes); code 3 a NumPy scalar, packed the same way. pdt decodes only the
arrays it predicts, those under `params` when the tree has one (a TrainState also holds
`step` and `opt_state`), and writes every other leaf back as the very bytes it read, so a
carried-over optimizer state is bit-identical. A tensor's name is its key path joined by `/`.
Msgpack has no random access, so the file is read whole (one checkpoint in memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..errors import CheckpointError
from ..lazy import torch
from .base import DTYPES, CheckpointFormat, CheckpointReader, Fuse, TensorInfo, unique_names

EXT_NDARRAY = 1
EXT_NPSCALAR = 3
CHUNKED_MARK = "__msgpack_chunked_array__"
PARAMS_KEY = "params"


@dataclass
class Leaf:
    """An extension object as read; decoded only when asked for."""

    code: int
    data: bytes

    def array_header(self) -> tuple[list[int], str, bytes]:
        shape, dtype, raw = msgpack.unpackb(self.data, raw=False)
        if not isinstance(dtype, str) or not isinstance(raw, bytes):
            raise ValueError("an array leaf is not (shape, dtype name, bytes)")
        return list(shape), dtype, raw


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(key path joined by '/', key path as written in Python, leaf) in file order; iterative, so a
    deeply nested file cannot exhaust the stack."""
    stack = [(prefix, f"[{prefix[:-1]!r}]" if prefix else "", node)]
    while stack:
        path, shown, item = stack.pop()
        if isinstance(item, dict):
            stack.extend(reversed([(f"{path}{key}/", f"{shown}[{key!r}]", value) for key, value in item.items()]))
        else:
            yield path[:-1], shown, item


class FlaxReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._tree = msgpack.unpackb(self.path.read_bytes(), raw=False, strict_map_key=False,
                                         ext_hook=lambda code, data: Leaf(code, data))
        except msgpack.StackError as exc:
            raise CheckpointError("corrupt msgpack state: nested deeper than msgpack reads (1024 levels); "
                                  "not a Flax state", self.path) from exc
        except (ValueError, msgpack.UnpackException, OSError) as exc:
            raise CheckpointError(f"corrupt or truncated msgpack state ({type(exc).__name__}: {exc})",
                                  self.path) from exc
        if not isinstance(self._tree, dict):
            raise CheckpointError("not a Flax state (the top level is not a map)", self.path)
        root = self._tree.get(PARAMS_KEY)
        prefix = f"{PARAMS_KEY}/" if isinstance(root, dict) else ""
        self._leaves = unique_names(self._arrays(root if prefix else self._tree, prefix), "key paths are joined "
                                    "with '/'", self.path)
        self._infos = [self._describe(name, leaf) for name, leaf in self._leaves.items()]

    def _arrays(self, node: Any, prefix: str) -> Iterator[tuple[str, str, Leaf]]:
        for name, shown, leaf in _walk(node, prefix):
            if name.endswith(CHUNKED_MARK) or (isinstance(leaf, dict) and CHUNKED_MARK in leaf):
                raise CheckpointError(f"array {name!r} is chunked (over 1 GiB); not supported yet", self.path)
            if isinstance(leaf, Leaf) and leaf.code == EXT_NDARRAY:
                yield name, shown, leaf

    def _describe(self, name: str, leaf: Leaf) -> TensorInfo:
        shape, dtype, raw = leaf.array_header()
        if dtype not in DTYPES:
            raise CheckpointError(f"array {name!r} has unsupported dtype {dtype}", self.path)
        info = TensorInfo(name, tuple(shape), DTYPES[dtype])
        if not all(isinstance(d, int) and d >= 0 for d in shape) or len(raw) != info.numel * info.dtype.itemsize:
            raise CheckpointError(f"array {name!r}: its bytes do not match its shape {shape} and dtype {dtype}",
                                  self.path)
        return info

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> torch.Tensor:
        shape, dtype, raw = self._leaves[name].array_header()
        flat = torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype]) if raw else torch.empty(0, dtype=DTYPES[dtype])
        return flat.reshape(shape)

    def recorded_step(self) -> int | None:
        step = self._tree.get("step")
        if not isinstance(step, Leaf):
            return step if isinstance(step, int) and not isinstance(step, bool) else None
        if step.code not in (EXT_NDARRAY, EXT_NPSCALAR):
            return None
        try:
            shape, dtype, raw = step.array_header()  # a NumPy scalar is packed as a 0-d array
        except (ValueError, TypeError, msgpack.UnpackException):
            return None
        if len(raw) < 1 or dtype in DTYPES and len(raw) != DTYPES[dtype].itemsize:
            return None
        if shape or dtype not in DTYPES or DTYPES[dtype].is_floating_point:
            return None
        return int(torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype])[0])

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        fused: dict[int, bytes] = {}
        for name, leaf in self._leaves.items():
            if fuse.wants(name):
                shape, dtype, _ = leaf.array_header()
                raw = fuse(name, self.read(name)).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                fused[id(leaf)] = msgpack.packb((shape, dtype, raw))

        def pack(obj: Any) -> msgpack.ExtType:
            if isinstance(obj, Leaf):
                return msgpack.ExtType(obj.code, fused.get(id(obj), obj.data))
            raise TypeError(f"cannot pack {type(obj).__name__}")

        with open(out, "wb") as handle:
            handle.write(msgpack.packb(self._tree, default=pack, strict_types=True))


class FlaxFormat(CheckpointFormat):
    name = "flax"
    suffixes = (".msgpack",)

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.suffix.lower() == ".msgpack" and bool(head) and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))

    def open(self, path: Path) -> CheckpointReader:
        return FlaxReader(path)
