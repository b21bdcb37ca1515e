"""Which tensors pdt predicts, and what kind of layer each belongs to.

Default: every floating-point tensor of the model, except normalisation running
statistics (they are estimates of data moments, not weights on a trajectory) and
integer tensors (counters, indices). `--include` patterns bring any tensor in, and
`--exclude` patterns take any out; patterns are shell globs on the tensor name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from .formats import BIAS_NAMES, RUNNING_STATS, TensorInfo
from .formats.base import whole_name
from .lazy import torch

# Running statistics by the names frameworks give them; formats that name them otherwise
# declare their own (`CheckpointFormat.running_stats`).
RUNNING_STAT_PATTERNS = ("*running_mean", "*running_var", "*num_batches_tracked", "*moving_mean",
                         "*moving_variance") + RUNNING_STATS
LAYER_TYPES = ("linear", "conv", "norm", "embedding", "bias", "other")
_NORM_WORDS = ("norm", "bn", "ln_", "ln.", "ln1", "ln2", "layernorm", "batchnorm", "rmsnorm")


@dataclass(frozen=True)
class Selection:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def decide(self, info: TensorInfo) -> str | None:
        """None if `info` is predicted, else the reason it is carried over (a piece of a tensor, as a
        rank of a distributed step holds it, goes by the tensor's name)."""
        name = whole_name(info.name)
        if info.numel == 0:
            return "empty tensor"
        if any(fnmatchcase(name, pattern) for pattern in self.exclude):
            return "excluded by --exclude"
        if any(fnmatchcase(name, pattern) for pattern in self.include):
            return None if info.dtype != torch.bool else "boolean tensor"
        if not info.dtype.is_floating_point:
            return "integer tensor" if info.dtype != torch.bool else "boolean tensor"
        if any(fnmatchcase(name, pattern) for pattern in RUNNING_STAT_PATTERNS):
            return "normalisation running statistic"
        return None

    def as_dict(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude)}


def layer_type(name: str, shape: tuple[int, ...]) -> str:
    """Best-effort layer family from the name and shape, for the rolled-up report."""
    lowered = whole_name(name).lower()
    leaf = re.split(r"[./]", lowered)[-1]
    numbered_bias = len(shape) == 1 and any(fnmatchcase(lowered, pattern) for pattern in BIAS_NAMES)
    if leaf == "bias" or leaf.endswith("_bias") or (numbered_bias and "norm" not in lowered):
        return "bias"
    if any(word in lowered for word in _NORM_WORDS) or (len(shape) == 1 and leaf in ("weight", "scale", "gamma")):
        return "norm"
    if "embed" in lowered or leaf in ("wte", "wpe") or ".wte." in lowered or ".wpe." in lowered:
        return "embedding"
    if len(shape) >= 3:
        return "conv"
    if len(shape) == 2:
        return "linear"
    return "other"


@dataclass
class LayoutPlan:
    """The predicted tensors in file order with their flat offsets, and what was skipped."""

    predicted: list[TensorInfo] = field(default_factory=list)
    skipped: list[tuple[TensorInfo, str]] = field(default_factory=list)
    objects: list[dict] = field(default_factory=list)  # carried without being known (`CheckpointReader.objects`)
    adapter: dict | None = None  # the tensors are this adapter (`CheckpointReader.adapter`), not the model


def plan_layout(infos: list[TensorInfo], selection: Selection, carried: list[tuple[TensorInfo, str]] = (),
                objects: list[dict] = (), adapter: dict | None = None) -> LayoutPlan:
    """`infos` by `selection`, with the tensors and objects the checkpoint itself carries (`carried`,
    `objects`: its reader's) listed beside what the selection skipped, and the `adapter` they are, if any."""
    plan = LayoutPlan(objects=list(objects), adapter=adapter)
    for info in infos:
        reason = selection.decide(info)
        if reason is None:
            plan.predicted.append(info)
        else:
            plan.skipped.append((info, reason))
    plan.skipped.extend(carried)
    return plan
