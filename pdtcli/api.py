"""One PDT step as library functions, in the order of Algorithm 1.

`snapshot` ingests new checkpoints into the store (line 17 for the optimizer's states),
`predict` fits DMD on the window (line 6), predicts tau steps ahead (lines 7-8), masks
(line 9) and writes the fused checkpoint (lines 10-11), recording it as the state
training resumes from (line 17 again). `remask`, `apply` and `report_data` are the same
step taken apart for audits. Each reads what the stage before left in the store and
recomputes nothing that is still valid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .backups import backup_path, copy_back, prune_backups
from .discover import ORDERS, Candidate, is_pdt_output, list_checkpoints, order_key, output_name, resolve_order
from .dmd import FitOptions, solve
from .errors import CheckpointError, OutputError, StageMissing, StoreError, UsageError
from .formats import open_checkpoint
from .fuse import DEFAULT_BLOCK, Predictor, Window, pick_device
from .identity import sha256_path, stat_of, unchanged
from .mask import MaskOptions
from .progress import NoProgress, Progress
from .report import summarize_counts
from .selection import Selection, plan_layout
from .store import Store, clean_leftovers, lock_for, now, resolve_store_root, snapshot_step

DEFAULT_HISTORY = 5


@dataclass
class Settings:
    """What a run may change; everything has the paper's default."""

    history: int | None = None
    fit: FitOptions = field(default_factory=FitOptions)
    mask: MaskOptions = field(default_factory=MaskOptions)
    selection: Selection | None = None
    device: str = "auto"
    block: int = DEFAULT_BLOCK
    store_dtype: str = "float32"
    order: str | None = None  # auto | name | step | mtime; None: the store's, or auto for a new store
    lock_timeout: float = 60.0
    progress: Progress = field(default_factory=NoProgress)


@dataclass
class StepResult:
    """What a command did, for the CLI's summary and for `--json`."""

    status: str  # written | dry-run | masked | up-to-date | waiting | ingested
    message: str
    store: str
    ingested: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    needed: int = 0
    output: str | None = None
    fit: dict | None = None
    mask: dict | None = None

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# ---- sessions: resolve, lock, open --------------------------------------------------


@dataclass
class Session:
    root: Path
    folder: Path | None
    store: Store | None
    settings: Settings
    order: str = "name"


@contextlib.contextmanager
def session(target: Path, store: Path | None, settings: Settings) -> Iterator[Session]:
    """Hold the store's lock for the whole command; a second pdt waits, then fails clearly."""
    root, folder = resolve_store_root(Path(target), store)
    lock = lock_for(root, settings.lock_timeout)
    try:
        lock.acquire()
    except Exception as exc:  # filelock.Timeout
        raise StoreError(f"locked by another pdt process (waited {settings.lock_timeout:g}s; --wait to wait longer)",
                         root) from exc
    try:
        clean_leftovers(root, folder)
        opened = Store.open(root) if Store.exists(root) else None
        if opened is not None and folder is not None and opened.folder.resolve() != folder.resolve():
            raise StoreError(f"this store belongs to another folder ({opened.folder})", root)
        state = Session(root, folder if folder is not None else (opened.folder if opened else None), opened, settings)
        try:
            yield state
        finally:
            if state.store is not None:
                state.store.close()
    finally:
        lock.release()


def _require_store(s: Session) -> Store:
    if s.store is None:
        raise StageMissing("no store yet; run `pdt snapshot` or `pdt predict` on the checkpoint folder first", s.root)
    return s.store


# ---- ingest (snapshot) --------------------------------------------------------------


def _pdt_owned_outputs(store: Store) -> set[str]:
    """Output paths that still hold what pdt wrote. An in-place output that training has since
    saved over is a checkpoint again (the same path, the next epoch)."""
    latest = {o["path"]: o for o in store.state["outputs"]}
    return {path for path, o in latest.items()
            if not o.get("in_place") or unchanged(Path(path), o)}


def _order_rule(s: Session) -> str:
    wanted = s.settings.order
    if wanted is not None and wanted not in ORDERS:
        raise UsageError(f"--order {wanted!r}: use one of {', '.join(ORDERS)}")
    if s.store is None:
        return wanted or "auto"
    stored = s.store.state.get("order", "name")  # stores made before --order existed ordered by name
    if wanted not in (None, "auto", stored):
        raise UsageError(f"this store orders checkpoints by {stored}; remove {s.root} to change --order")
    return stored


def _new_candidates(s: Session) -> tuple[list[Candidate], list[tuple[Candidate, str]]]:
    """Checkpoints not seen before and newer than the window, oldest first; and the passed over, with why."""
    store = s.store
    rule = _order_rule(s)
    known_outputs = _pdt_owned_outputs(store) if store else set()
    seen = {rec["path"]: rec for rec in store.state["ingested"]} if store else {}
    unseen = []
    for cand in list_checkpoints(s.folder, known_outputs):
        rec = seen.get(str(cand.path.resolve()))
        if not (rec and rec["size"] == cand.size and rec["mtime"] == cand.mtime):
            unseen.append(cand)
    s.order, unseen = resolve_order(rule, unseen)
    unseen.sort(key=lambda c: (*order_key(c, s.order), c.path.name))
    newest = None
    if store and store.state["window"]:
        checkpoints = [store.record(i) for i in store.state["window"] if store.record(i)["kind"] == "checkpoint"]
        if checkpoints:
            newest = order_key(checkpoints[-1], s.order)
    fresh, passed = [], []
    for cand in unseen:
        rec = seen.get(str(cand.path.resolve()))
        rewritten = rec is not None and cand.mtime > rec["mtime"]  # the same path saved again
        if newest is not None and order_key(cand, s.order) <= newest and not rewritten:
            passed.append((cand, "older than the newest snapshot in the window"))
            continue
        fresh.append(cand)
    return fresh, passed


def _check_layout(store: Store, reader, path: Path) -> None:
    infos = {info.name: info for info in reader.tensors()}
    for entry in store.tensors:
        info = infos.get(entry["name"])
        if info is None:
            raise CheckpointError(f"tensor {entry['name']!r} of the window is missing (another model?)", path)
        if list(info.shape) != entry["shape"]:
            raise CheckpointError(
                f"tensor {entry['name']!r} has shape {list(info.shape)}, the window has {entry['shape']}", path)


def _ingest_one(s: Session, cand: Candidate, digest: str, history: int, progress: Progress) -> dict:
    settings = s.settings
    path = cand.path
    if s.store is not None:
        duplicate = next((r for r in s.store.state["ingested"]
                          if r["sha256"] == digest and r.get("status") == "ingested"), None)
        if duplicate is not None:
            s.store.state["ingested"].append(_provenance(cand, digest, "duplicate", None))
            return {"path": str(path), "reason": f"same content as {duplicate['path']}"}
    with open_checkpoint(path) as reader:
        if s.store is None:
            selection = settings.selection or Selection()
            plan = plan_layout(reader.tensors(), selection)
            if not plan.predicted:
                raise CheckpointError("no tensor to predict (all were excluded or not floating point)", path)
            s.store = Store.create(s.root, s.folder, plan, selection, history, settings.store_dtype, s.order)
        store = s.store
        _check_layout(store, reader, path)
        slot = store.free_slot(keep=set(store.state["window"]))
        store_dtype = torch.float64 if store.dtype == np.float64 else torch.float32
        with progress.task(f"ingest {path.name}", store.n) as advance:
            for entry in store.tensors:
                values = reader.read(entry["name"]).detach().reshape(-1).to(store_dtype)
                if not bool(torch.isfinite(values).all()):
                    raise CheckpointError(f"tensor {entry['name']!r} holds NaN or Inf", path)
                store.write_segment(slot, entry["offset"], values.numpy())
                advance(entry["numel"])
        step = reader.recorded_step()
    record = _provenance(cand, digest, "ingested", step)
    store.sync()
    snapshot_id = store.place(slot, dict(record, kind="checkpoint"))
    record["id"] = snapshot_id
    store.state["ingested"].append(record)
    store.state["window"] = (store.state["window"] + [snapshot_id])[-history:]
    store.commit()
    return {}


def _provenance(cand: Candidate, digest: str | None, status: str, step: int | None) -> dict:
    return {
        "path": str(cand.path.resolve()),
        "size": cand.size,
        "mtime": cand.mtime,
        "name_step": cand.name_step,
        "recorded_step": step,
        "sha256": digest,
        "status": status,
        "at": now(),
    }


def _history_len(s: Session) -> int:
    wanted = s.settings.history
    if s.store is None:
        history = wanted or DEFAULT_HISTORY
        if history < 2:
            raise UsageError("--history must be at least 2 (DMD needs a step to learn from)")
        return history
    if wanted is not None and wanted != s.store.history_len:
        raise UsageError(f"this store keeps h={s.store.history_len} snapshots; remove {s.root} to change --history")
    return s.store.history_len


def _check_selection(s: Session) -> None:
    wanted = s.settings.selection
    if s.store is not None and wanted is not None and wanted.as_dict() != s.store.state["layout"]["selection"]:
        raise UsageError(f"this store was made with {s.store.state['layout']['selection']}; "
                         f"remove {s.root} to change --include/--exclude")


def _newest_distinct(fresh: list[Candidate], history: int) -> dict[Candidate, str]:
    """The new checkpoints worth reading, oldest first, with their content hashes.

    Only the newest h can end up in the window, so older ones are passed over unread; a copy
    of another checkpoint does not count towards the h (it is skipped as a duplicate later).
    """
    chosen: dict[Candidate, str] = {}
    distinct: set[str] = set()
    for cand in reversed(fresh):
        if len(distinct) == history:
            break
        digest = sha256_path(cand.path)
        chosen[cand] = digest
        distinct.add(digest)
    return dict(reversed(list(chosen.items())))


def _ingest(s: Session) -> tuple[list[str], list[dict]]:
    if s.folder is None or not s.folder.is_dir():
        raise StoreError("the checkpoint folder of this store is gone", s.folder or s.root)
    _check_selection(s)
    history = _history_len(s)
    fresh, passed = _new_candidates(s)
    chosen = _newest_distinct(fresh, history)
    passed += [(cand, f"older than the newest {history} new checkpoints") for cand in fresh if cand not in chosen]
    skipped = [{"path": str(cand.path), "reason": reason} for cand, reason in passed]
    ingested = []
    for cand, digest in chosen.items():
        note = _ingest_one(s, cand, digest, history, s.settings.progress)
        if note:
            skipped.append(note)
        else:
            ingested.append(str(cand.path))
    if skipped and s.store is not None:  # remember what was passed over, so it is not reported again
        for cand, _ in passed:
            s.store.state["ingested"].append(_provenance(cand, None, "skipped", None))
        s.store.commit()
    return ingested, skipped


def snapshot(target: Path, *, store: Path | None = None, settings: Settings | None = None) -> StepResult:
    """Ingest the checkpoints in `target` that the store has not seen."""
    settings = settings or Settings()
    with session(target, store, settings) as s:
        ingested, skipped = _ingest(s)
        st = _require_store(s)
        have = len(_base_window(st))
        message = (f"ingested {len(ingested)} checkpoint(s); window holds {have} of {st.history_len}"
                   if ingested else f"nothing new; window holds {have} of {st.history_len}")
        return StepResult("ingested" if ingested else "up-to-date", message, str(s.root), ingested, skipped,
                          needed=max(0, st.history_len - have))


# ---- fit ----------------------------------------------------------------------------


def _base_window(store: Store) -> list[int]:
    """The window the next fit uses: a trailing fused state is replaced by the checkpoint it came from.

    After `apply`, the newest snapshot is the fused state (training resumes from it), but
    a refit before the next checkpoint arrives must see the optimizer's own trajectory.
    """
    window = list(store.state["window"])
    if window:
        last = store.record(window[-1])
        if last["kind"] == "fused" and store.readable(last["parent"]):
            window[-1] = last["parent"]
    return window


def _window(store: Store, ids: list[int], settings: Settings) -> Window:
    return Window(store, [store.slot_of(i) for i in ids], pick_device(settings.device), settings.block)


def _ensure_fit(store: Store, ids: list[int], settings: Settings) -> dict:
    """The fit for this window and these options: reused when valid, else solved (from R if valid)."""
    current = store.state["fit"]
    options = settings.fit.as_dict()
    if current and current["window"] == ids and current["options"] == options:
        return current
    if current and current["window"] == ids:
        r = store.arrays["fit/R"]
    else:
        with settings.progress.task("fit: QR of the window", 1) as advance:
            r = _window(store, ids, settings).qr_factor()
            advance(1)
    fit = solve(r, settings.fit)
    fit_id = int(store.state.get("next_fit", 1))
    store.state["next_fit"] = fit_id + 1
    store.state["fit"] = {"id": fit_id, "window": ids, "options": options, "at": now(), **fit.summary()}
    store.arrays = {
        "fit/R": r,
        "fit/C": fit.coefficients,
        "fit/singular_values": fit.singular_values,
        "fit/eigenvalues": fit.eigenvalues,
    }
    store.state["mask"] = None
    return store.state["fit"]


def _mask_valid(store: Store, options: MaskOptions) -> bool:
    mask, fit = store.state["mask"], store.state["fit"]
    return bool(mask and fit and mask["fit_id"] == fit["id"] and mask["options"] == options.as_dict())


# ---- the second pass: mask, and fuse when there is a writer --------------------------


def _run_pass(s: Session, ids: list[int], options: MaskOptions, *, output: Path | None, force: bool,
              use_stored: bool, backup: Path | None = None) -> dict:
    """Pass 2 over every predicted tensor; with `output`, write the fused checkpoint too."""
    store = s.store
    settings = s.settings
    predictor = Predictor(_window(store, ids, settings), store.arrays["fit/C"], options)
    entries = {e["name"]: (i, e) for i, e in enumerate(store.tensors)}
    stored_bits = store.arrays.get("mask/bits") if use_stored else None
    byte_offsets = store.arrays.get("mask/byte_offsets") if use_stored else None
    counts = np.zeros((len(store.tensors), 6), dtype=np.int64)
    bits: list[np.ndarray | None] = [None] * len(store.tensors)
    lineage_slot = None

    def one(index: int, entry: dict, original: torch.Tensor | None):
        given = None
        if stored_bits is not None:
            given = stored_bits[byte_offsets[index]:byte_offsets[index + 1]]
        result = predictor.run(entry, original, given, lineage_slot)
        counts[index] = result.counts if given is None else store.arrays["mask/counts"][index]
        bits[index] = result.bits
        advance(entry["numel"])
        return result.fused

    with settings.progress.task("predict + mask" + (" + write" if output else ""), store.n) as advance:
        if output is None:
            for index, entry in enumerate(store.tensors):
                one(index, entry, None)
        else:
            replaceable = force or is_pdt_output(output)
            if output.exists() and not replaceable:
                raise OutputError("exists; pass --force to replace it", output)
            lineage_slot = _lineage_slot(s, ids)
            source = _source_of(store.record(ids[-1]))
            with atomic_path(output, force=replaceable, backup_to=backup) as tmp, open_checkpoint(source) as reader:
                def replace(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
                    found = entries.get(name)
                    return None if found is None else one(found[0], found[1], tensor)

                reader.write_fused(tmp, replace)
            store.sync()
    sizes = [len(b) for b in bits]
    return {
        "counts": counts,
        "bits": np.concatenate(bits) if bits else np.zeros(0, np.uint8),
        "byte_offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "lineage_slot": lineage_slot,
    }


def _source_of(record: dict) -> Path:
    """The checkpoint whose non-predicted content the output carries over: the newest of the
    window, or its backup when an in-place write has replaced it."""
    source = Path(record["path"])
    backup = Path(record["backup"]) if record.get("backup") else None
    if backup is not None and backup.exists() and (not source.exists() or stat_of(source) != stat_of(backup)):
        source = backup
    if not source.exists():
        raise CheckpointError("the newest checkpoint of the window is gone; its non-predicted content "
                              "cannot be carried over", source)
    if not unchanged(source, record) and sha256_path(source) != record["sha256"]:
        raise CheckpointError("the newest checkpoint changed since it was ingested; run `pdt snapshot` again", source)
    return source


def _lineage_slot(s: Session, ids: list[int]) -> int:
    """A slot for the fused state that the committed store does not depend on.

    If every slot is taken (window + the fit's base), the previous fused state is given
    up first, in a commit of its own, so that no committed snapshot is ever overwritten.
    """
    store = s.store
    keep = set(store.state["window"]) | set(ids)
    slot = store.free_slot(keep)
    if slot is None:
        store.state["window"] = list(ids)
        store.commit()
        slot = store.free_slot(set(ids))
    return slot


def _store_mask(store: Store, options: MaskOptions, result: dict) -> dict:
    totals = summarize_counts(store.tensors, result["counts"])
    mask_id = int(store.state.get("next_mask", 1))
    store.state["next_mask"] = mask_id + 1
    store.state["mask"] = {
        "id": mask_id,
        "fit_id": store.state["fit"]["id"],
        "options": options.as_dict(),
        "label": options.label,
        "at": now(),
        "totals": totals["model"],
        "by_layer_type": totals["by_layer_type"],
    }
    store.arrays.update({
        "mask/bits": result["bits"],
        "mask/byte_offsets": result["byte_offsets"],
        "mask/counts": result["counts"],
    })
    return store.state["mask"]


def _record_history(store: Store, command: str, output: str | None) -> None:
    fit, mask = store.state["fit"], store.state["mask"]
    steps = [snapshot_step(store.record(i), store.state.get("order", "name")) for i in fit["window"]]
    store.state["history"].append({
        "at": now(),
        "command": command,
        "window_steps": steps,
        "newest": store.record(fit["window"][-1])["path"],
        "fit_id": fit["id"],
        "rank": fit["rank"],
        "growing_modes": fit["growing_modes"],
        "mask": mask["label"],
        "totals": mask["totals"],
        "by_layer_type": mask["by_layer_type"],
        "per_tensor_accepted": [int(c) for c in store.arrays["mask/counts"][:, 1]],
        "output": output,
    })


def _commit_output(s: Session, ids: list[int], output: Path, lineage_slot: int, backup: Path | None = None) -> None:
    """Line 17 of Algorithm 1: the fused state becomes the newest snapshot."""
    store = s.store
    base = store.record(ids[-1])
    if backup is not None:
        base["backup"] = str(backup.resolve())
    size, mtime = stat_of(output)
    record = {
        "kind": "fused",
        "parent": ids[-1],
        "path": str(output.resolve()),
        "size": size,
        "mtime": mtime,
        "name_step": base.get("name_step"),
        "recorded_step": base.get("recorded_step"),
        "fit_id": store.state["fit"]["id"],
        "mask_id": store.state["mask"]["id"],
        "at": now(),
    }
    fused_id = store.place(lineage_slot, record)
    store.state["window"] = ids[:-1] + [fused_id]
    store.state["outputs"].append({
        "path": str(output.resolve()), "fit_id": record["fit_id"], "mask_id": record["mask_id"],
        "snapshot": fused_id, "at": record["at"], "size": size, "mtime": mtime,
        "in_place": backup is not None, "backup": base.get("backup") if backup is not None else None,
    })


def _write_output(s: Session, ids: list[int], options: MaskOptions, *, output: Path | None, force: bool,
                  in_place: bool, use_stored: bool, command: str) -> Path:
    """Pass 2 with a writer, then line 17 (the output becomes the newest snapshot), committed.

    In place, the output is the newest checkpoint's own path; what it held is kept as a
    backup (once: a second write from the same checkpoint must not back up pdt's output).
    """
    store = s.store
    base = store.record(ids[-1])
    backup = None
    if in_place:
        if output is not None:
            raise UsageError("--in-place writes over the newest checkpoint; it takes no --output")
        out, backup = Path(base["path"]), backup_path(store, base)
    else:
        out = Path(output) if output else output_name(Path(base["path"]))
    fresh_backup = backup if backup is not None and not backup.exists() else None
    result = _run_pass(s, ids, options, output=out, force=force or in_place, use_stored=use_stored,
                       backup=fresh_backup)
    if not use_stored:
        _store_mask(store, options, result)
    _commit_output(s, ids, out, result["lineage_slot"], backup)
    _record_history(store, command, str(out.resolve()))
    store.commit()
    if backup is not None:
        prune_backups(store)
    return out


def _written_already(store: Store) -> str | None:
    """The output written from the current fit and mask, if the store's lineage is that output."""
    window, mask = store.state["window"], store.state["mask"]
    if not window or not mask:
        return None
    last = store.record(window[-1])
    if last["kind"] == "fused" and last["mask_id"] == mask["id"] and Path(last["path"]).exists():
        return last["path"]
    return None


def _waiting(s: Session, ingested: list[str], skipped: list[dict]) -> StepResult | None:
    store = s.store
    have = len(_base_window(store)) if store else 0
    history = store.history_len if store else _history_len(s)
    if have >= history:
        return None
    need = history - have
    return StepResult("waiting", f"need {need} more checkpoint(s) before DMD can fit "
                      f"(window holds {have} of {history})", str(s.root), ingested, skipped, needed=need)


def predict(target: Path, *, store: Path | None = None, output: Path | None = None, dry_run: bool = False,
            force: bool = False, in_place: bool = False, settings: Settings | None = None) -> StepResult:
    """The whole step: ingest, fit, mask, and (unless `dry_run`) write the fused checkpoint."""
    settings = settings or Settings()
    with session(target, store, settings) as s:
        ingested, skipped = _ingest(s)
        waiting = _waiting(s, ingested, skipped)
        if waiting:
            return waiting
        st = s.store
        ids = _base_window(st)
        fit_before, mask_before = st.state["fit"], st.state["mask"]
        fit = _ensure_fit(st, ids, settings)
        mask_valid = _mask_valid(st, settings.mask)
        done = _written_already(st) if mask_valid else None
        if done and not ingested and (output is None or Path(output).resolve() == Path(done)):
            return StepResult("up-to-date", f"nothing new since {Path(done).name}; no checkpoint to add",
                              str(s.root), ingested, skipped, output=done, fit=fit, mask=st.state["mask"])
        if dry_run:
            if not mask_valid:
                result = _run_pass(s, ids, settings.mask, output=None, force=force, use_stored=False)
                _store_mask(st, settings.mask, result)
                _record_history(st, "predict --dry-run", None)
            if (fit_before, mask_before) != (st.state["fit"], st.state["mask"]):
                st.commit()
            return StepResult("dry-run", "fit and mask computed; nothing written (--dry-run)", str(s.root),
                              ingested, skipped, fit=st.state["fit"], mask=st.state["mask"])
        out = _write_output(s, ids, settings.mask, output=output, force=force, in_place=in_place,
                            use_stored=mask_valid, command="predict")
        return StepResult("written", f"wrote {out}", str(s.root), ingested, skipped, output=str(out),
                          fit=st.state["fit"], mask=st.state["mask"])


def remask(target: Path, *, store: Path | None = None, settings: Settings | None = None) -> StepResult:
    """Mask again from the stored fit with other settings; no new fit, nothing ingested."""
    settings = settings or Settings()
    with session(target, store, settings) as s:
        st = _require_store(s)
        fit = st.state["fit"]
        if not fit or not all(st.readable(i) for i in fit["window"]):
            raise StageMissing("no valid fit in the store; run `pdt predict --dry-run` first", s.root)
        if _mask_valid(st, settings.mask):
            return StepResult("up-to-date", f"mask {settings.mask.label} is already the stored one", str(s.root),
                              fit=fit, mask=st.state["mask"])
        result = _run_pass(s, fit["window"], settings.mask, output=None, force=False, use_stored=False)
        _store_mask(st, settings.mask, result)
        _record_history(st, "mask", None)
        st.commit()
        return StepResult("masked", f"stored mask {settings.mask.label}", str(s.root), fit=fit,
                          mask=st.state["mask"])


def apply(target: Path, *, store: Path | None = None, output: Path | None = None, force: bool = False,
          in_place: bool = False, settings: Settings | None = None) -> StepResult:
    """Write the fused checkpoint from the stored fit and mask (to any path)."""
    settings = settings or Settings()
    with session(target, store, settings) as s:
        st = _require_store(s)
        fit, mask = st.state["fit"], st.state["mask"]
        if not fit or not mask or mask["fit_id"] != fit["id"]:
            raise StageMissing("no stored fit and mask; run `pdt predict --dry-run` (or `pdt mask`) first", s.root)
        ids = fit["window"]
        if not all(st.readable(i) for i in ids):
            raise StageMissing("a newer checkpoint replaced the fit's window; run `pdt predict` again", s.root)
        options = MaskOptions(tuple(mask["options"]["criteria"]), mask["options"]["random"], mask["options"]["seed"])
        out = _write_output(s, ids, options, output=output, force=force, in_place=in_place, use_stored=True,
                            command="apply")
        return StepResult("written", f"wrote {out}", str(s.root), output=str(out), fit=fit, mask=mask)


def restore(target: Path, *, store: Path | None = None, path: Path | None = None, force: bool = False,
            settings: Settings | None = None) -> StepResult:
    """Put back the checkpoint that the latest `--in-place` write (to `path`, if given) replaced.

    The store forgets that fused state too: its snapshot leaves the window and the
    checkpoint it came from is the newest again, as if the write had not happened.
    """
    settings = settings or Settings()
    with session(target, store, settings) as s:
        st = _require_store(s)
        wanted = str(Path(path).resolve()) if path else None
        entry = next((o for o in reversed(st.state["outputs"]) if o.get("in_place") and not o.get("restored")
                      and (wanted is None or o["path"] == wanted)), None)
        if entry is None:
            raise StageMissing("no in-place write to undo" + (f" at {path}" if path else ""), s.root)
        final = Path(entry["path"])
        backup = Path(entry["backup"]) if entry["backup"] else None
        if backup is None or not backup.exists():
            raise StageMissing("the backup of this in-place write was pruned (backups are kept for the "
                               "checkpoints still in the window)", final)
        if final.exists() and not unchanged(final, entry) and not force:
            raise OutputError("changed since pdt wrote it (training saved over it?); pass --force to restore anyway",
                              final)
        copy_back(backup, final)
        window = st.state["window"]
        if window and window[-1] == entry["snapshot"]:
            window[-1] = st.record(entry["snapshot"])["parent"]
        entry["restored"] = now()
        st.commit()
        return StepResult("restored", f"restored {final} from {backup}", str(s.root), output=str(final))


def load_state(target: Path, *, store: Path | None = None, lock_timeout: float = 60.0) -> dict[str, Any]:
    """The store's state (fit, mask, per-tensor counts, history) for reports, read under the lock."""
    with session(target, store, Settings(lock_timeout=lock_timeout)) as s:
        st = _require_store(s)
        counts = st.arrays.get("mask/counts")
        return {
            "store": str(s.root),
            "folder": str(st.folder),
            "state": st.state,
            "counts": None if counts is None else counts.tolist(),
            "base_window": _base_window(st),
        }


__all__ = ["Settings", "StepResult", "apply", "load_state", "predict", "remask", "restore", "snapshot"]
