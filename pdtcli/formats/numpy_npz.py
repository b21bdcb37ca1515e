"""NumPy `.npz` archives (`np.savez` / `np.savez_compressed`): one array per key.

Loaded with `allow_pickle=False`, so an object array (which would need pickle) is refused
rather than run. Each array is read on demand from the zip. The fused copy keeps the key
order, dtypes and compression of the input; arrays pdt does not predict are written back
as their stored zip members, byte for byte.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..lazy import torch
from .base import STEP_KEYS, CheckpointFormat, CheckpointReader, Fuse, TensorInfo, torch_dtype, unique_names


def _as_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


class NpzReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
            self._members = unique_names(((info.filename, f"member {info.filename!r}", info)
                                          for info in self._zip.infolist()), "read from the archive", self.path)
            self._infos = [self._describe(info) for info in self._zip.infolist()]
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CheckpointError(f"corrupt or truncated .npz archive ({exc})", self.path) from exc

    def _describe(self, info: zipfile.ZipInfo) -> TensorInfo:
        with self._zip.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):  # the header only, not the data
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                array = np.lib.format.read_array(member, allow_pickle=False)
                shape, dtype = array.shape, array.dtype
        name = self._key(info.filename)
        return TensorInfo(name, tuple(shape), torch_dtype(dtype, name, self.path))

    @staticmethod
    def _key(member: str) -> str:
        return member[:-4] if member.endswith(".npy") else member

    def _load(self, name: str) -> np.ndarray:
        try:
            with self._zip.open(self._members[f"{name}.npy"]) as member:
                return np.lib.format.read_array(member, allow_pickle=False)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CheckpointError(f"corrupt array {name!r} ({exc})", self.path) from exc

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> torch.Tensor:
        return _as_torch(self._load(name))

    def recorded_step(self) -> int | None:
        for key in STEP_KEYS:
            info = next((i for i in self._infos if i.name == key), None)
            if info is not None and info.numel == 1 and not info.dtype.is_floating_point:
                return int(self._load(key).reshape(-1)[0])
        return None

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        with zipfile.ZipFile(out, "w", allowZip64=True) as dst:
            for info in self._zip.infolist():
                name = self._key(info.filename)
                if not fuse.wants(name):  # carried over: copy the stored member as it is, undecoded
                    with self._zip.open(info) as src, dst.open(_clone(info), "w", force_zip64=True) as sink:
                        while chunk := src.read(1 << 20):
                            sink.write(chunk)
                    continue
                with dst.open(_clone(info), "w", force_zip64=True) as sink:
                    np.lib.format.write_array(sink, fuse(name, self.read(name)).numpy(), allow_pickle=False)

    def close(self) -> None:
        self._zip.close()


def _clone(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
    copy.compress_type = info.compress_type
    copy.external_attr = info.external_attr
    return copy


class NpzFormat(CheckpointFormat):
    name = "npz"
    suffixes = (".npz",)

    def sniff(self, path: Path, head: bytes) -> bool:
        return head[:2] == b"PK" and path.suffix.lower() == ".npz"

    def open(self, path: Path) -> CheckpointReader:
        return NpzReader(path)
