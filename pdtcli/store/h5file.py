"""`store.h5`: the store's records as JSON and arrays in one small HDF5 file, checksummed.

It is rewritten whole at each commit (temporary file, fsync, rename). Its `snapshots` dataset
is an HDF5 external dataset over `snapshots.bin`, so `h5py` users can open the matrix too;
pdt itself never reads it through HDF5. Reading takes only the records pdt writes, by name,
each stored in the file itself: links, external or virtual data are refused (a crafted store
could otherwise read any file into itself). A SHA-256 over the records catches a damaged file.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..confine import stored_outside
from ..errors import StoreError, os_error

# 2: records carry a checksum. 3: the snapshot matrix's digests (SUMS); a pdt reading up to 2 would
# leave that record out of the records' checksum and call the store damaged, so it is told to upgrade.
FORMAT_VERSION = 3
SUMS = "matrix/xxh3_64"  # (slots, chunks) digests of snapshots.bin (`checksums`)
JSON_RECORDS = ("state", "layout", "history")
ARRAY_RECORDS = ("fit/R", "fit/C", "fit/singular_values", "fit/eigenvalues",
                 "mask/bits", "mask/byte_offsets", "mask/counts", SUMS)
MATRIX = "snapshots"


def hint(root: Path) -> str:
    """The way out of a damaged store. Deleting the store's two files, not its folder, keeps `backups/`,
    the only copies of checkpoints `--in-place` replaced (the next run sets them aside, never prunes)."""
    return (f"; `pdt snapshot --rebuild` makes it afresh from the checkpoints (or delete {root / 'store.h5'} "
            "and snapshots.bin)")


def read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON records parsed, arrays) of a store file; StoreError for anything but a sound store."""
    advice = hint(path.parent)
    try:
        with h5py.File(path, "r") as f:
            version = int(f.attrs.get("format_version", -1))
            if version > FORMAT_VERSION:
                raise StoreError(f"made by a newer pdt (store format {version}, this pdt reads up to "
                                 f"{FORMAT_VERSION}); upgrade pdt", path)
            if version < 1:
                raise StoreError("not a pdt store" + advice, path)
            outside = stored_outside(f, allowed=(MATRIX,), soft_links=False)
            if outside is not None:
                raise StoreError(f"refused: {outside}" + advice, path)
            records = {name: _record(f, name) for name in JSON_RECORDS + ARRAY_RECORDS
                       if name in f or name in JSON_RECORDS}
            stored_sum = f.attrs.get("checksum")
        if (version >= 2 or stored_sum is not None) and checksum(records) != _text(stored_sum):
            raise StoreError("damaged: its records fail their checksum" + advice, path)
        texts = {name: json.loads(records.pop(name)) for name in JSON_RECORDS}
    except StoreError:
        raise
    except Exception as exc:  # HDF5 on damaged bytes fails in many ways; each means the same here
        if isinstance(exc, OSError) and exc.errno:  # but the system refused (no permission, EIO): it may be sound
            raise os_error(exc, StoreError, "cannot read", path) from exc
        raise StoreError(f"unreadable store ({type(exc).__name__}: {str(exc)[:200]})" + advice, path) from exc
    return texts, records


def write(path: Path, texts: dict[str, Any], arrays: dict[str, np.ndarray],
          matrix: tuple[str, tuple, np.dtype, str]) -> None:
    """Replace the store file atomically with these records (`matrix`: the external data's name,
    shape, NumPy type of its bytes, and the dtype they hold, which differ for bfloat16)."""
    records: dict[str, Any] = {name: json.dumps(texts[name]) for name in JSON_RECORDS}
    records.update(arrays)
    data_name, shape, dtype, holds = matrix
    # Built in memory, then written by plain writes: HDF5 writing to the disk itself meets a full disk
    # while it flushes its caches in object destructors, where the error is only printed (a traceback per
    # object) and the process may then crash; a plain write's OSError is one StoreError (atomic_path).
    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["pdt_version"] = __version__
        f.attrs["checksum"] = checksum(records)
        for key, value in records.items():
            f.create_dataset(key, data=value)
        external = f.create_dataset(MATRIX, shape=shape, dtype=dtype, external=[(data_name, 0, h5py.h5f.UNLIMITED)])
        external.attrs["holds"] = holds  # "bfloat16": view the int16 values as torch.bfloat16
    with atomic_path(path, error=StoreError) as tmp, open(tmp, "xb") as out:
        out.write(image.getbuffer())


def _record(file: h5py.File, name: str) -> Any:
    """One record, read only if it is a dataset stored in the file itself under its own name."""
    node: h5py.Group = file
    for part in name.split("/"):
        if not isinstance(node.get(part, getlink=True), h5py.HardLink):
            raise ValueError(f"{name} is missing or a link, not a record")
        node = node[part]
    if not isinstance(node, h5py.Dataset) or node.external or node.is_virtual:
        raise ValueError(f"{name} is not a record stored in the file")
    return node[()]


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else value if isinstance(value, str) else None


def checksum(records: dict[str, Any]) -> str:
    """SHA-256 over every record of store.h5 (names, then JSON text or array dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for key in sorted(records):
        value = records[key]
        digest.update(key.encode() + b"\0")
        if isinstance(value, (str, bytes)):
            digest.update(value.encode() if isinstance(value, str) else value)
        else:
            array = np.ascontiguousarray(value)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            if array.size:  # the bytes in place, not a copy of a large mask
                digest.update(memoryview(array).cast("B"))
        digest.update(b"\0")
    return digest.hexdigest()
