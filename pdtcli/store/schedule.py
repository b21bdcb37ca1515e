"""Algorithm 1's schedule: when the next fused checkpoint is due.

T_0 (`store.start`) is the first step a fused checkpoint may be written at, T_i (`store.every`)
the number of plain checkpoints between two fused ones: the paper's counter c_e. Both are
fixed once a fused checkpoint was written under them (`pdtcli.ingest.schedule`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .lineage import base_window, taken

if TYPE_CHECKING:
    from . import Store


def not_due(store: Store) -> str | None:
    """Why no fused checkpoint is due yet under Algorithm 1's schedule, or None when one is.

    A write is due when the newest checkpoint is at step T_0 (`start`) or later, and T_i
    (`every`) plain checkpoints were ingested since the last fused one training resumed from.
    Under `mtime` order without steps, a checkpoint's place is its number among those ingested.
    """
    place, plain, fused_already = position(store)
    if store.start is not None and place < store.start:
        return (f"the next fused checkpoint is due at checkpoint {store.start} (--start); the newest is "
                f"checkpoint {place}")
    if fused_already:
        return None  # the newest checkpoint was fused already: writing it again is the same step
    if plain < store.every:
        return (f"the next fused checkpoint is due after {store.every - plain} more checkpoint(s) (--every "
                f"{store.every}: {plain} plain since the last fused one)")
    return None


@dataclass(frozen=True)
class Due:
    """When the next fused checkpoint is due: `due_in` checkpoints from now (0: now; None: at a step
    (`--start`) that checkpoints do not count), and the sentence reports print."""

    due_in: int | None
    sentence: str

    def as_dict(self) -> dict:
        """The JSON of `pdt report`'s schedule: `next` (the sentence), `due_in`, `due_now`."""
        return {"next": self.sentence, "due_in": self.due_in, "due_now": self.due_in == 0}


def window_short(store: Store) -> str | None:
    """How many checkpoints the window still lacks before DMD can fit, or None when it is full: before
    the first fit, the one next step every command names."""
    have = len(base_window(store))
    if have >= store.history_len:
        return None
    return (f"need {store.history_len - have} more checkpoint(s) before DMD can fit (window holds {have} of "
            f"{store.history_len})")


def next_due(store: Store) -> Due:
    """When the schedule next allows a fused checkpoint, for reports."""
    place, plain, fused_already = position(store)
    missing = store.history_len - len(base_window(store))  # a fused checkpoint needs a full window first
    first = f"the window needs {missing} more checkpoint(s) first; " if missing > 0 else ""
    if store.start is not None and place < store.start:
        return Due(None, f"{first}the next fused checkpoint is due at checkpoint {store.start}")
    remaining = store.every + 1 if fused_already else store.every - plain
    due_in = max(0, missing, remaining)  # the checkpoints that fill the window are plain ones: they count too
    if due_in == 0:
        return Due(0, "a fused checkpoint is due now")
    return Due(due_in, f"{first}the next fused checkpoint is due after {due_in} more checkpoint(s)")


def every_text(every: int) -> str:
    """--every as a report says it: T_i plain checkpoints between two fused ones (0: a fused one at every
    checkpoint)."""
    return "a fused one at every checkpoint" if every == 0 else f"a fused one after every {every} plain checkpoint(s)"


def position(store: Store) -> tuple[int, int, bool]:
    """Where the newest checkpoint stands in Algorithm 1's schedule.

    (its step, or its number among the checkpoints seen when it has none; c_e, the plain
    checkpoints before it since the last fused one, as the paper counts the epochs without a
    prediction; whether the newest was fused already). New checkpoints passed over unread
    count too: each was an epoch of training.
    """
    epochs = [i for i, r in enumerate(store.seen) if r.status in ("ingested", "passed-over")]
    newest = store.newest_checkpoint()
    step = store.step_of(newest) if newest else None
    last = next((o for o in reversed(store.outputs) if taken(o) and o.snapshot), None)  # the last fused step taken
    if last is None:
        since = len(epochs)
    elif last.seen_count is not None:
        since = len([i for i in epochs if i >= last.seen_count])
    else:  # an output recorded before outputs noted how much had been seen
        since = len([r for r in store.seen if r.status == "ingested" and (r.id or 0) > last.snapshot])
    fused_already = last is not None and newest is not None and newest.id < last.snapshot
    return (step if step is not None else len(epochs)), max(0, since - 1), fused_already
