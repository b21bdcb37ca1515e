"""PyTorch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`): a state dict, or a dict holding one.

Loaded with `weights_only=True` (a checkpoint is data, never code) and `mmap=True` where
the file is in the zip format, so opening one reads its structure, not its tensors. The values
are then read by byte range (`os.preadv`) from where the mapping says each storage lies in the
file, never through the mapping itself: a mapped file that training cuts short meanwhile (a
`torch.save` over it truncates it first) kills the reader with SIGBUS, where a read returns short
and is one error. The model's state dict is found under the usual keys; everything beside it
(optimizer state, schedulers, counters) is carried over unchanged when the fused copy is written.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, NotACheckpoint, os_reason
from ..rawio import read_into
from .base import STEP_KEYS, CheckpointFormat, CheckpointReader, Fuse, TensorInfo, unique_names

# Where training code usually keeps the model's weights inside a checkpoint dict.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module", "model_state", "net", "network")


def load_pickle(path: Path, mmap: bool = True) -> Any:
    """Load a torch checkpoint as data only (mapped, if `mmap` and the zip format allows); refuse
    anything that needs code to load."""
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(
            f"refused: loading it would run code, and pdt loads checkpoints as data only ({detail.strip()})", path
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"corrupt or truncated PyTorch checkpoint ({reason})", path) from exc


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and any(isinstance(v, torch.Tensor) for v in value.values())


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


def _entries(mapping: Mapping, prefix: str = "", shown: str = "") -> Iterator[tuple[str, str, torch.Tensor]]:
    """(name, key path as written in Python, tensor) of every tensor, nested dicts joined with '.'."""
    for key, value in mapping.items():
        name, where = f"{prefix}{key}", f"{shown}[{key!r}]"
        if isinstance(value, torch.Tensor):
            yield name, where, value
        elif isinstance(value, Mapping):
            yield from _entries(value, f"{name}.", where)


def _flatten(mapping: Mapping, path: Path) -> dict[str, torch.Tensor]:
    """The state dict's tensors by flat name; names that two entries flatten to are refused."""
    return unique_names(_entries(mapping), "nested keys are joined with '.'", path)


def _rebuild(mapping: Mapping, fused: dict[str, torch.Tensor], prefix: str = "") -> Mapping:
    """A copy of `mapping` (same type, same key order) with tensors swapped where fused."""
    items = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            value = fused.get(name, value)
        elif isinstance(value, Mapping) and any(k.startswith(f"{name}.") for k in fused):
            value = _rebuild(value, fused, f"{name}.")
        items.append((key, value))
    copy = dict(items) if type(mapping) is dict else type(mapping)(items)
    if hasattr(mapping, "_metadata"):  # nn.Module.state_dict() carries version metadata
        copy._metadata = mapping._metadata
    return copy


def _mappings(inode: int) -> list[tuple[int, int, int]]:
    """(start, end, file offset at start) of this process's mappings of the file with this inode, from
    /proc/self/maps; [] where there is no such table (not Linux)."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) >= 5 and fields[4] == str(inode):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    found.append((start, end, int(fields[2], 16)))
    except OSError:
        return []
    return found


class TorchReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(f"cannot read: {os_reason(exc)}", self.path) from exc
        try:
            self._obj = load_pickle(self.path)
            try:
                self._key_path = find_state_dict(self._obj)
            except NotACheckpoint as exc:
                raise NotACheckpoint(str(exc), self.path) from None
            self._tensors = _flatten(self._state_dict(self._obj), self.path)
            # the mapping torch.load made, found by the inode of the file held open: if the name was
            # given to another file in between, no mapping matches and values come through memory
            self._mapped = _mappings(os.fstat(self._fd).st_ino)
        except BaseException:
            self.close()
            raise

    def _state_dict(self, obj: Any) -> Mapping:
        node = obj
        for key in self._key_path:
            node = node[key]
        return node

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in self._tensors.items()]

    def _file_offset(self, tensor: torch.Tensor) -> int | None:
        """Where the tensor's first element lies in the file, if its storage is in the file's mapping."""
        address = tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size()
        return next((offset + address - start for start, end, offset in self._mapped if start <= address < end), None)

    def read(self, name: str) -> torch.Tensor:
        """The tensor's bytes read from the file into memory of its own (see the module's docstring); a
        tensor of a pickle that is not mapped (the legacy format) is in memory already."""
        tensor = self._tensors[name]
        where = self._file_offset(tensor) if tensor.numel() else None
        if where is None:
            return tensor
        # the bytes from the first element to the last, whatever the strides
        span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
        raw = torch.empty(span * tensor.element_size(), dtype=torch.uint8)
        try:
            complete = read_into(self._fd, memoryview(raw.numpy()), where)
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor {name!r}: {os_reason(exc)}", self.path) from exc
        if not complete:
            raise CheckpointError(f"truncated while pdt read it: tensor {name!r} runs past the end of the file "
                                  "(is training still saving it?)", self.path)
        return raw.view(tensor.dtype).as_strided(tensor.shape, tensor.stride())

    def recorded_step(self) -> int | None:
        if isinstance(self._obj, Mapping):
            for key in STEP_KEYS:
                value = self._obj.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        return None

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        """torch.save of the checkpoint with the predicted tensors fused. The checkpoint is loaded again,
        read rather than mapped: torch.save touches every storage, and a mapping cut short by training
        saving over the file would kill pdt mid-write (the caller checks the file did not change)."""
        whole = load_pickle(self.path, mmap=False)
        tensors = _flatten(self._state_dict(whole), self.path)
        fused = {name: fuse(name, tensor) for name, tensor in tensors.items() if fuse.wants(name)}
        state = _rebuild(self._state_dict(whole), fused)
        obj = state
        if self._key_path:
            obj = dict(whole) if type(whole) is dict else type(whole)(whole)
            obj[self._key_path[0]] = state
        # through a Python file: given a path, torch's zip writer reports a full disk as a RuntimeError
        # ("unexpected pos" in inline_container.cc) without its errno; Python's file raises the OSError
        with open(out, "wb") as handle:
            torch.save(obj, handle)

    def close(self) -> None:
        self._obj = None
        self._tensors = {}
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None


class TorchFormat(CheckpointFormat):
    name = "torch"
    suffixes = (".pt", ".pth", ".bin", ".ckpt", ".tar")
    sniff_last = True  # a pickle's first byte and a zip's magic are shared with msgpack maps and .npz

    def sniff(self, path: Path, head: bytes) -> bool:
        return head[:2] == b"PK" or head[:1] == b"\x80"

    def open(self, path: Path) -> CheckpointReader:
        return TorchReader(path)
