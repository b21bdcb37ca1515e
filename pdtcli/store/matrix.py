"""The snapshot matrix: `snapshots.bin`, slots x N values, snapshot-major and contiguous.

Ingesting a checkpoint is one sequential write of a slot, and a row block of all snapshots
is a few sequential reads. The file is opened without following a link and refused when it
has other hard links, so the values are never written into a file that is not the store's.
Every operating-system error on it (disk full, a file-size limit, EIO) is one StoreError naming it.

What is read back is checked, never trusted (`checksums`): every value read must be finite,
and every chunk of a slot that has digests is compared with its digest once its last value
has been read, by a running hash per slot. A read that is not contiguous with the slot's
previous one leaves the chunks it cut into unchecked; `finish_reads` checks those by reading
them whole, and every pass calls it before anything computed from the values is used. A chunk
checked once is not checked again by the same open store until its slot is written again: pass
2 of `pdt predict` re-reads the window that pass 1 checked, in the same process, and trusts it.
Writes are hashed as they go (ingest and the fused state write a slot in increasing order);
chunks written out of order are hashed from the file when the store commits (`seal`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

from ..atomic import remove_path
from ..errors import StoreError, os_error, os_errors_as
from ..rawio import read_into
from .checksums import ChunkStream, SlotSums, nonfinite_at
from .h5file import hint

log = logging.getLogger(__name__)


class SnapshotMatrix:
    def __init__(self, path: Path, slots: int, n: int, dtype: np.dtype, sums: SlotSums | None = None,
                 describe: Callable[[int], str] = lambda slot: "contents unknown") -> None:
        """`sums`: the digests the store recorded (None: none yet); `describe(slot)` names what a slot
        holds, for error messages ("checkpoint <path>")."""
        self.path = Path(path)
        self.slots, self.n, self.dtype = slots, n, np.dtype(dtype)
        self.sums = sums or SlotSums.empty(slots, n)
        self._describe = describe
        self._fd: int | None = None
        self._written: dict[int, tuple[ChunkStream, dict[int, int]]] = {}  # since the last seal: digests so far
        self._reading: dict[int, ChunkStream] = {}  # the running hash of each slot's reads
        self._verified: dict[int, set[int]] = {}  # chunks checked by this store since their slot was written
        self._unchecked: dict[int, set[int]] = {}  # chunks read in part by a read that skipped ahead or back
        self._scratch: np.ndarray | None = None  # one chunk, for chunks hashed from the file

    @property
    def nbytes(self) -> int:
        return self.slots * self.n * self.dtype.itemsize

    def create(self) -> None:
        """A new zero-filled file; whatever sat under the name (a dead run's file, a link) is removed."""
        with os_errors_as(StoreError, "cannot make the snapshot matrix", self.path):
            remove_path(self.path)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.ftruncate(fd, self.nbytes)  # sparse: a full disk shows only when values are written
            finally:
                os.close(fd)

    def check(self) -> None:
        """StoreError for a matrix that is missing or shorter than its slots (naming the first slot cut)."""
        with os_errors_as(StoreError, "cannot read the snapshot matrix", self.path):
            size = self.path.stat().st_size if self.path.is_file() else None
        if size is None:
            raise StoreError("missing: the store's snapshot values are gone" + hint(self.path.parent), self.path)
        if size < self.nbytes:
            slot = size // max(1, self.n * self.dtype.itemsize)
            raise StoreError(f"truncated to {size:,} bytes of {self.nbytes:,}: slot {slot} ({self._describe(slot)}) "
                             "and any after it are cut short" + hint(self.path.parent), self.path)

    def _handle(self) -> int:
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
            except OSError as exc:
                raise os_error(exc, StoreError, "cannot open the snapshot matrix", self.path) from exc
            if os.fstat(fd).st_nlink != 1:  # another name for the same bytes, perhaps outside the store
                os.close(fd)
                raise StoreError("the snapshot matrix has other hard links; pdt writes only into a file of its "
                                 "own (remove the store and run again)", self.path)
            self._fd = fd
        return self._fd

    def _position(self, slot: int, offset: int) -> int:
        return (slot * self.n + offset) * self.dtype.itemsize

    def _damaged(self, slot: int, problem: str) -> StoreError:
        return StoreError(f"slot {slot} ({self._describe(slot)}): {problem}" + hint(self.path.parent), self.path)

    # ---- writing, and the digests of what was written -------------------------------------------
    def write(self, slot: int, offset: int, values: np.ndarray) -> None:
        """Write `values` (converted to the store dtype) at `offset` of snapshot `slot`; hashed on the way."""
        data = memoryview(np.ascontiguousarray(values, dtype=self.dtype)).cast("B")
        self._note_written(slot, offset, data)
        position = self._position(slot, offset)
        fd = self._handle()
        with os_errors_as(StoreError, "cannot write the snapshot matrix", self.path):
            while data:
                written = os.pwrite(fd, data, position)
                data, position = data[written:], position + written

    def _note_written(self, slot: int, offset: int, data: memoryview) -> None:
        """Feed the slot's running digest. A write where the last one ended continues it; any other starts
        a new one there. Digests of the chunks this write touches are dropped first: a chunk keeps one only
        when one stream wrote it whole."""
        for state in (self._reading, self._verified, self._unchecked):  # what was read of the slot is gone
            state.pop(slot, None)
        stream, digests = self._written.get(slot, (None, {}))
        if stream is None or stream.position != offset:
            stream = ChunkStream(self.sums.chunk, self.n, self.dtype.itemsize, offset)
        stop = offset + len(data) // self.dtype.itemsize
        for index in range(offset // self.sums.chunk, -(-stop // self.sums.chunk)):
            digests.pop(index, None)
        digests.update(stream.feed(data))
        self._written[slot] = stream, digests

    def seal(self, held: list[bool]) -> None:
        """The digests of every slot written since the last seal, before the store commits: from the
        writes, or hashed from the file for chunks not written in order. `held[slot]`: whether the
        records about to be committed say the slot holds a snapshot; one that does not has no digests."""
        from_file = 0
        for slot, (_, digests) in self._written.items():
            if held[slot]:
                for index in range(self.sums.digests.shape[1]):
                    if index not in digests:
                        digests[index] = self._digest_from_file(slot, index)
                        from_file += 1
                    self.sums.digests[slot, index] = digests[index]
                self.sums.known[slot] = True
        self._written.clear()
        self.sums.known &= np.asarray(held, bool)
        if from_file:
            log.debug("hashed %d chunk(s) written out of order from %s", from_file, self.path.name)

    def _digest_from_file(self, slot: int, index: int) -> int:
        start, stop = self.sums.span(index, self.n)
        if self._scratch is None:
            self._scratch = np.empty(self.sums.chunk, self.dtype)
        view = memoryview(self._scratch[:stop - start])
        with os_errors_as(StoreError, "cannot read the snapshot matrix", self.path):
            complete = read_into(self._handle(), view, self._position(slot, start))
        if not complete:
            raise self._damaged(slot, "the snapshot matrix ended early")
        return xxhash.xxh3_64_intdigest(view.cast("B"))

    # ---- reading, checked -------------------------------------------------------------------------
    def read(self, slots: list[int], start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows `start:stop` of the given snapshots, as a (len(slots), stop-start) array; StoreError
        (naming the slot) for a value that is not finite or a chunk that fails its checksum."""
        width = stop - start
        if out is None:
            out = np.empty((len(slots), width), dtype=self.dtype)
        fd = self._handle()
        for row, slot in enumerate(slots):
            values = out[row, :width]
            with os_errors_as(StoreError, "cannot read the snapshot matrix", self.path):
                complete = read_into(fd, memoryview(values), self._position(slot, start))
            if not complete:
                raise self._damaged(slot, "the snapshot matrix ended early")
            self._check(slot, start, values)
        return out[:, :width]

    def _check(self, slot: int, start: int, values: np.ndarray) -> None:
        """Refuse NaN or Inf (pdt stores none), then feed the slot's running digest: a chunk is compared
        when its last value has been read. Values of chunks this store checked already pass; slots without
        digests (written by an older pdt) get only the first check, at every read."""
        chunk = self.sums.chunk
        verified = self._verified.setdefault(slot, set())
        if self.sums.known[slot] and verified.issuperset(range(start // chunk, -(-(start + values.size) // chunk))):
            return
        bad = nonfinite_at(values)
        if bad is not None:
            raise self._damaged(slot, f"value {start + bad:,} is NaN or Inf, which pdt never stores: the file was "
                                      "damaged")
        if not self.sums.known[slot]:
            return
        stream = self._reading.get(slot)
        if stream is None or stream.position != start:
            if stream is not None:
                self._leave(slot, stream)
            stream = self._reading[slot] = ChunkStream(self.sums.chunk, self.n, self.dtype.itemsize, start)
            self._leave(slot, stream)  # it starts inside a chunk: that one is checked whole later
        for index, digest in stream.feed(memoryview(values).cast("B"), skip=verified):
            self._compare(slot, index, digest)

    def _leave(self, slot: int, stream: ChunkStream) -> None:
        """Note the chunk a stream stands inside, unless checked, for `finish_reads`."""
        index = stream.open_chunk
        if index is not None and index not in self._verified.get(slot, ()):
            self._unchecked.setdefault(slot, set()).add(index)

    def _compare(self, slot: int, index: int, digest: int) -> None:
        if digest != int(self.sums.digests[slot, index]):
            start, stop = self.sums.span(index, self.n)
            raise self._damaged(slot, f"values {start:,} to {stop:,} fail their checksum: the file changed since "
                                      "pdt wrote them (a bad disk, or a write it lost)")
        self._verified.setdefault(slot, set()).add(index)

    def finish_reads(self) -> None:
        """Check every chunk that was read only in part, by hashing it whole from the file; call at the
        end of a pass, before what it computed is used. StoreError as `read`."""
        for slot, stream in self._reading.items():
            self._leave(slot, stream)
        self._reading.clear()
        for slot, chunks in self._unchecked.items():
            for index in sorted(chunks - self._verified.get(slot, set())):
                self._compare(slot, index, self._digest_from_file(slot, index))
        self._unchecked.clear()

    def sync(self) -> None:
        if self._fd is not None:
            with os_errors_as(StoreError, "cannot write the snapshot matrix", self.path):  # NFS reports ENOSPC here
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
