"""Backups of the checkpoints that `--in-place` replaced, and putting one back.

A backup lives in the store folder as `backups/<snapshot id>-<name>`, made by hard link at
the moment the fused checkpoint is renamed over the original (so it costs no copy). One is
kept for each checkpoint the store still holds a snapshot of, which bounds them to h+1.
Every backup path the store recorded is checked to lie in that folder before it is used.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path, copy_path, remove_path
from .confine import is_inside
from .discover import located
from .errors import StoreError, os_errors_as
from .identity import stat_of
from .store import BACKUP_DIRNAME, Store, lineage
from .store.records import Pending, Snapshot


def _folder(store: Store) -> Path:
    folder = store.root / BACKUP_DIRNAME
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise StoreError("is not a folder of the store's own (a link or a file); remove it", folder)
    return folder


def backup_path(store: Store, snapshot: Snapshot) -> Path:
    folder = _folder(store)
    with os_errors_as(StoreError, "cannot make the backups folder", folder):
        folder.mkdir(exist_ok=True)
    return folder / f"{snapshot.id}-{Path(snapshot.path).name}"


def recorded_backup(snapshot: Snapshot, backup: Path) -> bool:
    """Whether `backup` is the store's own backup of this checkpoint (made by an earlier in-place
    write from it), and so must not be made again from what is now pdt's output. A file that
    merely sits under the predictable name (planted, or left by a killed run) is not."""
    return snapshot.backup == located(backup) and backup.is_file() and not backup.is_symlink()


def in_backups(store: Store, path: str) -> Path:
    """A backup path the store recorded, checked to lie in its backups folder and not to be a link."""
    backup = Path(path)
    if backup.is_symlink() or backup.name in ("", ".", "..") or not is_inside(backup.parent, _folder(store)):
        raise StoreError(f"names a backup outside {store.root / BACKUP_DIRNAME} ({path}); refused", store.meta_path)
    return backup


def prune_backups(store: Store) -> list[Path]:
    """Remove the backups of checkpoints the store no longer holds; call after a commit."""
    folder = _folder(store)
    if not folder.is_dir():
        return []
    wanted = lineage.recorded_backups(store)
    removed = []
    with os_errors_as(StoreError, "cannot prune the backups"):
        for path in folder.iterdir():
            if located(path) not in wanted:
                remove_path(path)
                removed.append(path)
    return removed


def copy_back(backup: Path, target: Path) -> None:
    """Put a backup's content at `target`, atomically, as a real copy with the original times
    (a link would let training's next in-place save truncate the backup too)."""
    with atomic_path(target, force=True) as tmp:
        copy_path(backup, tmp)


def note_in_place(store: Store, final: Path, backup: Path, tmp: Path) -> None:
    """Commit, just before an in-place output is renamed over `final`, what it will look like.

    A run killed between that rename and the store's next commit leaves the fused file under
    the checkpoint's name with nothing in the store saying so; the next run would take it for
    a checkpoint training saved. The note lets the next run recognise it (`finish_in_place`).
    """
    size, mtime = stat_of(tmp)
    store.set_pending(Pending(located(final), located(backup), size, mtime))
    store.commit()


def finish_in_place(store: Store) -> bool:
    """Undo an in-place write that a killed run published but never recorded: put the original
    back from its backup, so the store and the folder agree again. True when it did."""
    pending = store.pending
    if pending is None:
        return False
    final = store.in_folder(pending.path)
    backup = in_backups(store, pending.backup)
    undone = (final.exists() and not final.is_symlink() and backup.exists()
              and stat_of(final) == (pending.size, pending.mtime))
    if undone:
        copy_back(backup, final)
    store.set_pending(None)
    store.commit()
    return undone
