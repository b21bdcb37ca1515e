"""The snapshot matrix: `snapshots.bin`, slots x N values, snapshot-major and contiguous.

Ingesting a checkpoint is one sequential write of a slot, and a row block of all snapshots
is a few sequential reads. The file is opened without following a link and refused when it
has other hard links, so the values are never written into a file that is not the store's.
Every operating-system error on it (disk full, a file-size limit, EIO) is one StoreError naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..atomic import remove_path
from ..errors import StoreError, os_error, os_errors_as
from ..rawio import read_into


class SnapshotMatrix:
    def __init__(self, path: Path, slots: int, n: int, dtype: np.dtype) -> None:
        self.path = Path(path)
        self.slots, self.n, self.dtype = slots, n, np.dtype(dtype)
        self._fd: int | None = None

    @property
    def nbytes(self) -> int:
        return self.slots * self.n * self.dtype.itemsize

    def create(self) -> None:
        """A new zero-filled file; whatever sat under the name (a dead run's file, a link) is removed."""
        with os_errors_as(StoreError, "cannot make the snapshot matrix", self.path):
            remove_path(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.ftruncate(fd, self.nbytes)  # sparse: a full disk shows only when values are written
            finally:
                os.close(fd)

    def check(self) -> None:
        with os_errors_as(StoreError, "cannot read the snapshot matrix", self.path):
            size = self.path.stat().st_size if self.path.is_file() else -1
        if size < self.nbytes:
            raise StoreError(f"snapshot matrix missing or truncated (expected {self.nbytes} bytes)", self.path)

    def _handle(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as exc:
                raise os_error(exc, StoreError, "cannot open the snapshot matrix", self.path) from exc
            if os.fstat(fd).st_nlink != 1:  # another name for the same bytes, perhaps outside the store
                os.close(fd)
                raise StoreError("the snapshot matrix has other hard links; pdt writes only into a file of its "
                                 "own (remove the store and run again)", self.path)
            self._fd = fd
        return self._fd

    def _position(self, slot: int, offset: int) -> int:
        return (slot * self.n + offset) * self.dtype.itemsize

    def write(self, slot: int, offset: int, values: np.ndarray) -> None:
        """Write `values` (converted to the store dtype) at `offset` of snapshot `slot`."""
        data = memoryview(np.ascontiguousarray(values, dtype=self.dtype)).cast("B")
        position = self._position(slot, offset)
        fd = self._handle()
        with os_errors_as(StoreError, "cannot write the snapshot matrix", self.path):
            while data:
                written = os.pwrite(fd, data, position)
                data, position = data[written:], position + written

    def read(self, slots: list[int], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `start:stop` of the given snapshots, as a (len(slots), stop-start) array."""
        width = stop - start
        if out is None:
            out = np.empty((len(slots), width), dtype=self.dtype)
        fd = self._handle()
        for row, slot in enumerate(slots):
            with os_errors_as(StoreError, "cannot read the snapshot matrix", self.path):
                complete = read_into(fd, memoryview(out[row, :width]), self._position(slot, start))
            if not complete:
                raise StoreError("snapshot matrix ended early", self.path)
        return out[:, :width]

    def sync(self) -> None:
        if self._fd is not None:
            with os_errors_as(StoreError, "cannot write the snapshot matrix", self.path):  # NFS reports ENOSPC here
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
