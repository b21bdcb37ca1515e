"""A run whose model changes keeps going: the window restarts on h checkpoints of the new layout.

Training that resizes its token embeddings, adds or drops a head, switches a 16-bit model's
precision, or saves with another number of ranks goes on saving into the same folder. Such a
checkpoint cannot join the window (its predicted tensors differ in names, shapes, or, in a 16-bit
store, dtypes). It is remembered instead (a `Seen` record, status `new-layout`, with its layout's
fingerprint and what changed) and the window waits. Once h consecutive checkpoints of one new layout
exist, all newer than the window, that is an ordinary model change: the store restarts on them with
the same settings (`restarted`). A checkpoint of the window's layout saved after one of a new layout
is no model change but two models saving into one folder: an error, never a guess.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .discover import Candidate
from .errors import CheckpointError
from .formats import TensorInfo, open_share
from .formats.base import split_piece
from .identity import Digest, unchanged
from .selection import Selection, plan_layout
from .session import Session
from .store import LOSSLESS_16, Store
from .store.records import Seen
from .world import current

log = logging.getLogger(__name__)
NEW_LAYOUT = "new-layout"
Entries = list[tuple[str, list[int], str]]  # (name, shape, dtype) of every predicted tensor


@dataclass
class Arrival:
    """A checkpoint newer than the window, in training order: of the window's layout (`layout` None),
    or of a new one (its fingerprint, and `change`, what differs). `seen`: remembered by an earlier run."""

    cand: Candidate
    digest: Digest
    layout: str | None = None
    change: str | None = None
    seen: Seen | None = None


def selection_of(store: Store) -> Selection:
    return Selection(tuple(store.layout.selection.get("include", ())), tuple(store.layout.selection.get("exclude", ())))


def window_entries(store: Store) -> Entries:
    return [(e.name, list(e.shape), e.dtype) for e in store.tensors]


def planned_entries(infos: list[TensorInfo], selection: Selection) -> Entries:
    """The predicted tensors of a checkpoint (a rank's share of it) as a window would hold them."""
    plan = plan_layout(infos, selection)
    return [(info.name, list(info.shape), str(info.dtype).removeprefix("torch.")) for info in plan.predicted]


def kept_dtype(entries: Entries, store_dtype: str | None) -> str | None:
    """The 16-bit dtype a store made for these tensors keeps (dtypes are then part of the layout: another
    one would be rounded), or None for a float32 or float64 store."""
    kinds = {dtype for _, _, dtype in entries}
    if store_dtype is None and len(kinds) == 1 and kinds <= set(LOSSLESS_16):
        return kinds.pop()
    return store_dtype if store_dtype in LOSSLESS_16 else None


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def describe(window: Entries, new: Entries, kept_as: str | None) -> str | None:
    """What differs between the window's predicted tensors and a checkpoint's, in a few words
    ("emb.weight 64×16 → 72×16; head2.weight added"), or None when it would join the window."""
    before = {name: (shape, dtype) for name, shape, dtype in window}
    after = {name: (shape, dtype) for name, shape, dtype in new}
    if any(split_piece(n)[1] is not None for n in set(before) ^ set(after)):
        return "saved by another number of ranks: its tensors are split into other pieces"
    words = []
    for name, (shape, dtype) in before.items():
        if name not in after:
            words.append(f"{name} removed")
        elif after[name][0] != shape:
            words.append(f"{name} {_shape(shape)} → {_shape(after[name][0])}")
        elif kept_as is not None and after[name][1] != dtype:
            words.append(f"{name} {dtype} → {after[name][1]} (this store keeps {kept_as})")
    words += [f"{name} added" for name in after if name not in before]
    if not words:
        return None
    return "; ".join(words[:3]) + (f"; {len(words) - 3} more" if len(words) > 3 else "")


def fingerprint(entries: Entries) -> str:
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def assess(window: Entries, kept_as: str | None, opened: dict[Candidate, list[TensorInfo]], selection: Selection
           ) -> dict[Candidate, tuple[str, str]]:
    """The opened checkpoints whose layout differs from the window's: (fingerprint, what changed).

    In a distributed step each rank sees its share; the ranks' answers are joined, so every rank
    decides the same (a change any rank sees is a change of the model)."""
    mine = {}
    for cand, infos in opened.items():
        entries = planned_entries(infos, selection)
        change = describe(window, entries, kept_as)
        mine[cand.path.name] = (fingerprint(entries), change) if change else None
    ranks = current().gather(mine, "comparing layouts")
    found = {}
    for cand in opened:
        seen = [r[cand.path.name] for r in ranks if r.get(cand.path.name)]
        if seen:
            found[cand] = (fingerprint([fp for fp, _ in seen]) if len(ranks) > 1 else seen[0][0], seen[0][1])
    return found


def remembered(store: Store, fresh: list[Candidate]) -> list[Arrival]:
    """The checkpoints of a new layout that earlier runs remembered, oldest first, still in the folder
    as they were (a file since saved over is among the `fresh` ones again; one deleted no longer counts)."""
    latest = {r.path: r for r in store.seen}
    again = {str(c.path) for c in fresh}
    return [Arrival(Candidate(Path(r.path), r.name_step, r.mtime, r.size, r.recorded_step), r.sha256, r.layout,
                    r.change, r)
            for r in store.seen if r.status == NEW_LAYOUT and latest[r.path] is r and r.path not in again
            and unchanged(Path(r.path), r.size, r.mtime)]


def split(arrivals: list[Arrival]) -> tuple[list[Arrival], list[Arrival], list[Arrival]]:
    """(those of the window's layout, the trailing run of one new layout, those of another new layout
    before that run). A window-layout checkpoint after a new-layout one is refused: the model did not
    change, two models save here."""
    old = [i for i, a in enumerate(arrivals) if a.layout is None]
    last_old = old[-1] if old else -1
    changed = next((a for a in arrivals[:max(last_old, 0)] if a.layout is not None), None)
    if changed is not None:
        raise CheckpointError(f"has the window's layout, but {changed.cand.path.name}, saved before it, has another "
                              f"({changed.change}): are two models saving into this folder? Keep one model's "
                              "checkpoints here (`--files GLOB` names them)", arrivals[last_old].cand.path)
    rest = arrivals[last_old + 1:]
    start = len(rest)
    while start > 0 and rest[start - 1].layout == rest[-1].layout:
        start -= 1
    return arrivals[:last_old + 1], rest[start:], rest[:start]


def distinct(run: list[Arrival]) -> int:
    """How many different states a run holds (a copy of a checkpoint is not another one)."""
    return len({a.digest if isinstance(a.digest, str) else id(a) for a in run})


def newest(run: list[Arrival], history: int) -> list[Arrival]:
    """The newest arrivals of a run that hold `history` different states."""
    taken: list[Arrival] = []
    for arrival in reversed(run):
        if distinct(taken) == history and distinct([*taken, arrival]) > history:
            break
        taken.insert(0, arrival)
    return taken


def waiting(store: Store) -> tuple[str, int] | None:
    """(the line, checkpoints still needed) while the window waits for h checkpoints of a new layout."""
    run = remembered(store, [])
    if not run:
        return None
    needed = store.history_len - distinct(run)
    return (f"the model changed at {run[0].cand.path.name} ({run[0].change}); the window restarts once "
            f"{store.history_len} checkpoints of the new layout exist: {needed} more"), needed


def restart_line(changed: Arrival, taken: list[Arrival]) -> str:
    """What a restart says: where the model changed, and the checkpoints the window restarts on."""
    return (f"the model changed at {changed.cand.path.name} ({changed.change}): the window restarts on the "
            f"{distinct(taken)} checkpoints of the new layout, {taken[0].cand.path.name} to "
            f"{taken[-1].cand.path.name}")


@contextlib.contextmanager
def restarted(s: Session, first: Path) -> Iterator[Store]:
    """A new store for the layout of the checkpoint `first`, in place of the session's, for the block
    to ingest into; committed at the end.

    Carried over: h, the order, `--files`, the schedule, the kept settings, the selection, a float64 store's dtype (else
    the new model's dtype decides, as for a new store), and the records that stay true of the folder:
    every checkpoint seen (so none is read or reported again), the outputs pdt wrote (never taken for
    checkpoints; the schedule counts from the last), the history (without its per-tensor counts, which
    name the old tensors), and the counters (an old output's ids never meet a new fit's). The old
    store is set aside as `--rebuild` sets it and dropped only once the new one is committed; backups
    of `--in-place` writes stay in `before-rebuild-<time>/backups/`. Any failure puts the old one back.
    """
    old = s.store
    selection = selection_of(old)
    with open_share(first, current()) as reader:
        plan = plan_layout(reader.tensors(), selection, adapter=reader.adapter())
    if not current().sum(np.array(len(plan.predicted)), "choosing the tensors"):
        raise CheckpointError("no tensor to predict (all were excluded or not floating point)", first)
    old.close()
    aside = Store.set_aside(s.root)
    try:
        s.store = Store.create(s.root, s.folder, plan, selection, old.history_len,
                               "float64" if old.dtype_name == "float64" else None, old.order, list(old.files),
                               old.start, old.every)
        _carry(old, s.store)
        yield s.store
        s.store.commit()
    except BaseException:
        if s.store is not old:
            s.store.forget()
        Store.put_back(s.root, aside)
        s.store = Store.open(s.root)
        raise
    Store.keep_aside(aside)


def _carry(old: Store, new: Store) -> None:
    new.seen = old.seen
    new.settings = old.settings
    new.outputs = old.outputs
    new.history = [replace(entry, per_tensor_accepted=[]) for entry in old.history]
    new.next_id, new.next_fit, new.next_mask = old.next_id, old.next_fit, old.next_mask
    new.generation = max(new.generation, old.generation)
