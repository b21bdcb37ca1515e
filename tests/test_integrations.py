"""The Hugging Face Trainer and Lightning callbacks on real training runs: the fused weights they load
into the model are bit for bit those `pdt predict` writes for the same checkpoints, training goes
on from them, and the ways a Trainer user resumes from a fused checkpoint work as documented."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import training
from safetensors.torch import load_file
from test_hostile import pdt

pytestmark = pytest.mark.slow

SEQ = 32


def text_dataset() -> list[dict[str, torch.Tensor]]:
    """Byte-level language modelling on real English text that ships with Python (a stdlib module)."""
    data = torch.tensor(list(inspect.getsource(inspect).encode()[:40_000]), dtype=torch.long)
    return [{"input_ids": chunk, "labels": chunk} for chunk in data.split(SEQ) if len(chunk) == SEQ]


def gpt(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2))


def trainer_for(model, output: Path, max_steps: int, callbacks=(), eval_dataset=None, **arguments):
    """A Trainer saving every 10 steps into `output`; `arguments`: more `TrainingArguments`."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(output), max_steps=max_steps, save_strategy="steps", save_steps=10,
                             per_device_train_batch_size=8, learning_rate=3e-3, weight_decay=0.01,
                             lr_scheduler_type="cosine", warmup_steps=5, report_to="none", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0, **arguments)
    return Trainer(model=model, args=args, train_dataset=text_dataset(), eval_dataset=eval_dataset,
                   callbacks=list(callbacks))


def replay(source: Path, folder: Path, names: list[str], *args: str) -> dict[str, Path]:
    """`pdt predict` after each checkpoint arrives, as from cron; the outputs it wrote, by checkpoint."""
    folder.mkdir()
    written = {}
    for name in names:
        copy = shutil.copytree if (source / name).is_dir() else shutil.copy2
        copy(source / name, folder / name)
        code, output = pdt("predict", folder, "--json", *args)
        assert code == 0, output
        payload = json.loads(output)
        if payload["status"] == "written":
            written[name] = Path(payload["output"])
    return written


def test_trainer_callback_matches_the_command_line_bit_for_bit(tmp_path):
    from transformers import TrainerCallback

    from pdtcli.integrations.hf import PDTCallback

    pdt_callback = PDTCallback(history=3)
    fused: dict[str, dict[str, torch.Tensor]] = {}

    class Record(TrainerCallback):  # runs after PDTCallback: the model as training goes on from it
        def on_save(self, args, state, control, model=None, **kwargs):
            if pdt_callback.pdt.last is not None and pdt_callback.pdt.last.status == "loaded":
                fused[f"checkpoint-{state.global_step}"] = {k: v.clone() for k, v in model.state_dict().items()}

    live = tmp_path / "live"
    result = trainer_for(gpt(), live, 50, [pdt_callback, Record()]).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    names = [f"checkpoint-{step}" for step in range(10, 51, 10)]
    written = replay(live, tmp_path / "cli", names, "--history", "3", "--files", "checkpoint-*")
    assert sorted(written) == sorted(fused) == names[2:]
    for name, path in written.items():
        on_disk = load_file(path / "model.safetensors")
        assert set(on_disk) < set(fused[name])  # the tied lm_head.weight is not saved
        for key, values in on_disk.items():
            assert torch.equal(values, fused[name][key]), (name, key)
        plain = load_file(live / name / "model.safetensors")
        assert any(not torch.equal(plain[k], on_disk[k]) for k in plain)
    report = json.loads(pdt("report", live, "--json")[1])
    cli = json.loads(pdt("report", tmp_path / "cli", "--json")[1])
    assert [h["totals"] for h in report["history"]] == [h["totals"] for h in cli["history"]]
    assert [h["window_steps"] for h in report["history"]] == [[10, 20, 30], [20, 30, 40], [30, 40, 50]]


def test_trainer_resumes_from_a_fused_checkpoint_the_documented_ways(tmp_path):
    """`resume_from_checkpoint=True` looks only for `checkpoint-<digits>`: it takes the plain
    checkpoint, never the fused one (in `run.pdt/`). The fused one is resumed from by its path, or
    written `--in-place`."""
    from transformers.trainer_utils import get_last_checkpoint

    run = tmp_path / "run"
    trainer_for(gpt(), run, 30).train()
    code, output = pdt("predict", run, "--json", "--history", "3", "--files", "checkpoint-*")
    assert code == 0, output
    fused_path = tmp_path / "run.pdt" / "checkpoint-30.pdt"
    assert json.loads(output)["output"] == str(fused_path)
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-30")  # the fused folder is not taken

    fused = load_file(fused_path / "model.safetensors")
    assert same(fused, started_from(run, 30, str(fused_path)))
    code, output = pdt("predict", run, "--in-place", "--json")  # the same step, over checkpoint-30 itself
    assert code == 0, output
    assert same(fused, started_from(run, 40, True))


def started_from(run: Path, max_steps: int, resume: str | bool) -> dict[str, torch.Tensor]:
    """The weights a resumed Trainer starts training from (those of the checkpoint it loaded)."""
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            start.update({k: v.clone() for k, v in model.state_dict().items()})

    start: dict[str, torch.Tensor] = {}
    trainer_for(gpt(seed=1), run, max_steps, [Capture()]).train(resume_from_checkpoint=resume)
    return start


def same(saved: dict[str, torch.Tensor], model: dict[str, torch.Tensor]) -> bool:
    """The model holds the saved weights (on the saved keys: the tied lm_head.weight is not saved)."""
    return all(torch.equal(model[k], v) for k, v in saved.items())


def test_lightning_callback_matches_the_command_line_bit_for_bit(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pdtcli.integrations.lightning import PDTCallback

    x, y = training.data()

    Module = training.lightning_module(lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01))

    pdt_callback = PDTCallback(history=3)
    fused: dict[int, dict[str, torch.Tensor]] = {}
    recorded: set[int] = set()

    class Record(L.Callback):  # runs after PDTCallback
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            last = pdt_callback.pdt.last if pdt_callback.pdt else None
            if last is not None and last.status == "loaded" and id(last) not in recorded:
                recorded.add(id(last))
                fused[trainer.global_step] = {k: v.clone() for k, v in module.state_dict().items()}

    live = tmp_path / "live"
    checkpoints = ModelCheckpoint(dirpath=live, filename="{epoch}-{step}", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=6, callbacks=[pdt_callback, Record(), checkpoints], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", deterministic=True)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    trainer.fit(Module(), loader)
    steps = len(loader)
    names = [f"epoch={e}-step={(e + 1) * steps}.ckpt" for e in range(6)]
    written = replay(live, tmp_path / "cli", names, "--history", "3")
    # the last checkpoint is saved when training ends: no batch follows, so nothing to fuse into
    assert sorted(written) == names[2:] and sorted(fused) == [(e + 1) * steps for e in range(2, 5)]
    for e in range(2, 5):
        on_disk = torch.load(written[names[e]], weights_only=True)["state_dict"]
        for key, values in on_disk.items():
            assert torch.equal(values, fused[(e + 1) * steps][key]), (e, key)
    report = json.loads(pdt("report", live, "--json")[1])
    assert [h["command"] for h in report["history"]] == ["in-loop"] * 3
