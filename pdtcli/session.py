"""One command's hold on a store: resolve the target, take the lock, open (or not yet) the store.

A second pdt on the same store waits for the lock, then fails clearly. A command that would
ingest from a folder in which nothing is a checkpoint fails before `.pdt` is made there, and
a store folder made by a run that ended without a store is removed again, so a wrong path in
a cron line creates nothing. The store's folder, lock and records are checked before they
are trusted: a linked store folder or lock file is refused, and a store opened by its own
path must be a default store folder of the checkpoint folder it names. An operating-system error on the
store's folder, lock or leftovers is a StoreError naming the file; a command that only reads (`pdt
report`) reads a store it may not lock (read-only media, another user's store) without the lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import filelock

from .adopt import adopt
from .atomic import remove_path, sweep_temporaries
from .backups import finish_in_place
from .discover import no_checkpoints_here
from .errors import (
    UNWRITABLE,
    CheckpointError,
    DistributedError,
    StageMissing,
    StoreError,
    UsageError,
    os_error,
    os_errors_as,
)
from .lazy import LAZY_TORCH
from .options import Settings
from .placement import is_default_store, side_folder, store_root
from .store import (
    BACKUP_DIRNAME,
    LOCK_NAME,
    META_NAME,
    Store,
    part_name,
    parts_of,
    roll_forward,
)
from .targets import check_store_place, whole_store
from .world import SINGLE, World, joined

log = logging.getLogger(__name__)


@dataclass
class Session:
    root: Path
    folder: Path | None
    store: Store | None
    settings: Settings
    order: str = "name"
    unlocked: str | None = None  # why a command that only reads holds no lock, when it does not
    notes: list[str] = field(default_factory=list)  # lines the result shows: a store adopted, a window restarted
    keeps: bool = False  # the command keeps its settings in the store once it completes (`kept_settings`)

    def kept_settings(self, audit: str | None = None) -> Settings:
        """The run's settings, each KEPT one it was not given taken from the store (`options.KEPT`; the default
        where the store keeps none), and one note when it was given another value than the store keeps.
        `audit`: what makes this run one that keeps no setting (`pdt mask`, `--dry-run`); else the values
        are kept for later runs once the command completes (`keep_settings`; a run that fails keeps none)."""
        self.keeps = audit is None
        kept = self.store.settings if self.store is not None else {}
        self.settings = self.settings.with_kept(kept)
        changed = self.settings.changes(kept)
        if changed:
            self.notes.append(f"settings changed from those kept in the store: {changed}; " + (
                "kept from now on" if audit is None else f"for this run only ({audit} keeps no setting)"))
        return self.settings

    def keep_settings(self) -> None:
        """Keep the run's KEPT settings in the store for later runs (a commit when they change), when it asked."""
        store = self.store
        if not self.keeps or store is None:
            return
        values = self.settings.run_values(store.settings)
        if values != store.settings:
            store.set_settings(values)
            store.commit()

    def require_store(self) -> Store:
        if self.store is None:
            raise StageMissing("no store yet; run `pdt snapshot` or `pdt predict` on the checkpoint folder first",
                               self.root)
        return self.store


def resolve_store_root(target: Path, store: Path | None) -> tuple[Path, Path | None]:
    """(store folder, checkpoint folder or None) for a command's target argument.

    The target may be a checkpoint folder (its store is `placement.store_root`, `<folder>/.pdt` or
    `<folder>.pdt/.pdt`, unless `--store` names another), a store folder, or a store's `store.h5`.
    A path pdt may not look at is a UsageError.
    """
    with os_errors_as(UsageError, "cannot look at this path", target):
        return _store_root_of(Path(target), store)


def _store_root_of(target: Path, store: Path | None) -> tuple[Path, Path | None]:
    if not target.exists():
        raise UsageError("does not exist", target)
    if target.is_file() and target.name == META_NAME:
        return target.parent, None
    if (target / META_NAME).is_file() and not store:
        return target, None
    if not target.is_dir():
        raise UsageError("not a checkpoint folder or a pdt store", target)
    if store:
        check_store_place(Path(store), target)
        return Path(store), target
    root = store_root(target)
    for path in (root, root.parent) if root.parent == side_folder(target) else (root,):
        if path.is_symlink():
            raise StoreError(f"is a symbolic link to {os.readlink(path)}; pdt keeps its default store at a place "
                             "derived from the checkpoint folder (pass --store with the real folder if you meant "
                             "it)", path)
    return root, target


def lock_for(root: Path, timeout: float) -> filelock.BaseFileLock:
    """The store's lock: a second pdt waits up to `timeout` seconds, then fails clearly.

    filelock opens the lock file for writing, so a lock file that is a link (planted to make
    pdt write another file) is refused rather than opened. OSError when the folder cannot be made.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StoreError("is not a folder; pdt keeps its store in a folder of this name (remove the file)", root)
    root.mkdir(parents=True, exist_ok=True)
    lock = root / LOCK_NAME
    if lock.is_symlink():
        raise StoreError("the lock file is a symbolic link; pdt never writes through one (remove it)", lock)
    return filelock.FileLock(str(lock), timeout=timeout)


_LOCKED = "locked by another pdt process (waited {wait:g}s; --wait to wait longer)"


def _acquired(root: Path, timeout: float, *, reads_only: bool = False) -> filelock.BaseFileLock | str:
    """The store folder's lock, held; a clear error when another pdt holds it past `timeout`, or
    when the folder or lock file cannot be made (no permission, read-only, a file in the path).

    `reads_only` (a command that changes nothing): where no lock can be made at all (read-only
    media, another user's store), the reason, as a note, instead of an error: the store is read as
    last committed, which the atomic replacement of `store.h5` keeps whole.
    """
    what = "cannot make the store folder (--store DIR keeps it elsewhere)"
    try:
        lock = lock_for(root, timeout)
        what = "cannot lock the store (--store DIR keeps it elsewhere)"
        lock.acquire()
    except filelock.Timeout as exc:
        raise StoreError(_LOCKED.format(wait=timeout), root) from exc
    except OSError as exc:
        if reads_only and exc.errno in UNWRITABLE:
            return f"read without the lock ({os.strerror(exc.errno)}); it shows the store as last committed"
        raise os_error(exc, StoreError, what) from exc
    return lock


def clean_leftovers(root: Path, folder: Path | None) -> list[Path]:
    """Remove temporaries a killed pdt left behind (call while holding the lock)."""
    removed = sweep_temporaries(root) + sweep_temporaries(root / BACKUP_DIRNAME)
    if folder is not None:
        removed += sweep_temporaries(folder)
    return removed


def _default_store_of(root: Path, folder: Path) -> bool:
    """Whether `root` is a default store folder of `folder` (`placement.is_default_store`). Only then
    may a store opened by its own path say which folder it serves: otherwise a store.h5 planted in
    any folder could name any other folder, and pdt would write outputs (and restore backups) there."""
    return is_default_store(whole_store(root), folder)  # one rank's part of a distributed store: .pdt/rank-R-of-K


@contextlib.contextmanager
def session(target: Path, store: Path | None, settings: Settings, *, ingests: bool = False,
            rebuild: bool = False, joins: bool = True, reads_only: bool = False) -> Iterator[Session]:
    """Hold the store's lock for the whole command; under torchrun, joined to the ranks' process group
    (`world.joined`), each rank holding its own part of the store.

    `ingests`: the command reads checkpoints from the folder, so a folder with none is a usage
    error when there is no store yet. `rebuild`: set the store aside unread (it may be
    damaged) and start a new one. `joins`: under torchrun, take part in the distributed step (reports
    and restores never do: they read or change one store as one process). `reads_only`: the command
    changes nothing (reports), so a store it may read but not lock is read without the lock
    (`Session.unlocked` says why), and nothing is cleaned up or finished in it.
    """
    with cpu_threads(settings.threads), \
            joined(settings.backend, settings.dist_timeout) if joins else contextlib.nullcontext(SINGLE) as world:
        root, folder = resolve_store_root(Path(target), store)
        part = part_root(root, world)
        with _whole_store(root, settings, world), _locked(part, folder, settings, world, ingests=ingests,
                                                             rebuild=rebuild, reads_only=reads_only) as state:
            yield state


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's CPU threads for one command, put back afterwards (an in-loop call runs inside the training
    process). One unless the user says otherwise: a row block is 2^16 elements, too little to share out,
    and on a machine busy with other work threads that wait for each other made the 100M steady step 6x
    slower (67 s against 11 s with one; benchmarks/RESULTS.md). Ranks on one node then also never
    oversubscribe its cores. A command that touches no tensor does not import torch for this
    (`LazyModule.first_use`)."""
    if count is None and "OMP_NUM_THREADS" not in os.environ:
        count = 1
    before: list[int] = []  # the caller's count, once torch is there to ask

    def limit(module: ModuleType) -> None:
        before.append(module.get_num_threads())
        if count is not None:
            module.set_num_threads(count)

    with LAZY_TORCH.first_use(limit):
        try:
            yield
        finally:
            if before:
                LAZY_TORCH.set_num_threads(before[0])


@contextlib.contextmanager
def _whole_store(root: Path, settings: Settings, world: World) -> Iterator[None]:
    """In a distributed step, rank 0 holds the store folder's own lock before any rank takes its part's:
    two runs on one store then queue as wholes, where each could otherwise hold a part the other waits for."""
    if not world.active:
        yield
        return
    lock, problem = None, None
    if world.leader:
        try:
            lock = _acquired(root, settings.lock_timeout)
        except StoreError as exc:
            problem = exc
    if world.gather(problem is not None, "locking the store")[0]:
        raise problem or StoreError(_LOCKED.format(wait=settings.lock_timeout), root)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def part_root(root: Path, world: World) -> Path:
    """Where this rank keeps its store: the store folder itself in one process, else its part
    (`rank-R-of-K/`) of it. A store made by another number of ranks is refused on every rank."""
    made = parts_of(root)
    sizes = sorted(made)
    if not world.active:
        if sizes and not Store.exists(root):
            raise DistributedError(f"this store was made by {sizes[0]} ranks under torchrun; run pdt the same way "
                                   f"(torchrun --nproc-per-node {sizes[0]} -m pdtcli ...); `pdt report` reads it as "
                                   "it is", root)
        return root
    if Store.exists(root):
        raise DistributedError(f"this store was made by one process, not {world.size} ranks: run pdt without "
                               "torchrun, or remove the store to make one for this many ranks", root)
    other = [size for size in sizes if size != world.size]
    if other:
        raise DistributedError(f"this store was made by {other[0]} ranks and this run has {world.size}: run with "
                               f"{other[0]} ranks (each keeps its part of the store), or remove the store", root)
    return Path(root) / part_name(world)


@contextlib.contextmanager
def _locked(root: Path, folder: Path | None, settings: Settings, world: World, *, ingests: bool,
            rebuild: bool, reads_only: bool = False) -> Iterator[Session]:
    fresh = not Store.exists(root) or rebuild
    if ingests and fresh and folder is not None:
        with os_errors_as(CheckpointError, "cannot list the checkpoint folder", folder):
            problem = no_checkpoints_here(folder, settings.files)
        if problem:
            raise UsageError(problem, folder)
    made = [path for path in (root, *root.parents) if not path.exists()]  # the side folder too, where new
    aside = None
    lock = _acquired(root, settings.lock_timeout, reads_only=reads_only)
    unlocked = lock if isinstance(lock, str) else None
    try:
        with os_errors_as(StoreError, "cannot use the store"):  # what no narrower boundary below names
            if unlocked is None:  # leftovers and an unfinished in-place write wait for a run that may write
                clean_leftovers(root, folder if world.leader else None)
            if rebuild:
                if folder is None:
                    raise UsageError("--rebuild needs the checkpoint folder, not the store", root)
                aside = Store.set_aside(root)
                log.info("store set aside in %s for --rebuild", aside)
            elif ingests and folder is not None and Store.orphaned_backups(root):  # kept as a rebuild keeps them
                aside = Store.set_aside(root)
                log.warning("%s: backups of checkpoints --in-place replaced, recorded by no store, kept in %s",
                            root / BACKUP_DIRNAME, aside / BACKUP_DIRNAME)
            if world.active:
                roll_forward(root, world)
            opened = Store.open(root) if Store.exists(root) else None
            notes = []
            if opened is not None and folder is not None and opened.folder.resolve() != folder.resolve():
                if not _default_store_of(root, folder):  # a store given with --store serves its own folder only
                    raise StoreError(f"this store belongs to another folder ({opened.folder}); run pdt on that "
                                     "folder, or give this one a store of its own (--store DIR)", root)
                # the folder's own .pdt, come along with a copied or renamed run folder
                notes.append(adopt(opened, folder, world, commit=unlocked is None and not reads_only))
            if opened is not None and folder is None and not _default_store_of(root, opened.folder):
                raise StoreError(f"is not the .pdt folder of the checkpoint folder it names ({opened.folder}); "
                                 f"run pdt on that folder with --store {root}", root)
            pending = opened.pending.path if opened is not None and opened.pending else None
            if opened is not None and unlocked is None and finish_in_place(opened):
                log.info("an in-place write killed before the store recorded it was undone: %s is the original "
                         "again", pending)
        # every rank must go on from the same records (a part killed while the others committed does not)
        world.same(opened.fingerprint() if opened else None, "store records")
        state = Session(root, folder if folder is not None else (opened.folder if opened else None), opened, settings,
                        unlocked=unlocked, notes=notes)
        try:
            yield state
            state.keep_settings()  # only for a command that completed
        finally:
            if state.store is not None:
                state.store.close()
    finally:
        if aside is not None and Store.exists(root):  # a rebuild keeps the old store until a new one is made
            Store.keep_aside(aside)
        elif aside is not None:
            Store.put_back(root, aside)
        if unlocked is None:
            lock.release()
        if made and not Store.exists(root):
            remove_path(root)
            if world.active and root.parent.is_dir() and not any(root.parent.iterdir()):
                root.parent.rmdir()
            for above in made[1:]:  # folders made for it, now empty
                if above.is_dir() and not any(above.iterdir()):
                    above.rmdir()
