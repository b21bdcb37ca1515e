"""Keras 3 whole-model archives (`model.save("x.keras")`, `ModelCheckpoint`'s default): a zip of
`metadata.json`, `config.json` and `model.weights.h5`.

The weights member is the same HDF5 layout as a `.weights.h5` file (`keras_h5`), read in place
through h5py: Keras stores it uncompressed, so h5py reads a window of the archive's own bytes and
nothing is extracted; a deflated member is read through zipfile's stream. The fused archive has
every member of the input, in order, with the same names, dates and contents, except that
`model.weights.h5` holds the fused values: its bytes are copied into a temporary file beside the
output, fused there in place as a `.weights.h5` file is, and stored as the member.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import struct
import zipfile
from pathlib import Path
from typing import BinaryIO

from ..errors import CheckpointError
from .base import CheckpointFormat, CheckpointReader, Fuse
from .keras_h5 import KerasReader

WEIGHTS = "model.weights.h5"
ZIP_MAGIC = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


class _Window(io.RawIOBase):
    """The bytes [start, start + size) of an open file, as a seekable read-only file of their own."""

    def __init__(self, handle: BinaryIO, start: int, size: int) -> None:
        super().__init__()
        self._handle, self._start, self._size, self._at = handle, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._at = max(0, {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self._size}[whence] + offset)
        return self._at

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._size - self._at))
        self._handle.seek(self._start + self._at)
        got = self._handle.readinto(view[:count])
        self._at += got
        return got


def _member_stream(archive: zipfile.ZipFile, handle: BinaryIO, info: zipfile.ZipInfo) -> BinaryIO:
    """A seekable file of one member's contents: a window of the archive when it is stored
    uncompressed (what Keras writes), else zipfile's decompressing stream."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return archive.open(info)
    handle.seek(info.header_offset)
    signature, name_length, extra_length = _LOCAL_HEADER.unpack(handle.read(_LOCAL_HEADER.size))
    if signature != ZIP_MAGIC:
        raise zipfile.BadZipFile(f"no local header for {info.filename}")
    return io.BufferedReader(_Window(handle, info.header_offset + _LOCAL_HEADER.size + name_length + extra_length,
                                     info.file_size))


class KerasArchiveReader(KerasReader):
    def __init__(self, path: Path) -> None:
        self._handle = open(path, "rb")  # noqa: SIM115 - held open while h5py reads through it; closed in close()
        try:
            self._archive = zipfile.ZipFile(self._handle)
            info = self._archive.getinfo(WEIGHTS)
            self._stream = _member_stream(self._archive, self._handle, info)
        except (zipfile.BadZipFile, KeyError, OSError, struct.error, EOFError) as exc:
            self._handle.close()
            raise CheckpointError(f"corrupt or truncated .keras archive, or one without {WEIGHTS} ({exc})",
                                  path) from exc
        try:
            super().__init__(path, self._stream)
        except BaseException:
            self._handle.close()
            raise

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        weights = out.with_name(out.name + ".h5")  # in the output's folder, under the temporary's name
        try:
            with self._archive.open(WEIGHTS) as src, open(weights, "wb") as dst:
                shutil.copyfileobj(src, dst)
            self.fuse_into(weights, fuse)
            with zipfile.ZipFile(out, "w") as dst:
                for info in self._archive.infolist():  # written under a copy: writing sets its sizes and offset
                    with (open(weights, "rb") if info.filename == WEIGHTS else self._archive.open(info)) as src, \
                            dst.open(copy.copy(info), "w", force_zip64=info.file_size >= zipfile.ZIP64_LIMIT) as member:
                        shutil.copyfileobj(src, member)
        finally:
            weights.unlink(missing_ok=True)

    def close(self) -> None:
        super().close()
        self._handle.close()


class KerasArchiveFormat(CheckpointFormat):
    name = "keras-archive"
    suffixes = (".keras",)  # its tensor names, running statistics and biases are those of KerasFormat

    def sniff(self, path: Path, head: bytes) -> bool:
        if head[:4] != ZIP_MAGIC:
            return False
        try:
            with zipfile.ZipFile(path) as archive:
                return WEIGHTS in archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return False

    def open(self, path: Path) -> CheckpointReader:
        return KerasArchiveReader(path)
