"""torch.save checkpoints whose pickle needs code, or whose names share a storage (issue 22 §1, §2).

pdt reads the archive's pickle without executing anything and writes the fused file as a copy of
the archive with only the predicted storages' bytes replaced: objects of any class (a loss module
in Lightning's hyper_parameters, an argparse.Namespace, a config dataclass) are carried byte for
byte, and tied weights (nanoGPT's wte/lm_head) stay one storage, predicted once.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import zipfile
from pathlib import Path

import pytest
import torch
import training
from test_hostile import one_error_line, pdt
from torch import nn

# ---- helpers ------------------------------------------------------------------------------------


def members(path: Path) -> dict[str, bytes]:
    """The archive's members by name below its folder (torch names the folder after the file)."""
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None  # every CRC-32 matches
        return {name.partition("/")[2]: archive.read(name) for name in archive.namelist()}


def only_predicted_changed(before: Path, after: Path, predicted: int) -> None:
    """Every member of `after` is the one of `before` byte for byte (the pickle too), but at most
    `predicted` storages (`data/<key>`) of the predicted tensors."""
    old, new = members(before), members(after)
    assert old.keys() == new.keys()
    changed = {name for name in old if old[name] != new[name]}
    assert changed and all(name.startswith("data/") for name in changed) and len(changed) <= predicted, changed


def report(folder: Path) -> dict:
    code, output = pdt("report", folder, "--json")
    assert code == 0, output
    return json.loads(output)


# ---- §2: objects that need code are carried, never executed ---------------------------------------


@dataclasses.dataclass
class Config:
    """A training script's config object, saved beside the weights."""

    lr: float = 0.05
    layers: tuple[int, ...] = (32,)
    name: str = "mlp"


def test_a_plain_loop_saving_a_namespace_and_a_config_object_is_predicted_and_resumes(tmp_path):
    args, config = argparse.Namespace(lr=0.05, epochs=6, out=str(tmp_path)), Config()
    x, y = training.data()
    net = training.model()
    optim = training.optimizer(net, "sgd")
    for epoch in range(1, 7):
        training.train_epoch(net, optim, x, y, epoch)
        torch.save({"model": net.state_dict(), "optimizer": optim.state_dict(), "epoch": epoch, "args": args,
                    "config": config}, tmp_path / f"epoch_{epoch}.pt")
    code, output = pdt("predict", tmp_path, "--json")
    assert code == 0, output  # was exit 3, "refused: loading it would run code"
    fused_path, newest_path = tmp_path / "epoch_6.pdt.pt", tmp_path / "epoch_6.pt"
    only_predicted_changed(newest_path, fused_path, 6)  # 0, 1 (BatchNorm's affine pair) and 3: weight and bias
    fused = torch.load(fused_path, weights_only=False)  # the test's own classes: the test trusts this file
    assert fused["args"] == args and fused["config"] == config and fused["epoch"] == 6
    newest = torch.load(newest_path, weights_only=False)
    assert not torch.equal(fused["model"]["0.weight"], newest["model"]["0.weight"])
    assert torch.equal(fused["optimizer"]["state"][0]["momentum_buffer"],
                       newest["optimizer"]["state"][0]["momentum_buffer"])
    resumed = training.model()  # training goes on from the fused file
    resumed.load_state_dict(fused["model"])
    optim = training.optimizer(resumed, "sgd")
    optim.load_state_dict(fused["optimizer"])
    training.train_epoch(resumed, optim, x, y, 7)
    assert all(torch.isfinite(p).all() for p in resumed.parameters())
    carried = report(tmp_path)["carried_objects"]
    assert {"where": "['args']", "type": "argparse.Namespace"} in carried
    assert {"where": "['config']", "type": f"{__name__}.Config"} in carried


def lightning_regressor():
    import lightning as L

    class LossModule(L.LightningModule):
        """The pattern of Lightning's docs: a module argument saved by save_hyperparameters()."""

        def __init__(self, loss_fn: nn.Module = nn.MSELoss(), lr: float = 0.05) -> None:  # noqa: B008
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(training.INPUTS, 16), nn.ReLU(), nn.Linear(16, 1))
            self.loss_fn = loss_fn

        def training_step(self, batch, _):
            return self.loss_fn(self.net(batch[0]).squeeze(1), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    LossModule.__qualname__ = LossModule.__name__ = "LossModule"
    globals()["LossModule"] = LossModule  # a module-level name, so that Lightning's pickle of it resolves
    return LossModule


@pytest.mark.slow
def test_lightning_hyperparameters_holding_a_loss_module_are_carried_and_the_fused_file_resumes(tmp_path):

    Module = lightning_regressor()
    x, _ = training.data()
    target = x @ torch.linspace(-1, 1, training.INPUTS)

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, target), batch_size=64)

    training.lightning_trainer(tmp_path, 6).fit(Module(), loader())
    code, output = pdt("predict", tmp_path, "--json")
    assert code == 0, output  # was exit 3, "refused: loading it would run code"
    fused_path, newest_path = tmp_path / "epoch=5.pdt.ckpt", tmp_path / "epoch=5.ckpt"
    only_predicted_changed(newest_path, fused_path, 4)  # net.0 and net.2: weight and bias
    fused, newest = (torch.load(p, weights_only=False) for p in (fused_path, newest_path))
    assert type(fused["hyper_parameters"]["loss_fn"]) is nn.MSELoss
    assert fused["hyper_parameters"]["lr"] == newest["hyper_parameters"]["lr"] == 0.05
    assert fused["hyper_parameters"].keys() == newest["hyper_parameters"].keys()
    assert torch.equal(fused["optimizer_states"][0]["state"][0]["momentum_buffer"],
                       newest["optimizer_states"][0]["state"][0]["momentum_buffer"])
    assert not torch.equal(fused["state_dict"]["net.0.weight"], newest["state_dict"]["net.0.weight"])
    resumed = training.lightning_trainer(tmp_path, 7)
    model = Module.load_from_checkpoint(fused_path, weights_only=False)  # Lightning's own load, hyper_parameters too
    assert type(model.loss_fn) is nn.MSELoss
    resumed.fit(Module(), loader(), ckpt_path=fused_path, weights_only=False)  # it holds a module, as the input
    assert resumed.current_epoch == 7 and resumed.global_step == newest["global_step"] + len(loader())
    carried = {item["where"]: item["type"] for item in report(tmp_path)["carried_objects"]}
    assert carried["['hyper_parameters']['loss_fn']"] == "torch.nn.modules.loss.MSELoss"


# ---- a pickle that would run code, whatever pdt does with it --------------------------------------


class Exec:
    """REDUCE to a builtin that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


class SetsState:
    """BUILD: unpickling calls the class's own __setstate__ with the saved state."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


class Touch:
    """A callable instance: unpickling one and REDUCE-ing with it calls its __call__."""

    def __call__(self, marker: str) -> None:
        Path(marker).touch()


class CallsAnInstance:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Touch(), (self.marker,))


@pytest.mark.parametrize("payload", [Exec, SetsState, CallsAnInstance])
def test_a_payload_called_by_reduce_build_or_setstate_never_runs(sgd_run, tmp_path, payload):
    marker = tmp_path / "payload-ran"
    evil = torch.load(sgd_run / "epoch_8.pt", weights_only=True)
    evil["extra"] = {"payload": payload(marker)}
    torch.save(evil, sgd_run / "epoch_8.pt")
    code, output = pdt("predict", sgd_run)
    assert code == 0, output  # carried as an inert placeholder, never refused
    assert not marker.exists()
    assert members(sgd_run / "epoch_8.pdt.pt")["data.pkl"] == members(sgd_run / "epoch_8.pt")["data.pkl"]
    code, output = pdt("report", sgd_run)
    assert code == 0 and not marker.exists()


def test_a_zip_that_torch_save_did_not_write_is_refused_with_its_reason(sgd_run):
    with zipfile.ZipFile(sgd_run / "epoch_9.pt", "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    code, output = pdt("predict", sgd_run)
    assert code == 3 and "epoch_9.pt" in one_error_line(output) and "torch.save" in one_error_line(output), output


# ---- §1: storage shared between names stays shared ------------------------------------------------

VOCAB, DIM, SEQ = 64, 16, 8


class TinyGPT(nn.Module):
    """nanoGPT's layout at toy size: token and position embeddings, one block, and an output head tied
    to the token embedding (`wte.weight = lm_head.weight`, as nanoGPT writes it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(VOCAB, DIM), wpe=nn.Embedding(SEQ, DIM),
                                              h=nn.Linear(DIM, DIM), ln_f=nn.LayerNorm(DIM)))
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        h = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        return self.lm_head(t.ln_f(h + torch.relu(t.h(h))))


def text_batches() -> torch.Tensor:
    """Byte-level text (a stdlib module's source) folded into the vocabulary, in windows of SEQ + 1."""
    data = torch.tensor(list(inspect.getsource(inspect).encode()[:20_000]), dtype=torch.long) % VOCAB
    return data[: len(data) // (SEQ + 1) * (SEQ + 1)].view(-1, SEQ + 1)


def test_nanogpt_tied_weights_stay_one_storage_through_in_place_steps(tmp_path):
    """torch.compile's wrapper gives the `_orig_mod.` keys nanoGPT saves; the model is trained through
    the plain module (the same parameters: compiling a forward on this CPU would only cost time)."""
    run = tmp_path / "out"
    run.mkdir()
    ckpt = run / "ckpt.pt"
    batches = text_batches()
    model = TinyGPT()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    statuses = []
    for iteration in range(7):
        for i in range(iteration * 8, iteration * 8 + 8):
            batch = batches[i::50][:16]
            optim.zero_grad()
            nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).backward()
            optim.step()
        torch.save({"model": compiled.state_dict(), "optimizer": optim.state_dict(), "iter_num": iteration,
                    "model_args": {"vocab_size": VOCAB, "n_embd": DIM}}, ckpt)
        saved = ckpt.stat().st_size
        code, output = pdt("predict", run, "--in-place", "--json")
        assert code == 0, output
        statuses.append(json.loads(output)["status"])
        if statuses[-1] != "written":
            continue
        state = torch.load(ckpt, weights_only=True)
        wte, head = state["model"]["_orig_mod.transformer.wte.weight"], state["model"]["_orig_mod.lm_head.weight"]
        assert wte.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()
        assert ckpt.stat().st_size < saved + wte.nbytes  # the embedding is in the file once
        tied = TinyGPT()
        tied.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()}, assign=True)
        assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
        # training resumes from the fused file, as nanoGPT's init_from='resume' does
        model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state["model"].items()})
        optim.load_state_dict(state["optimizer"])
        assert model.lm_head.weight is model.transformer.wte.weight
    assert "written" in statuses
    shown = report(run)
    assert shown["predicted_elements"] == sum(p.numel() for p in model.parameters())  # the tied matrix once
    assert {"name": "_orig_mod.lm_head.weight", "shape": [VOCAB, DIM], "dtype": "float32",
            "reason": "tied to '_orig_mod.transformer.wte.weight' (one storage): predicted once, as "
                      "'_orig_mod.transformer.wte.weight'"} in shown["skipped_tensors"]
