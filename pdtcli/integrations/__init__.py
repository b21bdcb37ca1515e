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
copy of the weights per step. A `verify` that returns None abstains: the step is taken ungated. The callbacks
build it from the evaluation data the framework already has (`verify="eval"`, `verify="val"`; `mean_loss`).

`horizon` is a policy that sets tau step by step (default None: the fixed `tau`; the paper's "adaptive
interval", NiNo's decaying horizon, the official trainers' back-off), each step's tau recorded in the store's
history (`tau` of its row) and never kept as a new `--tau`:

- `"lr"`: tau follows the learning-rate schedule, max(1, round(tau x lr / lr_peak)), the rate that of
  `optimizer.param_groups[0]` at the step and lr_peak the largest seen so far;
- `"backoff"`: tau halves (down to 1) after a step the loss gate rejected, or, without a gate, when the loss
  given to `step(..., loss=)` rose since the previous fused step; after an accepted step (or a loss that did
  not rise) it doubles back up to `tau`.

A step that fails (a full disk, NaN in the weights, the store locked by a running `pdt`)
warns and leaves the model unchanged: training goes on without that prediction.

Under DDP (replicated weights) every rank calls the step after rank 0 saved the checkpoint:
rank 0 runs it as one process would, and the fused values reach every rank over the training's
own process group before any rank takes them (all ranks or none; the group's timeout bounds the
wait). Sharded models (FSDP2 `fully_shard`, DTensor parameters) are stepped from the DCP folder every rank
just saved: each rank fuses and takes only its own shards (`sharded`). FSDP1 models are refused with a
warning: `pdt predict` under `torchrun` fuses their DCP folders between runs.

    pdt = PDTStep("ckpts", history=5, tau=5)
    for epoch in range(epochs):
        train_one_epoch(model, optimizer)
        path = f"ckpts/epoch_{epoch:03d}.pt"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        pdt.step(model, path)
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..api import StepResult, predict, reject_live
from ..live import Live
from ..options import Settings
from .sharded import holds_shards, step_shards

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
                 verify: Callable[[torch.nn.Module], float | None] | None = None, horizon: str | None = None,
                 optimizer: torch.optim.Optimizer | None = None, **options: Any) -> None:
        self.folder = Path(folder)
        self.store = Path(store) if store is not None else None
        self.verify = verify
        self.rejected: list[str] = []  # the checkpoints whose fused state the gate turned down
        self.settings = Settings.build(wait=wait, **options)
        self.horizon = Horizon(horizon, self.settings.fit.tau, optimizer, gated=verify is not None) \
            if horizon is not None else None
        self.last: StepResult | None = None
        self.seconds: list[float] = []  # wall time of each call, what pdt costs the training loop
        self._group = None  # a sharded model's steps: the gloo group of the training's ranks (made at the first)

    def step(self, model: torch.nn.Module | Mapping[str, torch.Tensor], checkpoint: str | Path | None = None, *,
             step: int | None = None, loss: float | None = None) -> StepResult | None:
        """Call right after `model` was saved as `checkpoint` (or as the checkpoint that records
        `step`) in the folder, before training changes it; `loss`: the training loss now, for
        `horizon="backoff"` without a gate. Returns what was done (`status` "loaded" when the model
        took fused values; "waiting" or "not-due" when the window or the schedule says not yet), or
        None when the step failed and the model is unchanged."""
        started = time.perf_counter()
        try:
            settings = self.settings
            if self.horizon is not None:
                settings = replace(settings, step_tau=self.horizon.before(loss))
            result = self._step(model, checkpoint, step, settings)
            if self.horizon is not None:
                self.horizon.after(result, loss)
            return result
        finally:
            self.seconds.append(time.perf_counter() - started)

    def _step(self, model: torch.nn.Module | Mapping[str, torch.Tensor], checkpoint: str | Path | None,
              step: int | None, settings: Settings) -> StepResult | None:
        self.last = None
        where = Path(checkpoint).name if checkpoint is not None else f"step {step}"
        reason = _sharded(model)  # every rank finds the same, before any state dict (FSDP's would gather)
        if reason is not None:
            return _skipped(where, reason)
        if holds_shards(model):  # FSDP2 / DTensor: every rank fuses and takes its own shards
            if self.verify is not None:
                warnings.warn("pdt: verify= is applied in one process only; a sharded model takes the fused state "
                              "unverified", PDTStepWarning, stacklevel=3)
            return self._outcome(where, *step_shards(self, model, checkpoint, step, settings))
        rank, size = _ranks()
        # under DDP rank 0 alone runs the step (it saved the file; the store has one writer) and keeps
        # the fused values aside until every rank holds them (`_replicate`)
        live = (_Held if size > 1 else Live)(_state_of(model), Path(checkpoint) if checkpoint is not None else None,
                                             step)
        result = None
        if self.verify is not None and size > 1:
            warnings.warn("pdt: verify= is applied in one process only; under DDP the fused state is taken "
                          "unverified", PDTStepWarning, stacklevel=3)
        if rank == 0:
            try:
                # the loss gate compares the model before and after: one process's model (under DDP not yet)
                gate = _Gate(self.verify, model) if self.verify is not None and size == 1 else None
                result = predict(self.folder, store=self.store, settings=settings, live=live)
                if gate is not None and result.status == "loaded" and not gate.keeps_fused():
                    self.rejected.append(where)
                    reject_live(self.folder, store=self.store, settings=self.settings)
                    result = replace(result, status="rejected", message=f"{result.message}; {gate.why}")
            except Exception as exc:  # noqa: BLE001 - whatever went wrong, training must go on
                reason = str(exc) or type(exc).__name__
        if size > 1:
            result, reason = _replicate(live, result, reason, rank)
        return self._outcome(where, result, reason)

    def _outcome(self, where: str, result: StepResult | None, reason: str | None) -> StepResult | None:
        """The step's result as `step` returns it: None, with a warning, when it did not happen."""
        if reason is not None or result is None:
            return _skipped(where, reason, stacklevel=5)
        self.last = result
        log.info("pdt at %s: %s", where, result.message)
        for warning in result.warnings:  # the step happened; what it found (the lineage) is worth a look
            log.warning("pdt at %s: %s", where, warning)
        return result


HORIZONS = ("lr", "backoff")


class Horizon:
    """The tau of each step under a horizon policy (`PDTStep(horizon=)`): `before` gives the step's, `after` learns
    from its outcome. `tau` is the configured one, the longest any step predicts."""

    def __init__(self, policy: str, tau: int, optimizer: torch.optim.Optimizer | None, gated: bool) -> None:
        if policy not in HORIZONS:
            raise ValueError(f"horizon={policy!r}: use one of {', '.join(HORIZONS)} (None: a fixed tau)")
        if policy == "lr" and optimizer is None:
            raise ValueError('horizon="lr" follows the learning rate: give PDTStep the optimizer= whose rate it is')
        self.policy, self.tau, self.optimizer, self.gated = policy, tau, optimizer, gated
        self.now = tau  # backoff: the tau of the next step
        self.lr_peak = 0.0
        self.fused_loss: float | None = None  # backoff without a gate: the loss given at the last fused step

    def before(self, loss: float | None) -> int:
        """This step's tau; under backoff without a gate, first halved when `loss` rose since the last fused
        step (doubled back toward `tau` when it did not). ValueError: backoff with neither gate nor loss."""
        if self.policy == "lr":
            lr = float(self.optimizer.param_groups[0]["lr"])
            self.lr_peak = max(self.lr_peak, lr)
            return max(1, round(self.tau * lr / self.lr_peak)) if self.lr_peak > 0 else 1
        if not self.gated and loss is None:
            raise ValueError('horizon="backoff" backs off when the loss rises: give step(..., loss=) or verify=')
        if not self.gated and self.fused_loss is not None:
            self._back(float(loss) <= self.fused_loss)
            self.fused_loss = None  # one verdict per fused step
        return self.now

    def after(self, result: StepResult | None, loss: float | None) -> None:
        """Learn from the step's outcome: the gate's verdict, or (no gate) the loss the next fused step compares."""
        if self.policy != "backoff" or result is None or result.status not in ("loaded", "rejected"):
            return
        if self.gated:
            self._back(result.status == "loaded")
        else:
            self.fused_loss = float(loss)

    def _back(self, accepted: bool) -> None:
        self.now = min(self.tau, 2 * self.now) if accepted else max(1, self.now // 2)


def _skipped(where: str, reason: str | None, stacklevel: int = 4) -> None:
    """Warn (at the training code's `step` call, `stacklevel` frames up) that no step happened at `where`, and why."""
    warnings.warn(f"pdt: no fused step at {where}, the model is unchanged: {reason}", PDTStepWarning,
                  stacklevel=stacklevel)


class _Held(Live):
    """Rank 0's live model among replicas: the fused values wait in `fused` (nothing is copied into
    the model) until every rank has received them, so that no rank changes its weights alone."""

    def load_fused(self) -> int:
        return len(self.fused)


def _state_of(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The model's state dict under the names it was saved with: a `DistributedDataParallel`
    wrapper's own names carry a `module.` prefix that the saved checkpoint does not."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model.state_dict() if isinstance(model, torch.nn.Module) else model


def _ranks() -> tuple[int, int]:
    """(rank, world size) of the training's process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _sharded(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> str | None:
    """Why the step refuses an FSDP1 model (`FullyShardedDataParallel`): its flat parameters are no DTensors, so a
    rank's shards cannot be matched to the DCP folder's chunks as FSDP2's are (`sharded`)."""
    if not torch.distributed.is_available() or not isinstance(model, torch.nn.Module):
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        return ("FSDP1 (FullyShardedDataParallel) models are not fused inside the loop: shard with FSDP2 "
                "(`fully_shard`), or run `torchrun --nproc-per-node N -m pdtcli predict` on the checkpoint folder "
                "(the DCP folders) between runs")
    return None


class _Gate:
    """The loss gate of `PDTStep(verify=...)`: the plain state's loss and a copy of its weights, taken before the
    step, and after it the choice between them and the fused state in the model."""

    def __init__(self, verify: Callable[[torch.nn.Module], float | None], model: torch.nn.Module | Mapping) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError("verify= needs the model itself (a torch.nn.Module) to measure its loss")
        self.verify, self.model = verify, model
        loss = verify(model)
        self.plain_loss = None if loss is None else float(loss)  # None: verify abstains, the step is ungated
        self.plain = {name: value.detach().clone() for name, value in model.state_dict().items()} \
            if self.plain_loss is not None else {}
        self.why = ""

    def keeps_fused(self) -> bool:
        """Whether the fused state in the model stays (its loss not above the plain state's; a NaN loss never
        does); otherwise the plain weights are copied back in place, so the optimizer's state still fits them."""
        if self.plain_loss is None:
            return True
        fused_loss = float(self.verify(self.model))
        if fused_loss <= self.plain_loss:
            return True
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                value.copy_(self.plain[name])
        self.why = (f"rejected by verify: held-out loss {fused_loss:.6g} fused against {self.plain_loss:.6g} "
                    "plain; the model keeps the optimizer's weights")
        return False


def mean_loss(model: torch.nn.Module, batches: Iterable, loss_of: Callable[[Any, int], Any],
              limit: int | None = None) -> float | None:
    """The mean of `loss_of(batch, i)` (a scalar tensor or number) over the first `limit` (None: all) of
    `batches`, each moved to the model's device first, with the model in eval mode under `torch.no_grad()` and
    put back in its former mode after. None when `loss_of` gives None (no loss on these batches); ValueError
    when there is no batch."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    total, count = 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(itertools.islice(batches, limit)):
                loss = loss_of(_moved(batch, device), i)
                if loss is None:
                    return None
                total, count = total + float(loss), count + 1
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("the evaluation data of the loss gate has no batch")
    return total / count


def _moved(batch: Any, device: torch.device) -> Any:
    """A batch (tensors in dicts, lists, tuples) on `device`; what is not a tensor as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _moved(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple takes its fields one by one
        return type(batch)(*(_moved(value, device) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(_moved(value, device) for value in batch)
    return batch


def warn_once(said: set[str], text: str) -> None:
    """A PDTStepWarning with `text`, unless `said` (the caller's) holds it already: a callback warns once per
    run of what it cannot do, not at every save."""
    if text not in said:
        said.add(text)
        warnings.warn(f"pdt: {text}", PDTStepWarning, stacklevel=3)


def _replicate(live: Live, result: StepResult | None, reason: str | None,
               rank: int) -> tuple[StepResult | None, str | None]:
    """Rank 0's outcome on every rank of the training's process group (which the framework made; no
    other is made): first whether the step loaded fused values (or why not) and their names, shapes
    and dtypes; then whether every rank's model can take them (one agreed answer); then the values;
    then one collective that every rank reaches only with all of them. Only then does each rank
    copy them into its model. Any failure (rank 0's step, a model that differs, a rank gone, the
    group's timeout: it bounds every wait) leaves every rank's model as it was. Returns (rank 0's
    result, why not)."""
    dist = torch.distributed
    device = _device()
    try:
        loaded = result is not None and result.status == "loaded"
        header = [(result, reason, _layout(live.tensors, live.fused) if loaded else {})]
        dist.broadcast_object_list(header, src=0, device=device)
        result, reason, layout = header[0]
        if reason is not None:
            return None, f"rank 0: {reason}"
        if not layout:
            return result, None
        problems: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(problems, _differs(live.tensors, layout))
        refused = [(r, problem) for r, problem in enumerate(problems) if problem is not None]
        if refused:
            return None, f"rank {refused[0][0]}: {refused[0][1]}; every rank keeps its own weights"
        received = _received(live, layout, rank, device)
        dist.all_reduce(torch.ones(1, device=device))  # reached by a rank only once it holds every value
    except Exception as exc:  # noqa: BLE001 - a rank gone or the timeout passed: training must go on
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return None, f"rank {rank} did not receive rank 0's fused values ({text}); every rank keeps its own"
    live.fused = received
    Live.load_fused(live)  # `_Held` keeps them aside; now that every rank has them, each takes them
    return result, None


def _layout(tensors: Mapping[str, torch.Tensor], fused: Mapping[str, torch.Tensor]) -> dict[str, tuple]:
    """Name -> (shape, dtype) of the model's tensors that take fused values, in the order they are sent."""
    return {name: (tuple(tensors[name].shape), str(tensors[name].dtype)) for name in fused}


def _differs(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, tuple]) -> str | None:
    """Why this rank's model cannot take rank 0's fused values (a tensor it lacks or holds in another
    shape or dtype), or None."""
    for name, (shape, dtype) in layout.items():
        tensor = tensors.get(name)
        if tensor is None:
            return f"its model has no tensor {name!r}, which rank 0 fused"
        if (tuple(tensor.shape), str(tensor.dtype)) != (shape, dtype):
            return (f"its {name!r} is {tuple(tensor.shape)} {tensor.dtype}, rank 0's {shape} {dtype}: "
                    "the replicas differ")
    return None


def _received(live: Live, layout: Mapping[str, tuple], rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 0's fused values on this rank, in this model's own dtypes and shapes: one broadcast per
    tensor, from a buffer that rank 0 fills as its own model would take the values."""
    received = {}
    for name in layout:
        buffer = torch.empty_like(live.tensors[name], device=device)
        if rank == 0:
            buffer.copy_(live.fused[name].view_as(buffer))
        torch.distributed.broadcast(buffer, src=0)
        received[name] = buffer
    return received


def _device() -> torch.device:
    """Where the training's process group moves tensors: its GPU under nccl, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["HORIZONS", "Horizon", "PDTStep", "PDTStepWarning", "mean_loss"]
