"""Lineage: which state training resumed from, and what pdt wrote.

After a fused checkpoint that training resumes from is written, the fused state is the newest
snapshot of the window (Algorithm 1, line 17), held in a slot of its own beside the checkpoint
it came from (its `parent`). These rules decide which snapshots the next fit uses, where a
fused state goes, which outputs are still pdt's, and what `pdt restore` undoes. They read and
change the records of a `Store`; the caller commits.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..identity import unchanged
from .records import Output, Snapshot, now

if TYPE_CHECKING:
    from . import Store


def base_window(store: Store) -> list[int]:
    """The window the next fit uses: a trailing fused state is replaced by the checkpoint it came from.

    After a write, the newest snapshot is the fused state (training resumes from it), but
    a refit before the next checkpoint arrives must see the optimizer's own trajectory. When
    that checkpoint's slot was given up (to a new checkpoint that then failed), the fused state
    is left out: fitting from it would predict again from a state no training has moved since,
    so the window waits for the next checkpoint instead.
    """
    window = list(store.window)
    if window:
        last = store.snapshots[window[-1]]
        if last.kind == "fused":
            window[-1:] = [last.parent] if store.readable(last.parent) else []
    return window


def resumed_from(store: Store) -> Snapshot | None:
    """The state training is taken to have resumed from: the newest snapshot of the window."""
    return store.snapshots[store.window[-1]] if store.window else None


def claim_slot(store: Store, ids: list[int]) -> int:
    """A slot for the fused state that the committed store does not depend on.

    If every slot is taken (window + the fit's base), the previous fused state is given
    up first, in a commit of its own, so that no committed snapshot is ever overwritten.
    """
    slot = store.free_slot(set(store.window) | set(ids))
    if slot is None:
        store.window = list(ids)
        store.commit()
        slot = store.free_slot(set(ids))
    return slot


def record_output(store: Store, ids: list[int], path: str, size: int, mtime: float, lineage_slot: int | None,
                  backup: str | None, live: bool = False) -> Output:
    """Record a written output; when training resumes from it (`lineage_slot`: its values are
    there), line 17 of Algorithm 1: the fused state becomes the newest snapshot. A `live` one went
    into the model in memory; `path` is then the checkpoint it was predicted from."""
    output = Output(path=path, fit_id=store.fit.id, mask_id=store.mask.id, snapshot=None, at=now(), size=size,
                    mtime=mtime, in_place=backup is not None, backup=backup, lineage=lineage_slot is not None,
                    seen_count=len(store.seen), live=live)
    if lineage_slot is not None:
        base = store.snapshots[ids[-1]]
        if backup is not None:
            base.backup = backup
        fused = store.place(lineage_slot, kind="fused", path=path, size=size, mtime=mtime,
                            name_step=base.name_step, recorded_step=base.recorded_step, at=output.at,
                            parent=base.id, fit_id=output.fit_id, mask_id=output.mask_id)
        output.snapshot = fused.id
        store.window = ids[:-1] + [fused.id]
    store.outputs.append(output)
    return output


def reinstate(store: Store, snapshot: Snapshot) -> None:
    """Put back a snapshot that `ingest_slot` gave up, once its slot holds its values again: the new
    checkpoint written there turned out to be a copy of it (a user's `cp` of the newest checkpoint).
    Without this, the checkpoint a fused state came from would be lost to the next fit."""
    store.slots[snapshot.slot] = snapshot.id
    store.snapshots[snapshot.id] = snapshot


def written_already(store: Store) -> str | None:
    """The output written from the current fit and mask, if the store's lineage is that output."""
    if not store.window or not store.mask:
        return None
    last = store.snapshots[store.window[-1]]
    if last.kind == "fused" and last.mask_id == store.mask.id and Path(last.path).exists():
        return last.path
    return None


def written_to(store: Store, path: str) -> str | None:
    """`path`, if pdt wrote it from the current fit and mask and it is unchanged since."""
    latest = next((o for o in reversed(store.outputs) if o.path == path), None)
    if latest and store.fit and store.mask and (latest.fit_id, latest.mask_id) == (store.fit.id, store.mask.id) \
            and unchanged(Path(path), latest.size, latest.mtime):
        return path
    return None


def owned_outputs(store: Store) -> set[str]:
    """Output paths that still hold what pdt wrote. An output that training has since saved over
    (in place, or an `-o` copy given a checkpoint's name in the folder, `-o DIR/epoch_7.pt`) is a
    checkpoint again, never passed over as pdt's. Outputs of stores made before outputs were
    identified (size -1) were in-place ones only when compared."""
    latest = {o.path: o for o in store.outputs if not o.live}  # a live output's path is a checkpoint's
    return {path for path, o in latest.items()
            if (o.size < 0 and not o.in_place) or unchanged(Path(path), o.size, o.mtime)}


def fused_yet(store: Store) -> bool:
    """Whether a fused checkpoint training resumes from was ever written from this store."""
    return any(o.lineage for o in store.outputs)


def latest_in_place(store: Store, path: str | None) -> Output | None:
    """The latest in-place write not yet undone (to `path`, if given)."""
    return next((o for o in reversed(store.outputs) if o.in_place and not o.restored
                 and (path is None or o.path == path)), None)


def undo(store: Store, output: Output) -> None:
    """Forget an in-place write that was undone: the checkpoint it replaced is the newest again."""
    if store.window and store.window[-1] == output.snapshot:
        store.window[-1] = store.snapshots[output.snapshot].parent
    output.restored = now()


def recorded_backups(store: Store) -> set[str]:
    return {s.backup for s in store.snapshots.values() if s.backup}
