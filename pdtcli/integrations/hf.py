"""A Hugging Face `TrainerCallback` that takes a PDT step at every checkpoint the Trainer saves.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[PDTCallback(history=5)])

The folder is the Trainer's `output_dir`, and only its `checkpoint-<step>` folders are
checkpoints (`files` says otherwise): a model saved at the top of `output_dir` is not one.
After `on_save`, the fused weights are in the model and training continues from them; the
checkpoint folder on disk keeps the optimizer's own weights. Under DDP (`torchrun`) every rank
calls the step: rank 0, which saved the checkpoint, fuses, and every rank takes the same values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import PDTStep


class PDTCallback(TrainerCallback):
    """`options`: those of `PDTStep` (and of `pdt predict`), e.g. `history=5, tau=5, every=1`."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("files", [f"{PREFIX_CHECKPOINT_DIR}-*"])
        self.options = options
        self.pdt: PDTStep | None = None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                **kwargs: Any) -> None:
        if model is None:  # every rank steps: under DDP rank 0 fuses and every replica takes the values
            return
        if self.pdt is None:
            # the Trainer's optimizer, for horizon="lr" (the user's own optimizer= comes first)
            self.pdt = PDTStep(args.output_dir, **{"optimizer": kwargs.get("optimizer"), **self.options})
        self.pdt.step(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
