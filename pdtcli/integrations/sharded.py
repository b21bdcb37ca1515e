"""The in-loop step of a sharded model (FSDP2 `fully_shard`, DTensor parameters), over the DCP folders training saves.

Every rank calls `PDTStep.step(model, folder)` right after `torch.distributed.checkpoint.save` wrote `folder`. The
ranks then run the step `torchrun -m pdtcli predict` runs (`api.predict` in a `World` of the training's ranks, on a
gloo group of their own made at the first step, with the step's `dist_timeout`): each rank ingests and fuses its own
`.distcp` files into its part of the folder's distributed store, and rank 0 publishes the fused folder (`NAME.pdt`,
bit for bit what one process writes). Each rank then reads its own shards of it into a copy (DCP's load without
collectives: the local chunks only); only when every rank has (`World.settle`: one agreed outcome) does each copy
them into its parameters. No rank holds more than its own shards at any time.

A failure on any rank (its files, its part of the store, the lock, a tensor its model lacks) leaves every rank's
weights as they were, with the same warning on each; the gloo group's timeout bounds every wait.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..api import StepResult, predict
from ..errors import CheckpointError, DistributedError, UsageError
from ..formats.torch_dcp import METADATA, DcpReader
from ..formats.torch_pickle import STATE_DICT_KEYS
from ..live import Live
from ..world import World, gloo_group, within

if TYPE_CHECKING:
    from ..options import Settings
    from . import PDTStep


def holds_shards(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> bool:
    """Whether `model` holds only its rank's shards: FSDP2 (`fully_shard`) modules or DTensor parameters/values."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(model, torch.nn.Module):
        return any(isinstance(m, FSDPModule) for m in model.modules()) or \
            any(isinstance(p, DTensor) for p in model.parameters())
    return any(isinstance(t, DTensor) for t in model.values())


def step_shards(pdt: PDTStep, model: torch.nn.Module | Mapping[str, torch.Tensor], checkpoint: str | Path | None,
                step: int | None, settings: Settings) -> tuple[StepResult | None, str | None]:
    """One step of every rank of a sharded model (see the module) with `settings` (the step's: its tau may be the
    horizon's), saved to the DCP folder `checkpoint` (or to the
    one that records `step`, when the framework names it: Lightning): (the result, None) when every rank took its
    fused shards or none was due ("waiting", "not-due"); (None, why) when no rank changed its weights."""
    dist = torch.distributed
    try:
        if pdt._group is None:  # made once, by every rank at its first step (torch numbers groups by creation)
            pdt._group = gloo_group(pdt.settings.dist_timeout)
        world = World(dist.get_rank(), dist.get_world_size(), pdt._group)  # this step's collectives, counted from 0
    except Exception as exc:  # noqa: BLE001 - a rank that never steps: the group's timeout, then training goes on
        return None, f"cannot make the ranks' group for pdt ({_reason(exc)}); every rank keeps its own weights"
    result, staged, problem = None, [], None
    try:
        with within(world):
            result, staged = _fused_shards(pdt, model, Live({}, Path(checkpoint) if checkpoint else None, step),
                                           settings)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, training must go on (on every rank)
        problem = (_reason(exc), not isinstance(exc, DistributedError))
    try:
        outcomes = world.settle(problem)
    except DistributedError as exc:  # a rank gone, or the timeout passed: the group is spent
        pdt._group = None
        return None, f"{_reason(exc)}; every rank keeps its own weights"
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if failed:  # the rank whose own part failed, rather than those it stopped
        rank, (reason, _) = next(((r, o) for r, o in failed if o[1]), failed[0])
        return None, f"rank {rank}: {reason}; every rank keeps its own weights"
    with torch.no_grad():  # local copies: every rank holds its fused shards, none can fail any more
        for target, values in staged:
            _local(target).copy_(_local(values))
    return result, None


def _fused_shards(pdt: PDTStep, model: torch.nn.Module | Mapping[str, torch.Tensor], saved: Live,
                  settings: Settings) -> tuple[StepResult, list[tuple[torch.Tensor, torch.Tensor]]]:
    """`pdt predict` on the folder as this rank's part of the step, then this rank's shards of the fused folder
    read into copies: (the result, [(the model's tensor, its fused copy)]); no copies unless it was written."""
    if saved.path is not None:  # known before any work; a checkpoint named by its step is known once written
        _dcp_folder(saved.path)
    result = predict(pdt.folder, store=pdt.store, settings=settings, saved=saved)
    if result.status != "written":
        return result, []
    staged = _read_shards(model, _dcp_folder(Path(result.output)))
    return replace(result, status="loaded", message=f"{result.message}; every rank loaded its shards of it"), staged


def _dcp_folder(path: Path) -> Path:
    """`path`, a DCP folder; UsageError (before any rank reads it) for another kind of checkpoint."""
    if not (path / METADATA).is_file():
        raise UsageError("a sharded model is stepped from the DCP folders its ranks save (torch.distributed."
                         "checkpoint.save of get_model_state_dict); this is none", path)
    return path


def _read_shards(model: torch.nn.Module | Mapping[str, torch.Tensor], folder: Path
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shards of the model's tensors (a module, or its sharded state dict) in the DCP folder `folder`,
    each read into a new tensor of the model's own placement, dtype and device (no collective, no other rank's
    chunk): [(the model's tensor, the copy)]. CheckpointError when a tensor of the folder is not in the model's
    state dict."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    # this rank's shards, views of its parameters, under the names saved (no collective without full_state_dict)
    state = get_model_state_dict(model) if isinstance(model, torch.nn.Module) else model
    keys = _model_keys(folder, state)  # first: pdt's reader admits DCP's own records only, so that DCP's load,
    # which unpickles `.metadata` as it is (a byte copy of the one this training just saved), meets no other
    staged = {name: torch.empty_like(state[key]) for name, key in keys.items()}
    load(staged, checkpoint_id=folder, no_dist=True)
    return [(state[key], staged[name]) for name, key in keys.items()]


def _model_keys(folder: Path, state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each model tensor of the folder (its name there) -> the model's state-dict key for it: the same name, or the
    name under the key it was saved under (`{"model": get_model_state_dict(model)}` gives `model.<key>`)."""
    reader = DcpReader(folder)
    try:
        names = [info.name for info in reader.tensors()]
    finally:
        reader.close()
    keys = {}
    for name in names:
        head, _, rest = name.partition(".")
        key = name if name in state else rest if head in STATE_DICT_KEYS and rest in state else None
        if key is None:
            raise CheckpointError(f"tensor {name!r} of the fused checkpoint is not in the model's state dict "
                                  "(get_model_state_dict); save the model's own state dict", folder)
        keys[name] = key
    return keys


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (its storage, not a copy); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _reason(exc: BaseException) -> str:
    """An exception as the one line of a warning."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__

