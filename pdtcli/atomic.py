"""Write-then-rename, so that no reader ever sees a half-written file under its final name.

A crash (even SIGKILL) between open and rename leaves only a hidden temporary file, which
`sweep_temporaries` removes on the next run; the final name keeps its previous content.
Checkpoint folders are written the same way as a temporary folder. A folder cannot be
renamed over a non-empty one, so replacing one (`--force`) first moves the old one aside
under a temporary name: a crash in that instant leaves the final name absent for a
moment, never half-written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import OutputError, PdtError, os_error, os_errors_as
from .identity import files_of
from .world import World

TMP_TAG = ".pdt-tmp-"


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry must reach the disk too."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file to disk; a read-only descriptor is enough, so a read-only (linked) file is fine."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(final: Path, *, force: bool = True, backup_to: Path | None = None,
                before_publish: Callable[[Path], None] | None = None,
                error: type[PdtError] = OutputError, accept: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it is synced and renamed over it.

    With `force=False` an existing `final` is refused before anything is written. With
    `backup_to`, what `final` held is kept there (see `keep_copy`) once the new content is
    complete and just before it replaces the old. `before_publish(tmp)` runs when the
    content is complete and on disk, just before the rename, so a caller can note what is
    about to appear under `final` (and recognise it after a crash in between). An operating-system
    error (disk full, no permission, a file-size limit) is one `error` naming `final` (an OutputError,
    or a StoreError for the store's own files).

    With `accept`, the temporary is `final`'s own name inside a hidden temporary folder beside it (so that a
    program judging it knows its format by its suffix), and `accept(tmp)`, called once it is complete, decides:
    False removes it and leaves `final` (and `backup_to`) as they were.
    """
    final = Path(final)
    with os_errors_as(error, "cannot write", final):  # a path pdt may not even look at
        folder = _writable_folder(final, force, error)
    hidden = folder / f".{final.name}{TMP_TAG}{os.getpid()}"  # swept by the next run if this one is killed
    tmp = hidden / final.name if accept is not None else hidden
    try:
        remove_path(hidden)  # whatever sits under the name (a planted link, a dead run's file) is not written through
        if accept is not None:
            hidden.mkdir()
        yield tmp
        if accept is not None and not accept(tmp):
            remove_path(hidden)
            return
        if backup_to is not None and final.exists():
            keep_copy(final, backup_to)
        for written in files_of(tmp):
            fsync_file(written)
        if before_publish is not None:
            before_publish(tmp)
        _publish(tmp, final)
        fsync_dir(folder)
        if accept is not None:
            hidden.rmdir()
    except BaseException as exc:
        remove_path(hidden)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise os_error(exc, error, "cannot write", final) from exc
        raise


def _writable_folder(final: Path, force: bool, error: type[PdtError] = OutputError) -> Path:
    """The folder `final` is written in, checked before anything is (an `error` if it cannot be)."""
    if not force and final.exists():
        raise error("exists; pass --force to replace it", final)
    folder = final.parent
    if not folder.is_dir():
        raise error("the folder for this output does not exist", final)
    if not os.access(folder, os.W_OK):
        raise error("no permission to write in this folder" + (" (it is mounted read-only)" if _read_only(folder)
                                                               else ""), final)
    return folder


def _read_only(folder: Path) -> bool:
    """Whether `folder` lies on a file system mounted read-only (where no permission helps)."""
    return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)


@contextlib.contextmanager
def shared_atomic_path(final: Path, world: World, prepare: Callable[[Path], None],
                       mine: Callable[[Path], list[Path]]) -> Iterator[Path]:
    """`atomic_path` for the ranks of a distributed step, all or nothing.

    Rank 0 names the temporary and `prepare`s it (for a folder checkpoint: the folder, with the
    files no rank owns); every rank then writes its own files there and syncs those (`mine`);
    only when every rank has does rank 0 rename it into place. A rank that fails or dies stops
    the others before the rename, and rank 0 removes the temporary (or, if rank 0 itself died,
    the next run's sweep does).
    """
    final = Path(final)
    tmp = final.parent / world.gather(f".{final.name}{TMP_TAG}{os.getpid()}", "naming the output")[0]
    try:
        if world.leader:
            _writable_folder(final, True)
            remove_path(tmp)
            prepare(tmp)
        world.agree(True, "writing the output")
        yield tmp
        for written in mine(tmp):
            fsync_file(written)
        world.agree(True, "publishing the output")
        if world.leader:
            _publish(tmp, final)
            fsync_dir(final.parent)
        world.agree(True, "the output published")  # no rank goes on (to stat it, to commit) before it is there
    except BaseException as exc:
        if world.leader:
            remove_path(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise os_error(exc, OutputError, "cannot write", final) from exc
        raise


def keep_copy(source: Path, dest: Path) -> None:
    """Keep `source` (file or folder) at `dest`, atomically: hard links where the filesystem allows.

    A link costs no space or time, and it is safe here because the caller then *renames*
    new content over `source`, so the linked inodes end up referenced by `dest` alone.
    """
    with atomic_path(dest) as tmp:
        copy_path(source, tmp, _link_or_copy2)


def copy_path(source: Path, dest: Path, copy_function: Callable[[str, str], object] = shutil.copy2) -> None:
    """Copy a checkpoint file or folder, file by file with `copy_function` (times kept by default)."""
    if source.is_dir():
        shutil.copytree(source, dest, copy_function=copy_function)
    else:
        copy_function(str(source), str(dest))


def _link_or_copy2(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copy2(src, dst)


def _publish(tmp: Path, final: Path) -> None:
    if tmp.is_dir() and final.exists():
        aside = final.parent / f".{final.name}{TMP_TAG}old-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        remove_path(aside)
    else:
        os.replace(tmp, final)


def remove_path(path: Path) -> None:
    """Remove a file or folder; a symbolic link is removed itself, never what it points to."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def sweep_temporaries(folder: Path) -> list[Path]:
    """Remove temporaries that a killed pdt left in `folder`; return what was removed."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".") and TMP_TAG in path.name:
                remove_path(path)
                removed.append(path)
    return removed
