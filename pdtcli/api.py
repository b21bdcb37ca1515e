"""One PDT step as library functions, in the order of Algorithm 1.

`snapshot` ingests new checkpoints into the store (line 17 for the optimizer's states),
`predict` fits DMD on the window (line 6), predicts tau steps ahead (lines 7-8), masks
(line 9) and writes the fused checkpoint (lines 10-11), recording it as the state
training resumes from (line 17 again). `remask`, `apply` and `report_data` are the same
step taken apart for audits. Each reads what the stage before left in the store and
recomputes nothing that is still valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path
from .backups import backup_path, copy_back, in_backups, note_in_place, prune_backups, recorded_backup
from .discover import is_pdt_output, located, output_name
from .dmd import solve
from .errors import CheckpointError, OutputError, StageMissing, UsageError
from .formats import open_checkpoint
from .fuse import Predictor, Window, pick_device
from .identity import sha256_path, stat_of, unchanged
from .ingest import ingest
from .mask import MaskOptions
from .options import DEFAULT_WAIT, Settings
from .report import summarize_counts
from .session import Session, session
from .store import Store, now, snapshot_step


@dataclass
class StepResult:
    """What a command did, for the CLI's summary and for `--json`."""

    status: str  # written | dry-run | masked | up-to-date | waiting | ingested | restored
    message: str
    store: str
    ingested: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    needed: int = 0
    output: str | None = None
    fit: dict | None = None
    mask: dict | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


# ---- ingest (snapshot) --------------------------------------------------------------


def snapshot(target: Path, *, store: Path | None = None, rebuild: bool = False,
             settings: Settings | None = None) -> StepResult:
    """Ingest the checkpoints in `target` that the store has not seen (`rebuild`: into a new store)."""
    settings = settings or Settings()
    with session(target, store, settings, ingests=True, rebuild=rebuild) as s:
        ingested, skipped = ingest(s)
        st = s.require_store()
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


def _run_pass(s: Session, ids: list[int], options: MaskOptions, *, output: Path | None, use_stored: bool,
              lineage: bool = False, backup: Path | None = None) -> dict:
    """Pass 2 over every predicted tensor; with `output`, write the fused checkpoint too (and,
    with `lineage`, the fused values into a free slot: training resumes from that output).

    `backup`: the write is in place; what `output` held is kept there (unless a backup of it
    exists already), and the store notes the write before it is published (see
    `backups.note_in_place`)."""
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
            if lineage:
                lineage_slot = _lineage_slot(s, ids)
            source = _source_of(store, store.record(ids[-1]))
            kept = backup is not None and recorded_backup(store, store.record(ids[-1]), backup)
            backup_to = None if kept else backup
            note = (lambda tmp: note_in_place(store, output, backup, tmp)) if backup is not None else None
            with atomic_path(output, backup_to=backup_to, before_publish=note) as tmp, \
                    open_checkpoint(source) as reader:
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


def _source_of(store: Store, record: dict) -> Path:
    """The checkpoint whose non-predicted content the output carries over: the newest of the
    window, or its backup when an in-place write has replaced it."""
    source = Path(record["path"])
    backup = in_backups(store, record["backup"]) if record.get("backup") else None
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


def _commit_output(s: Session, ids: list[int], output: Path, lineage_slot: int | None,
                   backup: Path | None = None) -> None:
    """Record the output; when training resumes from it (`lineage_slot`), line 17 of Algorithm 1:
    the fused state becomes the newest snapshot. Audit outputs (`-o`) never enter the window."""
    store = s.store
    size, mtime = stat_of(output)
    entry = {
        "path": located(output), "fit_id": store.state["fit"]["id"], "mask_id": store.state["mask"]["id"],
        "snapshot": None, "at": now(), "size": size, "mtime": mtime, "lineage": lineage_slot is not None,
        "in_place": backup is not None, "backup": None,
    }
    if lineage_slot is not None:
        base = store.record(ids[-1])
        if backup is not None:
            base["backup"] = entry["backup"] = located(backup)
        record = {
            "kind": "fused",
            "parent": ids[-1],
            "path": entry["path"],
            "size": size,
            "mtime": mtime,
            "name_step": base.get("name_step"),
            "recorded_step": base.get("recorded_step"),
            "fit_id": entry["fit_id"],
            "mask_id": entry["mask_id"],
            "at": entry["at"],
        }
        entry["snapshot"] = store.place(lineage_slot, record)
        store.state["window"] = ids[:-1] + [entry["snapshot"]]
    store.state["outputs"].append(entry)


def _write_output(s: Session, ids: list[int], options: MaskOptions, *, output: Path | None, force: bool,
                  in_place: bool, use_stored: bool, command: str) -> Path:
    """Pass 2 with a writer, then the output is recorded (and, when training resumes from it,
    becomes the newest snapshot), committed.

    In place, the output is the newest checkpoint's own path; what it held is kept as a
    backup (once: a second write from the same checkpoint must not back up pdt's output).
    A link there is refused: replacing it would hide where it pointed, writing through it
    would change a file outside the folder.
    """
    store = s.store
    base = store.record(ids[-1])
    newest = store.in_folder(base["path"])
    backup = None
    if in_place:
        if output is not None:
            raise UsageError("--in-place writes over the newest checkpoint; it takes no --output")
        if newest.is_symlink():
            raise OutputError("is a symbolic link; --in-place never writes through one (it would change "
                              f"{newest.resolve()}); use the default output instead", newest)
        out, backup = newest, backup_path(store, base)
    else:
        out = Path(output) if output else output_name(newest)
    lineage = in_place or output is None
    # `predict` renews its own default output (a new fit of the same newest checkpoint, or a run
    # killed after publishing it); anything else is replaced only with --force.
    renewable = command == "predict" and output is None and is_pdt_output(out)
    if (out.exists() or out.is_symlink()) and not (force or in_place or renewable):
        raise OutputError("exists; pass --force to replace it", out)
    result = _run_pass(s, ids, options, output=out, use_stored=use_stored, lineage=lineage, backup=backup)
    if not use_stored:
        _store_mask(store, options, result)
    _commit_output(s, ids, out, result["lineage_slot"], backup)
    _record_history(store, command, located(out))
    store.state["pending_in_place"] = None
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
    history = store.history_len
    if have >= history:
        return None
    need = history - have
    return StepResult("waiting", f"need {need} more checkpoint(s) before DMD can fit "
                      f"(window holds {have} of {history})", str(s.root), ingested, skipped, needed=need)


def _mask_warnings(mask: dict | None, wrote: bool) -> list[str]:
    """What a user must not miss in a result: a mask that accepted nothing."""
    if not mask or mask["totals"]["accepted"]:
        return []
    effect = "the fused checkpoint equals the newest one" if wrote else "a fused checkpoint would equal the newest one"
    return [f"the mask ({mask['label']}) accepted no element of {mask['totals']['elements']:,}: {effect}"]


def predict(target: Path, *, store: Path | None = None, output: Path | None = None, dry_run: bool = False,
            force: bool = False, in_place: bool = False, settings: Settings | None = None) -> StepResult:
    """The whole step: ingest, fit, mask, and (unless `dry_run`) write the fused checkpoint.

    Training is taken to resume from the default output (or, `in_place`, the newest checkpoint's
    own path); an `output` elsewhere is an audit copy and leaves the store's lineage alone.
    """
    settings = settings or Settings()
    if in_place and output is not None:
        raise UsageError("--in-place writes over the newest checkpoint; it takes no --output")
    with session(target, store, settings, ingests=True) as s:
        ingested, skipped = ingest(s)
        waiting = _waiting(s, ingested, skipped)
        if waiting:
            return waiting
        st = s.store
        ids = _base_window(st)
        fit_before, mask_before = st.state["fit"], st.state["mask"]
        fit = _ensure_fit(st, ids, settings)
        mask_valid = _mask_valid(st, settings.mask)
        done = _written_already(st) if mask_valid else None
        if done and not ingested and (output is None or located(Path(output)) == done):
            return StepResult("up-to-date", f"nothing new since {Path(done).name}; no checkpoint to add",
                              str(s.root), ingested, skipped, output=done, fit=fit, mask=st.state["mask"])
        if dry_run:
            if not mask_valid:
                result = _run_pass(s, ids, settings.mask, output=None, use_stored=False)
                _store_mask(st, settings.mask, result)
                _record_history(st, "predict --dry-run", None)
            if (fit_before, mask_before) != (st.state["fit"], st.state["mask"]):
                st.commit()
            return StepResult("dry-run", "fit and mask computed; nothing written (--dry-run)", str(s.root),
                              ingested, skipped, fit=st.state["fit"], mask=st.state["mask"],
                              warnings=_mask_warnings(st.state["mask"], wrote=False))
        out = _write_output(s, ids, settings.mask, output=output, force=force, in_place=in_place,
                            use_stored=mask_valid, command="predict")
        return StepResult("written", f"wrote {out}", str(s.root), ingested, skipped, output=str(out),
                          fit=st.state["fit"], mask=st.state["mask"],
                          warnings=_mask_warnings(st.state["mask"], wrote=True))


def _stored_fit(s: Session) -> dict:
    st = s.require_store()
    fit = st.state["fit"]
    if not fit or not all(st.readable(i) for i in fit["window"]):
        raise StageMissing("no valid fit in the store; run `pdt predict --dry-run` first", s.root)
    return fit


def remask(target: Path, *, store: Path | None = None, settings: Settings | None = None) -> StepResult:
    """Mask again from the stored fit with other settings; no new fit, nothing ingested."""
    settings = settings or Settings()
    with session(target, store, settings) as s:
        fit = _stored_fit(s)
        st = s.store
        if _mask_valid(st, settings.mask):
            return StepResult("up-to-date", f"mask {settings.mask.label} is already the stored one", str(s.root),
                              fit=fit, mask=st.state["mask"])
        result = _run_pass(s, fit["window"], settings.mask, output=None, use_stored=False)
        _store_mask(st, settings.mask, result)
        _record_history(st, "mask", None)
        st.commit()
        return StepResult("masked", f"stored mask {settings.mask.label}", str(s.root), fit=fit,
                          mask=st.state["mask"], warnings=_mask_warnings(st.state["mask"], wrote=False))


def apply(target: Path, *, store: Path | None = None, output: Path | None = None, force: bool = False,
          in_place: bool = False, settings: Settings | None = None) -> StepResult:
    """Write the fused checkpoint from the stored fit and mask.

    To the default output (or `in_place`), training is taken to resume from it; to any other
    `output`, it is an audit copy. An existing file is replaced only with `force`.
    """
    settings = settings or Settings()
    if in_place and output is not None:
        raise UsageError("--in-place writes over the newest checkpoint; it takes no --output")
    with session(target, store, settings) as s:
        st = s.require_store()
        fit, mask = st.state["fit"], st.state["mask"]
        if not fit or not mask or mask["fit_id"] != fit["id"]:
            raise StageMissing("no stored fit and mask; run `pdt predict --dry-run` (or `pdt mask`) first", s.root)
        ids = fit["window"]
        if not all(st.readable(i) for i in ids):
            raise StageMissing("a newer checkpoint replaced the fit's window; run `pdt predict` again", s.root)
        options = MaskOptions(tuple(mask["options"]["criteria"]), mask["options"]["random"], mask["options"]["seed"])
        out = _write_output(s, ids, options, output=output, force=force, in_place=in_place, use_stored=True,
                            command="apply")
        return StepResult("written", f"wrote {out}", str(s.root), output=str(out), fit=fit, mask=mask,
                          warnings=_mask_warnings(mask, wrote=True))


def restore(target: Path, *, store: Path | None = None, path: Path | None = None, force: bool = False,
            settings: Settings | None = None) -> StepResult:
    """Put back the checkpoint that the latest `--in-place` write (to `path`, if given) replaced.

    The store forgets that fused state too: its snapshot leaves the window and the
    checkpoint it came from is the newest again, as if the write had not happened. Both
    paths come from the store, so both are checked: the target must lie in the checkpoint
    folder and not be a link, the backup in the store's backups.
    """
    settings = settings or Settings()
    with session(target, store, settings) as s:
        st = s.require_store()
        wanted = located(Path(path)) if path else None
        entry = next((o for o in reversed(st.state["outputs"]) if o.get("in_place") and not o.get("restored")
                      and (wanted is None or o["path"] == wanted)), None)
        if entry is None:
            raise StageMissing("no in-place write to undo" + (f" at {path}" if path else ""), s.root)
        final = st.in_folder(entry["path"])
        backup = in_backups(st, entry["backup"]) if entry["backup"] else None
        if backup is None or not backup.exists():
            raise StageMissing("the backup of this in-place write was pruned (backups are kept for the "
                               "checkpoints still in the window)", final)
        if final.is_symlink():
            raise OutputError("is now a symbolic link; pdt never writes through one", final)
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


def load_state(target: Path, *, store: Path | None = None, lock_timeout: float = DEFAULT_WAIT) -> dict[str, Any]:
    """The store's state (fit, mask, per-tensor counts, history) for reports, read under the lock."""
    with session(target, store, Settings(lock_timeout=lock_timeout)) as s:
        st = s.require_store()
        counts = st.arrays.get("mask/counts")
        return {
            "store": str(s.root),
            "folder": str(st.folder),
            "state": st.state,
            "counts": None if counts is None else counts.tolist(),
            "base_window": _base_window(st),
        }


__all__ = ["Settings", "StepResult", "apply", "load_state", "predict", "remask", "restore", "snapshot"]
