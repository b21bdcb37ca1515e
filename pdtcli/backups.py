"""Backups of the checkpoints that `--in-place` replaced, and putting one back.

A backup lives in the store folder as `backups/<snapshot id>-<name>`, made by hard link at
the moment the fused checkpoint is renamed over the original (so it costs no copy). One is
kept for each checkpoint the store still holds a snapshot of, which bounds them to h+1.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_path, copy_path, remove_path
from .store import BACKUP_DIRNAME, Store


def backup_path(store: Store, record: dict) -> Path:
    folder = store.root / BACKUP_DIRNAME
    folder.mkdir(exist_ok=True)
    return folder / f"{record['id']}-{Path(record['path']).name}"


def prune_backups(store: Store) -> list[Path]:
    """Remove the backups of checkpoints the store no longer holds; call after a commit."""
    folder = store.root / BACKUP_DIRNAME
    if not folder.is_dir():
        return []
    wanted = {rec.get("backup") for rec in store.state["snapshots"].values()}
    removed = []
    for path in folder.iterdir():
        if str(path.resolve()) not in wanted:
            remove_path(path)
            removed.append(path)
    return removed


def copy_back(backup: Path, target: Path) -> None:
    """Put a backup's content at `target`, atomically, as a real copy with the original times
    (a link would let training's next in-place save truncate the backup too)."""
    with atomic_path(target, force=True) as tmp:
        copy_path(backup, tmp)
