"""One command's hold on a store: resolve the target, take the lock, open (or not yet) the store.

A second pdt on the same store waits for the lock, then fails clearly. A command that would
ingest from a folder in which nothing is a checkpoint fails before `.pdt` is made there, and
a store folder made by a run that ended without a store is removed again, so a wrong path in
a cron line creates nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .atomic import remove_path
from .backups import finish_in_place
from .discover import no_checkpoints_here
from .errors import StageMissing, StoreError, UsageError
from .options import Settings
from .store import STORE_DIRNAME, Store, clean_leftovers, lock_for, resolve_store_root


@dataclass
class Session:
    root: Path
    folder: Path | None
    store: Store | None
    settings: Settings
    order: str = "name"

    def require_store(self) -> Store:
        if self.store is None:
            raise StageMissing("no store yet; run `pdt snapshot` or `pdt predict` on the checkpoint folder first",
                               self.root)
        return self.store


def _default_store_of(root: Path, folder: Path) -> bool:
    """Whether `root` is `folder/.pdt`. Only then may a store opened by its own path say which
    folder it serves: otherwise a store.h5 planted in any folder could name any other folder,
    and pdt would write outputs (and restore backups) there."""
    return root.name == STORE_DIRNAME and root.resolve().parent == folder.resolve()


@contextlib.contextmanager
def session(target: Path, store: Path | None, settings: Settings, *, ingests: bool = False,
            rebuild: bool = False) -> Iterator[Session]:
    """Hold the store's lock for the whole command.

    `ingests`: the command reads checkpoints from the folder, so a folder with none is a usage
    error when there is no store yet. `rebuild`: set the store aside unread (it may be
    damaged) and start a new one.
    """
    root, folder = resolve_store_root(Path(target), store)
    fresh = not Store.exists(root) or rebuild
    if ingests and fresh and folder is not None:
        problem = no_checkpoints_here(folder, settings.files)
        if problem:
            raise UsageError(problem, folder)
    made_root = not root.exists()
    lock = lock_for(root, settings.lock_timeout)
    try:
        lock.acquire()
    except Exception as exc:  # filelock.Timeout
        raise StoreError(f"locked by another pdt process (waited {settings.lock_timeout:g}s; --wait to wait longer)",
                         root) from exc
    try:
        clean_leftovers(root, folder)
        if rebuild:
            if folder is None:
                raise UsageError("--rebuild needs the checkpoint folder, not the store", root)
            Store.set_aside(root)
        opened = Store.open(root) if Store.exists(root) else None
        if opened is not None and folder is not None and opened.folder.resolve() != folder.resolve():
            raise StoreError(f"this store belongs to another folder ({opened.folder})", root)
        if opened is not None and folder is None and not _default_store_of(root, opened.folder):
            raise StoreError(f"is not the .pdt folder of the checkpoint folder it names ({opened.folder}); "
                             f"run pdt on that folder with --store {root}", root)
        if opened is not None:
            finish_in_place(opened)
        state = Session(root, folder if folder is not None else (opened.folder if opened else None), opened, settings)
        try:
            yield state
        finally:
            if state.store is not None:
                state.store.close()
    finally:
        lock.release()
        if made_root and not Store.exists(root):
            remove_path(root)
