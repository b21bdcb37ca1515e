"""Positional reads into buffers the caller owns.

Checkpoints and the snapshot matrix are read by byte range into memory pdt allocated, never
through a memory map: the pages of a mapped file count in the process's resident set while
the mapping lives, so reading a large tensor through one grows it by the tensor's size even when
the tensor is consumed a piece at a time.
"""

from __future__ import annotations

import os


def read_into(fd: int, buffer: memoryview, position: int) -> bool:
    """Fill `buffer` (a byte view) from `position` of `fd`; False when the file ends first."""
    view = buffer.cast("B") if buffer.format != "B" else buffer
    while view:
        got = os.preadv(fd, [view], position)
        if got == 0:
            return False
        view, position = view[got:], position + got
    return True
