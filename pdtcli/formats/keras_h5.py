"""Keras 3 weight files (`model.save_weights("x.weights.h5")`): HDF5, one dataset per variable.

Keras 3 stores each layer's variables as numbered datasets, `layers/<layer>/vars/<i>`, and
nested layers and the optimizer (`optimizer/vars/<i>`) as further groups. A tensor's name
in pdt is its HDF5 path. The model's tensors are the datasets outside `optimizer/`; the
optimizer's are carried over. The fused copy is the input file copied byte for byte, then
the predicted datasets overwritten in place: groups, attributes, chunking, and dtypes stay.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np

from ..confine import stored_outside
from ..errors import CheckpointError
from ..lazy import torch
from .base import CheckpointFormat, CheckpointReader, Fuse, TensorInfo, torch_dtype

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# A shard of `model.save_weights("x.weights.json", max_shard_size=...)`: `x_00000.weights.h5` beside `x.weights.json`
SHARD = re.compile(r"(.+)_\d+\.weights\.h5")
CARRIED_GROUPS = ("optimizer/",)


class KerasReader(CheckpointReader):
    """`source`: where the HDF5 bytes are, when not the file `path` itself (a member of a `.keras`
    archive, as a seekable file object); errors still name `path`."""

    def __init__(self, path: Path, source: BinaryIO | None = None) -> None:
        super().__init__(path)
        try:
            self._file = h5py.File(self.path if source is None else source, "r")
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
        self.fuse_into(out, fuse)

    def fuse_into(self, copy: Path, fuse: Fuse) -> None:
        """Overwrite, in `copy` (a byte copy of these weights), the datasets `fuse` wants with its values."""
        with h5py.File(copy, "r+") as dst:
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
        shard = SHARD.fullmatch(Path(path).name)
        index = Path(path).with_name(f"{shard.group(1)}.weights.json") if shard else None
        if index is not None and index.is_file():  # one checkpoint in several files, not one checkpoint per file
            raise CheckpointError(f"a shard of the Keras sharded weights {index.name}, which pdt does not read: save "
                                  "each checkpoint as one file (`save_weights` without `max_shard_size`, or the "
                                  ".keras archive `ModelCheckpoint` writes)", path)
        return KerasReader(path)
