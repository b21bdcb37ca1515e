"""A Hugging Face `TrainerCallback` that takes a PDT step at every checkpoint the Trainer saves.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[PDTCallback(history=5)])

The folder is the Trainer's `output_dir`, and only its `checkpoint-<step>` folders are
checkpoints (`files` says otherwise): a model saved at the top of `output_dir` is not one.
After `on_save`, the fused weights are in the model and training continues from them; the
checkpoint folder on disk keeps the optimizer's own weights. Under DDP (`torchrun`) every rank
calls the step: rank 0, which saved the checkpoint, fuses, and every rank takes the same values.

`verify="eval"` is the loss gate (`PDTStep(verify=...)`) on the Trainer's own evaluation data: the mean
`model(**batch).loss` over its eval dataloader (the first `verify_batches` batches), which the Trainer makes
at its first evaluation; give it an `eval_dataset` and an `eval_strategy`, so that it evaluates before it saves.
Until it has one, the step is taken ungated, with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import PDTStep, mean_loss, warn_once

NO_EVAL_DATA = ("verify='eval' needs the Trainer's eval dataloader, which it makes at its first evaluation: give "
                "it an eval_dataset and an eval_strategy (evaluating before it saves), or pass verify=callable; "
                "the step is taken ungated until then")
NO_EVAL_LOSS = ("verify='eval': the model computes no loss on the eval batches (no labels in them?); pass "
                "verify=callable; the step is taken ungated")


class PDTCallback(TrainerCallback):
    """`options`: those of `PDTStep` (and of `pdt predict`), e.g. `history=5, tau=5, every=1`; `verify`: a
    callable (as `PDTStep`'s) or "eval" (the eval dataloader's mean loss, over its first `verify_batches`)."""

    def __init__(self, *, verify: Callable[[Any], float | None] | str | None = None,
                 verify_batches: int | None = None, **options: Any) -> None:
        if isinstance(verify, str) and verify != "eval":
            raise ValueError(f"verify={verify!r}: use 'eval' (the Trainer's eval dataloader) or a callable")
        options.setdefault("files", [f"{PREFIX_CHECKPOINT_DIR}-*"])
        self.options = options
        self.verify, self.verify_batches = verify, verify_batches
        self.warned: set[str] = set()
        self.pdt: PDTStep | None = None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None,
                **kwargs: Any) -> None:
        if model is None:  # every rank steps: under DDP rank 0 fuses and every replica takes the values
            return
        if self.pdt is None:
            # the Trainer's optimizer, for horizon="lr" (the user's own optimizer= comes first)
            self.pdt = PDTStep(args.output_dir, **{"optimizer": kwargs.get("optimizer"), **self.options})
        self.pdt.verify = self._eval_loss(kwargs.get("eval_dataloader")) if self.verify == "eval" else self.verify
        self.pdt.step(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _eval_loss(self, loader: Any) -> Callable[[Any], float | None] | None:
        """The gate's loss on the eval dataloader `loader`; None (and a warning, once) without one."""
        if loader is None:
            warn_once(self.warned, NO_EVAL_DATA)
            return None

        def loss(model: Any) -> float | None:
            value = mean_loss(model, loader, lambda batch, _: model(**batch).loss, self.verify_batches)
            if value is None:
                warn_once(self.warned, NO_EVAL_LOSS)
            return value

        return loss
