"""One PDT step as library functions, each the plan of a command in the order of Algorithm 1.

`snapshot` ingests new checkpoints into the store (line 17 for the optimizer's states),
`predict` fits DMD on the window (line 6), predicts tau steps ahead (lines 7-8), masks
(line 9) and writes the fused checkpoint (lines 10-11), recording it as the state
training resumes from (line 17 again). `remask`, `apply` and `load_state` are the same
step taken apart for audits. Each reads what the stage before left in the store and
recomputes nothing that is still valid. The work itself is elsewhere: the session and its
lock (`session`), reading checkpoints in (`ingest`), the fit (`dmd`), the second pass
(`fuse`), and the store's rules (`store`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import restart
from .backups import backup_path, copy_back, in_backups, note_in_place, prune_backups, recorded_backup
from .discover import is_pdt_output, located
from .dmd import FitOptions, combine_each, combine_r, each_arrays, each_summary, solve, solve_each, traits
from .errors import CheckpointError, OutputError, PdtError, StageMissing, UsageError, os_errors_as
from .formats import checkpoint_digest, open_checkpoint, output_conversion
from .formats.base import whole_name
from .fuse import Destination, Window, second_pass, window_of
from .identity import stat_of, unchanged
from .ingest import ingest
from .live import Live
from .mask import MaskOptions, summary_of, tensor_rows, type_totals, whole_rows
from .options import DEFAULT_WAIT, Settings
from .placement import default_output
from .session import Session, resolve_store_root, session
from .store import Store, complete_parts, lineage, merge_states, parts_of, schedule
from .store.records import Mask, Snapshot
from .targets import check_output, guard_of
from .verify import Verdict
from .world import current

log = logging.getLogger(__name__)
WROTE = ("written", "loaded")  # statuses after which training resumes from a fused state
LIVE_OUTPUT = "(in memory)"  # what the history shows as the output of a step inside the training loop
REJECTED = "--verify rejected"  # a history row's command ends so when `--verify` turned the fused checkpoint down

@dataclass
class StepResult:
    """What a command did, for the CLI's summary and for `--json`."""

    status: str  # written | rejected | loaded | dry-run | masked | up-to-date | waiting | not-due | ingested | restored
    message: str
    store: str
    ingested: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    needed: int = 0
    output: str | None = None
    fit: dict | None = None
    mask: dict | None = None
    warnings: list[str] = field(default_factory=list)
    tensors: list[dict] | None = None  # per-tensor counts of the mask, for the summary
    verify: dict | None = None  # what `--verify` said of the fused checkpoint (`Verdict.as_dict`)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "tensors"}


# ---- the commands -----------------------------------------------------------------------


def snapshot(target: Path, *, store: Path | None = None, rebuild: bool = False,
             settings: Settings | None = None) -> StepResult:
    """Ingest the checkpoints in `target` that the store has not seen (`rebuild`: into a new store)."""
    settings = settings or Settings()
    with session(target, store, settings, ingests=True, rebuild=rebuild) as s:
        ingested, skipped = ingest(s)
        st = s.require_store()
        have = len(lineage.base_window(st))
        message = (f"ingested {len(ingested)} checkpoint(s); window holds {have} of {st.history_len}"
                   if ingested else f"nothing new; window holds {have} of {st.history_len}")
        changed = restart.waiting(st)
        if changed:
            return StepResult("waiting", changed[0], str(s.root), ingested, skipped, needed=changed[1],
                              warnings=s.notes)
        return StepResult("ingested" if ingested else "up-to-date", message, str(s.root), ingested, skipped,
                          needed=max(0, st.history_len - have), warnings=s.notes)


def predict(target: Path, *, store: Path | None = None, output: Path | None = None, dry_run: bool = False,
            force: bool = False, in_place: bool | None = None, settings: Settings | None = None,
            live: Live | None = None, saved: Live | None = None) -> StepResult:
    """The whole step: ingest, fit, mask, and (unless `dry_run`) write the fused checkpoint.

    Training is taken to resume from the default output (or, `in_place`, the newest checkpoint's
    own path); an `output` elsewhere is an audit copy and leaves the store's lineage alone.
    With `live` (a training loop's model, just saved as the newest checkpoint), the newest
    checkpoint's values come from memory and the fused values go back into the model, after
    the store has committed them: training resumes from them with no file in between. When
    another run (cron) wrote the fused checkpoint of that checkpoint since it was saved, the
    model takes those fused values, as the store records that training resumes from them.
    `saved`: the checkpoint a sharded model inside the training loop was just saved to (a `Live` without tensors:
    each rank reads its own files, `integrations.sharded`); as with `live`, nothing is done unless it is the
    window's newest, and the history records the step as `in-loop`; the ranks then load their shards of the output.

    The settings not given (`in_place` None: not given) are those the store keeps from the last predict
    (`options.KEPT`); this run's are kept in turn, unless it is an audit (`dry_run`, an `output`).
    """
    settings = (settings or Settings()).giving(in_place=in_place)
    _in_place_alone(settings, output)
    _verify_alone(settings, dry_run)
    if (live or saved) is not None and (settings.given.get("in_place") or output is not None or dry_run):
        raise UsageError("a live model takes the fused values itself; it takes no output, --in-place or --dry-run")
    audit = "--dry-run" if dry_run else "-o" if output is not None else None
    # a live model's step is one process's (rank 0's under DDP; the integration shares the result): it never
    # joins the training's process group, whose other ranks are not in this step
    with session(target, store, settings, ingests=True, joins=live is None) as s:
        settings = s.kept_settings(audit)
        in_place = settings.in_place and output is None and live is None  # a kept --in-place: for the default output
        _single_only(in_place)
        if output is not None:  # what no --force allows is refused before the store takes anything in; an
            # existing output pdt wrote may still be up to date, so --force is asked for only when writing it
            check_output(Path(output), guard_of(s.folder, s.root, s.store), force=True)
        ingested, skipped = ingest(s, live)                              # line 17: the optimizer's states
        st = s.store
        changed = restart.waiting(st)  # the model changed: the window waits for h checkpoints of the new one
        if changed:
            return StepResult("waiting", changed[0], str(s.root), ingested, skipped, needed=changed[1],
                              warnings=s.notes)
        short = schedule.window_short(st)
        if short:
            return StepResult("waiting", short, str(s.root), ingested, skipped,
                              needed=st.history_len - len(lineage.base_window(st)), warnings=s.notes)
        not_due = schedule.not_due(st) if not dry_run and (output is None or in_place) else None
        if not_due:                                                            # line 3
            return StepResult("not-due", not_due, str(s.root), ingested, skipped, warnings=s.notes)
        ids = lineage.base_window(st)
        if (live or saved) is not None and not (live or saved).saved_as(st.snapshot(ids[-1])):  # before any work
            raise UsageError(f"the newest checkpoint of the window is {Path(st.snapshot(ids[-1]).path).name}, not "
                             "the one the live model was saved to; nothing loaded", s.folder)
        fitted = _fit(st, ids, settings)                                       # line 6
        mask = st.mask_of(settings.mask.as_dict())
        if mask:
            log.info("mask %d (%s) reused: made on this fit with these criteria", mask.id, mask.label)
        done = None
        if mask is not None:
            done = lineage.written_already(st) if output is None else lineage.written_to(st, located(Path(output)))
        if done and not ingested and live is not None and not lineage.loaded_already(st):
            loaded = _load_written(s, ids, settings.mask, live)
            return _result(st, "loaded", f"loaded the fused values of {loaded} tensor(s) into the model: those of "
                           f"{Path(done).name}, which another pdt run wrote since the model was saved", s)
        if done and not ingested:
            return _result(st, "up-to-date", f"nothing new since {Path(done).name}; no checkpoint to add", s,
                           ingested, skipped, output=done)
        if mask is not None and not ingested and settings.verify is not None and _rejected_already(st):
            return _result(st, "up-to-date", f"nothing new since --verify rejected the fused checkpoint of "
                           f"{Path(st.snapshot(ids[-1]).path).name}; no checkpoint to add (to judge it again: "
                           "pdt apply --verify CMD)", s, ingested, skipped)
        if dry_run:
            if mask is None:                                                   # lines 7-9
                _masked_pass(s, ids, settings.mask)
                st.append_history("predict --dry-run", None, training=False)
            if fitted or mask is None:
                st.commit()
            return _result(st, "dry-run", "fit and mask computed; nothing written (--dry-run)", s, ingested, skipped)
        if live is not None:
            loaded = _load_live(s, ids, settings.mask, live, use_stored=mask is not None)
            return _result(st, "loaded", f"loaded the fused values of {loaded} tensor(s) into the model", s,
                           ingested, skipped)
        out, verdict = _write(s, ids, settings.mask, output=output, force=force, in_place=in_place,  # lines 7-11, 17
                              use_stored=mask is not None, command="predict",
                              history="in-loop" if saved is not None else None)
        return _written(st, out, verdict, s, ingested, skipped)


def remask(target: Path, *, store: Path | None = None, settings: Settings | None = None) -> StepResult:
    """Mask again from the stored fit with other settings; no new fit, nothing ingested."""
    settings = settings or Settings()
    with session(target, store, settings) as s:
        st = s.require_store()
        settings = s.kept_settings("pdt mask")  # the criteria not given: those the last predict ran with
        if not st.fit_readable():
            raise StageMissing(_no_fit(st, "no valid fit in the store; run `pdt predict --dry-run` first"), s.root)
        if st.mask_of(settings.mask.as_dict()):
            return _result(st, "up-to-date", f"mask {settings.mask.label} is already the stored one", s)
        ids = st.fit.window
        _masked_pass(s, ids, settings.mask)
        st.append_history("mask", None, training=False)
        st.commit()
        return _result(st, "masked", f"stored mask {settings.mask.label}", s)


def apply(target: Path, *, store: Path | None = None, output: Path | None = None, force: bool = False,
          in_place: bool | None = None, settings: Settings | None = None) -> StepResult:
    """Write the fused checkpoint from the stored fit and mask.

    To the default output (or `in_place`; None: as the store keeps it from the last predict), training
    is taken to resume from it; to any other `output`, it is an audit copy. An existing file is replaced
    only with `force`.
    """
    settings = (settings or Settings()).giving(in_place=in_place)
    _in_place_alone(settings, output)
    _verify_alone(settings, False)
    with session(target, store, settings) as s:
        st = s.require_store()
        in_place = s.kept_settings("pdt apply").in_place and output is None
        _single_only(in_place)
        if st.fit is None or st.mask is None or st.mask.fit_id != st.fit.id:
            raise StageMissing(_no_fit(st, "no stored fit and mask; run `pdt predict --dry-run` (or `pdt mask`) "
                                          "first"), s.root)
        if not st.fit_readable():
            raise StageMissing(_no_fit(st, "a newer checkpoint replaced the fit's window; run `pdt predict` again"),
                               s.root)
        options = MaskOptions.from_dict(st.mask.options)
        out, verdict = _write(s, st.fit.window, options, output=output, force=force, in_place=in_place,
                              use_stored=True, command="apply")
        return _written(st, out, verdict, s)


def restore(target: Path, *, store: Path | None = None, path: Path | None = None, force: bool = False,
            settings: Settings | None = None) -> StepResult:
    """Put back the checkpoint that the latest `--in-place` write (to `path`, if given) replaced.

    The store forgets that fused state too: its snapshot leaves the window and the
    checkpoint it came from is the newest again, as if the write had not happened; the next
    checkpoint's values then show whether training had resumed from it all the same. When a
    checkpoint that descends from it was ingested already, only the file is put back: the
    fused state stays in the window, and a warning says so (`lineage.undo`). Both
    paths come from the store, so both are checked: the target must be an entry of the
    checkpoint folder and not a link, the backup in the store's backups.
    """
    settings = settings or Settings()
    with session(target, store, settings, joins=False) as s:
        st = s.require_store()
        entry = lineage.latest_in_place(st, located(Path(path)) if path else None)
        if entry is None:
            raise StageMissing("no in-place write to undo" + (f" at {path}" if path else ""), s.root)
        final = st.in_folder(entry.path)
        backup = in_backups(st, entry.backup) if entry.backup else None
        if backup is None or not backup.exists():
            raise StageMissing("the backup of this in-place write was pruned (backups are kept for the "
                               "checkpoints still in the window)", final)
        if final.is_symlink():
            raise OutputError("is now a symbolic link; pdt never writes through one", final)
        if final.exists() and not unchanged(final, entry.size, entry.mtime) and not force:
            raise OutputError("changed since pdt wrote it (training saved over it?); pass --force to restore anyway",
                              final)
        copy_back(backup, final)
        kept = lineage.undo(st, entry)
        st.commit()
        return StepResult("restored", f"restored {final} from {backup}", str(s.root), output=str(final),
                          warnings=s.notes + ([kept] if kept else []))


def load_state(target: Path, *, store: Path | None = None, lock_timeout: float = DEFAULT_WAIT,
               writes: Path | None = None) -> dict[str, Any]:
    """What the store holds (fit, mask, per-tensor counts, window, history) for reports, read under the lock.

    A store made by the ranks of a distributed step is read part by part, each under its own lock,
    and shown as the one model it is. A store pdt may read but not lock (read-only media, another
    user's store) is read without the lock: `unlocked` says so (None when the lock was held).
    `writes`: a file the caller will write (`report --plot`), checked in the same session to be none
    of the folder's checkpoints, the store, or a folder (OutputError, exit 5); an existing regular
    file there is replaced.
    """
    settings = Settings(lock_timeout=lock_timeout)
    root, _ = resolve_store_root(Path(target), store)
    made = parts_of(root)
    if len(made) == 1 and not Store.exists(root):
        states, order, unlocked = [], None, None
        size, parts = next(iter(made.items()))
        for part in complete_parts(root, size, parts):
            with session(part, None, settings, joins=False, reads_only=True) as s:
                _check_writes(s, writes)
                states.append(s.require_store().describe())
                order = order or _tensor_order(s.require_store())  # the same checkpoint for every part
                unlocked = unlocked or s.unlocked
        return dict(merge_states(states, root, order), unlocked=unlocked)
    with session(target, store, settings, joins=False, reads_only=True) as s:
        _check_writes(s, writes)
        return dict(s.require_store().describe(), unlocked=s.unlocked, notes=s.notes)


def _no_fit(store: Store, otherwise: str) -> str:
    """Why a command that needs the stored fit cannot run, as the one next step: while the window is
    short of checkpoints nothing can fit, so the checkpoints it lacks; else `otherwise`."""
    short = schedule.window_short(store)
    if not short:
        return otherwise
    why = "no fit yet" if store.fit is None else otherwise.split(";")[0]  # a fit the window no longer holds
    return f"{why}: {short}; run `pdt predict` once training has saved them"


def _check_writes(s: Session, path: Path | None) -> None:
    if path is not None:
        check_output(Path(path), guard_of(s.folder, s.root, s.store), force=True)


# ---- the steps the plans share ------------------------------------------------------------------


def _tensor_order(store: Store) -> list[str] | None:
    """The tensors of the window's newest checkpoint in its own order (its header only), to show a
    distributed store's tensors as one process would; None when it cannot be read."""
    if not store.window:
        return None
    try:
        with open_checkpoint(Path(store.snapshot(store.window[-1]).path)) as reader:
            return [info.name for info in reader.tensors()]
    except (PdtError, OSError):
        return None


def _in_place_alone(settings: Settings, output: Path | None) -> None:
    """`--in-place` given with `-o` (a kept one gives way to `-o`: an audit copy)."""
    if settings.given.get("in_place") and output is not None:
        raise UsageError("--in-place writes over the newest checkpoint; it takes no --output")


def _verify_alone(settings: Settings, dry_run: bool) -> None:
    """`--verify` where it cannot judge (UsageError): `--dry-run` writes no checkpoint, and the ranks of torchrun
    would each have to publish their share on one command's word."""
    if settings.verify is None:
        return
    if dry_run:
        raise UsageError("--verify judges the fused checkpoint pdt writes; --dry-run writes none")
    if current().active:
        raise UsageError("--verify runs in one process; under torchrun run `pdt apply --verify CMD` afterwards in one")


def _rejected_already(store: Store) -> bool:
    """Whether the store's last masking run was a `--verify` that turned down this very fit and mask: a rerun
    with nothing new would write and judge the same fused checkpoint again."""
    last = store.history[-1] if store.history else None
    return (last is not None and last.command.endswith(REJECTED) and last.fit_id == store.fit.id
            and last.mask == store.mask.label)


def _single_only(in_place: bool) -> None:
    """What a distributed step does not do (yet): write over the newest checkpoint."""
    if current().active and in_place:
        raise UsageError("under torchrun pdt writes the default output (NAME.pdt, see `placement`); "
                         "--in-place is for one process")


def _window(store: Store, ids: list[int], settings: Settings):
    return window_of(store, ids, settings.device, settings.block)


def _fit(store: Store, ids: list[int], settings: Settings) -> bool:
    """The fit for this window and these options, solved unless stored (from the stored R when only
    the options changed); True when a new one was made."""
    options = settings.fit.as_dict()
    steps = [store.step_of(store.snapshot(i)) for i in ids]
    if store.fit_of(ids, options):
        log.info("fit %d reused: the window (steps %s) and the options are those it was made with",
                 store.fit.id, steps)
        return False
    per_tensor = settings.fit.per_tensor
    r = store.r_of(ids, per_tensor)
    if r is not None:
        log.info("fit on the stored QR factor: same window (steps %s), other options %s", steps, options)
    else:
        log.info("fit: QR pass over the window, steps %s", steps)
        with settings.progress.task("fit: QR of the window", 1) as advance:
            r = _qr_pass(store, _window(store, ids, settings), per_tensor)
            advance(1)
    summary, arrays = _solved(store, r, settings.fit)
    store.set_fit(ids, options, summary, {"R": r, **arrays})
    return True


def _solved(store: Store, r: np.ndarray, options: FitOptions) -> tuple[dict, dict[str, np.ndarray]]:
    """The fit record's summary and the arrays (C, singular values, eigenvalues) of the DMD on R: one fit, or
    one per tensor (R (T, h, h)), whose summary is of the whole model's fits on every rank."""
    if not options.per_tensor:
        fit = solve(r, options)
        return fit.summary(), {"C": fit.coefficients, "singular_values": fit.singular_values,
                               "eigenvalues": fit.eigenvalues}
    fits = solve_each(r, options)
    names = [whole_name(entry.name) for entry in store.tensors]
    by_name: dict[str, tuple] = {}
    for share in current().gather(dict(zip(names, map(traits, fits), strict=True)), "the fits' summary"):
        by_name.update(share)
    return each_summary(by_name), each_arrays(fits, r.shape[-1], options.tau)


def _qr_pass(store: Store, window: Window, per_tensor: bool) -> np.ndarray:
    """Pass 1 and, under torchrun, the ranks' factors combined: R (h, h) of the whole window, or per tensor
    (T, h, h) in `store.tensors` order, each of all the tensor's rows over all ranks (the pieces of a tensor
    that ranks or files hold apart are combined under its one name)."""
    if not per_tensor:
        return combine_r(current().gather(window.qr_factor(), "the fit"))  # each rank's R: the whole window's
    names = [whole_name(entry.name) for entry in store.tensors]
    whole = combine_each(current().gather((names, window.qr_factors(store.tensors)), "the fit"))
    return np.stack([whole[name] for name in names]) if names else np.zeros((0, len(window.slots),
                                                                            len(window.slots)))


def _masked_pass(s: Session, ids: list[int], options: MaskOptions, *, write: Destination | Live | None = None,
                 use_stored: bool = False) -> None:
    """Pass 2 over the window `ids` (with the stored mask, or a new one that is then stored)."""
    store = s.store
    result = second_pass(store, _window(store, ids, s.settings), options, write=write,
                         stored=store.stored_mask() if use_stored else None, progress=s.settings.progress)
    if not use_stored:  # the whole model's counts, the same on every rank
        totals = current().sum(type_totals([t.layer_type for t in store.tensors], result.counts), "the mask's counts")
        summary = summary_of(totals)
        store.set_mask(options.as_dict(), options.label, summary, result.arrays())


def _source_of(store: Store, newest: Snapshot) -> Path:
    """The checkpoint whose non-predicted content the output carries over: the newest of the
    window, or its backup when an in-place write has replaced it."""
    source = Path(newest.path)
    backup = in_backups(store, newest.backup) if newest.backup else None
    if backup is not None and backup.exists() and (not source.exists() or stat_of(source) != stat_of(backup)):
        source = backup
    if not source.exists():
        raise CheckpointError("the newest checkpoint of the window is gone; its non-predicted content "
                              "cannot be carried over", source)
    # one decision for all ranks (each sees the file's times through its own filesystem client)
    changed = any(current().gather(not unchanged(source, newest.size, newest.mtime), "checking the newest checkpoint"))
    with os_errors_as(CheckpointError, "cannot read"):
        same = not changed or checkpoint_digest(source, current()) == newest.sha256
    if not same:
        raise CheckpointError("the newest checkpoint changed since it was ingested; run `pdt snapshot` again", source)
    return source


def _write(s: Session, ids: list[int], options: MaskOptions, *, output: Path | None, force: bool,
           in_place: bool, use_stored: bool, command: str, history: str | None = None
           ) -> tuple[Path, Verdict | None]:
    """Pass 2 with a writer, then the output is recorded (and, when training resumes from it,
    becomes the newest snapshot), committed; `history`: the command the store's history names (default
    `command`). Returns the output's path and, with `--verify`, the verdict.

    With `--verify`, the complete output is judged under a temporary name before it is published; a
    rejected one is removed unpublished (in place: the checkpoint is left as it was, no backup made), and
    the store keeps the fit and mask but not the fused state, with a history row (`REJECTED`).

    In place, the output is the newest checkpoint's own path; what it held is kept as a
    backup (once: a second write from the same checkpoint must not back up pdt's output).
    A link there is refused: replacing it would hide where it pointed, writing through it
    would change a file outside the folder.
    """
    store = s.store
    newest = store.snapshot(ids[-1])
    path = store.in_folder(newest.path)
    backup = None
    if in_place:
        if path.is_symlink():
            raise OutputError("is a symbolic link; --in-place never writes through one (it would change "
                              f"{path.resolve()}); use the default output instead", path)
        out, backup = path, backup_path(store, newest)
    else:
        out = Path(output) if output else default_output(path)
    if not in_place:
        # `predict` renews its own default output (a new fit of the same newest checkpoint, or a run
        # killed after publishing it); anything else is replaced only with --force.
        renewable = command == "predict" and output is None and is_pdt_output(out)
        check_output(out, guard_of(s.folder, s.root, store), force=force or renewable, default=output is None)
        if output is None:  # the side folder beside the checkpoint folder, on its first output there
            with os_errors_as(OutputError, "cannot make the folder of the output", out.parent):
                out.parent.mkdir(exist_ok=True)
    destination = Destination(out, _source_of(store, newest))
    if output is not None:
        destination.convert = _conversion(s, destination.source, out)
    resumes = in_place or output is None
    if resumes:  # training resumes from it: its values go into the window too
        destination.lineage_slot = lineage.claim_slot(store, ids)  # may commit, to free a slot safely
    if backup is not None:
        destination.backup_to = None if recorded_backup(newest, backup) else backup
        destination.before_publish = lambda tmp: note_in_place(store, out, backup, tmp)
    verdicts: list[Verdict] = []
    verifier = s.settings.verifier
    if verifier is not None:
        def accept(candidate: Path) -> bool:
            verdicts.append(verifier.judge(candidate, destination.source))
            return verdicts[-1].accepted
        destination.accept = accept
    _masked_pass(s, ids, options, write=destination, use_stored=use_stored)
    verdict = verdicts[0] if verdicts else None
    if verdict is not None and not verdict.accepted:
        store.append_history(f"{command} {REJECTED}", None, training=False)
        store.commit()
        return out, verdict
    size, mtime = current().gather(stat_of(out) if current().leader else None, "the output's size")[0]
    lineage.record_output(store, ids, located(out), size, mtime, destination.lineage_slot,
                        located(backup) if backup is not None else None)
    store.append_history(history or command, located(out), training=resumes)
    store.set_pending(None)
    store.commit()
    if backup is not None:
        prune_backups(store)
    return out, verdict


def _written(store: Store, out: Path, verdict: Verdict | None, s: Session, ingested: list[str] | None = None,
             skipped: list[dict] | None = None) -> StepResult:
    """The result of a run that wrote `out`, or, `--verify` having turned it down, that published nothing."""
    if verdict is not None and not verdict.accepted:
        result = _result(store, "rejected", f"rejected {out.name} (--verify: {verdict.why}); nothing written", s,
                         ingested, skipped)
    else:
        checked = f" (--verify: {verdict.why})" if verdict is not None else ""
        result = _result(store, "written", f"wrote {out}{checked}", s, ingested, skipped, output=str(out))
    result.verify = verdict.as_dict() if verdict is not None else None
    return result


def _conversion(s: Session, source: Path, out: Path) -> str | None:
    """The conversion the suffix of `-o out` asks of checkpoint `source` (`formats.output_conversion`: None
    for its own format, UsageError for a suffix pdt does not write), with the note of what it leaves out."""
    convert = output_conversion(source, out)
    if convert and current().active:
        raise UsageError("under torchrun each rank writes its own files of the checkpoint's format; convert to "
                         f"{convert} in one process (pdt apply -o)", out)
    if convert:
        s.notes.append(f"{out.name} holds the model's tensors only: a {convert} file has no place for the rest "
                       f"of {source.name} (optimizer state, counters, configuration, second names of shared "
                       "tensors)")
    return convert


def _load_live(s: Session, ids: list[int], options: MaskOptions, live: Live, use_stored: bool) -> int:
    """Pass 2 into memory; once the store has the fused state as the newest snapshot (committed),
    the live model takes it. A failure before that leaves the model as it was."""
    store = s.store
    newest = store.snapshot(ids[-1])
    live.lineage_slot = lineage.claim_slot(store, ids)
    _masked_pass(s, ids, options, write=live, use_stored=use_stored)
    lineage.record_output(store, ids, newest.path, newest.size, newest.mtime, live.lineage_slot, None, live=True)
    store.append_history("in-loop", LIVE_OUTPUT, training=True)
    store.commit()
    return live.load_fused()


def reject_live(target: Path, *, store: Path | None = None, settings: Settings | None = None) -> None:
    """A loss gate turned down the fused state just loaded into the live model, which took the optimizer's
    weights back: the store forgets that state as `restore` forgets an in-place write (the checkpoint it came
    from is the newest of the window again, the schedule does not count it) and its history gets an audit row,
    command `in-loop rejected`. StageMissing when the window's newest state is not one loaded into a model."""
    settings = settings or Settings()
    with session(target, store, settings, joins=False) as s:
        st = s.require_store()
        output = lineage.output_of(st, st.window[-1]) if st.window else None
        if output is None or not output.live or output.restored:
            raise StageMissing("the window's newest state is no fused state loaded into a model; nothing to reject",
                               s.root)
        lineage.undo(st, output)
        st.append_history("in-loop rejected", LIVE_OUTPUT, training=False)
        st.commit()


def _load_written(s: Session, ids: list[int], options: MaskOptions, live: Live) -> int:
    """Pass 2 into memory with the stored mask, as the run that wrote the window's fused state made it,
    so the live model takes bit for bit those values; the store, which already records them as the
    state training resumes from, is not changed."""
    _masked_pass(s, ids, options, write=live, use_stored=True)
    return live.load_fused()


def _mask_warnings(mask: Mask | None, wrote: bool) -> list[str]:
    """What a user must not miss in a result: a mask that accepted nothing."""
    if mask is None or mask.totals["accepted"]:
        return []
    effect = "the fused checkpoint equals the newest one" if wrote else "a fused checkpoint would equal the newest one"
    return [f"the mask ({mask.label}) accepted no element of {mask.totals['elements']:,}: {effect}"]


def _result(store: Store, status: str, message: str, s: Session, ingested: list[str] | None = None,
            skipped: list[dict] | None = None, output: str | None = None) -> StepResult:
    """A result that carries the store's fit and mask as they now are, and what the run said (`s.notes`)."""
    stored = store.stored_mask()
    warnings = s.notes + ([] if status == "up-to-date" else _mask_warnings(store.mask, status in WROTE))
    tensors = tensor_rows([t.as_dict() for t in store.tensors], stored["counts"]) if stored else None
    if current().active:  # each rank has its share's tensors (or pieces of them): the model's are all of them
        tensors = whole_rows(current().gather(tensors, "the result"), _tensor_order(store))
    return StepResult(status, message, str(s.root), ingested or [], skipped or [], output=output,
                      fit=store.fit.as_dict() if store.fit else None, mask=store.mask.as_dict() if store.mask else None,
                      warnings=warnings, tensors=tensors)


__all__ = ["Live", "Settings", "StepResult", "apply", "load_state", "predict", "reject_live", "remask", "restore",
           "snapshot"]
