"""PDT inside the training loop: right after a checkpoint is saved, the same step as `pdt predict`.

`PDTStep` is the plain-PyTorch helper; `pdtcli.integrations.hf.PDTCallback` (Hugging Face
Trainer) and `pdtcli.integrations.lightning.PDTCallback` (Lightning) call it from the
frameworks' own hooks. The newest checkpoint's values are taken from the model in memory
(its file is opened only for its header), the store is the folder's default one
(`placement.store_root`, so `pdt report` and later `pdt` runs see the same store), and the fused values are copied
into the model's parameters in place, so the optimizer keeps its state exactly as when
training resumes from a fused file.

`verify` is a loss gate: a callable that gives the model's held-out loss (a float; lower is better). With it, the
fused state is kept only when its loss is not worse than that of the optimizer's own weights, which are otherwise
put back into the model (status "rejected"), the store forgets the fused state (`api.reject_live`: its history
gets an `in-loop rejected` row) and `PDTStep.rejected` lists the checkpoints. It costs two evaluations and a
copy of the weights per step.

A step that fails (a full disk, NaN in the weights, the store locked by a running `pdt`)
warns and leaves the model unchanged: training goes on without that prediction.

    pdt = PDTStep("ckpts", history=5, tau=5)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        path = f"ckpts/epoch_{epoch:03d}.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        pdt.step(model, path)
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..api import StepResult, predict, reject_live
from ..live import Live
from ..options import Settings

log = logging.getLogger(__name__)


class PDTStepWarning(RuntimeWarning):
    """A step inside the training loop that did not happen; the model was left as it was."""


class PDTStep:
    """One PDT step per saved checkpoint, from memory into memory.

    `options` are those of `pdt predict` as keywords (`history`, `tau`, `start`, `every`,
    `criteria`, `files`, ...; see `Settings.build`); invalid ones raise at once. `wait` is how
    long a step waits for the store's lock: 0 by default, so that training never stalls
    behind a `pdt` run from cron (that step is skipped with a warning).
    """

    def __init__(self, folder: str | Path, *, store: str | Path | None = None, wait: float = 0.0,
                 verify: Callable[[torch.nn.Module], float] | None = None, **options: Any) -> None:
        self.folder = Path(folder)
        self.store = Path(store) if store is not None else None
        self.verify = verify
        self.rejected: list[str] = []  # the checkpoints whose fused state the gate turned down
        self.settings = Settings.build(wait=wait, **options)
        self.last: StepResult | None = None
        self.seconds: list[float] = []  # wall time of each call, what pdt costs the training loop

    def step(self, model: torch.nn.Module | Mapping[str, torch.Tensor], checkpoint: str | Path | None = None, *,
             step: int | None = None) -> StepResult | None:
        """Call right after `model` was saved as `checkpoint` (or as the checkpoint that records
        `step`) in the folder, before training changes it. Returns what was done (`status`
        "loaded" when the model took fused values; "waiting" or "not-due" when the window or
        the schedule says not yet), or None when the step failed and the model is unchanged."""
        started = time.perf_counter()
        try:
            return self._step(model, checkpoint, step)
        finally:
            self.seconds.append(time.perf_counter() - started)

    def _step(self, model: torch.nn.Module | Mapping[str, torch.Tensor], checkpoint: str | Path | None,
              step: int | None) -> StepResult | None:
        self.last = None
        tensors = model.state_dict() if isinstance(model, torch.nn.Module) else model
        where = Path(checkpoint).name if checkpoint is not None else f"step {step}"
        reason = _single_process_only()
        if reason is None:
            try:
                gate = _Gate(self.verify, model) if self.verify is not None else None
                self.last = predict(self.folder, store=self.store, settings=self.settings,
                                    live=Live(tensors, Path(checkpoint) if checkpoint is not None else None, step))
                if gate is not None and self.last.status == "loaded" and not gate.keeps_fused():
                    self.rejected.append(where)
                    reject_live(self.folder, store=self.store, settings=self.settings)
                    self.last = replace(self.last, status="rejected", message=f"{self.last.message}; {gate.why}")
                log.info("pdt at %s: %s", where, self.last.message)
                for warning in self.last.warnings:  # the step happened; what it found (the lineage) is worth a look
                    log.warning("pdt at %s: %s", where, warning)
                return self.last
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, training must go on
                reason = str(exc) or type(exc).__name__
        warnings.warn(f"pdt: no fused step at {where}, the model is unchanged: {reason}", PDTStepWarning,
                      stacklevel=3)
        return None


class _Gate:
    """The loss gate of `PDTStep(verify=...)`: the plain state's loss and a copy of its weights, taken before the
    step, and after it the choice between them and the fused state in the model."""

    def __init__(self, verify: Callable[[torch.nn.Module], float], model: torch.nn.Module | Mapping) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError("verify= needs the model itself (a torch.nn.Module) to measure its loss")
        self.verify, self.model = verify, model
        self.plain = {name: value.detach().clone() for name, value in model.state_dict().items()}
        self.plain_loss = float(verify(model))
        self.why = ""

    def keeps_fused(self) -> bool:
        """Whether the fused state in the model stays (its loss not above the plain state's; a NaN loss never
        does); otherwise the plain weights are copied back in place, so the optimizer's state still fits them."""
        fused_loss = float(self.verify(self.model))
        if fused_loss <= self.plain_loss:
            return True
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                value.copy_(self.plain[name])
        self.why = (f"rejected by verify: held-out loss {fused_loss:.6g} fused against {self.plain_loss:.6g} "
                    "plain; the model keeps the optimizer's weights")
        return False


def _single_process_only() -> str | None:
    """Why the step must not run here: with several ranks, one rank's fused weights would leave
    the replicas apart (a step split across ranks is the command line's `torchrun` mode)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return (f"training runs on {torch.distributed.get_world_size()} ranks; the in-loop step runs in a "
                "single process only (run `pdt predict` on the checkpoint folder between runs instead)")
    return None


__all__ = ["PDTStep", "PDTStepWarning"]
