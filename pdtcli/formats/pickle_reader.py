"""An unpickler for torch.save's `data.pkl` that executes nothing.

A pickle names the callables that rebuild its objects (GLOBAL) and then calls them (REDUCE, NEWOBJ,
BUILD). Here every name resolves to pdt's own inert objects, never to the named code:

- torch's tensor rebuilders become `TensorRef`s (storage key, dtype, offset, shape, stride), and the
  storages torch names by persistent id `StorageRef`s: where the values are, none of them read;
- `collections.OrderedDict` (a state dict's type) is itself: building one runs no code of the file's;
- every other global becomes an `Opaque` class, made for this one load and named after the global:
  calling it, building or filling one makes another placeholder holding what it was given.

The result is a tree of plain containers, records and placeholders; pdt reads the tensors it finds
there, and the fused copy carries the pickle's bytes as stored, so nothing is ever rebuilt.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..lazy import TorchDtypes, torch

# Storage types by the name torch.save gives them (`torch.FloatStorage`, ...): their element type.
STORAGE_DTYPES = TorchDtypes({
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
})


@dataclass(frozen=True)
class View:
    """Where a tensor's elements lie in a storage: offset, shape and strides in elements of `dtype`."""

    storage: object  # the storage's identity: its archive key, or its address in memory
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def span(self) -> tuple[int, int]:
        """[first byte, end) of the storage bytes the elements lie in, whatever the strides."""
        last = self.offset + sum((size - 1) * step for size, step in zip(self.shape, self.stride, strict=True))
        return self.offset * self.dtype.itemsize, (last + 1) * self.dtype.itemsize

    def contiguous(self) -> bool:
        """Whether the elements lie in flat order, one after another."""
        expected = 1
        for size, step in reversed(list(zip(self.shape, self.stride, strict=True))):
            if size != 1 and step != expected:
                return False
            expected *= size
        return True

    def dense(self) -> bool:
        """Whether every element has a place of its own and the places fill the span (a permutation of
        a contiguous tensor, as a transpose); an expanded view repeats places and is not."""
        dims = sorted((step, size) for size, step in zip(self.shape, self.stride, strict=True) if size != 1)
        expected = 1
        for step, size in dims:
            if step != expected:
                return False
            expected *= size
        return True


class Opaque:
    """An object of a class pdt does not know, kept as what built it: never called, never used."""

    _global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        made = object.__new__(cls)
        object.__setattr__(made, "parts", {"args": args, "kwargs": kwargs, "state": None, "items": []})
        return made

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE on the class: __new__ kept the args
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:  # REDUCE on an instance: another placeholder
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:  # BUILD
        self.parts["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a dict subclass
        self.parts["items"].append((key, value))

    def append(self, value: Any) -> None:  # APPEND(S) on a list subclass
        self.parts["items"].append((len(self.parts["items"]), value))

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __setattr__(self, name: str, value: Any) -> None:  # BUILD's slot state: recorded, not set
        self.parts["items"].append((name, value))

    def __repr__(self) -> str:
        return f"<{self._global} (not loaded)>"

    @classmethod
    def global_name(cls) -> str:
        return cls._global


class StorageRef:
    """A storage member of the archive (`data/<key>`) and its element type, as torch's persistent id names it."""

    __slots__ = ("key", "dtype")

    def __init__(self, key: str, dtype: torch.dtype) -> None:
        self.key, self.dtype = key, dtype


class TensorRef:
    """A tensor as torch's `_rebuild_tensor_v2` would make it: a view of a storage. The fields are
    whatever the pickle gave; `view()` checks them."""

    def __init__(self, storage: Any, offset: Any, shape: Any, stride: Any, *rest: Any) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def view(self) -> View | None:
        """The view, or None when the pickle's fields are not a storage, a count and two tuples of counts
        of one length."""
        def counts(value: Any) -> bool:
            return isinstance(value, tuple) and all(_count(v) for v in value)

        if not (isinstance(self.storage, StorageRef) and _count(self.offset) and counts(self.shape)
                and counts(self.stride) and len(self.shape) == len(self.stride)):
            return None
        return View(self.storage.key, self.storage.dtype, self.offset, self.shape, self.stride)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _StorageType:
    """What `torch.FloatStorage` and its kin resolve to: only their element type."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _parameter(data: Any, *rest: Any) -> Any:
    """`torch._utils._rebuild_parameter(data, requires_grad, hooks[, state])`: the tensor itself."""
    return data


def _from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """`torch._tensor._rebuild_from_type_v2`: a tensor of a subclass, or with attributes; pdt's rebuilder
    applied to `args` when `func` is one, else a placeholder."""
    if func in _BUILDERS.values() and isinstance(args, tuple):
        return func(*args)
    return _opaque_class("torch._tensor._rebuild_from_type_v2")(func, new_type, args, state)


_BUILDERS = {
    ("torch._utils", "_rebuild_tensor_v2"): TensorRef,
    ("torch._utils", "_rebuild_tensor"): TensorRef,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _from_type,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def _opaque_class(name: str) -> type[Opaque]:
    return type(name.rpartition(".")[2] or "Opaque", (Opaque,), {"_global": name})


class InertUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals are pdt's inert objects (see the module's docstring)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._made: dict[str, type[Opaque]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _BUILDERS:
            return _BUILDERS[module, name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        full = f"{module}.{name}"
        if full not in self._made:  # one class per global and load: a class changed by BUILD stays in this load
            self._made[full] = _opaque_class(full)
        return self._made[full]

    def persistent_load(self, pid: Any) -> StorageRef:
        """torch's ('storage', storage type, key, location, numel); anything else is refused."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        return StorageRef(pid[2], pid[1].dtype)


def load_inert(data: bytes) -> Any:
    """The object a `data.pkl` describes, built of containers, records and placeholders only."""
    return InertUnpickler(data).load()


def _children(where: str, node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield f"{where}[{key!r}]", value
    elif isinstance(node, list | tuple | set | frozenset):
        for index, value in enumerate(node):
            yield f"{where}[{index}]", value
    elif isinstance(node, Opaque):
        for index, value in enumerate(node.parts["args"]):
            yield f"{where}({index})", value
        for key, value in node.parts["items"]:
            yield f"{where}[{key!r}]", value
        state = node.parts["state"]
        if isinstance(state, Mapping):
            for key, value in state.items():
                yield f"{where}.{key}", value
        elif state is not None:
            yield f"{where}.__state__", state
        yield from ((f"{where}.{key}", value) for key, value in node.parts["kwargs"].items())
    elif isinstance(node, TensorRef):
        yield f"{where}.storage", node.storage
    elif isinstance(node, torch.Tensor):
        return


def graph(root: Any) -> Iterator[tuple[str, Any, Any]]:
    """(where, node, parent) of every object reachable from `root`, each once, depth first and without
    recursion (a pickle can nest deeper than Python's stack, and can hold cycles); `where` is the path
    from the root as Python would index it ("['model']['wte.weight']")."""
    seen: set[int] = set()
    stack: list[tuple[str, Any, Any]] = [("", root, None)]
    while stack:
        where, node, parent = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield where, node, parent
        stack.extend((child_where, child, node) for child_where, child in reversed(list(_children(where, node))))
