"""The one interface every checkpoint family implements.

pdt needs three things from a checkpoint: the list of model tensors, one tensor at a
time (so that big files are never read whole), and a way to write a copy in which some
tensors are replaced while everything else (optimizer state, counters, metadata, the
key structure, dtypes) is carried over untouched.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

# Keys under which single-file formats record the step or epoch they were saved at, first match wins.
STEP_KEYS = ("step", "global_step", "epoch", "iteration")

# Called for each model tensor while writing; returns the replacement, or None to keep it.
Replace = Callable[[str, torch.Tensor], "torch.Tensor | None"]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def torch_dtype(dtype: np.dtype, name: str, path: Path) -> torch.dtype:
    """The torch dtype of a NumPy array's dtype; a clear refusal for ones torch lacks."""
    if dtype.hasobject:
        raise CheckpointError(f"{name!r} holds Python objects (loading it would need pickle)", path)
    try:
        return torch.from_numpy(np.zeros(0, dtype)).dtype
    except TypeError as exc:
        raise CheckpointError(f"{name!r} has unsupported dtype {dtype}", path) from exc


class CheckpointReader(abc.ABC):
    """An open checkpoint. Use as a context manager so mapped files are released."""

    format_name: str = ""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @abc.abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """The model tensors, in the order the file stores them."""

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor on the CPU in its stored dtype."""

    @abc.abstractmethod
    def write_fused(self, out: Path, replace: Replace) -> None:
        """Write a copy of this checkpoint to `out` (a temporary path the caller renames)."""

    def recorded_step(self) -> int | None:
        """The step or epoch the file says it was saved at, when it says one."""
        return None

    def close(self) -> None:  # noqa: B027 - readers without resources keep the default
        """Release mapped files."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointFormat(abc.ABC):
    name: str = ""
    suffixes: tuple[str, ...] = ()

    @abc.abstractmethod
    def sniff(self, path: Path, head: bytes) -> bool:
        """Whether the file's first bytes (or, for a folder format, its files) look like this format."""

    @abc.abstractmethod
    def open(self, path: Path) -> CheckpointReader: ...
