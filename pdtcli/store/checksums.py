"""Checksums of the snapshot matrix: one xxh3_64 digest per fixed-size chunk of every slot.

The digests are over the bytes as stored in `snapshots.bin`, computed as a slot is written and
compared as it is read back, so a flipped bit, a stale page or a stale slot (a write the disk
lost) is found before any value of it reaches a fit or an output. They are kept in `store.h5`
(the `matrix/xxh3_64` record, one row per slot), so they are committed in the same atomic
rename as the records that say what each slot holds, and covered by store.h5's own SHA-256.

xxh3_64 because the step reads the whole window twice: it hashes 9-10 GB/s on this project's
CPU, against 2 GB/s for zlib.crc32 and 0.45 GB/s for blake2b. Accidental damage is what it is
for; a store that someone rewrites on purpose is store.h5's checksum's concern.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

HASH = "xxh3_64"
CHUNK_ELEMENTS = 1 << 20  # values per digest: 4 MiB of float32, so re-reading one chunk to check it is cheap


def chunk_count(n: int, chunk: int) -> int:
    """Chunks of a slot of `n` values (the last one may be short)."""
    return -(-n // chunk)


@dataclass
class SlotSums:
    """The digests a store expects: `digests` (slots, chunks) uint64, and `known` (slots,) bool,
    False for a slot whose bytes were never hashed (empty, or written by a pdt before checksums)."""

    chunk: int
    digests: np.ndarray
    known: np.ndarray

    @classmethod
    def empty(cls, slots: int, n: int) -> SlotSums:
        """No digests yet, chunks of CHUNK_ELEMENTS (read at the call, so a test can make it small)."""
        return cls(CHUNK_ELEMENTS, np.zeros((slots, chunk_count(n, CHUNK_ELEMENTS)), np.uint64), np.zeros(slots, bool))

    @classmethod
    def from_records(cls, state: dict[str, Any] | None, digests: np.ndarray | None, slots: int, n: int) -> SlotSums:
        """The checksums a store recorded; none for a store made before them (every slot unknown until it is
        written again). ValueError for records that do not fit the matrix."""
        if state is None and digests is None:
            return cls.empty(slots, n)
        if not isinstance(state, dict) or state.get("hash") != HASH or digests is None:
            raise ValueError(f"its snapshot checksums are not {HASH} digests pdt makes")
        chunk, known = state.get("chunk"), state.get("slots")
        if not isinstance(chunk, int) or chunk < 1 or not isinstance(known, list) or len(known) != slots \
                or digests.dtype != np.uint64 or digests.shape != (slots, chunk_count(n, chunk)):
            raise ValueError("its snapshot checksums do not match its matrix")
        return cls(chunk, np.array(digests), np.array([bool(k) for k in known], bool))

    def state(self) -> dict[str, Any]:
        """What store.h5's state record keeps of them (the digests are an array record)."""
        return {"hash": HASH, "chunk": self.chunk, "slots": self.known.tolist()}

    def span(self, index: int, n: int) -> tuple[int, int]:
        """Values start..stop of chunk `index` of a slot of `n` values."""
        return index * self.chunk, min(n, (index + 1) * self.chunk)


class ChunkStream:
    """Digests of a slot's chunks from consecutive runs of its bytes, starting at any value.

    A chunk is digested only when the stream saw it from its first byte to its last; one it
    started inside (or stopped inside: `open_chunk`) must be checked some other way.
    """

    def __init__(self, chunk: int, n: int, itemsize: int, position: int) -> None:
        self.chunk, self.n, self.itemsize = chunk, n, itemsize
        self.position = position  # the value the next bytes start at
        self._whole = position % chunk == 0  # the current chunk was seen from its start
        self._hasher = xxhash.xxh3_64()

    @property
    def open_chunk(self) -> int | None:
        """The chunk the stream stands inside (None at a chunk boundary or the slot's end)."""
        return self.position // self.chunk if self.position % self.chunk and self.position < self.n else None

    def feed(self, data: memoryview, skip: Container[int] = ()) -> list[tuple[int, int]]:
        """Take the bytes of the values from `position` on (a byte view); (chunk, digest) of each chunk
        they complete. Chunks in `skip` (checked already) are passed over unhashed."""
        done = []
        while data:
            index = self.position // self.chunk
            end = min(self.n, (index + 1) * self.chunk)
            take = min(len(data), (end - self.position) * self.itemsize)
            hashing = self._whole and index not in skip
            if hashing:
                self._hasher.update(data[:take])
            data = data[take:]
            self.position += take // self.itemsize
            if self.position == end:
                if hashing:
                    done.append((index, self._hasher.intdigest()))
                self._hasher.reset()
                self._whole = True
        return done


def nonfinite_at(values: np.ndarray) -> int | None:
    """Index of the first NaN or Inf among values as the matrix stores them (int16: bfloat16's bits),
    None when all are finite. About 24 GB/s for float32 here, so every read can afford it."""
    if values.dtype.kind == "f":
        finite = np.isfinite(values)
        return None if finite.all() else int(np.argmin(finite))
    special = (values & 0x7F80) == 0x7F80  # bfloat16 with an all-ones exponent: Inf or NaN
    return int(np.argmax(special)) if special.any() else None
