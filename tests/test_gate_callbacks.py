"""The loss gate of the HF and Lightning callbacks on the evaluation data the user already gives the trainer
(`verify="eval"`, `verify="val"`): on real runs each fused state is kept exactly when its loss on that data, as
computed here, is not above the plain state's; a rejected one leaves the model bit for bit the checkpoint saved."""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
import training
from safetensors.torch import load_file
from test_hostile import pdt
from test_integrations import gpt, text_dataset, trainer_for
from torch import nn

from pdtcli.integrations import PDTStepWarning

pytestmark = pytest.mark.slow


def eval_loss(model: nn.Module, batches, loss_of) -> float:
    """The mean loss over `batches` in eval mode, computed here (not by pdt) to check the gate's choices."""
    was = model.training
    model.eval()
    with torch.no_grad():
        losses = [float(loss_of(model, batch)) for batch in batches]
    model.train(was)
    return sum(losses) / len(losses)


def check_choice(status: str, message: str, model: nn.Module, plain: dict[str, torch.Tensor], loss) -> str:
    """That the gate chose as the losses computed here say: rejected, the model holds the saved weights and
    the loss pdt reports for them is ours; loaded, the model moved and its loss is not above the saved one's."""
    state = model.state_dict()
    if status == "rejected":
        assert all(torch.equal(state[k], v) for k, v in plain.items())
        fused_loss, plain_loss = (float(v) for v in re.search(r"loss (\S+) fused against (\S+) plain", message)
                                  .groups())
        assert f"{loss(model):.6g}" == f"{plain_loss:.6g}" and fused_loss > plain_loss
    else:
        assert status == "loaded", status
        assert any(not torch.equal(state[k], v) for k, v in plain.items())
        saved = copy.deepcopy(model)
        saved.load_state_dict(plain, strict=False)
        assert loss(model) <= loss(saved)
    return status


def hf_run(tmp_path, name: str, eval_dataset) -> tuple[list[str], list]:
    """A Trainer that evaluates on `eval_dataset` before each save, gated by PDTCallback(verify="eval"); what
    the gate did at each save and the warnings."""
    from transformers import TrainerCallback

    from pdtcli.integrations.hf import PDTCallback

    gate = PDTCallback(history=3, verify="eval")
    choices: list[str] = []

    class Check(TrainerCallback):  # runs after PDTCallback: the model as training goes on from it
        def on_save(self, args, state, control, model=None, eval_dataloader=None, **kwargs):
            last = gate.pdt.last
            if last is not None and last.status in ("loaded", "rejected") and eval_dataloader is not None:
                plain = load_file(tmp_path / name / f"checkpoint-{state.global_step}" / "model.safetensors")
                choices.append(check_choice(last.status, last.message, model, plain, lambda m: eval_loss(
                    m, eval_dataloader, lambda net, batch: net(**batch).loss)))

    arguments = {"eval_strategy": "steps", "eval_steps": 10, "per_device_eval_batch_size": 8} if eval_dataset else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(gpt(), tmp_path / name, 60, [gate, Check()], eval_dataset=eval_dataset, **arguments).train()
    return choices, [w for w in caught if issubclass(w.category, PDTStepWarning)]


def test_trainer_gate_on_the_eval_dataset(tmp_path):
    """On the training text itself the predicted states are kept; on text whose labels are random bytes (a
    model that learns English grows surer of the wrong bytes) they are turned down; both as the losses say."""
    text = text_dataset()
    gen = torch.Generator().manual_seed(0)
    noise = [{"input_ids": b["input_ids"], "labels": torch.randint(0, 256, (len(b["labels"]),), generator=gen)}
             for b in text[:16]]
    same, _ = hf_run(tmp_path, "same", text[:16])
    random, _ = hf_run(tmp_path, "random", noise)
    assert len(same) == len(random) == 4
    assert "loaded" in same and "rejected" in random
    history = json.loads(pdt("report", tmp_path / "random", "--json")[1])["history"]
    assert [h["command"] for h in history].count("in-loop rejected") == random.count("rejected")


def test_trainer_gate_without_eval_data_warns_once_and_steps_ungated(tmp_path):
    choices, caught = hf_run(tmp_path, "none", None)
    assert [str(w.message) for w in caught] == [
        "pdt: verify='eval' needs the Trainer's eval dataloader, which it makes at its first evaluation: give it an "
        "eval_dataset and an eval_strategy (evaluating before it saves), or pass verify=callable; the step is "
        "taken ungated until then"]
    history = json.loads(pdt("report", tmp_path / "none", "--json")[1])["history"]
    assert [h["command"] for h in history] == ["in-loop"] * 4


def lightning_run(tmp_path, name: str, val: tuple[torch.Tensor, torch.Tensor] | None, returns_loss: bool = True):
    """Lightning with validation on `val` each epoch, gated by PDTCallback(verify="val"): what the gate did at
    each step it took, the warnings, and the values of "val_loss" the trainer's metrics held during training that
    no validation logged (what a monitoring ModelCheckpoint or EarlyStopping would have read)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pdtcli.integrations.lightning import PDTCallback

    Base = training.lightning_module(lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01))

    class Module(Base):
        def validation_step(self, batch, _):
            loss = nn.functional.cross_entropy(self.net(batch[0]), batch[1])
            self.log("val_loss", loss)
            return {"loss": loss} if returns_loss else None

    gate = PDTCallback(history=3, verify="val")
    choices: list[str] = []
    folder = tmp_path / name

    class Check(L.Callback):  # runs after PDTCallback
        def __init__(self) -> None:
            self.seen: set[int] = set()

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            last = gate.pdt.last if gate.pdt else None
            if last is None or id(last) in self.seen or last.status not in ("loaded", "rejected"):
                return
            self.seen.add(id(last))
            saved = next(folder.glob(f"*-step={trainer.global_step}.ckpt"))
            plain = torch.load(saved, weights_only=True)["state_dict"]
            choices.append(check_choice(last.status, last.message, module, plain, lambda m: eval_loss(
                m.net, [val], lambda net, batch: nn.functional.cross_entropy(net(batch[0]), batch[1]))))

    class Watch(L.Callback):
        def __init__(self) -> None:
            self.validated: set[float] = set()
            self.read: set[float] = set()

        def on_validation_epoch_end(self, trainer, module):
            self.validated.add(float(trainer.callback_metrics["val_loss"]))

        def on_train_batch_end(self, trainer, module, *args):
            if "val_loss" in trainer.callback_metrics:
                self.read.add(float(trainer.callback_metrics["val_loss"]))

    watch = Watch()
    x, y = training.data()
    checkpoints = ModelCheckpoint(dirpath=folder, filename="{epoch}-{step}", save_top_k=-1, every_n_epochs=1)
    trainer = L.Trainer(max_epochs=7, callbacks=[gate, Check(), checkpoints, watch], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", deterministic=True,
                        num_sanity_val_steps=0)
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    valid = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*val), batch_size=len(val[0])) if val else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Module(), train, valid)
    return choices, [w for w in caught if issubclass(w.category, PDTStepWarning)], watch.read - watch.validated


def test_lightning_gate_on_the_validation_data(tmp_path):
    """Validated on its own training data the predicted states are kept; on data labelled by another teacher
    they are turned down; both as the losses say. validation_step's `self.log` is muted in the gate: the metrics
    during training hold only what the epochs' validations logged."""
    x, y = training.data()
    same, caught, leaked = lightning_run(tmp_path, "same", (x, y))
    assert not caught and not leaked
    elsewhere, caught, leaked = lightning_run(tmp_path, "other", training.data(seed=1))
    assert not caught and not leaked
    assert len(same) == len(elsewhere) == 4
    assert "loaded" in same and "rejected" in elsewhere


def test_lightning_gate_without_a_loss_warns_once_and_steps_ungated(tmp_path):
    x, y = training.data()
    choices, caught, _ = lightning_run(tmp_path, "none", (x, y), returns_loss=False)
    assert [str(w.message) for w in caught] == [
        "pdt: verify='val': validation_step returns no loss (return it, as a tensor or a dict's 'loss' or "
        "'val_loss'), or pass verify=callable; the step is taken ungated"]
    assert choices and set(choices) == {"loaded"}
