"""Where pdt may write a path the user chose: never on what it reads, never over what is not its own.

Every path a user gives that pdt writes (`-o`, the default `NAME.pdt` output, `report --plot`) is
checked here before anything is written or removed, and so is `--store`, the folder pdt keeps its
store files in. What must never be a target is the checkpoint folder itself, every checkpoint it
holds, every checkpoint or backup the store's records name, and the store folder: an output may
not be one of them, hold one (`-o RUN`, `-o /`), or lie inside one (`-o RUN/.pdt/snapshots.bin`),
with `--force` or without; `--in-place`, with its backup, stays the only way to write over an
input. Paths are compared resolved (links, `..`, relative paths), the final name kept as it is, so
that a link there is the link (replaced itself, never written through). What `--force` may
replace is a regular file or a link, or a folder that pdt wrote; never a device, pipe or socket.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

from .atomic import TMP_TAG
from .discover import list_checkpoints, located
from .errors import OutputError, UsageError
from .placement import store_root
from .store import LOCK_NAME, PART_PREFIX, Store, lineage, parts_of

NEVER = ("pdt never writes over its inputs or its store, --force or not (--in-place, with its backup, "
         "is the way to replace the newest checkpoint); choose another path")
FOLDER = "the checkpoint folder"
_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a pipe (fifo)",
          stat.S_IFSOCK: "a socket"}


@dataclass(frozen=True)
class Guard:
    """What no written path may be, hold or lie inside, each as (resolved path, what it is for messages),
    and the outputs pdt wrote (their located paths), the only folders `--force` replaces."""

    kept: tuple[tuple[Path, str], ...]
    owned: frozenset[str] = frozenset()

    def conflict(self, path: Path) -> str | None:
        """How `path` meets what is kept ("is the store", "holds the input checkpoint …", "lies inside …"),
        or None when it meets none. The checkpoint folder itself may hold outputs."""
        where = resolved(path)
        for kept, what in self.kept:
            if where == kept:
                return f"is {what}"
            if kept.is_relative_to(where):
                return f"holds {what} {kept}"
            if where.is_relative_to(kept) and what != FOLDER:
                return f"lies inside {what} {kept}"
        return None


def resolved(path: Path) -> Path:
    """`path` absolute, its folders' links and `..` resolved, its own name kept (a link stays the link)."""
    path = Path(path)
    return path.resolve() if path.name in ("", "..") else Path(located(path))


def _forms(path: str | Path) -> set[Path]:
    """A kept path as it is named and as it is reached through its links (an input that is a link to
    a file elsewhere: writing over that file would change the input too)."""
    return {resolved(Path(path)), Path(path).resolve()}


def whole_store(root: Path) -> Path:
    """The store folder a session's root belongs to: `.pdt` for one rank's part `.pdt/rank-R-of-K`."""
    root = Path(root)
    return root.parent if root.name.startswith(PART_PREFIX) else root


def guard_of(folder: Path | None, root: Path, store: Store | None) -> Guard:
    """The guard of a session: its checkpoint folder and every checkpoint in it (pdt's own outputs
    aside), every checkpoint, in-place target and backup the store records, and the store folder."""
    owned: set[str] = set()
    recorded: set[str] = set()
    if store is not None:
        folder = folder or store.folder
        recorded |= {r.path for r in store.seen}
        recorded |= {s.path for s in store.snapshots.values() if s.kind == "checkpoint"}
        recorded |= {o.path for o in store.outputs if o.in_place or o.live}  # a checkpoint's own path
        recorded |= lineage.recorded_backups(store)
        recorded |= {store.pending.path, store.pending.backup} if store.pending else set()
        owned = {o.path for o in store.outputs if not (o.in_place or o.live)}
    kept = _inputs(folder, store, recorded) + [(p, "the store") for p in _forms(whole_store(root))]
    return Guard(tuple(kept), frozenset(owned))


def _inputs(folder: Path | None, store: Store | None, recorded: set[str]) -> list[tuple[Path, str]]:
    """The checkpoint folder, then every checkpoint in it (pdt's own outputs aside) and `recorded`."""
    if folder is None:
        return [(p, "the input checkpoint") for path in sorted(recorded) for p in _forms(path)]
    known = lineage.owned_outputs(store) if store is not None else frozenset()
    found = {str(c.path) for c in list_checkpoints(Path(folder), known)}
    return [(p, FOLDER) for p in _forms(folder)] + [
        (p, "the input checkpoint") for path in sorted(found | recorded) for p in _forms(path)]


def check_output(out: Path, guard: Guard, *, force: bool, default: bool = False) -> None:
    """Refuse (OutputError, exit 5) to write `out` unless it is a path pdt may write.

    `out` may not be, hold or lie inside anything `guard` keeps. When it exists, `force` is needed
    (the caller passes it for a path it renews without asking), and even then only a regular file,
    a link (replaced itself) or a folder pdt wrote is replaced: an output it recorded, or
    (`default`) the default `NAME.pdt` output, pdt's by its name.
    """
    out = Path(out)
    problem = guard.conflict(out)
    if problem:
        raise OutputError(f"{problem}; {NEVER}", out)
    try:
        mode = out.lstat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there: the write says if its folder is missing
        return
    kind = _KINDS.get(stat.S_IFMT(mode))
    if kind:
        raise OutputError(f"is {kind}; pdt writes only regular files and folders (choose another path)", out)
    if stat.S_ISDIR(mode) and not default and str(resolved(out)) not in guard.owned:
        raise OutputError("is a folder pdt did not write; --force replaces only pdt's own outputs and regular "
                          "files (remove it yourself, or choose another path)", out)
    if not force:
        raise OutputError("exists; pass --force to replace it", out)


def check_store_place(store: Path, folder: Path) -> None:
    """Refuse (UsageError, exit 2) a `--store` folder that is the checkpoint folder, holds it or an
    input checkpoint, or lies inside one: the store's files would be written among the checkpoints.
    Refuse too an existing folder that holds no store but other files: pdt writes `snapshots.bin`
    and `store.h5` there, and prunes what `backups/` holds."""
    problem = Guard(tuple(_inputs(folder, None, set()))).conflict(store)
    if problem:
        raise UsageError(f"--store {problem}: the store's files would be written among the checkpoints; "
                         f"keep it apart from them (the default is {store_root(folder)})", store)
    other = _foreign_entry(Path(store))
    if other:
        raise UsageError(f"--store names a folder that holds {other} and no pdt store; pdt writes and removes "
                         "files in its store folder, so give a new or empty folder, or one that holds a store", store)


def _foreign_entry(store: Path) -> str | None:
    """The first entry of an existing folder that holds no store which is not pdt's (its lock, a
    temporary of a killed run), or None."""
    if not store.is_dir() or Store.exists(store) or parts_of(store):
        return None
    return next((p.name for p in sorted(store.iterdir()) if p.name != LOCK_NAME and TMP_TAG not in p.name), None)
