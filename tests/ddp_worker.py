"""One rank of a real DDP training run with the in-loop PDT step, as `torchrun` starts it.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py MODE FOLDER OUT

MODE: `loop` (a plain loop around `DistributedDataParallel`), `locked` (the same, with rank 0's
store locked by a `pdt` from cron at epoch 4), `differ` (the same, rank 1 passing a state dict
without `0.weight` at epoch 4), `dies` (rank 0 exits at epoch 4 instead of stepping; started
without torchrun, which would stop rank 1 at once), `hf` (the Hugging Face Trainer, `ddp_backend="gloo"`),
`lightning` (`strategy="ddp"`), `lightning-fsdp` (Lightning's FSDP2 `ModelParallelStrategy`, saving DCP folders),
`fsdp` (FSDP2 `fully_shard`, every rank saving its shards with DCP each epoch,
`OUT/saved/` keeping a copy of each folder as saved, before the step), `fsdp-fails` (the same, rank 1's own
`.distcp` file of epoch 4 cut short while the step reads it), `fsdp-differ` (the same, rank 1 passing a sharded
state dict without `0.weight` at epoch 4: it fails after the fused folder is published). Each rank writes
`OUT/rank<R>.pt`:
`{"fused": {step: state dict right after a step that loaded}, "warnings": [PDTStepWarning texts],
"statuses": {step: status or None}, "parameters": [names]}` (a rank's buffers, such as BatchNorm's
running statistics, are its own until DDP broadcasts rank 0's at the next forward), so that the
test compares the ranks with each other and with `pdt predict`. Under FSDP2 the fused state is the whole model's
(`full_tensor`, gathered here for the test only), and `unchanged` says, for each step that did not load, whether
this rank's shards were left bit for bit as they were, `seconds` what each step took.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import training  # noqa: E402

from pdtcli.integrations import PDTStep, PDTStepWarning  # noqa: E402

EPOCHS = 5
OPTIONS = {"history": 3}
TIMEOUT = 60  # seconds a sharded step waits for the other ranks (`dist_timeout`)


def record(out: dict, step: int, result, model: nn.Module) -> None:
    out["statuses"][step] = result.status if result is not None else None
    if result is not None and result.status == "loaded":  # a sharded model's whole tensors: gathered, for the test
        out["fused"][step] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                              for k, v in model.state_dict().items()}
        out["parameters"] = sorted(name for name, _ in model.named_parameters())


def plain_loop(folder: Path, out: dict, mode: str) -> None:
    """SGD on this rank's half of the data; rank 0 saves `epoch_E.pt`, then every rank steps."""
    x, y = training.data()
    rank, size = dist.get_rank(), dist.get_world_size()
    net = training.model()
    model = nn.parallel.DistributedDataParallel(net)
    optim = training.optimizer(model, "sgd")
    pdt = PDTStep(folder, **OPTIONS)
    for epoch in range(1, EPOCHS + 1):
        training.train_epoch(model, optim, x[rank::size], y[rank::size], epoch)
        path = folder / f"epoch_{epoch}.pt"
        if rank == 0:
            torch.save({"model": net.state_dict(), "epoch": epoch}, path)
        dist.barrier()  # the file is complete before any rank steps (a training loop's own save does this)
        if mode == "locked" and epoch == 4 and rank == 0:
            import filelock

            with filelock.FileLock(str(folder / ".pdt" / "lock")):  # a `pdt` from cron holds the store
                result = pdt.step(model, path)
        elif mode == "dies" and epoch == 4:  # rank 0 is gone (as killed while fusing) while rank 1 waits for it
            if rank == 0:
                os._exit(3)
            before = {k: v.clone() for k, v in net.state_dict().items()}
            record(out, epoch, pdt.step(model, path), net)
            out["unchanged"] = all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
            return  # the process group is broken: training would stop here
        elif mode == "differ" and epoch == 4 and rank == 1:  # a state dict that lacks a tensor rank 0 fuses
            result = pdt.step({k: v for k, v in net.state_dict().items() if k != "0.weight"}, path)
        else:
            result = pdt.step(model, path)
        record(out, epoch, result, net)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters); a buffer as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def sharded_loop(folder: Path, out: dict, saved: Path, mode: str) -> None:
    """SGD on this rank's half of the data under FSDP2; every rank saves its shards (`dcp.save`) to `step_E`, then
    every rank steps. `fsdp-fails`: rank 1's own file of epoch 4 is cut short while the step reads it;
    `fsdp-differ`: rank 1 passes its sharded state dict without `0.weight` at epoch 4."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    x, y = training.data()
    rank, size = dist.get_rank(), dist.get_world_size()
    net = training.model()
    model = fully_shard(net)
    optim = training.optimizer(model, "sgd")
    pdt = PDTStep(folder, dist_timeout=TIMEOUT, **OPTIONS)
    out["unchanged"], out["seconds"] = {}, {}
    for epoch in range(1, EPOCHS + 1):
        training.train_epoch(model, optim, x[rank::size], y[rank::size], epoch)
        path = folder / f"step_{epoch}"
        dcp.save({"model": get_model_state_dict(model), "epoch": epoch}, checkpoint_id=path)
        if rank == 0:
            shutil.copytree(path, saved / path.name)
        dist.barrier()  # the copy is complete before any rank steps
        own = path / f"__{rank}_0.distcp"
        kept = own.read_bytes()
        if mode == "fsdp-fails" and epoch == 4 and rank == 1:
            own.write_bytes(kept[: len(kept) // 2])
        before = {k: local(v).clone() for k, v in net.state_dict().items()}
        target = model
        if mode == "fsdp-differ" and epoch == 4 and rank == 1:
            target = {k: v for k, v in get_model_state_dict(model).items() if k != "0.weight"}
        result = pdt.step(target, path)
        out["seconds"][epoch] = pdt.seconds[-1]
        own.write_bytes(kept)
        if result is None or result.status != "loaded":
            out["unchanged"][epoch] = all(torch.equal(local(v), before[k]) for k, v in net.state_dict().items())
        record(out, epoch, result, net)


def hf(folder: Path, out: dict) -> None:
    from test_integrations import gpt, trainer_for
    from transformers import TrainerCallback

    from pdtcli.integrations.hf import PDTCallback

    callback = PDTCallback(**OPTIONS)

    class Record(TrainerCallback):  # runs after PDTCallback: the model as training goes on from it
        def on_save(self, args, state, control, model=None, **kwargs):
            record(out, state.global_step, callback.pdt.last, model)

    trainer_for(gpt(), folder, 40, [callback, Record()], ddp_backend="gloo").train()


def lightning(folder: Path, out: dict, mode: str) -> None:
    """`strategy="ddp"`, or (`lightning-fsdp`) Lightning's FSDP2 strategy, `ModelParallelStrategy`, with the module
    sharded by `fully_shard` in `configure_model`: Lightning then saves each checkpoint as a DCP folder."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    from pdtcli.integrations.lightning import PDTCallback

    x, y = training.data()
    Module = training.lightning_module(lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01))
    strategy = "ddp"
    if mode == "lightning-fsdp":
        from torch.distributed.fsdp import fully_shard

        class Sharded(Module):
            def configure_model(self):
                fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

        Module, strategy = Sharded, ModelParallelStrategy()
    callback = PDTCallback(dist_timeout=TIMEOUT, **OPTIONS)

    class Record(L.Callback):  # runs after PDTCallback, at the batch that took the step
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if callback.pdt is not None and trainer.global_step not in out["statuses"] and batch_idx == 0:
                record(out, trainer.global_step, callback.pdt.last, module)

    checkpoints = ModelCheckpoint(dirpath=folder, filename="{epoch}-{step}", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[callback, Record(), checkpoints], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=2,
                        strategy=strategy, deterministic=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    trainer.fit(Module(), loader)


def main() -> None:
    mode, folder, target = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if not mode.startswith("lightning"):
        dist.init_process_group("gloo")
    out: dict = {"fused": {}, "warnings": [], "statuses": {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PDTStepWarning)
        if mode == "hf":
            hf(folder, out)
        elif mode.startswith("lightning"):
            lightning(folder, out, mode)
        elif mode.startswith("fsdp"):
            (target / "saved").mkdir(exist_ok=True)
            sharded_loop(folder, out, target / "saved", mode)
        else:
            plain_loop(folder, out, mode)
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, PDTStepWarning)]
    torch.save(out, target / f"rank{os.environ['RANK']}.pt")
    if dist.is_initialized() and mode != "dies":
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort a normal interpreter exit


if __name__ == "__main__":
    main()
