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
at each commit, with a SHA-256 of its records, so that a store damaged on disk is refused
(exit 4) instead of silently steering a fit. The store's files are never written through a
symbolic link: `snapshots.bin` is opened without following one, and a linked lock file or
default store folder is refused.
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
from .atomic import atomic_path, remove_path, sweep_temporaries
from .confine import stored_outside
from .errors import StoreError, UsageError
from .selection import LayoutPlan, Selection, layer_type

FORMAT_VERSION = 2  # 2: records carry a checksum
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
        hint = f"; `pdt snapshot --rebuild` makes it afresh from the checkpoints (or delete {Path(root)})"
        try:
            with h5py.File(path, "r") as f:
                version = int(f.attrs.get("format_version", -1))
                if version > FORMAT_VERSION:
                    raise StoreError(
                        f"made by a newer pdt (store format {version}, this pdt reads up to {FORMAT_VERSION}); "
                        "upgrade pdt", path)
                if version < 1:
                    raise StoreError("not a pdt store" + hint, path)
                outside = stored_outside(f, allowed=("snapshots",), soft_links=False)
                if outside is not None:
                    raise StoreError(f"refused: {outside}" + hint, path)
                records = {name: _record(f, name) for name in RECORDS if name in f or "/" not in name}
                stored_sum = f.attrs.get("checksum")
            if (version >= 2 or stored_sum is not None) and _checksum(records) != _text(stored_sum):
                raise StoreError("damaged: its records fail their checksum" + hint, path)
            state = json.loads(records.pop("state"))
            state["layout"] = json.loads(records.pop("layout"))
            state["history"] = json.loads(records.pop("history"))
            _check_schema(state)
        except StoreError:
            raise
        except (OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
            raise StoreError(f"unreadable store ({type(exc).__name__}: {exc})" + hint, path) from exc
        store = cls(Path(root), state, records)
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
        remove_path(store.data_path)  # a dead run's file or a planted link: never written through
        fd = os.open(store.data_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        store.commit()
        return store

    @staticmethod
    def set_aside(root: Path) -> list[Path]:
        """Drop a store's records and matrix unread, for `--rebuild`; backups are kept, renamed.

        The backups of `--in-place` writes are the user's original checkpoints, so they move to
        `backups-before-rebuild-<time>` rather than being pruned by the new store.
        """
        root = Path(root)
        for name in (META_NAME, DATA_NAME):
            remove_path(root / name)
        backups = root / BACKUP_DIRNAME
        if not backups.is_dir() or backups.is_symlink() or not any(backups.iterdir()):
            remove_path(backups)
            return []
        kept = root / f"{BACKUP_DIRNAME}-before-rebuild-{now().replace(':', '')}"
        os.replace(backups, kept)
        return [kept]

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

    def in_folder(self, path: str | Path) -> Path:
        """A path the store recorded, checked to be an entry of its checkpoint folder (where every
        checkpoint and resume output lives) before pdt writes there."""
        path = Path(path)
        if path.name in ("", ".", "..") or path.parent.resolve() != self.folder.resolve():
            raise StoreError(f"names {path}, outside its checkpoint folder {self.folder}; refused", self.meta_path)
        return path

    # ---- the snapshot matrix ----------------------------------------------------------
    def _handle(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self.data_path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as exc:
                raise StoreError(f"cannot open snapshot matrix: {exc.strerror}", self.data_path) from exc
            if os.fstat(fd).st_nlink != 1:  # another name for the same bytes, perhaps outside the store
                os.close(fd)
                raise StoreError("the snapshot matrix has other hard links; pdt writes only into a file of its "
                                 "own (remove the store and run again)", self.data_path)
            self._fd = fd
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
        records: dict[str, Any] = {
            "state": json.dumps(small),
            "layout": json.dumps(self.state["layout"]),
            "history": json.dumps(self.state["history"]),
        }
        records.update(self.arrays)
        with atomic_path(self.meta_path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["pdt_version"] = __version__
            f.attrs["checksum"] = _checksum(records)
            for key, value in records.items():
                f.create_dataset(key, data=value)
            f.create_dataset("snapshots", shape=(self.capacity, self.n), dtype=self.dtype,
                             external=[(DATA_NAME, 0, h5py.h5f.UNLIMITED)])


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


# Every record pdt writes into store.h5, and so the only ones it reads back.
RECORDS = ("state", "layout", "history", "fit/R", "fit/C", "fit/singular_values", "fit/eigenvalues",
           "mask/bits", "mask/byte_offsets", "mask/counts")


def _record(file: h5py.File, name: str) -> Any:
    """One record, read only if it is a dataset stored in the file itself under its own name
    (a soft link could make any dataset, such as the external snapshot matrix, read as a record)."""
    node: h5py.Group = file
    for part in name.split("/"):
        if not isinstance(node.get(part, getlink=True), h5py.HardLink):
            raise ValueError(f"{name} is missing or a link, not a record")
        node = node[part]
    if not isinstance(node, h5py.Dataset) or node.external or node.is_virtual:
        raise ValueError(f"{name} is not a record stored in the file")
    return node[()]


_REQUIRED = {
    "folder": str, "history_len": int, "capacity": int, "n": int, "dtype": str, "layout": dict, "snapshots": dict,
    "slots": list, "window": list, "next_id": int, "ingested": list, "outputs": list, "history": list,
}


def _check_schema(state: dict) -> None:
    """Refuse a store whose records parse but lack what the commands rely on."""
    if not isinstance(state, dict):
        raise ValueError("its state is not a record")
    for key, kind in _REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise ValueError(f"its state lacks {key!r}")
    if not isinstance(state["layout"].get("tensors"), list) or state["dtype"] not in STORE_DTYPES:
        raise ValueError("its layout is incomplete")
    if len(state["slots"]) != state["capacity"]:
        raise ValueError("its ring of slots does not match its capacity")


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else value if isinstance(value, str) else None


def _checksum(records: dict[str, Any]) -> str:
    """SHA-256 over every record of store.h5 (names, then JSON text or array dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for key in sorted(records):
        value = records[key]
        digest.update(key.encode() + b"\0")
        if isinstance(value, (str, bytes)):
            digest.update(value.encode() if isinstance(value, str) else value)
        else:
            array = np.ascontiguousarray(value)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        digest.update(b"\0")
    return digest.hexdigest()


def lock_for(root: Path, timeout: float) -> filelock.BaseFileLock:
    """The store's lock: a second pdt waits up to `timeout` seconds, then fails clearly.

    filelock opens the lock file with truncation, so a lock file that is a link (planted to
    make pdt truncate another file) is refused rather than opened.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StoreError("is not a folder; pdt keeps its store in a folder of this name (remove the file)", root)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_NAME
    if lock.is_symlink():
        raise StoreError("the lock file is a symbolic link; pdt never writes through one (remove it)", lock)
    return filelock.FileLock(str(lock), timeout=timeout)


def resolve_store_root(target: Path, store: Path | None) -> tuple[Path, Path | None]:
    """(store folder, checkpoint folder or None) for a command's target argument.

    The target may be a checkpoint folder (its store is `<folder>/.pdt` unless `--store`
    names another), a store folder, or a store's `store.h5`.
    """
    target = Path(target)
    if not target.exists():
        raise UsageError("does not exist", target)
    if target.is_file() and target.name == META_NAME:
        return target.parent, None
    if (target / META_NAME).is_file() and not store:
        return target, None
    if not target.is_dir():
        raise UsageError("not a checkpoint folder or a pdt store", target)
    if store:
        return Path(store), target
    root = target / STORE_DIRNAME
    if root.is_symlink():
        raise StoreError(f"is a symbolic link to {os.readlink(root)}; pdt keeps its default store inside the "
                         "checkpoint folder (pass --store with the real folder if you meant it)", root)
    return root, target


def clean_leftovers(root: Path, folder: Path | None) -> list[Path]:
    """Remove temporaries a killed pdt left behind (call while holding the lock)."""
    removed = sweep_temporaries(root) + sweep_temporaries(root / BACKUP_DIRNAME)
    if folder is not None:
        removed += sweep_temporaries(folder)
    return removed
