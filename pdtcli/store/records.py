"""The store's records, typed: what one snapshot, fit, mask, output or step of history holds.

They are written to `store.h5` as JSON with these field names (the names stores have always
used), so the file format does not depend on this module's layout. Reading a record refuses
one that lacks a field without a default: the store then reports itself damaged.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="Record")


def now() -> str:
    """The time a record is made: UTC, ISO 8601, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Record:
    """JSON in, JSON out, by field name."""

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        if not isinstance(data, dict):
            raise ValueError(f"a {cls.__name__} record is not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"a {cls.__name__} record lacks {missing[0]!r}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TensorEntry(Record):
    """One predicted tensor's place in the flat snapshot vector."""

    name: str
    shape: list[int]
    dtype: str
    offset: int
    numel: int
    layer_type: str


@dataclass
class Layout(Record):
    """The predicted tensors, what was carried over and why, and the selection that decided it."""

    tensors: list[TensorEntry]
    skipped: list[dict]
    selection: dict
    n: int
    fingerprint: str = ""
    objects: list[dict] = field(default_factory=list)  # carried, of classes pdt does not know: where, type
    adapter: dict | None = None  # the tensors are a fine-tuning adapter (`CheckpointReader.adapter`), not the model

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        layout = super().from_dict(data)
        layout.tensors = [TensorEntry.from_dict(t) for t in layout.tensors]
        return layout


@dataclass
class Seen(Record):
    """A file or folder the store looked at: ingested, a duplicate, passed over, not a checkpoint, or
    of a new layout that the window waits to restart on (`pdtcli.restart`)."""

    path: str
    size: int
    mtime: float
    name_step: int | None
    recorded_step: int | None
    sha256: str | None
    status: str  # ingested | duplicate | skipped | passed-over | not-a-checkpoint | new-layout
    at: str
    id: int | None = None
    layout: str | None = None  # new-layout: the fingerprint of its layout
    change: str | None = None  # new-layout: how it differs from the window's ("emb.weight 64×16 → 72×16")


@dataclass
class Snapshot(Record):
    """What one ring slot holds: a checkpoint's values, or a fused state training resumed from."""

    id: int
    slot: int
    kind: str  # checkpoint | fused
    path: str
    size: int
    mtime: float
    name_step: int | None
    recorded_step: int | None
    at: str
    sha256: str | None = None
    status: str | None = None
    backup: str | None = None  # checkpoints: where --in-place kept what it replaced
    parent: int | None = None  # fused: the checkpoint it was predicted from
    fit_id: int | None = None
    mask_id: int | None = None
    # checkpoints saved after pdt wrote a fused state: which state training resumed from, "fused" or "plain"
    # (decided from the values at ingest, or kept as assumed: `lineage.Evidence`), that state's path, and the
    # evidence: (d_P - d_F) / (d_P + d_F) of the distances to either state (None: the two states are equal)
    descends_from: str | None = None
    descends_path: str | None = None
    lineage_evidence: float | None = None


@dataclass
class Fit(Record):
    """The latest DMD fit: its window (snapshot ids, oldest first), options, and what it found."""

    id: int
    window: list[int]
    options: dict
    at: str
    rank: int
    singular_values: list[float]
    eigenvalues: list[list[float]]
    eigenvalue_magnitudes: list[float]
    growing_modes: int
    start_offset: float
    per_tensor: dict | None = None  # fits per tensor (`dmd.each_summary`): how many, rank and |λ| ranges


@dataclass
class Mask(Record):
    """The latest mask of a fit, with its totals (per-tensor counts and bits are arrays)."""

    id: int
    fit_id: int
    options: dict
    label: str
    at: str
    totals: dict
    by_layer_type: dict


@dataclass
class Output(Record):
    """A fused checkpoint pdt wrote (or, `live`, loaded into the training model); `lineage`: training
    resumes from it, so it entered the window."""

    path: str
    fit_id: int
    mask_id: int
    snapshot: int | None
    at: str
    size: int = -1  # -1: stores made before outputs were identified (only in-place ones are compared)
    mtime: float = -1.0
    in_place: bool = False
    backup: str | None = None
    lineage: bool | None = None  # None in stores made before audits (-o) were kept out of the window
    restored: str | None = None
    seen_count: int | None = None  # how many files the store had seen when it was written (the schedule's c_e)
    live: bool = False  # loaded into the model in memory by a training-loop callback; `path` is the checkpoint
    resumed: bool | None = None  # what the next checkpoint's values showed: training resumed from it (None: not known)

    def __post_init__(self) -> None:
        if self.lineage is None:
            self.lineage = self.snapshot is not None


@dataclass
class HistoryEntry(Record):
    """One run that masked: a step of training (training resumes from what it wrote), or an audit (a
    mask, a dry run, a copy written elsewhere with `-o`), for the accepted-ratio curves across steps."""

    at: str
    command: str
    window_steps: list[int | None]
    newest: str
    fit_id: int
    rank: int
    growing_modes: int
    mask: str
    totals: dict
    by_layer_type: dict
    per_tensor_accepted: list[int] = field(default_factory=list)
    output: str | None = None
    training: bool | None = None  # None in stores made before audits were told apart (`Store` decides then)
    tau: int | None = None  # how far the fit predicted (a horizon policy changes it per step); None in older stores


@dataclass
class Pending(Record):
    """An in-place output about to be renamed over a checkpoint (see `backups.note_in_place`)."""

    path: str
    backup: str
    size: int
    mtime: float
