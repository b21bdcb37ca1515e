"""The `-o` rule: an output's suffix selects a format pdt writes, or the output is refused.

An output keeps the format of the checkpoint it is fused from (a file: one of that format's suffixes; a
folder: any name without a checkpoint file's suffix), or its suffix names one of `CONVERSIONS`, which
any checkpoint can be written as: its model tensors, fused, in one file. Nothing else: `-o
audit.safetensors` on a torch run used to write a torch pickle under that name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import UsageError
from ..lazy import torch
from .base import CheckpointFormat, CheckpointReader, Fuse


def _safetensors(tensors: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file  # imports torch: only when a tensor is written

    save_file(tensors, str(out), metadata={"format": "pt"})  # "pt": what Transformers' loader asks of a file


def _torch(tensors: dict[str, torch.Tensor], out: Path) -> None:
    torch.save(tensors, out)


# suffix -> the writer of a {name: tensor} dict in that format
CONVERSIONS: dict[str, Callable[[dict[str, torch.Tensor], Path], None]] = {
    ".safetensors": _safetensors, ".pt": _torch}


def conversion_of(fmt: CheckpointFormat, out: Path, file_suffixes: tuple[str, ...]) -> str | None:
    """None when `out` is written in `fmt`, the checkpoint's own format; else the suffix of `CONVERSIONS`
    it names. UsageError (exit 2) for any other suffix, naming those this run can write.
    `file_suffixes`: every suffix of a one-file format pdt reads (a folder output may not end in one)."""
    suffix = out.suffix.lower()
    # a one-file format: one of its own suffixes; a folder: any name that does not end as a file would
    if suffix in fmt.suffixes or not (fmt.suffixes or suffix in file_suffixes or suffix in CONVERSIONS):
        return None
    if suffix in CONVERSIONS:
        return suffix
    kept = "a folder name without a file suffix" if not fmt.suffixes else ", ".join(fmt.suffixes)
    raise UsageError(f"pdt writes this run's {fmt.name} checkpoints as {kept}, or converts them to "
                     f"{', '.join(CONVERSIONS)} (the model tensors only); {suffix or 'no suffix'} is none of "
                     "these: choose an -o name that ends in one", out)


def write_converted(reader: CheckpointReader, out: Path, fuse: Fuse, suffix: str) -> int:
    """Every model tensor of `reader` (those `fuse` wants with their fused values, the others as stored)
    into one file of the `CONVERSIONS` format `suffix`; the number written. Held in memory whole (an
    audit copy); second names of a shared storage and what is not a tensor are left out."""
    tensors = {}
    for info in reader.tensors():
        values = reader.read(info.name)
        tensors[info.name] = (fuse(info.name, values) if fuse.wants(info.name) else values).contiguous()
    CONVERSIONS[suffix](tensors, out)
    return len(tensors)
