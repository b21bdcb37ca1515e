"""A horizon policy in the loop (`PDTStep(horizon=)`, issue 24): tau set step by step, from the learning rate or
backing off when the loss rises or the gate rejects. Each step's tau is recorded in the store's history, the
configured --tau stays the kept one (no step looks like a user's change of settings), and the fused values are
bit for bit those of `pdt predict --tau <that step's tau>` on the same checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import training
from test_hostile import pdt
from test_in_loop import distance_to_plain

from pdtcli.integrations import PDTStep

TAU = 4
EPOCHS = 8


def loop(folder: Path, make_step: Callable[[torch.optim.Optimizer], PDTStep], *, lrs: list[float] | None = None,
         losses: list[float] | None = None) -> tuple[dict[int, dict], dict[int, str]]:
    """Real SGD training, a checkpoint per epoch and the step (made for the loop's optimizer) after each save;
    epoch e trains at `lrs[e-1]` and gives the step `losses[e-1]`. Returns the model's state after each step
    that loaded, and each status."""
    folder.mkdir(parents=True)
    x, y = training.data()
    net = training.model()
    optim = training.optimizer(net, "sgd")
    pdt_step = make_step(optim)
    fused, statuses = {}, {}
    for epoch in range(1, EPOCHS + 1):
        if lrs is not None:
            for group in optim.param_groups:
                group["lr"] = lrs[epoch - 1]
        training.train_epoch(net, optim, x, y, epoch)
        path = folder / f"epoch_{epoch}.pt"
        torch.save({"model": net.state_dict(), "optimizer": optim.state_dict(), "epoch": epoch}, path)
        result = pdt_step.step(net, path, loss=losses[epoch - 1] if losses is not None else None)
        statuses[epoch] = result.status
        assert not [w for w in result.warnings if "settings changed" in w], result.warnings
        if result.status == "loaded":
            fused[epoch] = {k: v.clone() for k, v in net.state_dict().items()}
    return fused, statuses


def report(folder: Path) -> dict:
    return json.loads(pdt("report", folder, "--json")[1])


def taus(folder: Path) -> dict[int, int]:
    """The tau of each step of training in the store's history, by the epoch of its newest checkpoint."""
    return {h["window_steps"][-1]: h["tau"] for h in report(folder)["history"] if h["command"] == "in-loop"}


def assert_same_as_the_command_line(live: Path, cli: Path, fused: dict[int, dict], used: dict[int, int]) -> None:
    """Each checkpoint arrives in another folder and `pdt predict --tau <the step's tau>` runs: it writes bit for
    bit the state the loop's model took."""
    cli.mkdir()
    for epoch in range(1, EPOCHS + 1):
        shutil.copy2(live / f"epoch_{epoch}.pt", cli / f"epoch_{epoch}.pt")
        code, output = pdt("predict", cli, "--json", "--history", "3", "--tau", used.get(epoch, TAU))
        assert code == 0, output
        assert (json.loads(output)["status"] == "written") == (epoch in fused)
        if epoch in fused:
            on_disk = torch.load(cli / f"epoch_{epoch}.pdt.pt", weights_only=True)["model"]
            for name, values in on_disk.items():
                assert torch.equal(values, fused[epoch][name]), (epoch, name)


def test_tau_follows_the_learning_rate(tmp_path):
    lrs = [0.05, 0.1, 0.1, 0.07, 0.045, 0.02, 0.005, 0.001]  # a warm-up, then a decay
    live = tmp_path / "live"
    fused, _ = loop(live, lambda optim: PDTStep(live, history=3, tau=TAU, horizon="lr", optimizer=optim), lrs=lrs)
    assert sorted(fused) == [3, 4, 5, 6, 7, 8]
    peak = [max(lrs[:e]) for e in range(1, EPOCHS + 1)]
    expected = {e: max(1, round(TAU * lrs[e - 1] / peak[e - 1])) for e in fused}
    assert expected == {3: 4, 4: 3, 5: 2, 6: 1, 7: 1, 8: 1}
    assert taus(live) == expected
    assert report(live)["settings"]["tau"] == TAU  # the configured tau is the kept one
    assert_same_as_the_command_line(live, tmp_path / "cli", fused, expected)


def test_tau_backs_off_when_the_loss_rises_and_comes_back_when_it_falls(tmp_path):
    losses = [1.0, 0.9, 0.8, 0.85, 0.9, 0.7, 0.6, 0.5]  # rises after the fused steps of epochs 3 and 4
    live = tmp_path / "live"
    fused, _ = loop(live, lambda optim: PDTStep(live, history=3, tau=TAU, horizon="backoff"), losses=losses)
    expected = {3: 4, 4: 2, 5: 1, 6: 2, 7: 4, 8: 4}
    assert taus(live) == expected
    assert report(live)["settings"]["tau"] == TAU
    assert_same_as_the_command_line(live, tmp_path / "cli", fused, expected)


def test_tau_halves_after_each_rejection_and_doubles_after_each_acceptance(tmp_path):
    live = tmp_path / "live"
    rejects = {4, 5, 6}
    distance = distance_to_plain(live)

    def verify(net) -> float:  # the gate turns down the fused state of the epochs in `rejects`
        newest = max(int(p.stem.split("_")[1]) for p in live.glob("epoch_*.pt"))
        return distance(net) if newest in rejects else -distance(net)

    _, statuses = loop(live, lambda optim: PDTStep(live, history=3, tau=TAU, horizon="backoff", verify=verify))
    assert [statuses[e] for e in range(3, EPOCHS + 1)] == ["loaded", "rejected", "rejected", "rejected", "loaded",
                                                           "loaded"]
    used = {h["window_steps"][-1]: h["tau"] for h in report(live)["history"]}  # the rejected steps' rows too
    assert used == {3: 4, 4: 4, 5: 2, 6: 1, 7: 1, 8: 2}


def test_a_policy_without_what_it_follows_is_refused(tmp_path):
    with pytest.raises(ValueError, match="optimizer="):
        PDTStep(tmp_path, horizon="lr")
    with pytest.raises(ValueError, match="horizon='sometimes'"):
        PDTStep(tmp_path, horizon="sometimes")
    with pytest.raises(ValueError, match="loss="):
        PDTStep(tmp_path, horizon="backoff").step(training.model(), tmp_path / "epoch_1.pt")


@pytest.mark.slow
def test_the_trainer_callback_gives_the_step_its_optimizer_for_the_lr_policy(tmp_path):
    from test_integrations import gpt, trainer_for
    from transformers import TrainerCallback

    from pdtcli.integrations.hf import PDTCallback

    lrs: dict[int, float] = {}

    class Rates(TrainerCallback):  # the rate at each save, as the step saw it (no optimizer step in between)
        def on_save(self, args, state, control, optimizer=None, **kwargs):
            lrs[state.global_step] = optimizer.param_groups[0]["lr"]

    live = tmp_path / "live"
    trainer_for(gpt(), live, 60, [PDTCallback(history=3, tau=TAU, horizon="lr"), Rates()]).train()
    peaks = {step: max(lr for s, lr in lrs.items() if s <= step) for step in lrs}
    expected = {step: max(1, round(TAU * lrs[step] / peaks[step])) for step in lrs if step >= 30}
    assert taus(live) == expected and len(set(expected.values())) > 1  # the cosine decay shortens it


@pytest.mark.slow
def test_the_lightning_callback_gives_the_step_its_optimizer_for_the_lr_policy(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pdtcli.integrations.lightning import PDTCallback

    x, y = training.data()
    Module = training.lightning_module(lambda params: torch.optim.SGD(params, lr=0.05))
    callback = PDTCallback(history=3, tau=TAU, horizon="lr")
    live = tmp_path / "live"
    trainer = L.Trainer(max_epochs=5, callbacks=[callback, ModelCheckpoint(dirpath=live, save_top_k=-1)],
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Module(), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64))
    assert callback.pdt.horizon.optimizer is trainer.optimizers[0]
    assert list(taus(live).values()) == [TAU, TAU]  # a constant rate: the configured tau at each fused step
