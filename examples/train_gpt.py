"""A small GPT-style language model trained with Hugging Face Trainer, with and without pdt.

A byte-level GPT-2 (`transformers`' own classes, a few layers) learns Python's documentation
as it ships with Python (`pydoc_data.topics`: about 460 kB of English prose and examples,
no download). AdamW with weight decay, a cosine schedule with warm-up, a checkpoint every
`--save-every` steps through Trainer (`save_strategy="steps"`), as Trainer users train.
At every checkpoint the loss on a fixed sample of the training text and on held-out text
is measured on the model training continues from.

`--pdt` says how pdt takes part:
- `none`: the baseline;
- `callback`: `pdtcli.integrations.hf.PDTCallback` inside the Trainer (the fused weights go
  into the model in memory at each checkpoint);
- `cli`: training runs in segments of `--save-every` steps; after each, `pdt predict` runs as
  its own process on the checkpoint folder and the next segment resumes from the fused
  checkpoint by its path (`resume_from_checkpoint="…/checkpoint-N.pdt"`).

    python examples/train_gpt.py --out runs/gpt-base --steps 600
    python examples/train_gpt.py --out runs/gpt-pdt --steps 600 --pdt callback
    python examples/train_gpt.py --out runs/gpt-cli --steps 600 --pdt cli
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

VOCAB = 256  # bytes


def text_blocks(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training blocks, held-out blocks) of `seq` bytes: the documentation topics in a fixed
    order, the last tenth of the blocks held out."""
    from pydoc_data.topics import topics

    data = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.long)
    blocks = data[: len(data) // seq * seq].view(-1, seq)
    split = int(0.9 * len(blocks))
    return blocks[:split], blocks[split:]


def make_model(seed: int, seq: int, width: int, layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=seq, n_embd=width, n_layer=layers, n_head=max(1, width // 32),
                        bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    return GPT2LMHeadModel(config)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


@torch.no_grad()
def loss_on(model, blocks: torch.Tensor, batch: int = 32) -> float:
    """Mean next-byte cross-entropy of `model` on `blocks` (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    total = sum(float(model(input_ids=b, labels=b).loss) * len(b) for b in blocks.split(batch))
    model.train(was_training)
    return total / len(blocks)


class Meter:
    """Losses along the run, with the wall-clock of training (and pdt) without the measuring itself."""

    def __init__(self, probe: torch.Tensor, held_out: torch.Tensor) -> None:
        self.probe, self.held_out = probe, held_out
        self.rows: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.spent = 0.0  # seconds spent measuring

    def measure(self, step: int, model, checkpoint: bool = False, ratio: float | None = None) -> None:
        began = time.perf_counter()
        self.rows.append({"step": step, "wall_s": began - self.started - self.spent,
                          "train_loss": loss_on(model, self.probe),
                          "val_loss": loss_on(model, self.held_out) if checkpoint else None,
                          "fused": ratio is not None, "ratio": ratio})
        self.spent += time.perf_counter() - began


def arguments(out: Path, cfg: argparse.Namespace, max_steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=cfg.batch, learning_rate=cfg.lr,
        weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=cfg.warmup, save_strategy="steps",
        save_steps=cfg.save_every, logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0)


def trainer_for(model, out: Path, cfg: argparse.Namespace, callbacks: list, train: torch.Tensor):
    from transformers import Trainer

    # the schedule spans the whole run, also when the run is trained in segments
    args = arguments(out, cfg, cfg.steps)
    return Trainer(model=model, args=args, train_dataset=Blocks(train), callbacks=callbacks)


def run(cfg: argparse.Namespace) -> dict[str, Any]:
    from transformers import TrainerCallback, TrainerControl

    from pdtcli.integrations.hf import PDTCallback

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = text_blocks(cfg.seq)
    probe = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(99))[: cfg.probe]]
    options: dict[str, Any] = {"history": cfg.history, "tau": cfg.tau}
    options.update({k: v for k, v in (("criteria", cfg.criteria), ("modes", cfg.modes), ("start", cfg.start),
                                      ("every", cfg.every), ("random", cfg.random or None)) if v is not None})
    pdt_seconds: list[float] = []
    meter = Meter(probe, held_out)

    class Measure(TrainerCallback):
        """The training loss every `--eval-every` steps; at each checkpoint (after pdt, `at_saves`)
        the training and held-out losses of the model training continues from."""

        def __init__(self, pdt: PDTCallback | None, at_saves: bool) -> None:
            self.pdt, self.at_saves = pdt, at_saves

        def on_step_end(self, args, state, control: TrainerControl, model=None, **kwargs):
            if state.global_step % cfg.eval_every == 0 and state.global_step % cfg.save_every != 0:
                meter.measure(state.global_step, model)

        def on_save(self, args, state, control: TrainerControl, model=None, **kwargs):
            if self.at_saves:
                last = self.pdt.pdt.last if self.pdt is not None and self.pdt.pdt is not None else None
                loaded = last is not None and last.status == "loaded"
                meter.measure(state.global_step, model, checkpoint=True,
                              ratio=last.mask["totals"]["ratio"] if loaded else None)

    if cfg.pdt in ("none", "callback"):
        pdt = PDTCallback(**options) if cfg.pdt == "callback" else None
        callbacks = ([pdt] if pdt else []) + [Measure(pdt, at_saves=True)]
        trainer_for(make_model(cfg.seed, cfg.seq, cfg.width, cfg.layers), out, cfg, callbacks, train).train()
        if pdt is not None and pdt.pdt is not None:
            pdt_seconds = pdt.pdt.seconds
    else:  # segments, with `pdt predict` as its own process between them
        resume: str | None = None
        for end in range(cfg.save_every, cfg.steps + 1, cfg.save_every):
            model = make_model(cfg.seed, cfg.seq, cfg.width, cfg.layers)
            trainer = trainer_for(model, out, cfg, [Stop(end), Measure(None, at_saves=False)], train)
            trainer.train(resume_from_checkpoint=resume)
            t0 = time.perf_counter()
            flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()]
            done = subprocess.run([sys.executable, "-m", "pdtcli", "predict", str(out), "--json",
                                   "--files", "checkpoint-*", *flags], capture_output=True, text=True)
            pdt_seconds.append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise SystemExit(f"pdt predict failed: {done.stdout or done.stderr}")
            result = json.loads(done.stdout)
            fused = result["status"] == "written"
            resume = result["output"] if fused else str(out / f"checkpoint-{end}")
            if fused:
                from safetensors.torch import load_file

                model.load_state_dict(load_file(Path(resume) / "model.safetensors"), strict=False)
            meter.measure(end, model, checkpoint=True, ratio=result["mask"]["totals"]["ratio"] if fused else None)
    rows = meter.rows
    total = time.perf_counter() - meter.started - meter.spent  # training and pdt, not the measurements
    interval = total / max(1, sum(r["val_loss"] is not None for r in rows))
    summary = {"config": vars(cfg), "rows": rows, "wall_s": total, "pdt_calls": len(pdt_seconds),
               "pdt_s_per_call": sum(pdt_seconds) / len(pdt_seconds) if pdt_seconds else 0.0,
               "interval_s": interval,
               "params": sum(p.numel() for p in make_model(cfg.seed, cfg.seq, cfg.width, cfg.layers).parameters())}
    summary["pdt_share_of_interval"] = summary["pdt_s_per_call"] / interval if pdt_seconds else 0.0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def Stop(step: int):
    """A callback that ends a segment at `step` (after its checkpoint is saved)."""
    from transformers import TrainerCallback

    class _Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= step:
                control.should_training_stop = True

    return _Stop()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--pdt", choices=("none", "callback", "cli"), default="none")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--history", type=int, default=5)
    p.add_argument("--tau", type=int, default=5)
    p.add_argument("--random", action="store_true", help="pdt's random mask at the same ratio (an audit)")
    p.add_argument("--criteria", default=None, help="pdt's mask criteria (all, none, or a comma list; default: "
                   "pdt's)")
    p.add_argument("--modes", default=None, help="pdt's DMD modes (default: pdt's own)")
    p.add_argument("--start", type=int, default=None, help="pdt's --start (T_0)")
    p.add_argument("--every", type=int, default=None, help="pdt's --every (T_i)")
    p.add_argument("--probe", type=int, default=256, help="training blocks whose loss is measured")
    p.add_argument("--eval-every", type=int, default=10, help="steps between two training-loss measurements")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    summary = run(parse(argv))
    best = min(summary["rows"], key=lambda r: r["train_loss"])
    last_val = [r["val_loss"] for r in summary["rows"] if r["val_loss"] is not None][-1]
    print(json.dumps({"params": summary["params"], "wall_s": round(summary["wall_s"], 1),
                      "best_train_loss": round(best["train_loss"], 4), "at_step": best["step"],
                      "final_val_loss": round(last_val, 4),
                      "pdt_s_per_call": round(summary["pdt_s_per_call"], 3),
                      "pdt_share_of_interval": round(summary["pdt_share_of_interval"], 4),
                      "ppl_final": round(math.exp(last_val), 2)}))


if __name__ == "__main__":
    main()
