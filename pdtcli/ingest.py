"""Folder → new snapshots: discover, filter, check, hash, dedup, then copy values into the store.

A run checks every checkpoint it will take in (format, layout, that it holds a state dict)
before it writes a single value, so a bad file in the folder stops the run with the store
as it was. A store made by this run is removed again if any checkpoint then fails while its
values are copied (NaN, a short read). An existing store that takes several new checkpoints
(one commit each) has their values checked finite first, so a NaN anywhere leaves it as it
was too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from . import restart
from .discover import Candidate, list_checkpoints, located
from .errors import CheckpointError, NotACheckpoint, StoreError, UsageError, os_errors_as
from .formats import CheckpointReader, TensorInfo, checkpoint_digest, open_share
from .formats.base import PIECE_MARK
from .identity import Digest, Hashes, HeldStill
from .lazy import torch
from .live import Live
from .options import DEFAULT_HISTORY
from .order import order_key, resolve_order
from .progress import Progress
from .selection import Selection, plan_layout
from .session import Session
from .store import LOSSLESS_16, Store, lineage, now
from .store.records import Seen, Snapshot
from .world import current

log = logging.getLogger(__name__)
Shapes = list[tuple[str, list[int]]]  # (tensor name, shape) of every predicted tensor


def order_rule(s: Session) -> str:
    wanted = s.settings.order
    if s.store is None:
        return wanted or "auto"
    stored = s.store.order
    if wanted not in (None, "auto", stored):
        raise UsageError(f"this store orders checkpoints by {stored}; remove {s.root} to change --order")
    return stored


def _check_store_dtype(s: Session) -> None:
    wanted = s.settings.store_dtype
    if s.store is not None and wanted is not None and wanted != s.store.dtype_name:
        raise UsageError(f"this store keeps snapshots as {s.store.dtype_name}; remove {s.root} to change "
                         "--store-dtype")


def history_len(s: Session) -> int:
    wanted = s.settings.history
    if s.store is None:
        return wanted or DEFAULT_HISTORY
    if wanted is not None and wanted != s.store.history_len:
        raise UsageError(f"this store keeps h={s.store.history_len} snapshots; remove {s.root} to change --history")
    return s.store.history_len


def schedule(s: Session) -> tuple[int | None, int]:
    """Algorithm 1's T_0 and T_i for this store: set when it is made, or by any run before its first
    fused checkpoint, then fixed (like h), since the counter c_e runs from that write."""
    start, every = s.settings.start, s.settings.every
    if s.store is None:
        return start, every or 0
    changed = start is not None and start != s.store.start or every is not None and every != s.store.every
    if changed and lineage.fused_yet(s.store):
        since = "as soon as the window is full" if s.store.start is None else f"from step {s.store.start}"
        raise UsageError(f"this store writes {since} with T_i = {s.store.every} (--every); it has written a fused "
                         f"checkpoint under that schedule: remove {s.root} to change --start or --every")
    if changed:
        s.store.set_schedule(s.store.start if start is None else start, s.store.every if every is None else every)
    return s.store.start, s.store.every


def file_patterns(s: Session) -> tuple[str, ...] | None:
    """`--files` globs of this run, else those the store keeps from an earlier one."""
    if s.settings.files is not None:
        return tuple(s.settings.files) or None
    if s.store is None:
        return None
    return tuple(s.store.files) or None


def _check_selection(s: Session) -> None:
    wanted = s.settings.selection
    if s.store is not None and wanted is not None and wanted.as_dict() != s.store.layout.selection:
        raise UsageError(f"this store was made with {s.store.layout.selection}; "
                         f"remove {s.root} to change --include/--exclude")


def _new_candidates(s: Session, files: tuple[str, ...] | None
                    ) -> tuple[list[Candidate], list[tuple[Candidate, str]], list[tuple[Candidate, str]]]:
    """Checkpoints not seen before and newer than the window, oldest first; those passed over,
    with why; and files found to hold no state dict."""
    store = s.store
    rule = order_rule(s)
    known = lineage.owned_outputs(store) if store else set()
    seen = {cand: store.last_seen(located(cand.path)) if store else None
            for cand in list_checkpoints(s.folder, known, files)}
    unseen = [cand for cand, rec in seen.items() if not (rec and rec.size == cand.size and rec.mtime == cand.mtime)]
    s.order, unseen, dropped = resolve_order(rule, unseen)
    if rule != s.order:
        log.info("training order: %s (asked: %s)", s.order, rule)
    unseen.sort(key=lambda c: (*order_key(c, s.order), c.path.name))
    last = store.newest_checkpoint() if store else None
    newest = order_key(last, s.order) if last else None
    fresh, passed = [], []
    for cand in unseen:
        rec = seen.get(cand)
        rewritten = rec is not None and cand.mtime > rec.mtime  # the same path saved again
        if newest is not None and order_key(cand, s.order) <= newest and not rewritten:
            passed.append((cand, "older than the newest snapshot in the window"))
            continue
        fresh.append(cand)
    return fresh, passed, [(cand, NOT_A_CHECKPOINT) for cand in dropped]


PASSED_OVER = "older than the newest {history} new checkpoints"
SUPERSEDED = "of a new layout that another replaced before h checkpoints of it were saved"
NOT_A_CHECKPOINT = "holds no state dict, so it is not a checkpoint; `--files GLOB` names the checkpoints"


def _layout_of(infos: list[TensorInfo], selection: Selection, path: Path) -> Shapes:
    """What the window predicts of a checkpoint (of this rank's share of it: a rank may own none)."""
    plan = plan_layout(infos, selection)
    if not current().sum(np.array(len(plan.predicted)), "choosing the tensors"):
        raise CheckpointError("no tensor to predict (all were excluded or not floating point)", path)
    return [(info.name, list(info.shape)) for info in plan.predicted]


def _check_layout(expected: Shapes, tensors: list[TensorInfo], path: Path, kept_as: str | None = None,
                  carried: list[tuple[TensorInfo, str]] = ()) -> None:
    """Names and shapes as the window's; with `kept_as` (a 16-bit store), dtypes too: a float32
    tensor (training switched precision) would be rounded to the store's dtype. `carried`: the tensors
    the reader carries (a tied name), which a store made by an older pdt may predict."""
    infos = {info.name: info for info in tensors}
    reasons = {info.name: why for info, why in carried}
    for name, shape in expected:
        info = infos.get(name)
        if info is None and name in reasons:
            raise CheckpointError(f"tensor {name!r} of the window is one pdt now carries ({reasons[name]}); the "
                                  "store was made by an older pdt: `pdt snapshot --rebuild`", path)
        if info is None and PIECE_MARK in name:
            raise CheckpointError(f"tensor piece {name!r} of the window is missing: this checkpoint was saved by "
                                  "another number of ranks than the window's, and a window holds one sharding: once "
                                  "h checkpoints are saved the new way, remove the store and run pdt again", path)
        if info is None:
            raise CheckpointError(f"tensor {name!r} of the window is missing (another model?)", path)
        if list(info.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(info.shape)}, the window has {shape}", path)
        dtype = str(info.dtype).removeprefix("torch.")
        if kept_as is not None and dtype != kept_as:
            raise CheckpointError(f"tensor {name!r} is {dtype}; this store keeps {kept_as} snapshots (the model's "
                                  "dtype when it was made), which would round it: `pdt snapshot --rebuild` makes "
                                  "a store for the new precision", path)


def _checked(s: Session, fresh: list[Candidate], history: int, from_memory: Candidate | None = None,
             hashes: Hashes | None = None) -> tuple[list[restart.Arrival], list[tuple[Candidate, str]]]:
    """The new checkpoints worth reading, oldest first, with their content hashes, each opened
    and compared with the window's layout (that of the oldest, for a new store) before anything
    is written; and the files that turned out to hold no state dict.

    Only the newest h can end up in the window, so older ones are passed over unread; a copy
    of another checkpoint does not count towards the h (it is skipped as a duplicate later).
    Telling copies apart needs the hashes here only when there are more new checkpoints than h;
    otherwise each is hashed in the background while its values are ingested (`Hashes`), which
    on a cron step hides the hash behind the read. The one whose values are `from_memory` is not
    hashed (that would read it whole): its header is all that is read of it.
    """
    chosen: dict[Candidate, Digest] = {}
    opened: dict[Candidate, list[TensorInfo]] = {}
    dropped: list[tuple[Candidate, str]] = []
    distinct: set[str] = set()
    world = current()
    deferred = {}
    # submitted oldest first: the order of ingest (not across ranks, whose hashes meet in a collective)
    if hashes is not None and len(fresh) <= history and not world.active:
        deferred = {cand: hashes.submit(cand.path) for cand in fresh if cand is not from_memory}
    for cand in reversed(fresh):
        if len(distinct) == history:
            break
        digest: Digest = deferred.get(cand) or (None if cand is from_memory else checkpoint_digest(cand.path, world))
        if not isinstance(digest, str) or digest not in distinct:
            try:
                with open_share(cand.path, world) as reader:
                    opened[cand] = reader.tensors()
            except NotACheckpoint:
                dropped.append((cand, NOT_A_CHECKPOINT))
                continue
        chosen[cand] = digest
        distinct.add(digest)
    chosen = dict(reversed(list(chosen.items())))
    opened = dict(sorted(opened.items(), key=lambda item: list(chosen).index(item[0])))
    if s.store is not None:
        selection, window = restart.selection_of(s.store), restart.window_entries(s.store)
        kept_as = s.store.dtype_name if s.store.dtype_name in LOSSLESS_16 else None
    elif opened:  # a new store: the oldest checkpoint sets the layout
        selection = s.settings.selection or Selection()
        oldest = next(iter(opened))
        _layout_of(opened[oldest], selection, oldest.path)
        window = restart.planned_entries(opened[oldest], selection)
        kept_as = restart.kept_dtype(window, s.settings.store_dtype)
    changes = restart.assess(window, kept_as, opened, selection) if opened else {}
    twins = {digest: changes.get(cand) for cand, digest in chosen.items() if cand in opened and isinstance(digest, str)}
    return [restart.Arrival(cand, digest, *(changes.get(cand) or twins.get(digest) or (None, None)))
            for cand, digest in chosen.items()], dropped


def _provenance(cand: Candidate, digest: str | None, status: str, step: int | None) -> Seen:
    return Seen(path=located(cand.path), size=cand.size, mtime=cand.mtime, name_step=cand.name_step,
                recorded_step=step, sha256=digest, status=status, at=now())


def _values(reader: CheckpointReader, name: str, path: Path, live: Live | None) -> Iterator[torch.Tensor]:
    """A tensor's values as consecutive flat pieces: from memory, or as the format reads them (a piece of
    a big tensor at a time where it can)."""
    if live is not None:
        yield live.values(name, path).reshape(-1)
    else:
        for piece in reader.chunks(name):
            yield piece.detach().reshape(-1)


def _duplicate(store: Store | None, cand: Candidate, digest: str | None) -> dict:
    """A note that `cand` has the content of a checkpoint the store has seen (noted in the store
    too), or {} when it has not."""
    duplicate = store.duplicate_of(digest) if store is not None and digest is not None else None
    if duplicate is None:
        return {}
    store.note_seen(_provenance(cand, digest, "duplicate", None))
    return {"path": str(cand.path), "reason": f"same content as {duplicate.path}"}


def _ingest_one(s: Session, cand: Candidate, digest: Digest, history: int, progress: Progress,
                created: bool, live: Live | None) -> tuple[dict, str | None]:
    """One checkpoint into a free slot, its values read from the file or, `live`, from memory; (a note
    when it was a copy, else {}; the line saying what its values showed of the lineage, if anything).

    A hash still being computed (a `Future`) is waited for once the values are written: a copy
    found then leaves its slot uncommitted, free for the next checkpoint (it is waited for first
    when the slot would be the window's oldest and the checkpoint starts as a copy of the newest
    would: that slot could not be put back). When the window ends
    with a fused state (or a checkpoint whose fused state is still held), the values are compared
    with both on the way (`lineage.Evidence`), and the window follows the one training resumed from.
    """
    settings = s.settings
    path = cand.path
    if isinstance(digest, str) and (note := _duplicate(s.store, cand, digest)):
        return note, None
    held = HeldStill(path, cand.size, cand.mtime)
    with open_share(path, current()) as reader:
        if s.store is None:
            selection = settings.selection or Selection()
            plan = plan_layout(reader.tensors(), selection, reader.carried(), reader.objects(), reader.adapter())
            s.store = Store.create(s.root, s.folder, plan, selection, history, settings.store_dtype, s.order,
                                   list(settings.files or ()), *schedule(s))
        store = s.store
        _check_layout([(e.name, e.shape) for e in store.tensors], reader.tensors(), path,
                      store.dtype_name if store.dtype_name in LOSSLESS_16 else None, reader.carried())
        window, pair = list(store.window), lineage.choice(store)
        keep = {snapshot.id for snapshot in pair or ()}
        if pair and isinstance(digest, Future) and store.free_slot(set(window) | keep) is None \
                and _starts_as(store, reader, pair[1], path, live):
            # the window's oldest would give its slot up for what looks like a copy of P: settle it first
            digest = digest.result()
            if note := _duplicate(store, cand, digest):
                return note, None
        slot, evicted = store.ingest_slot(keep)
        evidence = lineage.Evidence.of(store, pair)
        with progress.task(f"ingest {path.name}", store.n) as advance:
            for entry in store.tensors:
                position = 0
                for stored in _values(reader, entry.name, path, live):
                    if not _finite(stored):
                        raise CheckpointError(f"tensor {entry.name!r} holds NaN or Inf", path)
                    values = stored.to(store.torch_dtype)
                    if values.element_size() < stored.element_size() and not _finite(values):
                        raise CheckpointError(f"tensor {entry.name!r} does not fit in this store's {store.dtype_name}"
                                              " (made with --store-dtype); `pdt snapshot --rebuild --store-dtype "
                                              "float64`", path)
                    store.write_values(slot, entry.offset + position, values)
                    if evidence is not None:
                        evidence.add(store, entry.offset + position, values)
                    position += stored.numel()
                    advance(stored.numel())
        step = reader.recorded_step()
    hashed_meanwhile = isinstance(digest, Future)
    if hashed_meanwhile:
        digest = digest.result()
    held.check()  # the values (and the hash) are of one version of the file, the one listed
    if hashed_meanwhile and (note := _duplicate(store, cand, digest)):
        if evicted is not None and evicted.sha256 == digest:  # its values, just written again
            lineage.reinstate(store, evicted, window)
        return note, None
    snapshot_id = store.add_checkpoint(slot, _provenance(cand, digest, "ingested", step))
    said = evidence.settle(store, snapshot_id) if evidence is not None else None
    if not created:  # a store made by this run is committed once, when all its checkpoints are in
        store.commit()
    return {}, said


def _starts_as(store: Store, reader: CheckpointReader, snapshot: Snapshot, path: Path, live: Live | None) -> bool:
    """Whether a checkpoint's first values (its first tensor's, up to a block) are those of `snapshot`: a
    copy of it starts so; a checkpoint saved after more training does not (nearly every value moved)."""
    first = next(iter(_values(reader, store.tensors[0].name, path, live)), None)
    return first is not None and lineage.same_start(store, snapshot, first.to(store.torch_dtype))


def _check_values(store: Store, candidates: list[Candidate], from_memory: Candidate | None, live: Live | None
                  ) -> None:
    """Every value of every new checkpoint finite, before any is written: an existing store takes
    several new checkpoints one commit at a time, so a NaN in a later one would otherwise leave
    the earlier ones in. One sum per tensor (see `_finite`); a first run needs no such pass, as a
    store it made is removed whole on failure, and one new checkpoint has a free slot of its own."""
    for cand in candidates:
        with open_share(cand.path, current()) as reader:
            for entry in store.tensors:
                for values in _values(reader, entry.name, cand.path, live if cand is from_memory else None):
                    if not _finite(values):
                        raise CheckpointError(f"tensor {entry.name!r} holds NaN or Inf", cand.path)


def _finite(values: torch.Tensor) -> bool:
    """Whether every value is finite. A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum
    settles it with one vectorised reduction (about 50x cheaper than a test per element); only a
    sum that is not finite (a bad value, or finite values that overflow) needs the exact test."""
    wide = torch.float32 if values.element_size() < 4 else None  # fp16 sums overflow early
    if bool(torch.isfinite(values.sum(dtype=wide))):
        return True
    return bool(torch.isfinite(values).all())


def ingest(s: Session, live: Live | None = None) -> tuple[list[str], list[dict]]:
    """Take the folder's new checkpoints into the store; (paths ingested, passed over with why, lines on
    the lineage the values showed: `lineage.Evidence.settle`).

    `live`: the newest new checkpoint's values are also in memory and are taken from there.
    """
    if s.folder is None or not s.folder.is_dir():
        raise StoreError("the checkpoint folder of this store is gone", s.folder or s.root)
    _check_selection(s)
    _check_store_dtype(s)
    # what the system refuses here and the store's own files do not name (those are StoreErrors) is
    # reading the folder or a checkpoint: listing it, hashing, opening, reading values
    with Hashes() as hashes, os_errors_as(CheckpointError, "cannot read"):
        return _ingest_all(s, live, hashes)


def _ingest_all(s: Session, live: Live | None, hashes: Hashes) -> tuple[list[str], list[dict], list[str]]:
    scheduled = (s.store.start, s.store.every) if s.store else None
    schedule(s)
    history = history_len(s)
    files = file_patterns(s)
    fresh, passed, dropped = _new_candidates(s, files)
    current().same([c.path.name for c in fresh], "new checkpoints")
    from_memory = live.which(fresh) if live is not None else None
    arrivals, more_dropped = _checked(s, fresh, history, from_memory, hashes)
    dropped += more_dropped
    # new checkpoints too many to fit the window: passed over unread, yet each was an epoch of training
    passed_over = [(cand, PASSED_OVER.format(history=history)) for cand in fresh
                   if cand not in {a.cand for a in arrivals} and cand not in {c for c, _ in more_dropped}]
    if s.store is None and not arrivals:
        names = ", ".join(c.path.name for c, _ in dropped[:3])
        raise UsageError(f"no checkpoints here: {names} {'hold' if len(dropped) > 1 else 'holds'} no state dict"
                         if dropped else "no new checkpoints here", s.folder)
    chosen, waits, run = _sorted_out(s, fresh, arrivals, history, passed_over)
    restarts = waits is None
    skipped = [{"path": str(cand.path), "reason": reason} for cand, reason in passed + passed_over + dropped]
    for cand, reason in passed + passed_over + dropped:
        log.info("skipped %s: %s", cand.path.name, reason)
    for cand in chosen:
        log.info("to ingest: %s (step %s, ordered by %s)", cand.path.name,
                 cand.recorded_step if s.order == "step" else cand.name_step, s.order)
    if restarts:
        s.notes.append(restart.restart_line(run[0], [a for a in run if a.cand in chosen]))
        with restart.restarted(s, next(iter(chosen)).path):
            ingested = _take_in(s, chosen, history, skipped, True, from_memory, live)
            _note_passed(s, None, True, skipped, passed, passed_over, dropped)
        return ingested, skipped
    created = s.store is None
    if not created and len(chosen) > 1:
        _check_values(s.store, list(chosen), from_memory, live)
    try:
        ingested = _take_in(s, chosen, history, skipped, created, from_memory, live)
        _remember(s.store, waits)
        _note_passed(s, scheduled, created, skipped, passed, passed_over, dropped)
    except BaseException:
        if created and s.store is not None:  # a first run that fails (here, or another rank) leaves no store behind
            s.store.forget()
            s.store = None
        raise
    return ingested, skipped


def _sorted_out(s: Session, fresh: list[Candidate], arrivals: list[restart.Arrival], history: int,
                passed_over: list[tuple[Candidate, str]]
                ) -> tuple[dict[Candidate, Digest], list[restart.Arrival] | None, list[restart.Arrival]]:
    """(the checkpoints to ingest; those of a new layout to remember, or None when the window restarts
    on the chosen ones instead; the run of the new layout) from the new ones and those remembered.
    Those passed over on the way are added to `passed_over`, or, when remembered, marked so."""
    same, run, superseded = restart.split((restart.remembered(s.store, fresh) if s.store else []) + arrivals)
    taken = restart.newest(run, history) if s.store is not None and restart.distinct(run) >= history else None
    left = [(a, SUPERSEDED, "skipped") for a in superseded]  # a new layout that another replaced before h of it
    if taken is not None:  # h checkpoints of the new layout: the window restarts on the newest h of them
        left += [(a, PASSED_OVER.format(history=history), "passed-over") for a in same + run if a not in taken]
    for arrival, reason, status in left:
        if arrival.seen is not None:  # remembered by an earlier run: no longer waited for
            arrival.seen.status = status
        else:
            passed_over.append((arrival.cand, reason))
    if taken is not None:
        return {a.cand: a.digest for a in taken}, None, run
    return {a.cand: a.digest for a in same}, [a for a in run if a.seen is None], run


def _remember(store: Store, waits: list[restart.Arrival]) -> None:
    """Note checkpoints of a new layout, so that the window restarts on them once there are h (committed)."""
    for arrival in waits:
        digest = arrival.digest.result() if isinstance(arrival.digest, Future) else arrival.digest
        record = _provenance(arrival.cand, digest, restart.NEW_LAYOUT, arrival.cand.recorded_step)
        record.layout, record.change = arrival.layout, arrival.change
        store.note_seen(record)
    if waits:
        store.commit()


def _take_in(s: Session, chosen: dict[Candidate, Digest], history: int, skipped: list[dict], created: bool,
             from_memory: Candidate | None, live: Live | None) -> list[str]:
    """The chosen checkpoints into the store, oldest first; copies found on the way go to `skipped`, and
    what their values showed of the lineage to the run's notes (`s.notes`)."""
    ingested = []
    for cand, digest in chosen.items():
        note, line = _ingest_one(s, cand, digest, history, s.settings.progress, created,
                                 live if cand is from_memory else None)
        if note:
            skipped.append(note)
        else:
            ingested.append(str(cand.path))
        if line:
            s.notes.append(line)
    return ingested


def _note_passed(s: Session, scheduled: tuple | None, created: bool, skipped: list[dict], passed: list,
                 passed_over: list, dropped: list) -> None:
    """Record what was passed over (so it is not reported again; it counts for the schedule) and commit."""
    store = s.store
    files_changed = s.settings.files is not None and list(s.settings.files) != store.files
    if files_changed:
        store.set_files(list(s.settings.files))
    for status, entries in (("skipped", passed), ("passed-over", passed_over), ("not-a-checkpoint", dropped)):
        for cand, _ in entries:
            store.note_seen(_provenance(cand, None, status, None))
    if created or skipped or files_changed or (scheduled is not None and scheduled != (store.start, store.every)):
        store.commit()
