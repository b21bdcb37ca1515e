"""The one interface every checkpoint family implements.

pdt needs three things from a checkpoint: the list of model tensors, one tensor at a
time (so that big files are never read whole), and a way to write a copy in which some
tensors are replaced while everything else (optimizer state, counters, metadata, the
key structure, dtypes) is carried over untouched.
"""

from __future__ import annotations

import abc
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

import numpy as np

from ..errors import CheckpointError
from ..lazy import TorchDtypes, torch

# Keys under which checkpoints record the step or epoch they were saved at, first match wins:
# the optimizer-step counter training resumes from before coarser counters.
STEP_KEYS = ("global_step", "step", "epoch", "iteration")

# A piece of a tensor, as one rank of a distributed step holds it (a chunk of a DCP tensor that
# several ranks saved): "name@offsets", e.g. "layer.weight@512,0".
PIECE_MARK = "@"

# Element types by their NumPy-style name, the one table every format maps its own names onto.
DTYPES = TorchDtypes({name: name for name in (
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")})


T = TypeVar("T")


def unique_names(entries: Iterator[tuple[str, str, T]], joined: str, path: Path) -> dict[str, T]:
    """`{name: value}` of a checkpoint's (name, where it stands in the file, value) entries.

    Formats that flatten nested keys into one name (`joined`: how) can meet two entries that flatten
    to the same name (a key "a.b" beside a nested {"a": {"b"}}, the key 1 beside "1", a member listed
    twice). pdt could read only one of them and would write its fused values into both places, so such
    a file is refused (CheckpointError, exit 3) with both entries shown.
    """
    found: dict[str, T] = {}
    where: dict[str, str] = {}
    for name, shown, value in entries:
        if name in found:
            raise CheckpointError(f"tensor names collide: {where[name]} and {shown} are both {name!r} once "
                                  f"{joined}; pdt cannot tell them apart and refuses the file rather than merge "
                                  "them", path)
        found[name], where[name] = value, shown
    return found


def no_duplicate_keys(path: Path, what: str):
    """A `json.loads` `object_pairs_hook` that refuses an object naming a key twice (JSON keeps the last
    silently; `what` is the part of the file the error names)."""
    def pairs(items: list[tuple[str, object]]) -> dict:
        return unique_names(((key, f"{key!r}", value) for key, value in items), f"read from {what}", path)
    return pairs


# Elements of a tensor read (and written) at a time by formats that can read part of a tensor:
# 4M elements, 16 MiB of float32, whatever the size of the tensor.
CHUNK_ELEMENTS = 1 << 22


class Fuse(Protocol):
    """What a writer asks while it copies a checkpoint: whether a tensor is replaced (asked first,
    so a tensor that is not is copied as stored, never decoded), and its fused values."""

    def wants(self, name: str) -> bool: ...

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def copy_bytes(src: BinaryIO, dst: BinaryIO, count: int) -> None:
    """Copy the next `count` bytes of `src` to `dst`, in bounded chunks."""
    shutil.copyfileobj(_Limited(src, count), dst)


class _Limited:
    """A file view that returns at most `remaining` bytes, for copyfileobj."""

    def __init__(self, handle, remaining: int) -> None:
        self._handle = handle
        self._remaining = remaining

    def read(self, size: int = -1) -> bytes:
        if self._remaining <= 0:
            return b""
        size = self._remaining if size < 0 else min(size, self._remaining)
        data = self._handle.read(size)
        self._remaining -= len(data)
        return data


def split_piece(name: str) -> tuple[str, list[int] | None]:
    """(the tensor, the piece's offsets) of a piece's name `tensor@o1,o2`; (name, None) for a whole
    tensor, even one whose own name holds the mark."""
    whole, _, at = name.rpartition(PIECE_MARK)
    words = at.split(",")
    if whole and all(w.isascii() and w.isdigit() for w in words):
        return whole, [int(w) for w in words]
    return name, None


def whole_name(name: str) -> str:
    """The tensor a piece belongs to (a whole tensor's own name)."""
    return split_piece(name)[0]


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

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @abc.abstractmethod
    def tensors(self) -> list[TensorInfo]:
        """The model tensors, in the order the file stores them."""

    @abc.abstractmethod
    def read(self, name: str) -> torch.Tensor:
        """One tensor on the CPU in its stored dtype."""

    def chunks(self, name: str) -> Iterator[torch.Tensor]:
        """One tensor as consecutive flat pieces of at most about `CHUNK_ELEMENTS` (where the format can
        read part of a tensor; else the whole of it as one), so that ingest and the fused write hold no
        more than a piece of the largest tensor."""
        yield self.read(name).reshape(-1)

    @abc.abstractmethod
    def write_fused(self, out: Path, fuse: Fuse) -> None:
        """Write a copy of this checkpoint to `out` (a temporary path the caller renames), with the
        tensors `fuse` wants replaced by its values and everything else as stored."""

    def recorded_step(self) -> int | None:
        """The step or epoch the file says it was saved at, when it says one."""
        return None

    def carried(self) -> list[tuple[TensorInfo, str]]:
        """Model tensors the file holds beyond `tensors()`, carried as stored, and why: a second name of
        one storage (tied weights, predicted once under the first), a view overlapping another."""
        return []

    def objects(self) -> list[dict]:
        """What the file holds beside the tensors that pdt carries without knowing it: {"where": the key
        path, "type": the class it names} (objects of a pickle's unknown classes, never loaded)."""
        return []

    def adapter(self) -> dict | None:
        """What adapter the tensors are, when they are a fine-tuning adapter and not the model (a PEFT
        LoRA folder): a small dict for the report; None for a model's own weights."""
        return None

    def weight_files(self) -> list[str]:
        """The files of a folder checkpoint that hold tensors (relative names), which the ranks of a
        distributed step share out; [] for a checkpoint that is one file."""
        return []

    def part(self, files: list[str]) -> CheckpointReader:
        """The view of a folder checkpoint holding only what `files` hold: its `tensors()` are the
        tensors, or pieces of tensors, stored there, and `write_fused` writes only those files into
        an existing output folder. It takes over this reader's open files."""
        raise NotImplementedError(f"{type(self).__name__} is one file; it has no parts")

    def write_shared(self, out: Path) -> None:
        """Into the output folder `out` (made here): every file of the checkpoint that is no weight
        file (an index, DCP's `.metadata`, optimizer and trainer state), as stored."""
        raise NotImplementedError(f"{type(self).__name__} is one file; it has nothing shared")

    def close(self) -> None:  # noqa: B027 - readers without resources keep the default
        """Release mapped files."""

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointFormat(abc.ABC):
    """A checkpoint family, declared in one file: how to recognise it and what it knows of itself."""

    name: str = ""
    suffixes: tuple[str, ...] = ()  # file suffixes it claims (folder formats claim none)
    output_suffixes: tuple[str, ...] = ()  # compound suffixes an output name must keep at its end
    running_stats: tuple[str, ...] = ()  # globs of tensor names that are running statistics, not weights
    bias_names: tuple[str, ...] = ()  # globs of 1-d tensor names that are biases, where names do not say so
    sniff_last: bool = False  # its magic bytes are shared with other formats: try it after them

    @abc.abstractmethod
    def sniff(self, path: Path, head: bytes) -> bool:
        """Whether the file's first bytes (or, for a folder format, its files) look like this format."""

    @abc.abstractmethod
    def open(self, path: Path) -> CheckpointReader: ...
