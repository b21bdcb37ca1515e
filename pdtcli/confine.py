"""Keeping every path pdt touches inside the checkpoint it came from.

Checkpoint folders arrive from other jobs, other people and downloads, so the names their
indexes and metadata hold (a shard map, DCP's `relative_path`, an HDF5 file's external
storage, the paths a store recorded) are untrusted input. A name is used only when it is
relative, has no `..`, and resolves inside its folder; a folder whose links lead outside is
refused before anything in it is copied; HDF5 data stored in other files is refused before
it is read, because pdt would otherwise copy it into an output or write fused values back
through it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import h5py

from .errors import CheckpointError


def is_inside(path: Path, folder: Path) -> bool:
    """Whether `path`, with every link resolved, lies in `folder` (resolved too)."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def member(folder: Path, name: object, what: str, owner: Path | None = None) -> Path:
    """`folder / name` for a name read from a checkpoint's own index or metadata.

    Refused unless it is a non-empty relative name without `..` that resolves inside
    `folder`; `owner` is the file the error names (the checkpoint).
    """
    text = str(name) if isinstance(name, (str, os.PathLike)) else None
    parts = PurePosixPath(text.replace("\\", "/")).parts if text and "\0" not in text else ()
    if not parts or text.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise CheckpointError(f"{what} names {name!r}: only names relative to the checkpoint, without '..', "
                              "are accepted", owner or folder)
    path = Path(folder, *parts)
    if not is_inside(path, folder):
        raise CheckpointError(f"{what} names {name!r}, which leads outside the checkpoint (a link?)",
                              owner or folder)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{what} names {name!r}, which is not a regular file", owner or folder)
    return path


def refuse_links_out(folder: Path) -> None:
    """Refuse a checkpoint folder that holds anything but files, folders and links to files in it.

    Its files are copied into the fused folder and some are rewritten there, so a link
    out would either copy someone else's file into the output or, once copied as a link,
    be written through; a link to a folder can loop; a pipe or device would block the copy.
    """
    folder = Path(folder)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root, name)
            shown = path.relative_to(folder)
            if path.is_symlink():
                if not is_inside(path, folder):
                    raise CheckpointError(f"{shown} is a symbolic link to {os.readlink(path)}, outside the "
                                          "checkpoint; pdt does not follow links out of a checkpoint", folder)
                if not path.is_file():
                    raise CheckpointError(f"{shown} is a symbolic link to a folder or to nothing; pdt copies "
                                          "only files", folder)
            elif not (path.is_file() or path.is_dir()):
                raise CheckpointError(f"{shown} is not a regular file (a pipe, socket or device)", folder)


def stored_outside(file: h5py.File, allowed: tuple[str, ...] = (), soft_links: bool = True) -> str | None:
    """The first dataset or link of an HDF5 file whose data lives in another file, or None.

    External datasets, virtual datasets and external links all point into other files;
    `allowed` names the ones the caller placed there itself (the store's snapshot matrix).
    `soft_links=False` refuses links inside the file too, for files pdt wrote without any.
    """
    found: list[str] = []

    def check(name: str, link: h5py.SoftLink | h5py.HardLink | h5py.ExternalLink) -> bool | None:
        if name in allowed:
            return None
        if isinstance(link, h5py.ExternalLink):
            found.append(f"{name} (an external link to {link.filename})")
            return True
        if isinstance(link, h5py.SoftLink) and not soft_links:
            found.append(f"{name} (a link to {link.path})")
            return True
        if isinstance(link, h5py.HardLink):
            obj = file.get(name)
            if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
                found.append(f"{name} (data stored in another file)")
                return True
        return None

    file.visititems_links(check)
    return found[0] if found else None
