"""Keras 3 weight files (`model.save_weights("x.weights.h5")`): HDF5, one dataset per variable.

Keras 3 stores each layer's variables as numbered datasets, `layers/<layer>/vars/<i>`, and
nested layers and the optimizer (`optimizer/vars/<i>`) as further groups. A tensor's name
in pdt is its HDF5 path. The model's tensors are the datasets outside `optimizer/`; the
optimizer's are carried over. The fused copy is the input file copied byte for byte, then
the predicted datasets overwritten in place: groups, attributes, chunking, and dtypes stay.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np

from ..confine import stored_outside
from ..errors import CheckpointError
from ..lazy import torch
from .base import CheckpointFormat, CheckpointReader, Fuse, TensorInfo, torch_dtype

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
CARRIED_GROUPS = ("optimizer/",)


class KerasReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._file = h5py.File(self.path, "r")
            names: list[str] = []
            self._file.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        except (OSError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"corrupt or truncated HDF5 weights file ({exc})", self.path) from exc
        outside = stored_outside(self._file)
        if outside is not None:
            self._file.close()
            raise CheckpointError(f"refused: {outside}; pdt reads weights only from the file itself", self.path)
        self._infos = [
            TensorInfo(name, tuple(self._file[name].shape), torch_dtype(self._file[name].dtype, name, self.path))
            for name in names
            if not name.startswith(CARRIED_GROUPS) and self._file[name].dtype.kind in "fiub"
        ]

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> torch.Tensor:
        try:
            return torch.from_numpy(np.ascontiguousarray(self._file[name][()]))
        except (OSError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"cannot read dataset {name!r} ({exc})", self.path) from exc

    def recorded_step(self) -> int | None:
        iterations = self._file.get("optimizer/vars/0")  # Keras optimizers keep `iterations` first
        if isinstance(iterations, h5py.Dataset) and iterations.shape == () and iterations.dtype.kind in "iu":
            return int(iterations[()])
        return None

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        shutil.copyfile(self.path, out)
        with h5py.File(out, "r+") as dst:
            for info in self._infos:
                if fuse.wants(info.name):
                    dst[info.name][...] = fuse(info.name, self.read(info.name)).numpy()

    def close(self) -> None:
        self._file.close()


class KerasFormat(CheckpointFormat):
    name = "keras"
    suffixes = (".h5",)
    output_suffixes = (".weights.h5",)  # Keras loads weights only from names ending so
    # Keras 3 numbers a layer's variables; BatchNormalization keeps gamma, beta, moving_mean,
    # moving_variance in that order.
    running_stats = ("*batch_normalization*/vars/2", "*batch_normalization*/vars/3")
    bias_names = ("*/vars/1",)  # a Dense or Conv layer keeps its kernel as vars/0 and its bias as vars/1

    def sniff(self, path: Path, head: bytes) -> bool:
        return head[:8] == HDF5_SIGNATURE

    def open(self, path: Path) -> CheckpointReader:
        return KerasReader(path)
