"""A Lightning `Callback` that takes a PDT step at every checkpoint `ModelCheckpoint` saves.

    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath="ckpts", save_top_k=-1), PDTCallback()])

Lightning writes a checkpoint after its callbacks' hooks of the same event have run, so the
step is taken at the start of the next training batch, when the file is complete and the
model still holds the values it saved. The checkpoint is recognised by the step it records.
Under `strategy="ddp"` every rank calls the step: rank 0, which saved the checkpoint, fuses, and
every rank takes the same values.

`verify="val"` is the loss gate (`PDTStep(verify=...)`) on the validation data given to `fit`: the mean of what
`validation_step(batch, i)` returns (a tensor, or a dict's "loss" or "val_loss") over the (first) validation
dataloader's first `verify_batches` batches, its `self.log` calls muted (the gate's evaluations are not the
epoch's validation, whose logged metrics a `ModelCheckpoint` or `EarlyStopping` may monitor). Without
validation data, or a `validation_step` that returns nothing, the step is taken ungated, with a warning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from . import PDTStep, mean_loss, warn_once

NO_VAL_DATA = ("verify='val' needs validation data: pass val_dataloaders to trainer.fit (or define "
               "val_dataloader), or pass verify=callable; the step is taken ungated")
NO_VAL_LOSS = ("verify='val': validation_step returns no loss (return it, as a tensor or a dict's 'loss' or "
               "'val_loss'), or pass verify=callable; the step is taken ungated")


class PDTCallback(pl.Callback):
    """`folder`: where the checkpoints are (default: the `ModelCheckpoint`'s `dirpath`);
    `options`: those of `PDTStep` (and of `pdt predict`), e.g. `history=5, tau=5, every=1`; `verify`: a
    callable (as `PDTStep`'s) or "val" (the validation data's mean loss, over its first `verify_batches`)."""

    def __init__(self, folder: str | Path | None = None, *, verify: Callable[[Any], float | None] | str | None = None,
                 verify_batches: int | None = None, **options: Any) -> None:
        if isinstance(verify, str) and verify != "val":
            raise ValueError(f"verify={verify!r}: use 'val' (the validation dataloader) or a callable")
        self.folder = Path(folder) if folder is not None else None
        self.options = options
        self.verify, self.verify_batches = verify, verify_batches
        self.warned: set[str] = set()
        self.pdt: PDTStep | None = None
        self._saved: int | None = None  # the global step of a checkpoint being saved

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._saved = checkpoint.get("global_step")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        saved, self._saved = self._saved, None
        if saved is None:  # every rank steps: under DDP rank 0 fuses and every replica takes the values
            return
        if self.pdt is None:
            folder = self.folder or (Path(trainer.checkpoint_callback.dirpath) if trainer.checkpoint_callback else None)
            if folder is None:
                return
            # the Trainer's optimizer, for horizon="lr" (the user's own optimizer= comes first)
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            self.pdt = PDTStep(folder, **{"optimizer": optimizer, **self.options})
        self.pdt.verify = self._val_loss(trainer) if self.verify == "val" else self.verify
        self.pdt.step(pl_module, step=saved)

    def _val_loss(self, trainer: pl.Trainer) -> Callable[[pl.LightningModule], float | None] | None:
        """The gate's loss on the first validation dataloader; None (and a warning, once) without one."""
        loader = trainer.val_dataloaders
        if isinstance(loader, Mapping):
            loader = next(iter(loader.values()), None)
        elif isinstance(loader, list | tuple):
            loader = loader[0] if loader else None
        if loader is None:
            warn_once(self.warned, NO_VAL_DATA)
            return None

        def loss(module: pl.LightningModule) -> float | None:
            with _unlogged(module):
                value = mean_loss(module, loader, lambda batch, i: _loss_of(module.validation_step(batch, i)),
                                  self.verify_batches)
            if value is None:
                warn_once(self.warned, NO_VAL_LOSS)
            return value

        return loss


def _loss_of(output: Any) -> Any:
    """The loss in what `validation_step` returned: a tensor or number, a dict's "loss" or "val_loss", or None."""
    if isinstance(output, Mapping):
        return output.get("loss", output.get("val_loss"))
    return output


@contextlib.contextmanager
def _unlogged(module: pl.LightningModule) -> Iterator[None]:
    """`module.log` and `log_dict` as no-ops (instance attributes over the methods) while the gate evaluates:
    logged from a training hook, its values would become the training step's metrics."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict
