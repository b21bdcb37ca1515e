"""The snapshot store: one HDF5 file per checkpoint folder, plus its raw snapshot matrix.

Layout of a store folder (default `<checkpoints>/.pdt/`):

- `store.h5`: everything but the snapshot values: layout, provenance, ring slots, the
  window, the latest fit and mask, the outputs written and the history of runs. The
  `snapshots` dataset in it is an HDF5 *external* dataset whose values live in
  `snapshots.bin` (open it with `efile_prefix="${ORIGIN}"`).
- `snapshots.bin`: the snapshot matrix, snapshot-major (slots x N), contiguous, so that
  ingesting a checkpoint is one sequential write and a row block of all snapshots is a
  few sequential reads. It has h + 1 slots: a new snapshot is always written into a slot
  the window does not use, and becomes part of the window only when `store.h5` is
  replaced. So a kill at any moment leaves the previous, valid store.
- `lock`: held by the one pdt process allowed to change the store.

`store.h5` is small and is rewritten whole, atomically (temporary file, fsync, rename),
at each commit.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import h5py
import numpy as np

from . import __version__
from .atomic import atomic_path, sweep_temporaries
from .errors import StoreError
from .selection import LayoutPlan, Selection, layer_type

FORMAT_VERSION = 1
STORE_DIRNAME = ".pdt"
META_NAME = "store.h5"
BACKUP_DIRNAME = "backups"  # what --in-place replaced (pdtcli.backups)
DATA_NAME = "snapshots.bin"
LOCK_NAME = "lock"
STORE_DTYPES = {"float32": np.float32, "float64": np.float64}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class TensorEntry:
    """One predicted tensor's place in the flat snapshot vector."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int
    layer_type: str

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "offset": self.offset,
            "numel": self.numel,
            "layer_type": self.layer_type,
        }


def layout_from_plan(plan: LayoutPlan, selection: Selection) -> dict:
    entries, offset = [], 0
    for info in plan.predicted:
        entry = TensorEntry(info.name, info.shape, str(info.dtype).removeprefix("torch."), offset, info.numel,
                            layer_type(info.name, info.shape))
        entries.append(entry.as_dict())
        offset += info.numel
    skipped = [
        {"name": info.name, "shape": list(info.shape), "dtype": str(info.dtype).removeprefix("torch."), "reason": why}
        for info, why in plan.skipped
    ]
    signature = json.dumps([(e["name"], e["shape"]) for e in entries]).encode()
    return {
        "tensors": entries,
        "skipped": skipped,
        "selection": selection.as_dict(),
        "n": offset,
        "fingerprint": hashlib.sha256(signature).hexdigest()[:16],
    }


class Store:
    """An open store. Change it only while holding `lock()`; `commit()` publishes changes."""

    def __init__(self, root: Path, state: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.root = Path(root)
        self.state = state
        self.arrays = arrays
        self._fd: int | None = None

    # ---- opening and creating -------------------------------------------------------
    @staticmethod
    def exists(root: Path) -> bool:
        return (Path(root) / META_NAME).is_file()

    @classmethod
    def open(cls, root: Path) -> Store:
        path = Path(root) / META_NAME
        try:
            with h5py.File(path, "r") as f:
                version = int(f.attrs.get("format_version", -1))
                if version > FORMAT_VERSION:
                    raise StoreError(
                        f"made by a newer pdt (store format {version}, this pdt reads up to {FORMAT_VERSION}); "
                        "upgrade pdt", path)
                if version < 1:
                    raise StoreError("not a pdt store", path)
                state = json.loads(f["state"][()])
                state["layout"] = json.loads(f["layout"][()])
                state["history"] = json.loads(f["history"][()])
                arrays = {
                    f"{group}/{name}": f[group][name][()]
                    for group in ("fit", "mask")
                    if group in f
                    for name in f[group]
                }
        except StoreError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise StoreError(f"unreadable store ({exc}); remove the folder {Path(root)} to start afresh",
                             path) from exc
        store = cls(Path(root), state, arrays)
        data = store.data_path
        expected = store.capacity * store.n * store.itemsize
        if not data.is_file() or data.stat().st_size < expected:
            raise StoreError(f"snapshot matrix missing or truncated (expected {expected} bytes)", data)
        return store

    @classmethod
    def create(cls, root: Path, folder: Path, plan: LayoutPlan, selection: Selection, history: int,
               dtype: str = "float32", order: str = "name") -> Store:
        if dtype not in STORE_DTYPES:
            raise StoreError(f"unknown store dtype {dtype!r} (use one of {', '.join(STORE_DTYPES)})")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        layout = layout_from_plan(plan, selection)
        capacity = history + 1
        state = {
            "format_version": FORMAT_VERSION,
            "pdt_version": __version__,
            "created": now(),
            "folder": str(Path(folder).resolve()),
            "history_len": history,
            "order": order,
            "capacity": capacity,
            "n": layout["n"],
            "dtype": dtype,
            "layout": layout,
            "snapshots": {},
            "slots": [None] * capacity,
            "window": [],
            "next_id": 1,
            "ingested": [],
            "fit": None,
            "mask": None,
            "outputs": [],
            "history": [],
        }
        store = cls(root, state, {})
        size = capacity * layout["n"] * store.itemsize
        with open(store.data_path, "wb") as handle:
            handle.truncate(size)
        store.commit()
        return store

    # ---- properties -----------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / META_NAME

    @property
    def data_path(self) -> Path:
        return self.root / DATA_NAME

    @property
    def n(self) -> int:
        return int(self.state["n"])

    @property
    def capacity(self) -> int:
        return int(self.state["capacity"])

    @property
    def history_len(self) -> int:
        return int(self.state["history_len"])

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(STORE_DTYPES[self.state["dtype"]])

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def folder(self) -> Path:
        return Path(self.state["folder"])

    @property
    def tensors(self) -> list[dict]:
        return self.state["layout"]["tensors"]

    def record(self, snapshot_id: int) -> dict:
        return self.state["snapshots"][str(snapshot_id)]

    def slot_of(self, snapshot_id: int) -> int:
        return self.state["slots"].index(snapshot_id)

    def readable(self, snapshot_id: int) -> bool:
        return snapshot_id in self.state["slots"]

    # ---- locking --------------------------------------------------------------------
    def lock(self, timeout: float) -> filelock.BaseFileLock:
        return lock_for(self.root, timeout)

    # ---- the snapshot matrix ----------------------------------------------------------
    def _handle(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.data_path, os.O_RDWR)
            except OSError as exc:
                raise StoreError(f"cannot open snapshot matrix: {exc.strerror}", self.data_path) from exc
        return self._fd

    def _position(self, slot: int, offset: int) -> int:
        return (slot * self.n + offset) * self.itemsize

    def write_segment(self, slot: int, offset: int, values: np.ndarray) -> None:
        """Write `values` (already in the store dtype) at `offset` of snapshot `slot`."""
        data = memoryview(np.ascontiguousarray(values, dtype=self.dtype)).cast("B")
        position = self._position(slot, offset)
        fd = self._handle()
        while data:
            written = os.pwrite(fd, data, position)
            data, position = data[written:], position + written

    def read_block(self, slots: list[int], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `start:stop` of the given snapshots, as a (len(slots), stop-start) array."""
        width = stop - start
        if out is None:
            out = np.empty((len(slots), width), dtype=self.dtype)
        fd = self._handle()
        for row, slot in enumerate(slots):
            view = memoryview(out[row, :width]).cast("B")
            position = self._position(slot, start)
            while view:
                got = os.preadv(fd, [view], position)
                if got == 0:
                    raise StoreError("snapshot matrix ended early", self.data_path)
                view, position = view[got:], position + got
        return out[:, :width]

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def free_slot(self, keep: set[int]) -> int | None:
        """A slot that holds none of the snapshots in `keep`; empty slots first."""
        slots = self.state["slots"]
        for index, held in enumerate(slots):
            if held is None:
                return index
        for index, held in enumerate(slots):
            if held not in keep:
                return index
        return None

    def place(self, slot: int, record: dict) -> int:
        """Record a snapshot just written to `slot` (the caller publishes with commit)."""
        snapshot_id = int(self.state["next_id"])
        self.state["next_id"] = snapshot_id + 1
        evicted = self.state["slots"][slot]
        if evicted is not None:
            self.state["snapshots"].pop(str(evicted), None)
        self.state["slots"][slot] = snapshot_id
        self.state["snapshots"][str(snapshot_id)] = dict(record, id=snapshot_id, slot=slot)
        return snapshot_id

    # ---- publishing -----------------------------------------------------------------
    def commit(self) -> None:
        """Replace store.h5 atomically with the current state; values must be synced first."""
        self.sync()
        small = {k: v for k, v in self.state.items() if k not in ("layout", "history")}
        with atomic_path(self.meta_path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["pdt_version"] = __version__
            f.create_dataset("state", data=json.dumps(small))
            f.create_dataset("layout", data=json.dumps(self.state["layout"]))
            f.create_dataset("history", data=json.dumps(self.state["history"]))
            f.create_dataset("snapshots", shape=(self.capacity, self.n), dtype=self.dtype,
                             external=[(DATA_NAME, 0, h5py.h5f.UNLIMITED)])
            for key, value in self.arrays.items():
                f.create_dataset(key, data=value)


def snapshot_step(record: dict, order: str) -> int | None:
    """The step that places a snapshot in training order, as every command shows it.

    Under `step` order it is the step recorded inside the checkpoint, under `name` the number
    in its name; under `mtime` time orders the window, and the step shown is whichever of the
    two the checkpoint has (None when it has neither: show its name instead).
    """
    if order == "step":
        return record.get("recorded_step")
    if order == "name":
        return record.get("name_step")
    recorded = record.get("recorded_step")
    return recorded if recorded is not None else record.get("name_step")


def lock_for(root: Path, timeout: float) -> filelock.BaseFileLock:
    """The store's lock: a second pdt waits up to `timeout` seconds, then fails clearly."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(Path(root) / LOCK_NAME), timeout=timeout)


def resolve_store_root(target: Path, store: Path | None) -> tuple[Path, Path | None]:
    """(store folder, checkpoint folder or None) for a command's target argument.

    The target may be a checkpoint folder (its store is `<folder>/.pdt` unless `--store`
    names another), a store folder, or a store's `store.h5`.
    """
    target = Path(target)
    if target.is_file() and target.name == META_NAME:
        return target.parent, None
    if (target / META_NAME).is_file() and not store:
        return target, None
    if not target.is_dir():
        raise StoreError("not a checkpoint folder or a pdt store", target)
    return (Path(store) if store else target / STORE_DIRNAME), target


def clean_leftovers(root: Path, folder: Path | None) -> list[Path]:
    """Remove temporaries a killed pdt left behind (call while holding the lock)."""
    removed = sweep_temporaries(root) + sweep_temporaries(root / BACKUP_DIRNAME)
    if folder is not None:
        removed += sweep_temporaries(folder)
    return removed
