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
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError
from .identity import files_of

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
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_path(final: Path, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it is synced and renamed over it.

    With `force=False` an existing `final` is refused before anything is written.
    """
    final = Path(final)
    if not force and final.exists():
        raise OutputError("exists; pass --force to replace it", final)
    folder = final.parent
    if not folder.is_dir():
        raise OutputError("the folder for this output does not exist", final)
    if not os.access(folder, os.W_OK):
        raise OutputError("no permission to write in this folder", final)
    tmp = folder / f".{final.name}{TMP_TAG}{os.getpid()}"
    try:
        yield tmp
        _publish(tmp, final)
        fsync_dir(folder)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise OutputError(f"cannot write: {exc.strerror or exc}", final) from exc
        raise


def _publish(tmp: Path, final: Path) -> None:
    for written in files_of(tmp):
        fsync_file(written)
    if tmp.is_dir() and final.exists():
        aside = final.parent / f".{final.name}{TMP_TAG}old-{os.getpid()}"
        os.replace(final, aside)
        os.replace(tmp, final)
        _remove(aside)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()
    elif path.exists():
        path.unlink()


def sweep_temporaries(folder: Path) -> list[Path]:
    """Remove temporaries that a killed pdt left in `folder`; return what was removed."""
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(".") and TMP_TAG in path.name:
                _remove(path)
                removed.append(path)
    return removed
