"""Lineage: which state training resumed from, and what pdt wrote.

After a fused checkpoint that training resumes from is written, the fused state is the newest
snapshot of the window (Algorithm 1, line 17), held in a slot of its own beside the checkpoint
it came from (its `parent`). These rules decide which snapshots the next fit uses, where a
fused state goes, which outputs are still pdt's, and what `pdt restore` undoes. That training
did resume from the fused state is checked when the next checkpoint is ingested (`Evidence`): a
script that resumed from the plain checkpoint, or a `pdt restore` after training went on from
the fused file, is seen in the values, and the window follows what training did. They read and
change the records of a `Store`; the caller commits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..identity import unchanged
from ..lazy import torch
from ..world import current
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
        slot = store.free_slot(set(ids))
        store.evict(slot)  # gone from the records too: a held fused state is read when the next checkpoint comes
        store.commit()
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
                            parent=base.id, fit_id=output.fit_id, mask_id=output.mask_id,
                            # what its checkpoint descends from, for the report of a window that holds it instead
                            descends_from=base.descends_from, descends_path=base.descends_path,
                            lineage_evidence=base.lineage_evidence)
        output.snapshot = fused.id
        store.window = ids[:-1] + [fused.id]
    store.outputs.append(output)
    return output


def reinstate(store: Store, snapshot: Snapshot, window: list[int]) -> None:
    """Put back a snapshot that `ingest_slot` gave up, once its slot holds its values again, and the
    `window` as it was (the snapshot may have been its oldest): the new checkpoint written there turned
    out to be a copy of it (a user's `cp` of the newest checkpoint). Without this, the checkpoint a
    fused state came from would be lost to the next fit."""
    store.slots[snapshot.slot] = snapshot.id
    store.snapshots[snapshot.id] = snapshot
    store.window = list(window)


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


def undo(store: Store, output: Output) -> str | None:
    """Forget an in-place write that was undone: the checkpoint it replaced is the newest again. Its
    fused state stays held, so the next checkpoint's values still show whether training had resumed
    from it (`Evidence`). When a checkpoint that descends from it is in the window already, training
    went on from the fused state, which no restore undoes: it stays in the lineage (and counts for the
    schedule), and the line returned says so."""
    output.restored = now()
    if output.snapshot not in store.window:
        return None
    at = store.window.index(output.snapshot)
    if at == len(store.window) - 1:
        store.window[-1] = store.snapshots[output.snapshot].parent
        return None
    output.resumed = True
    child = Path(store.snapshots[store.window[at + 1]].path).name
    return (f"training had already resumed from the fused state ({child} descends from it): the store keeps it in "
            "the window; only the file was put back")


def output_of(store: Store, snapshot_id: int) -> Output | None:
    """The output whose fused state is snapshot `snapshot_id`."""
    return next((o for o in reversed(store.outputs) if o.snapshot == snapshot_id), None)


def taken(output: Output) -> bool:
    """Whether training took the step `output` is: it resumed from it, as the next checkpoint's values
    showed, or, until one did, as the store assumes (it entered the window and was not restored)."""
    if output.resumed is not None:
        return output.resumed
    return bool(output.lineage) and not output.restored


def loaded_already(store: Store) -> bool:
    """Whether the window's newest state was loaded into a live model (not written by another run)."""
    output = output_of(store, store.window[-1]) if store.window else None
    return output is not None and output.live


# ---- which state a new checkpoint descends from -------------------------------------------------

# Where N less half the step before lies on the line from P (0) to F (1), beyond which the values decide;
# measured on real SGD and AdamW runs, plain resumes gave -0.2..0.37 and fused ones 0.44..1.3 (tests/test_lineage.py).
PLAIN_BELOW, FUSED_ABOVE = 0.35, 0.65
LEAST_APART = 0.5  # F and P must differ by half the step before, or one step of training hides which it left
EVIDENCE_BLOCK = 1 << 18  # elements read from each slot at a time: the memory the evidence takes is bounded


def choice(store: Store) -> tuple[Snapshot, Snapshot] | None:
    """(F, P): a fused state and the checkpoint it came from, both held, when the next checkpoint may
    descend from either: the window ends with F (Algorithm 1, line 17), or with P while F is still
    held (after `pdt restore`). None when the window ends with a checkpoint that has no fused child."""
    if not store.window:
        return None
    last = store.snapshots[store.window[-1]]
    if last.kind == "fused":
        return (last, store.snapshots[last.parent]) if store.readable(last.parent) else None
    children = [s for s in store.snapshots.values() if s.kind == "fused" and s.parent == last.id]
    return (max(children, key=lambda s: s.id), last) if children else None


def same_start(store: Store, snapshot: Snapshot, values: torch.Tensor) -> bool:
    """Whether `values` (in the store's dtype) are the first values of `snapshot`, up to `EVIDENCE_BLOCK`."""
    width = min(values.numel(), EVIDENCE_BLOCK)
    held = store.values(store.matrix.read([store.slot_of(snapshot.id)], 0, width))[0]
    return torch.equal(held, values.reshape(-1)[:width])


@dataclass
class Evidence:
    """Which of a fused state F and its parent P a new checkpoint N descends from, measured while
    N's values are ingested (`add`, chunk by chunk, in increasing offsets), decided by `settle`.

    Training moves a state by about one optimizer step s between checkpoints, so N is about P + s
    or F + s. Only the elements where F and P differ (D = F - P, the accepted ones) tell them
    apart, and only N's move along D does (the rest is the same from both). Where N lies on the
    line from P to F, lambda = (N - P).D / |D|^2, is about s.D / |D|^2 from P and 1 + s.D / |D|^2
    from F: the mask accepts predictions along the motion, so s pulls both towards F. s is not
    known; the step before, s' = P - Q (Q: the window's state before F or P), is: a plain resume
    went on by 0.2 to 1.0 times s' along D, a fused one by -0.5 to 0.9 times (momentum SGD falls
    back after a jump ahead). So the evidence is lambda - (s'.D / |D|^2) / 2, decided below
    `PLAIN_BELOW` or above `FUSED_ABOVE`; in between, or when |D| is under `LEAST_APART` |s'|,
    the values do not settle it. With h = 2 there is no Q (its slot went to N): s' is taken as 0.
    """

    fused: Snapshot
    parent: Snapshot
    before: Snapshot | None
    assumed: str  # what the window says now: "fused" or "plain"
    sums: np.ndarray = field(default_factory=lambda: np.zeros(4))  # |D|^2, (N - P).D, s'.D, |s'|^2 where D != 0

    @classmethod
    def of(cls, store: Store, pair: tuple[Snapshot, Snapshot] | None) -> Evidence | None:
        """The evidence to gather for the next checkpoint, once its slot is chosen (`pair`: `choice`)."""
        if pair is None:
            return None
        fused, parent = pair
        earlier = store.window[-2] if len(store.window) > 1 else None
        return cls(fused, parent, store.snapshots[earlier] if store.readable(earlier) else None,
                   "fused" if store.window[-1] == fused.id else "plain")

    def add(self, store: Store, offset: int, values: torch.Tensor) -> None:
        """Measure values `offset`.. of N (in the store's dtype), reading the same range of P, F (and Q)
        through the checked reads of the matrix, `EVIDENCE_BLOCK` elements at a time."""
        slots = [store.slot_of(s.id) for s in (self.parent, self.fused, self.before) if s is not None]
        flat = values.reshape(-1)
        for a in range(0, flat.numel(), EVIDENCE_BLOCK):
            b = min(flat.numel(), a + EVIDENCE_BLOCK)
            rows = store.values(store.matrix.read(slots, offset + a, offset + b)).to(torch.float64)
            plain = rows[0]
            apart = rows[1] - plain  # 0 where F and P are equal: those elements add nothing to the first three sums
            moved = flat[a:b].to(torch.float64) - plain
            if self.before is None:
                self.sums += [float(apart @ apart), float(moved @ apart), 0.0, 0.0]
                continue
            step = plain - rows[2]
            self.sums += [float(apart @ apart), float(moved @ apart), float(step @ apart),
                          float(step @ (step * (apart != 0)))]

    def settle(self, store: Store, new_id: int) -> str | None:
        """Decide for checkpoint `new_id`, just added to the window right after F or P: record what it
        descends from, put that state before it in the window, and note on F's output whether training
        took it (the schedule counts only steps training took). Returns the one line to tell the user:
        the values contradict what the store assumed, or cannot tell F and P apart; else None."""
        store.matrix.finish_reads()  # every value compared passed its checksum
        apart, moved, step, step_size = current().sum(self.sums, "the lineage evidence")
        close = apart < LEAST_APART ** 2 * step_size  # or equal (0): nothing to tell apart, nothing to say
        evidence = None if close else float((moved - step / 2) / apart)
        verdict = None
        if evidence is not None:
            verdict = "plain" if evidence < PLAIN_BELOW else "fused" if evidence > FUSED_ABOVE else None
        kept = verdict or self.assumed
        state = self.fused if kept == "fused" else self.parent
        new = store.snapshots[new_id]
        new.descends_from, new.descends_path, new.lineage_evidence = kept, state.path, evidence
        store.window[store.window.index(new_id) - 1] = state.id
        output = output_of(store, self.fused.id)
        if verdict is not None and output is not None:
            output.resumed = verdict == "fused"
        name, fused, plain = Path(new.path).name, _named(store, self.fused), Path(self.parent.path).name
        if verdict is None and apart > 0:
            why = ("they differ by less than half a step of training" if close else
                   f"evidence {evidence:.2f}, where 0 is the plain state and 1 the fused one")
            return (f"the values of {name} do not tell whether training resumed from {fused} or from {plain} "
                    f"({why}); the store keeps assuming {fused if kept == 'fused' else plain}")
        if verdict is None or verdict == self.assumed:
            return None
        if verdict == "plain":
            return (f"{name} descends from {plain}, not from {fused}: training resumed from the plain checkpoint, "
                    f"so the window holds {plain} (evidence {evidence:.2f})")
        return (f"{name} descends from {fused}, not from {plain} as restored: training resumed from the fused "
                f"state before `pdt restore`, so the window holds it (evidence {evidence:.2f})")


def _named(store: Store, fused: Snapshot) -> str:
    """A fused state as a user knows it: its file, or the checkpoint it was written over or loaded at."""
    output = output_of(store, fused.id)
    name = Path(fused.path).name
    if output is not None and output.live:
        return f"the fused state loaded into the model at {name}"
    if output is not None and output.in_place:
        return f"the fused state pdt wrote over {name}"
    return f"the fused {name}"


def recorded_backups(store: Store) -> set[str]:
    return {s.backup for s in store.snapshots.values() if s.backup}
