"""The snapshot store: one folder per checkpoint folder, behind typed records and the rules.

Layout of a store folder (default `<checkpoints>/.pdt/`):

- `store.h5`: everything but the snapshot values (`store.h5file`): layout, provenance, ring
  slots, the window, the latest fit and mask, the outputs written and the history of runs.
- `snapshots.bin`: the snapshot matrix (`store.matrix`), h + 1 slots: a new snapshot is
  always written into a slot the window does not use, and becomes part of the window only
  when `store.h5` is replaced. So a kill at any moment leaves the previous, valid store.
- `lock`: held by the one pdt process allowed to change the store (`session`).
- `backups/`: what `--in-place` replaced (`backups`).

The `Store` owns the rules of its records, so that every command answers the same way:
which slot is free, what the window is and which part of it the next fit uses, where a
fused state goes and what it replaced, what step a snapshot is at, which outputs are pdt's.
Callers change the store only through these methods, and publish with `commit()`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import fsync_dir, remove_path
from ..errors import StoreError, UsageError, os_errors_as
from ..lazy import torch
from ..mask import COUNT_COLUMNS, join_pieces, tensor_rows, whole_rows
from ..selection import LayoutPlan, Selection, layer_type
from ..world import World, current
from . import h5file, lineage, schedule
from .checksums import SlotSums
from .matrix import SnapshotMatrix
from .records import Fit, HistoryEntry, Layout, Mask, Output, Pending, Seen, Snapshot, TensorEntry, now

STORE_DIRNAME = ".pdt"
META_NAME = "store.h5"
BACKUP_DIRNAME = "backups"  # what --in-place replaced (pdtcli.backups)
DATA_NAME = "snapshots.bin"
NEXT_NAME = "store.h5.next"  # a distributed commit's records, written by every rank before any puts them in place
LOCK_NAME = "lock"
PART_PREFIX = "rank-"  # the part of a store that one rank of a distributed step keeps: rank-00001-of-00004
# How snapshot values are kept: by the torch dtype's name, the NumPy type of its bytes in snapshots.bin
# (bfloat16 has no NumPy type, so its 16 bits are kept as int16 and viewed back). Names, not torch
# dtypes: opening a store must not import torch (`pdtcli.lazy`).
STORE_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.int16}
LOSSLESS_16 = ("bfloat16", "float16")  # kept in their own dtype when every predicted tensor has it
ORDER_OF_OLD_STORES = "name"  # stores made before --order existed ordered by name
AUDIT_COMMANDS = ("mask", "predict --dry-run")  # history rows that never write what training resumes from

def part_name(world: World) -> str:
    return f"{PART_PREFIX}{world.rank:05d}-of-{world.size:05d}"

def parts_of(root: Path) -> dict[int, list[Path]]:
    """The parts a distributed step made in a store folder, by the number of ranks that made them."""
    found: dict[int, list[Path]] = {}
    with os_errors_as(StoreError, "cannot read the store folder", root):
        entries = sorted(Path(root).iterdir()) if Path(root).is_dir() else []
    for path in entries:
        words = path.name.removeprefix(PART_PREFIX).split("-of-")
        if path.name.startswith(PART_PREFIX) and len(words) == 2 and all(w.isdigit() for w in words) \
                and (path / META_NAME).is_file():
            found.setdefault(int(words[1]), []).append(path)
    return found

def complete_parts(root: Path, size: int, parts: list[Path]) -> list[Path]:
    """The `size` parts of a distributed store (`parts`, as `parts_of` found them), in rank order.

    A part that is gone (its folder or its records) would leave a report of the rest looking like the
    whole model: StoreError naming the first missing one instead.
    """
    expected = [Path(root) / part_name(World(rank, size)) for rank in range(size)]
    missing = [path for path in expected if path not in parts]
    if missing:
        raise StoreError(f"this store was made by {size} ranks and its part {missing[0].name} is missing (or has "
                         f"no {META_NAME}), so it holds only part of the model: put that part back, or remove "
                         f"{root} and run pdt again with {size} ranks", missing[0])
    return expected

def roll_forward(root: Path, world: World) -> None:
    """Finish a distributed commit that a rank did not (killed after every rank had written its next
    records, before it put its own in place): its part takes them, so all parts are at the same
    commit. Next records of a commit the ranks never agreed on are dropped. Every rank calls this."""
    root = Path(root)
    committed = _generation(root / META_NAME)
    pending = _generation(root / NEXT_NAME)
    known = [g for g in world.gather(committed, "recovering the store") if g is not None]
    if pending is not None and known and pending == max(known) == (committed or 0) + 1:
        os.replace(root / NEXT_NAME, root / META_NAME)
        fsync_dir(root)
    else:
        remove_path(root / NEXT_NAME)

def _generation(path: Path) -> int | None:
    """The commit count of a store file (0 for stores made before it was kept), None if it cannot be read."""
    if not path.is_file():
        return None
    try:
        texts, _ = h5file.read(path)
        return int(texts["state"].get("generation", 0))
    except (StoreError, KeyError, ValueError, TypeError, AttributeError, OSError):
        return None

def merge_states(states: list[dict[str, Any]], root: Path, order: list[str] | None = None) -> dict[str, Any]:
    """The `Store.describe` of the whole model from those of a distributed store's parts: the records
    are the same in every part; the tensors (or pieces of them, joined again, in the checkpoint's
    `order`) and counts are each part's own."""
    merged = dict(states[0], store=str(root), n=sum(state["n"] for state in states))
    layout = dict(states[0]["layout"])
    layout["skipped"] = join_pieces([t for state in states for t in state["layout"]["skipped"]])
    if all(state["counts"] is not None for state in states):
        rows = whole_rows([tensor_rows(state["layout"]["tensors"], np.asarray(state["counts"]).reshape(
            len(state["layout"]["tensors"]), len(COUNT_COLUMNS))) for state in states], order)
        merged["counts"] = [[row[column] for column in COUNT_COLUMNS] for row in rows]
    else:
        rows = whole_rows([[dict(t, **dict.fromkeys(COUNT_COLUMNS, 0)) for t in state["layout"]["tensors"]]
                           for state in states], order)
    layout["tensors"] = [{"name": row["name"], "shape": row["shape"], "layer_type": row["layer_type"]}
                         for row in rows]
    merged["layout"] = layout
    merged["history"] = []
    for index, entry in enumerate(states[0]["history"]):  # per-tensor counts of each step, joined the same way
        accepted = [dict(t, accepted=count) for state in states for t, count in zip(
            state["layout"]["tensors"], state["history"][index]["per_tensor_accepted"], strict=False)]
        joined = {row["name"]: row["accepted"] for row in join_pieces(accepted, ("accepted",))}
        merged["history"].append(dict(entry, per_tensor_accepted=[joined.get(row["name"], 0) for row in rows]))
    return merged

def snapshot_step(snapshot: Snapshot | Seen, order: str) -> int | None:
    """The step that places a snapshot in training order, as every command shows it.

    Under `step` order it is the step recorded inside the checkpoint, under `name` the number
    in its name; under `mtime` time orders the window, and the step shown is whichever of the
    two the checkpoint has (None when it has neither: show its name instead).
    """
    if order == "step":
        return snapshot.recorded_step
    if order == "name":
        return snapshot.name_step
    return snapshot.recorded_step if snapshot.recorded_step is not None else snapshot.name_step

def layout_from_plan(plan: LayoutPlan, selection: Selection) -> Layout:
    entries, offset = [], 0
    for info in plan.predicted:
        entries.append(TensorEntry(info.name, list(info.shape), str(info.dtype).removeprefix("torch."), offset,
                                   info.numel, layer_type(info.name, info.shape)))
        offset += info.numel
    skipped = [
        {"name": info.name, "shape": list(info.shape), "dtype": str(info.dtype).removeprefix("torch."), "reason": why}
        for info, why in plan.skipped
    ]
    signature = json.dumps([(e.name, e.shape) for e in entries]).encode()
    return Layout(entries, skipped, selection.as_dict(), offset, hashlib.sha256(signature).hexdigest()[:16],
                  plan.objects, plan.adapter)

class Store:
    """An open store; change it only while holding the session's lock, publish with `commit()`."""

    def __init__(self, root: Path, state: dict[str, Any], layout: Layout, history: list[HistoryEntry],
                 arrays: dict[str, np.ndarray]) -> None:
        self.root = Path(root)
        self.folder = Path(state["folder"])
        self.history_len = int(state["history_len"])
        self.capacity = int(state["capacity"])
        self.n = int(state["n"])
        self.dtype_name = str(state["dtype"])
        if self.dtype_name not in STORE_DTYPES or self.capacity != len(state["slots"]):
            raise ValueError("its dtype or its ring of slots is not one pdt makes")
        self.order = str(state.get("order", ORDER_OF_OLD_STORES))
        self.start: int | None = state.get("start")  # Algorithm 1's T_0 (None: as soon as the window is full)
        self.every = int(state.get("every") or 0)  # its T_i
        self.files: list[str] = list(state.get("files") or [])
        # the settings `pdt predict` was last run with (`options.KEPT`); none in a store older than them
        self.settings: dict[str, Any] = dict(state.get("settings") or {})
        self.created = state.get("created")
        self.generation = int(state.get("generation", 0))  # commits so far: the ranks' parts must agree on it
        self.layout = layout
        self.snapshots = {int(k): Snapshot.from_dict(v) for k, v in state["snapshots"].items()}
        self.slots: list[int | None] = list(state["slots"])
        self.window: list[int] = [int(i) for i in state["window"]]
        self.next_id = int(state["next_id"])
        self.next_fit = int(state.get("next_fit", 1))
        self.next_mask = int(state.get("next_mask", 1))
        self.seen = [Seen.from_dict(r) for r in state["ingested"]]
        self.fit = Fit.from_dict(state["fit"]) if state.get("fit") else None
        self.mask = Mask.from_dict(state["mask"]) if state.get("mask") else None
        self.outputs = [Output.from_dict(o) for o in state["outputs"]]
        self.history = history
        self._tell_audits_apart()
        self.pending = Pending.from_dict(state["pending_in_place"]) if state.get("pending_in_place") else None
        sums = SlotSums.from_records(state.get("checksums"), arrays.pop(h5file.SUMS, None), self.capacity, self.n)
        self._arrays = arrays  # the fit's and the mask's; the matrix keeps its own digests
        self.matrix = SnapshotMatrix(self.root / DATA_NAME, self.capacity, self.n, self.dtype, sums, self.holding)
        self._check()

    def _tell_audits_apart(self) -> None:
        """Rows recorded before the history told training steps from audits: a mask or a dry run is an
        audit, and so is a write to an output training does not resume from (`Output.lineage`)."""
        copies = {o.path for o in self.outputs if not o.lineage}
        for entry in self.history:
            if entry.training is None:
                entry.training = entry.command not in AUDIT_COMMANDS and entry.output not in copies

    def _check(self) -> None:
        """Refuse records that disagree with each other (a store made by hand, or a bug): every
        later step would otherwise read the wrong slots or index past an array."""
        offset = 0
        for entry in self.layout.tensors:
            if entry.offset != offset or entry.numel < 0 or not isinstance(entry.name, str):
                raise ValueError(f"its layout does not tile the snapshot vector at {entry.name!r}")
            offset += entry.numel
        if offset != self.n or self.layout.n != self.n:
            raise ValueError("its layout and its snapshot length disagree")
        for snapshot_id, snapshot in self.snapshots.items():
            if snapshot.id != snapshot_id or not 0 <= snapshot.slot < self.capacity \
                    or self.slots[snapshot.slot] != snapshot_id or not isinstance(snapshot.path, str):
                raise ValueError(f"its snapshot {snapshot_id} and its ring of slots disagree")
        held = [i for i in self.slots if i is not None]
        if set(held) != set(self.snapshots) or len(held) != len(set(held)):
            raise ValueError("its ring of slots names snapshots it does not hold")
        if any(i not in self.snapshots for i in self.window) or len(self.window) > self.history_len:
            raise ValueError("its window names snapshots it does not hold")
        if not all(isinstance(r.path, str) for r in [*self.seen, *self.outputs]):
            raise ValueError("a path it recorded is not text")
        tensors = len(self.layout.tensors)
        counts, offsets = self._arrays.get("mask/counts"), self._arrays.get("mask/byte_offsets")
        if counts is not None and counts.shape[0] != tensors or offsets is not None and (
                offsets.shape != (tensors + 1,) or offsets[-1] > len(self._arrays.get("mask/bits", ()))):
            raise ValueError("its stored mask does not match its layout")

    # ---- opening, creating, publishing -------------------------------------------------
    @staticmethod
    def exists(root: Path) -> bool:
        return (Path(root) / META_NAME).is_file()

    @classmethod
    def open(cls, root: Path) -> Store:
        path = Path(root) / META_NAME
        texts, arrays = h5file.read(path)
        try:
            store = cls(Path(root), texts["state"], Layout.from_dict(texts["layout"]),
                        [HistoryEntry.from_dict(h) for h in texts["history"]], arrays)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise StoreError(f"unreadable store ({type(exc).__name__}: {exc})" + h5file.hint(Path(root)),
                             path) from exc
        store.matrix.check()
        return store

    @classmethod
    def create(cls, root: Path, folder: Path, plan: LayoutPlan, selection: Selection, history: int,
               dtype: str | None, order: str, files: list[str], start: int | None = None, every: int = 0) -> Store:
        """A new store; `dtype` None keeps a bf16 or fp16 model in its own dtype (2 bytes a value,
        nothing lost), any other in float32."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        layout = layout_from_plan(plan, selection)
        kinds = {entry.dtype for entry in layout.tensors}
        if dtype is None:
            dtype = kinds.pop() if len(kinds) == 1 and kinds <= set(LOSSLESS_16) else "float32"
        elif dtype in LOSSLESS_16 and kinds != {dtype}:
            raise UsageError(f"--store-dtype {dtype} would round the model's {', '.join(sorted(kinds - {dtype}))} "
                             "tensors; a 16-bit store is only for a model saved in that dtype")
        state = {"folder": str(Path(folder).resolve()), "history_len": history, "capacity": history + 1,
                 "n": layout.n, "dtype": dtype, "order": order, "files": files, "start": start, "every": every,
                 "created": now(),
                 "snapshots": {}, "slots": [None] * (history + 1), "window": [], "next_id": 1,
                 "ingested": [], "fit": None, "mask": None, "outputs": []}
        store = cls(root, state, layout, [], {})
        store.matrix.create()
        store.commit()
        return store

    @staticmethod
    def set_aside(root: Path) -> Path:
        """Move a store's files, unread, into `before-rebuild-<time>/` for `--rebuild`.

        `keep_aside` then drops the old records once a new store is committed (backups of
        `--in-place` writes, the user's original checkpoints, stay there), and `put_back` undoes
        the move when the rebuild itself fails, so a rebuild never leaves less than it found.
        """
        root = Path(root)
        stamp = root / f"before-rebuild-{now().replace(':', '')}"
        tried = itertools.chain([stamp], (Path(f"{stamp}-{i}") for i in itertools.count(2)))
        aside = next(p for p in tried if not p.exists())
        aside.mkdir()  # a second set-aside within the second (after a killed rebuild) gets a name of its own
        for name in (META_NAME, DATA_NAME, BACKUP_DIRNAME):
            if (root / name).exists() or (root / name).is_symlink():
                os.replace(root / name, aside / name)
        return aside

    @staticmethod
    def orphaned_backups(root: Path) -> bool:
        """Whether `root` holds backups of `--in-place` writes but no store records them (a rebuild killed
        after it set store.h5 aside, store.h5 deleted by hand): the only copies of the checkpoints those
        writes replaced, which a new store, recording none, would prune."""
        folder = Path(root) / BACKUP_DIRNAME
        return not Store.exists(root) and folder.is_dir() and not folder.is_symlink() and any(folder.iterdir())

    @staticmethod
    def keep_aside(aside: Path) -> None:
        for name in (META_NAME, DATA_NAME):
            remove_path(aside / name)
        if not any(aside.iterdir()):
            aside.rmdir()

    @staticmethod
    def put_back(root: Path, aside: Path) -> None:
        for name in (META_NAME, DATA_NAME, BACKUP_DIRNAME):
            remove_path(Path(root) / name)
            if (aside / name).exists() or (aside / name).is_symlink():
                os.replace(aside / name, Path(root) / name)
        aside.rmdir()

    def forget(self) -> None:
        """Remove this store's files: a run that made it failed, and leaves nothing behind."""
        self.close()
        for name in (META_NAME, DATA_NAME):
            remove_path(self.root / name)

    def commit(self) -> None:
        """Replace store.h5 atomically with the current records; the matrix is synced first.

        In a distributed step every rank commits its part at the same point, and only once all
        have synced their values: a rank that failed (or died) makes the others stop here. The
        digests of the slots written since the last commit go in with the records that name them.
        """
        self.matrix.sync()
        self.matrix.seal([held is not None for held in self.slots])
        self.generation += 1
        state = {
            "format_version": h5file.FORMAT_VERSION, "pdt_version": __version__, "created": self.created,
            "generation": self.generation,
            "folder": str(self.folder), "history_len": self.history_len, "order": self.order, "files": self.files,
            "start": self.start, "every": self.every, "settings": self.settings,
            "capacity": self.capacity, "n": self.n, "dtype": self.dtype_name,
            "snapshots": {str(k): v.as_dict() for k, v in self.snapshots.items()}, "slots": self.slots,
            "window": self.window, "next_id": self.next_id, "next_fit": self.next_fit, "next_mask": self.next_mask,
            "ingested": [r.as_dict() for r in self.seen], "fit": self.fit.as_dict() if self.fit else None,
            "mask": self.mask.as_dict() if self.mask else None, "outputs": [o.as_dict() for o in self.outputs],
            "pending_in_place": self.pending.as_dict() if self.pending else None,
            "checksums": self.matrix.sums.state(),
        }
        texts = {"state": state, "layout": self.layout.as_dict(), "history": [h.as_dict() for h in self.history]}
        arrays = {**self._arrays, h5file.SUMS: self.matrix.sums.digests}
        world = current()
        matrix = (DATA_NAME, (self.capacity, self.n), self.dtype, self.dtype_name)
        if not world.active:
            h5file.write(self.meta_path, texts, arrays, matrix)
            return
        # two phases: every rank writes (and syncs) its next records beside the current ones; only when all
        # have does each put them in place. A rank killed between the two finds them there on the next run
        # (`roll_forward`), so the parts never stay a commit apart.
        h5file.write(self.root / NEXT_NAME, texts, arrays, matrix)
        try:
            world.agree(True, "committing the store")
        except BaseException:
            remove_path(self.root / NEXT_NAME)  # a commit the ranks did not agree on (a killed rank's: next run)
            raise
        with os_errors_as(StoreError, "cannot commit the store", self.meta_path):
            os.replace(self.root / NEXT_NAME, self.meta_path)
        fsync_dir(self.root)

    def close(self) -> None:
        self.matrix.close()

    def fingerprint(self) -> list:
        """What every rank's part of a distributed store must share: its commits, the records' counters,
        the slots and the window."""
        return [self.generation, self.next_id, self.next_fit, self.next_mask, self.slots, self.window,
                len(self.history), len(self.outputs), len(self.seen), self.history_len, self.start, self.every,
                self.files]

    # ---- what the store is ------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / META_NAME

    @property
    def dtype(self) -> np.dtype:
        """The NumPy type of the matrix's bytes (int16 for bfloat16: see `values`)."""
        return np.dtype(STORE_DTYPES[self.dtype_name])

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype_name)

    def values(self, raw: np.ndarray) -> torch.Tensor:
        """Snapshot values read from the matrix, as a tensor of the store's dtype (no copy)."""
        tensor = torch.from_numpy(raw)
        return tensor.view(torch.bfloat16) if self.dtype_name == "bfloat16" else tensor

    @property
    def tensors(self) -> list[TensorEntry]:
        return self.layout.tensors

    def snapshot(self, snapshot_id: int) -> Snapshot:
        return self.snapshots[snapshot_id]

    def holding(self, slot: int) -> str:
        """What a slot of the matrix holds, as error messages name it."""
        held = self.snapshots.get(self.slots[slot]) if 0 <= slot < self.capacity else None
        if held is None:
            return "no snapshot"
        return f"{'fused ' if held.kind == 'fused' else ''}checkpoint {held.path}"

    def slot_of(self, snapshot_id: int) -> int:
        return self.slots.index(snapshot_id)

    def readable(self, snapshot_id: int | None) -> bool:
        return snapshot_id is not None and snapshot_id in self.slots

    def step_of(self, snapshot: Snapshot | Seen) -> int | None:
        return snapshot_step(snapshot, self.order)

    def in_folder(self, path: str | Path) -> Path:
        """A path the store recorded, checked to be an entry of its checkpoint folder (where every
        checkpoint and resume output lives) before pdt writes there."""
        path = Path(path)
        if path.name in ("", ".", "..") or path.parent.resolve() != self.folder.resolve():
            raise StoreError(f"names {path}, outside its checkpoint folder {self.folder}; refused", self.meta_path)
        return path

    # ---- ingest ---------------------------------------------------------------------------------
    def last_seen(self, path: str) -> Seen | None:
        return next((r for r in reversed(self.seen) if r.path == path), None)

    def duplicate_of(self, digest: str) -> Seen | None:
        """An ingested checkpoint with this content: a copy of it adds no new state to the window."""
        return next((r for r in self.seen if r.sha256 == digest and r.status == "ingested"), None)

    def note_seen(self, record: Seen) -> None:
        """Remember a file that was passed over, so it is neither read nor reported again."""
        self.seen.append(record)

    def newest_checkpoint(self) -> Snapshot | None:
        """The newest checkpoint (not fused state) in the window: new ones must come after it."""
        checkpoints = [self.snapshots[i] for i in self.window if self.snapshots[i].kind == "checkpoint"]
        return checkpoints[-1] if checkpoints else None

    def free_slot(self, keep: set[int]) -> int | None:
        """A slot that holds none of the snapshots in `keep`; empty slots first."""
        for index, held in enumerate(self.slots):
            if held is None:
                return index
        return next((index for index, held in enumerate(self.slots) if held not in keep), None)

    def ingest_slot(self, keep: set[int] = frozenset()) -> tuple[int, Snapshot | None]:
        """Where the next checkpoint's values go, and the snapshot given up for it (see `reinstate`):
        a slot that neither the committed window nor `keep` (snapshots the ingest still reads) uses.
        The ring has h + 1 slots and the window at most h; when `keep` takes the spare one, the
        window's oldest snapshot, which the new checkpoint pushes out of a full window anyway,
        leaves it now.

        That slot may still hold a snapshot the stored fit reads (the checkpoint a fused state
        came from). It is given up first, in a commit of its own, so that a run that fails or is
        killed while writing there leaves a store that knows the fit is gone, never one whose
        fit reads half-overwritten values.
        """
        slot = self.free_slot(set(self.window) | keep)
        if slot is None:
            self.window = self.window[1:]
            slot = self.free_slot(set(self.window) | keep)
        evicted = self.evict(slot)
        if evicted is not None:
            self.commit()
        return slot, evicted

    def write_values(self, slot: int, offset: int, values: torch.Tensor) -> None:
        """Values of a snapshot being written to `slot` (not yet in the window until committed),
        converted to the store's dtype."""
        kept = values.detach().reshape(-1).to(self.torch_dtype).contiguous()
        self.matrix.write(slot, offset, (kept.view(torch.int16) if self.dtype_name == "bfloat16" else kept).numpy())

    def set_files(self, patterns: list[str]) -> None:
        """The `--files` globs later runs keep using."""
        self.files = list(patterns)

    def set_settings(self, values: dict[str, Any]) -> None:
        """The settings later runs take for the flags they are not given (`options.KEPT`)."""
        self.settings = dict(values)

    def set_schedule(self, start: int | None, every: int) -> None:
        """Algorithm 1's T_0 and T_i, while no fused checkpoint was written under other ones."""
        self.start, self.every = start, every

    def set_pending(self, pending: Pending | None) -> None:
        """Note (or clear) an in-place write about to be published (`backups.note_in_place`)."""
        self.pending = pending

    def evict(self, slot: int) -> Snapshot | None:
        """Forget the snapshot `slot` holds, if any, and return it."""
        evicted = self.slots[slot]
        if evicted is None:
            return None
        self.slots[slot] = None
        return self.snapshots.pop(evicted, None)

    def place(self, slot: int, **fields: Any) -> Snapshot:
        snapshot_id = self.next_id
        self.next_id += 1
        self.evict(slot)
        self.slots[slot] = snapshot_id
        snapshot = Snapshot(id=snapshot_id, slot=slot, **fields)
        self.snapshots[snapshot_id] = snapshot
        return snapshot

    def add_checkpoint(self, slot: int, record: Seen) -> int:
        """A checkpoint whose values were just written to `slot` joins the window (line 17 for the
        optimizer's own states); the oldest leaves it when it holds h."""
        snapshot = self.place(slot, kind="checkpoint", path=record.path, size=record.size, mtime=record.mtime,
                               name_step=record.name_step, recorded_step=record.recorded_step, at=record.at,
                               sha256=record.sha256, status=record.status)
        record.id = snapshot.id
        self.seen.append(record)
        self.window = (self.window + [snapshot.id])[-self.history_len:]
        return snapshot.id

    # ---- fit and mask -----------------------------------------------------------------------------

    def fit_of(self, ids: list[int], options: dict) -> Fit | None:
        """The stored fit, if it was made on this window with these options."""
        fit = self.fit
        return fit if fit is not None and fit.window == ids and fit.options == options else None

    def r_of(self, ids: list[int], per_tensor: bool = False) -> np.ndarray | None:
        """The stored QR factor of this window (a new tau or rank needs no new pass over the data): the
        whole model's (h, h), or `per_tensor` one per tensor (T, h, h); None when the store has not that one."""
        if self.fit is None or self.fit.window != ids:
            return None
        r = self._arrays["fit/R"]
        return r if (r.ndim == 3) == per_tensor else None

    def set_fit(self, ids: list[int], options: dict, summary: dict, arrays: dict[str, np.ndarray]) -> Fit:
        self.fit = Fit(id=self.next_fit, window=list(ids), options=options, at=now(), **summary)
        self.next_fit += 1
        self._arrays = {f"fit/{k}": v for k, v in arrays.items()}
        self.mask = None
        return self.fit

    @property
    def coefficients(self) -> np.ndarray:
        """C of the fit: (h, tau), or (T, h, tau) when fitted per tensor (`store.tensors` order)."""
        return self._arrays["fit/C"]

    @property
    def qr_factor(self) -> np.ndarray:
        """R of the fit's window (its column norms bound every value of the window): (h, h), or (T, h, h)
        when fitted per tensor."""
        return self._arrays["fit/R"]

    def fit_readable(self) -> bool:
        return self.fit is not None and all(self.readable(i) for i in self.fit.window)

    def mask_of(self, options: dict) -> Mask | None:
        """The stored mask, if it is of the stored fit and made with these options."""
        mask, fit = self.mask, self.fit
        return mask if mask and fit and mask.fit_id == fit.id and mask.options == options else None

    def set_mask(self, options: dict, label: str, summary: dict, arrays: dict[str, np.ndarray]) -> Mask:
        self.mask = Mask(id=self.next_mask, fit_id=self.fit.id, options=options, label=label, at=now(),
                         totals=summary["model"], by_layer_type=summary["by_layer_type"])
        self.next_mask += 1
        self._arrays.update({f"mask/{k}": v for k, v in arrays.items()})
        return self.mask

    def stored_mask(self) -> dict[str, np.ndarray] | None:
        """Packed accepted bits, their byte offsets per tensor, and per-tensor counts of the stored mask."""
        if self.mask is None or "mask/bits" not in self._arrays:
            return None
        return {name: self._arrays[f"mask/{name}"] for name in ("bits", "byte_offsets", "counts")}

    # ---- lineage: the outputs, and the fused state training resumes from --------------------------

    def append_history(self, command: str, output: str | None, *, training: bool) -> None:
        """A row of history for the fit and mask just used; `training`: training resumes from what the
        run wrote (a step of training), else an audit (`AUDIT_COMMANDS`, a copy written with `-o`)."""
        fit, mask = self.fit, self.mask
        counts = self._arrays["mask/counts"]
        self.history.append(HistoryEntry(
            at=now(), command=command, window_steps=[self.step_of(self.snapshots[i]) for i in fit.window],
            newest=self.snapshots[fit.window[-1]].path, fit_id=fit.id, rank=fit.rank,
            growing_modes=fit.growing_modes, mask=mask.label, totals=mask.totals, by_layer_type=mask.by_layer_type,
            per_tensor_accepted=[int(c) for c in counts[:, 1]], output=output, training=training,
            tau=fit.options.get("tau")))

    # ---- reports ------------------------------------------------------------------------------------
    def view(self, snapshot_id: int) -> dict:
        """A snapshot as reports show it, with the step that orders the window. A fit may outlive the
        snapshots it used (a newer checkpoint took their slot): a checkpoint is then known by what the
        store saw of it (`seen`, by id), a fused state by its output; only what neither names shows as
        its id alone (kind, path, step and name None)."""
        snapshot = self.snapshots.get(snapshot_id)
        if snapshot is not None:
            return {"id": snapshot_id, "kind": snapshot.kind, "path": snapshot.path, "step": self.step_of(snapshot),
                    "name": Path(snapshot.path).name, "descends_from": snapshot.descends_from,
                    "descends_path": snapshot.descends_path, "lineage_evidence": snapshot.lineage_evidence}
        gone = {"id": snapshot_id, "kind": None, "path": None, "step": None, "name": None, "descends_from": None,
                "descends_path": None, "lineage_evidence": None}
        seen = next((r for r in self.seen if r.id == snapshot_id), None)
        if seen is not None:
            return dict(gone, kind="checkpoint", path=seen.path, step=self.step_of(seen), name=Path(seen.path).name)
        output = next((o for o in self.outputs if o.snapshot == snapshot_id), None)
        if output is not None:  # its step is its checkpoint's, which the output does not record: its name says it
            return dict(gone, kind="fused", path=output.path, name=Path(output.path).name)
        return gone

    def describe(self) -> dict[str, Any]:
        """Everything a report shows, as plain data."""
        resumed = lineage.resumed_from(self)
        counts = self._arrays.get("mask/counts")
        return {
            "store": str(self.root), "folder": str(self.folder), "order": self.order, "history_len": self.history_len,
            "schedule": {"start": self.start, "every": self.every, **schedule.next_due(self).as_dict()},
            "waiting": schedule.window_short(self),
            "settings": self.settings,
            "n": self.n, "layout": self.layout.as_dict(),
            "window": [self.view(i) for i in self.window],
            "fit_window": [self.view(i) for i in self.fit.window] if self.fit else [],
            "resumed_from": resumed.path if resumed else None,
            "fit": self.fit.as_dict() if self.fit else None, "mask": self.mask.as_dict() if self.mask else None,
            "history": [h.as_dict() for h in self.history],
            "counts": None if counts is None or self.mask is None else counts.tolist(),
        }
