"""Tiny real training runs that produce the checkpoint trajectories the tests use.

A small MLP with a BatchNorm layer (so running statistics and an integer counter are
in the state dict) learns a fixed random teacher on generated data, with SGD+momentum
or AdamW. Checkpoints are saved with torch.save or safetensors' own save_file, exactly
as training code does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

INPUTS, CLASSES = 16, 4


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, INPUTS, generator=gen)
    teacher = torch.randn(INPUTS, CLASSES, generator=gen)
    return x, (x @ teacher).argmax(1)


def model(hidden: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(INPUTS, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def optimizer(net: nn.Module, name: str) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(net.parameters(), lr=3e-3)
    return torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)


def train_epoch(net: nn.Module, optim: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
    """One epoch of minibatches of 64, in an order fixed by the epoch's number."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
    for i in range(0, len(x), 64):
        batch = order[i: i + 64]
        optim.zero_grad()
        nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        optim.step()


def lightning_module(make_optimizer):
    """A LightningModule around the MLP (hidden 16), with the optimizer `make_optimizer(params)`."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model(16)

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return make_optimizer(self.parameters())

    return Module


def train(folder: Path, epochs: int, *, fmt: str = "pt", opt: str = "sgd", resume: Path | None = None,
          hidden: int = 32, dtype: torch.dtype | None = None) -> list[Path]:
    """Train `epochs` epochs (after `resume`'s epoch) and save one checkpoint per epoch.

    `fmt` is pt (torch.save), safetensors (save_file) or npz (np.savez); `dtype` casts the
    saved floating-point weights, as mixed-precision training code saves them.
    """
    folder.mkdir(parents=True, exist_ok=True)
    x, y = data()
    net = model(hidden)
    optim = optimizer(net, opt)
    start = 0
    if resume is not None:
        if resume.suffix == ".safetensors":
            net.load_state_dict(load_file(resume))
            start = int(resume.stem.split("_")[1].split(".")[0])
        else:
            ckpt = torch.load(resume, weights_only=True)
            net.load_state_dict(ckpt["model"])
            optim.load_state_dict(ckpt["optimizer"])
            start = ckpt["epoch"]
    saved = []
    for epoch in range(start + 1, start + epochs + 1):
        train_epoch(net, optim, x, y, epoch)
        state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
                 for k, v in net.state_dict().items()}
        if fmt == "safetensors":
            path = folder / f"epoch_{epoch}.safetensors"
            metadata = {"epoch": str(epoch), "note": "kept"}
            save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)
        elif fmt == "npz":
            path = folder / f"epoch_{epoch}.npz"
            np.savez(path, **{k: v.numpy() for k, v in state.items()}, epoch=np.int64(epoch))
        else:
            path = folder / f"epoch_{epoch}.pt"
            torch.save({"model": state, "optimizer": optim.state_dict(), "epoch": epoch}, path)
        saved.append(path)
    return saved


def flat_weights(paths: list[Path], names: list[str]) -> torch.Tensor:
    """The snapshot matrix W (N x h) in float64, built directly from the files."""
    columns = []
    for path in paths:
        if path.suffix == ".safetensors":
            state = load_file(path)
        elif path.suffix == ".npz":
            state = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
        else:
            state = torch.load(path, weights_only=True)["model"]
        columns.append(torch.cat([state[n].double().reshape(-1) for n in names]))
    return torch.stack(columns, dim=1)


def flax_run():
    """A Flax `TrainState` of the MLP (hidden 16, SGD with momentum) on the data, `step(state, xb, yb)`: one
    jitted batch, and `epoch(state)`: batches of 64 over the data. (x, y, state, step, epoch)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen
    from flax.training import train_state

    x, y = (jnp.asarray(t.numpy()) for t in data())
    net = linen.Sequential([linen.Dense(16), linen.relu, linen.Dense(CLASSES)])
    state = train_state.TrainState.create(apply_fn=net.apply, params=net.init(jax.random.PRNGKey(0), x[:1]),
                                          tx=optax.sgd(0.05, momentum=0.9))

    @jax.jit
    def step(state, xb, yb):
        def loss(params):
            return optax.softmax_cross_entropy_with_integer_labels(state.apply_fn(params, xb), yb).mean()

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    def epoch(state):
        for i in range(0, len(x), 64):
            state = step(state, x[i: i + 64], y[i: i + 64])
        return state

    return x, y, state, step, epoch


def lightning_trainer(folder: Path, epochs: int):
    """A CPU Lightning Trainer, deterministic and quiet, saving a checkpoint `{epoch}.ckpt` into `folder` each epoch."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoints = ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    return L.Trainer(max_epochs=epochs, callbacks=[checkpoints], logger=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", deterministic=True)
