"""Progress reporting that the library can call without knowing who, if anyone, displays it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

Advance = Callable[[int], None]


class Progress(Protocol):
    def task(self, description: str, total: int) -> AbstractContextManager[Advance]: ...


class NoProgress:
    """The library default: progress goes nowhere."""

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        yield lambda n: None
