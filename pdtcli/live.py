"""A model in memory as the newest checkpoint of its folder, for steps taken inside the training loop.

Training code has just saved a checkpoint and still holds the same values in memory. The
step then reads them from there instead of from the file (the file is opened only for its
header: names, shapes, the step it records), and the fused values go back into the live
tensors instead of into a new file. Everything else (the folder, the store, the schedule,
the fit and the mask) is the command line's own, so both give the same store and the same
fused values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .discover import Candidate, located
from .errors import CheckpointError, UsageError
from .lazy import torch
from .order import with_recorded_step
from .store.records import Snapshot


@dataclass
class Live:
    """The live tensors (a state dict: views of the model's own parameters and buffers) and the
    checkpoint they were saved to, named by `path`, or by the `step` it records when the saver
    picks the name (Lightning)."""

    tensors: Mapping[str, torch.Tensor]
    path: Path | None = None
    step: int | None = None
    fused: dict[str, torch.Tensor] = field(default_factory=dict)  # filled by the second pass, on the CPU
    lineage_slot: int | None = None  # where the fused values go in the store (training resumes from them)

    def __post_init__(self) -> None:
        if self.path is None and self.step is None:
            raise UsageError("a live model needs the checkpoint it was saved to (its path or its step)")

    def values(self, name: str, path: Path | None = None) -> torch.Tensor:
        """A tensor's values as saved, on the CPU (what reading the file would have given); `path`
        names the checkpoint in an error (default: the one the values were saved to)."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise CheckpointError(f"tensor {name!r} is in the checkpoint but not in the live model's state dict",
                                  path or self.path)
        return tensor.detach().cpu()

    def which(self, fresh: list[Candidate]) -> Candidate | None:
        """The newest of the new checkpoints `fresh` (oldest first) if these values were saved to it."""
        if not fresh:
            return None
        newest = fresh[-1]
        if self.path is not None:
            return newest if located(newest.path) == located(self.path) else None
        step = newest.recorded_step if newest.recorded_step is not None else with_recorded_step(newest).recorded_step
        return newest if step == self.step else None

    def saved_as(self, snapshot: Snapshot | None) -> bool:
        """Whether the newest checkpoint of the window holds these values: only then may the fused
        values, predicted from that checkpoint, replace them."""
        if snapshot is None:
            return False
        if self.path is not None:
            return snapshot.path == located(self.path)
        return snapshot.recorded_step == self.step

    def load_fused(self) -> int:
        """Copy the fused values into the live tensors (the model's own storage); how many tensors."""
        with torch.no_grad():
            for name, values in self.fused.items():
                self.tensors[name].copy_(values.view_as(self.tensors[name]))
        return len(self.fused)
