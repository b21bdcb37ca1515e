"""A Lightning `Callback` that takes a PDT step at every checkpoint `ModelCheckpoint` saves.

    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath="ckpts", save_top_k=-1), PDTCallback()])

Lightning writes a checkpoint after its callbacks' hooks of the same event have run, so the
step is taken at the start of the next training batch, when the file is complete and the
model still holds the values it saved. The checkpoint is recognised by the step it records.
Under `strategy="ddp"` every rank calls the step: rank 0, which saved the checkpoint, fuses, and
every rank takes the same values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from . import PDTStep


class PDTCallback(pl.Callback):
    """`folder`: where the checkpoints are (default: the `ModelCheckpoint`'s `dirpath`);
    `options`: those of `PDTStep` (and of `pdt predict`), e.g. `history=5, tau=5, every=1`."""

    def __init__(self, folder: str | Path | None = None, **options: Any) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.options = options
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
        self.pdt.step(pl_module, step=saved)
