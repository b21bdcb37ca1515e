"""File I/O below the formats: positional reads into pdt's own buffers, and writes behind the work.

Checkpoints and the snapshot matrix are read by byte range into memory pdt allocated, never
through a memory map: the pages of a mapped file count in the process's resident set while
the mapping lives, so reading a large tensor through one grows it by the tensor's size even when
the tensor is consumed a piece at a time.

Outputs are written by a thread of their own while the next piece is computed: the write call
releases the GIL, and at 100M parameters writing the fused file was a third of pass 2.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import BinaryIO


def read_into(fd: int, buffer: memoryview, position: int) -> bool:
    """Fill `buffer` (a byte view) from `position` of `fd`; False when the file ends first."""
    view = buffer.cast("B") if buffer.format != "B" else buffer
    while view:
        got = os.preadv(fd, [view], position)
        if got == 0:
            return False
        view, position = view[got:], position + got
    return True


class WriteBehind:
    """A file's writes, in order, on a thread, at most `depth` buffers ahead of the caller.

    A buffer handed to `write` must not be changed afterwards (pass 2 hands over fresh pieces). An
    error on the thread (a full disk) is raised by the next `write` or by `close`; leaving the
    `with` block on an error stops the thread without writing what is still queued.
    """

    def __init__(self, dst: BinaryIO, depth: int = 2) -> None:
        self._dst = dst
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abandon = False
        self._thread = threading.Thread(target=self._run, name="pdt-write-behind", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None and not self._abandon:
                try:
                    self._dst.write(data)
                except BaseException as exc:  # handed to the caller's thread
                    self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes | memoryview) -> None:
        self._check()
        self._queue.put(data)

    def close(self) -> None:
        """Wait until everything handed over is written; raise what the thread met."""
        self._queue.put(None)
        self._thread.join()
        self._check()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
            return
        self._abandon = True
        self._queue.put(None)
        self._thread.join()
