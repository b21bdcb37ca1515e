"""Training order: by the number in the name, by the step recorded inside, or by mtime.

Real checkpoints from a training run are renamed or re-timed so that each rule gives a
different order from the others; the order pdt ingests them in is the one asked for.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from pdtcli.cli import app


def snapshot(folder, *args: str) -> tuple[int, dict | str]:
    result = CliRunner().invoke(app, ["snapshot", str(folder), "--json", *args])
    return result.exit_code, json.loads(result.output) if result.exit_code == 0 else result.output


def names(payload: dict) -> list[str]:
    return [os.path.basename(p) for p in payload["ingested"]]


def test_names_without_numbers_fall_back_to_the_recorded_step(sgd_run):
    # epoch_1..8 become unnumbered names whose alphabetical and mtime orders are both wrong
    words = ["hotel", "golf", "foxtrot", "echo", "delta", "charlie", "bravo", "alpha"]
    for epoch, word in enumerate(words, start=1):
        path = sgd_run / f"{word}.pt"
        os.rename(sgd_run / f"epoch_{epoch}.pt", path)
        os.utime(path, (1e9 - epoch, 1e9 - epoch))
    code, payload = snapshot(sgd_run)
    assert code == 0
    assert names(payload) == [f"{w}.pt" for w in words[3:]]  # epochs 4..8, oldest first


def test_mtime_order_overrides_the_names(sgd_run):
    for epoch in range(1, 9):  # names say 1..8, modification times say 8..1
        os.utime(sgd_run / f"epoch_{epoch}.pt", (1e9 - epoch, 1e9 - epoch))
    code, payload = snapshot(sgd_run, "--order", "mtime")
    assert code == 0
    assert names(payload) == [f"epoch_{e}.pt" for e in (5, 4, 3, 2, 1)]
    code, output = snapshot(sgd_run, "--order", "name")
    assert code == 2 and "orders checkpoints by mtime" in output


def test_step_order_needs_a_step_in_every_checkpoint(sgd_run):
    state = torch.load(sgd_run / "epoch_3.pt", weights_only=True)
    del state["epoch"]
    torch.save(state, sgd_run / "epoch_3.pt")
    before = (sgd_run / "epoch_3.pt").read_bytes()
    code, output = snapshot(sgd_run, "--order", "step")
    assert code == 3
    line, error = output.strip().splitlines()  # one line for people, one JSON object for --json
    assert "epoch_3.pt" in line and "records no step" in line
    assert json.loads(error)["exit_code"] == 3 and json.loads(error)["path"].endswith("epoch_3.pt")
    assert (sgd_run / "epoch_3.pt").read_bytes() == before and not (sgd_run / ".pdt" / "store.h5").exists()


def _lightning_run(folder, epochs: int = 6):
    """A real Lightning run whose ModelCheckpoint names files by epoch and validation loss, as Lightning's
    and Keras's docs show (`{epoch}-{val_loss:.4f}`): every name holds two numbers."""
    import lightning as L
    import training
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = training.data()
    Base = training.lightning_module(lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))

    class Module(Base):
        def validation_step(self, batch, _):
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    checkpoints = ModelCheckpoint(dirpath=folder, filename="{epoch}-{val_loss:.4f}", save_top_k=-1)
    L.Trainer(max_epochs=epochs, callbacks=[checkpoints], logger=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu", deterministic=True).fit(Module(), loader(), loader())
    return sorted(folder.glob("*.ckpt"), key=lambda p: torch.load(p, weights_only=True)["global_step"])


@pytest.mark.slow
def test_checkpoints_named_by_epoch_and_loss_are_ordered_by_the_step_inside(tmp_path):
    run = tmp_path / "run"
    saved = _lightning_run(run)
    assert len(saved) == 6
    result = CliRunner().invoke(app, ["predict", str(run), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    newest = saved[-1]
    assert payload["output"] == str(newest.with_name(newest.name.removesuffix(".ckpt") + ".pdt.ckpt"))
    report = json.loads(CliRunner().invoke(app, ["report", str(run), "--json"]).output)
    steps = [torch.load(p, weights_only=True)["global_step"] for p in saved[1:]]
    assert [w["step"] for w in report["fit_window"]] == steps  # the step of every window checkpoint


def _strip_steps(folder, rename) -> None:
    """The run's checkpoints renamed by `rename(epoch)`, with nothing inside that records a step."""
    for epoch in range(1, 9):
        state = torch.load(folder / f"epoch_{epoch}.pt", weights_only=True)
        del state["epoch"]
        (folder / f"epoch_{epoch}.pt").unlink()
        torch.save(state, folder / rename(epoch))


@pytest.mark.parametrize("rename,problem", [
    (lambda e: f"epoch{e}-loss{9 - e}.pt", "holds several numbers"),
    (lambda e: f"run{(e + 1) // 2}-{'ab'[e % 2]}.pt", "the same number"),
])
def test_names_that_do_not_settle_the_order_are_an_error_naming_order(sgd_run, rename, problem):
    _strip_steps(sgd_run, rename)
    code, output = snapshot(sgd_run)
    assert code == 2, output
    line = output.strip().splitlines()[0]
    assert problem in line and "--order" in line, line
    assert not (sgd_run / ".pdt" / "store.h5").exists()
    code, payload = snapshot(sgd_run, "--order", "mtime")  # the way out it names
    assert code == 0, payload


def test_names_and_recorded_steps_that_disagree_are_an_error(sgd_run):
    for epoch in range(1, 9):  # names count down while the epochs recorded inside count up
        os.rename(sgd_run / f"epoch_{epoch}.pt", sgd_run / f"tmp_{epoch}.pt")
    for epoch in range(1, 9):
        os.rename(sgd_run / f"tmp_{epoch}.pt", sgd_run / f"ckpt_{9 - epoch}.pt")
    code, output = snapshot(sgd_run)
    assert code == 2, output
    line = output.strip().splitlines()[0]
    assert "disagree" in line and "--order step" in line and "--order name" in line, line
    code, payload = snapshot(sgd_run, "--order", "step")
    assert code == 0 and names(payload) == [f"ckpt_{9 - e}.pt" for e in range(4, 9)], payload
