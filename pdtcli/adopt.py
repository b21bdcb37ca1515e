"""A run folder copied or renamed takes its store along (`cp -a runs/a runs/b`, `mv runs/a runs/b`).

The store in the folder's own `.pdt` then names the old folder. When the checkpoints of its window are
found in the new folder under the same names with the same content (SHA-256), the store is this
folder's own: every path it recorded inside the old folder (checkpoints, outputs, backups, an
unfinished in-place write, the history) is moved to the same place in the new one. Otherwise it is
refused, naming `pdt snapshot --rebuild`. The old folder, which may still hold its own store, is
never opened: only its name is replaced. Which store may be adopted at all (only the folder's own
`.pdt`, never one given with `--store`) is the session's rule.
"""

from __future__ import annotations

from pathlib import Path

from .errors import StoreError, os_errors_as
from .formats import checkpoint_digest
from .identity import unchanged
from .store import Store, lineage
from .store.records import Snapshot
from .world import World


def adopt(store: Store, folder: Path, world: World, *, commit: bool) -> str:
    """Make `store`, found in `folder`'s own `.pdt` but made for another folder, `folder`'s; the line
    that says so. StoreError naming `--rebuild` when a checkpoint of its window is not the same here.
    `commit`: record it (a command that only reads adopts it for itself)."""
    old, new = Path(store.folder), Path(folder).resolve()
    for snapshot_id in lineage.base_window(store):
        snapshot = store.snapshot(snapshot_id)
        if snapshot.kind == "checkpoint" and not _found(snapshot, old, new, world):
            raise StoreError(f"this store was made for {old}, and its checkpoint {Path(snapshot.path).name} is not "
                             "the same here; `pdt snapshot --rebuild` makes a store for this folder", store.root)
    _move_paths(store, old, new)
    if commit:
        store.commit()
    return f"this store was made for {old}; its checkpoints are here: adopted for {new}"


def _moved(path: str | None, old: Path, new: Path) -> str | None:
    """`path` at the same place under `new` when it lies under `old`; else as it was (an audit copy written
    elsewhere, or a path the store's own checks refuse when it is used)."""
    if path is None or not Path(path).is_relative_to(old):
        return path
    return str(new / Path(path).relative_to(old))


def _found(snapshot: Snapshot, old: Path, new: Path, world: World) -> bool:
    """Whether a window checkpoint is in `new` as it was ingested: by content, in its place or, when an
    in-place write replaced it, as its backup; by size and time when its hash was never taken (its
    values came from a training loop's memory)."""
    here = [Path(p) for p in (_moved(snapshot.path, old, new), _moved(snapshot.backup, old, new)) if p is not None]
    with os_errors_as(StoreError, "cannot read a checkpoint of the store's window"):
        if snapshot.sha256 is None:
            return unchanged(here[0], snapshot.size, snapshot.mtime)
        return any(path.exists() and checkpoint_digest(path, world) == snapshot.sha256 for path in here)


def _move_paths(store: Store, old: Path, new: Path) -> None:
    for snapshot in store.snapshots.values():
        snapshot.path, snapshot.backup = _moved(snapshot.path, old, new), _moved(snapshot.backup, old, new)
    for record in [*store.seen, *store.outputs]:
        record.path = _moved(record.path, old, new)
    for output in store.outputs:
        output.backup = _moved(output.backup, old, new)
    for entry in store.history:
        entry.newest, entry.output = _moved(entry.newest, old, new), _moved(entry.output, old, new)
    if store.pending is not None:
        store.pending.path, store.pending.backup = (_moved(store.pending.path, old, new),
                                                    _moved(store.pending.backup, old, new))
    store.folder = new
