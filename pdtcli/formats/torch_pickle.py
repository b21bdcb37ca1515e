"""PyTorch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`): a state dict, or a dict holding one.

Loaded with `weights_only=True` (a checkpoint is data, never code) and `mmap=True` where
the file is in the zip format, so tensors are mapped rather than read. The model's
state dict is found under the usual keys; everything beside it (optimizer state,
schedulers, counters) is carried over unchanged when the fused copy is written.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, NotACheckpoint
from .base import STEP_KEYS, CheckpointFormat, CheckpointReader, Fuse, TensorInfo

# Where training code usually keeps the model's weights inside a checkpoint dict.
STATE_DICT_KEYS = ("model_state_dict", "state_dict", "model", "module", "model_state", "net", "network")


def load_pickle(path: Path) -> Any:
    """Load a torch checkpoint as data only; refuse anything that needs code to load."""
    mmap = zipfile.is_zipfile(path)
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


def _flatten(mapping: Mapping, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
    return out


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


class TorchReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._obj = load_pickle(self.path)
        try:
            self._key_path = find_state_dict(self._obj)
        except NotACheckpoint as exc:
            raise NotACheckpoint(str(exc), self.path) from None
        self._tensors = _flatten(self._state_dict())

    def _state_dict(self) -> Mapping:
        node = self._obj
        for key in self._key_path:
            node = node[key]
        return node

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in self._tensors.items()]

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def recorded_step(self) -> int | None:
        if isinstance(self._obj, Mapping):
            for key in STEP_KEYS:
                value = self._obj.get(key)
                if isinstance(value, int) and not isinstance(value, bool):
                    return value
        return None

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        fused = {name: fuse(name, tensor) for name, tensor in self._tensors.items() if fuse.wants(name)}
        state = _rebuild(self._state_dict(), fused)
        obj = state
        if self._key_path:
            obj = dict(self._obj) if type(self._obj) is dict else type(self._obj)(self._obj)
            obj[self._key_path[0]] = state
        # through a Python file: given a path, torch's zip writer reports a full disk as a RuntimeError
        # ("unexpected pos" in inline_container.cc) without its errno; Python's file raises the OSError
        with open(out, "wb") as handle:
            torch.save(obj, handle)

    def close(self) -> None:
        self._obj = None
        self._tensors = {}


class TorchFormat(CheckpointFormat):
    name = "torch"
    suffixes = (".pt", ".pth", ".bin", ".ckpt", ".tar")
    sniff_last = True  # a pickle's first byte and a zip's magic are shared with msgpack maps and .npz

    def sniff(self, path: Path, head: bytes) -> bool:
        return head[:2] == b"PK" or head[:1] == b"\x80"

    def open(self, path: Path) -> CheckpointReader:
        return TorchReader(path)
