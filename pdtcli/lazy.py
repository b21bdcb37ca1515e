"""torch, imported when a tensor is first touched, not when pdt starts.

`import torch` takes 1.5-3 s, most of a `pdt --version`, a `pdt report` or a `pdt predict` that finds
nothing new, none of which touches a tensor. Modules write `from ..lazy import torch` and use `torch.x`
as ever: the first attribute read imports torch (then each attribute is kept, so a hot loop pays one
dictionary look-up, as with a module). Type checkers see the real module. A table of torch dtypes
built when a module is imported (`DTYPES`) is a `TorchDtypes`: its keys are known without torch.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any


class LazyModule:
    """A module imported on the first read of one of its attributes (`name`: its import name)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._pending: list[Callable[[ModuleType], None]] = []  # `first_use` hooks not yet run

    def __getattr__(self, attr: str) -> Any:
        # called only for attributes not yet kept in the instance's own __dict__
        module = importlib.import_module(self._name)
        hooks, self._pending = self._pending, []
        for hook in hooks:
            hook(module)
        value = getattr(module, attr)
        setattr(self, attr, value)
        return value

    @contextlib.contextmanager
    def first_use(self, hook: Callable[[ModuleType], None]) -> Iterator[None]:
        """Within the block, `hook(module)` runs before the module is first used through this object: at once
        when it is imported already, else on the first attribute read (never, when nothing reads one)."""
        if self._name in sys.modules:
            hook(sys.modules[self._name])
            yield
            return
        self._pending.append(hook)
        try:
            yield
        finally:
            if hook in self._pending:
                self._pending.remove(hook)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


LAZY_TORCH = LazyModule("torch")  # the one stand-in every module shares (its `first_use` hooks are for all)
if TYPE_CHECKING:
    import torch
else:
    torch = LAZY_TORCH


class TorchDtypes(Mapping):
    """`{key: torch dtype}` given as `{key: the dtype's name in torch}`: membership, keys and length
    without torch; a value is looked up in torch when read (KeyError for an unknown key)."""

    def __init__(self, names: Mapping[str, str]) -> None:
        self._names = dict(names)

    def __getitem__(self, key: str) -> torch.dtype:
        return getattr(torch, self._names[key])

    def __contains__(self, key: object) -> bool:  # Mapping's own would read the value, importing torch
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
