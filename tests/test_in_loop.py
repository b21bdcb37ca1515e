"""PDT inside a plain PyTorch training loop: the same store and bit for bit the same fused weights
as `pdt predict` run on the checkpoints between epochs, the schedule honoured, and failures that
leave the model as it was while training goes on."""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import filelock
import pytest
import torch
import training
from test_hostile import pdt
from torch import nn

from pdtcli.integrations import PDTStep, PDTStepWarning
from pdtcli.store import Store

OPTIONS = {"history": 3}


def loop(folder: Path, epochs: int, pdt_step: PDTStep | None, on_epoch=None) -> dict[int, dict]:
    """Real SGD training that saves a checkpoint per epoch and calls the helper after each save;
    returns the model's state right after each step that loaded fused values."""
    folder.mkdir(parents=True, exist_ok=True)
    x, y = training.data()
    net = training.model()
    optim = training.optimizer(net, "sgd")
    fused = {}
    for epoch in range(1, epochs + 1):
        training.train_epoch(net, optim, x, y, epoch)
        path = folder / f"epoch_{epoch}.pt"
        torch.save({"model": net.state_dict(), "optimizer": optim.state_dict(), "epoch": epoch}, path)
        if on_epoch is not None:
            on_epoch(epoch, net)
        if pdt_step is not None:
            result = pdt_step.step(net, path)
            if result is not None and result.status == "loaded":
                fused[epoch] = {k: v.clone() for k, v in net.state_dict().items()}
    return fused


def replay(source: Path, folder: Path, epochs: int, *args: str) -> dict[int, Path]:
    """The command line's way: each checkpoint arrives and `pdt predict` runs, as from cron."""
    folder.mkdir()
    written = {}
    for epoch in range(1, epochs + 1):
        shutil.copy2(source / f"epoch_{epoch}.pt", folder / f"epoch_{epoch}.pt")
        code, output = pdt("predict", folder, "--json", *args)
        assert code == 0, output
        if json.loads(output)["status"] == "written":
            written[epoch] = folder / f"epoch_{epoch}.pdt.pt"
    return written


def history(folder: Path) -> list[tuple]:
    report = json.loads(pdt("report", folder, "--json")[1])
    return [(h["window_steps"], h["mask"], h["totals"], h["per_tensor_accepted"]) for h in report["history"]]


def test_in_loop_fused_weights_are_bit_identical_to_the_command_line(tmp_path):
    fused = loop(tmp_path / "live", 7, PDTStep(tmp_path / "live", **OPTIONS))
    written = replay(tmp_path / "live", tmp_path / "cli", 7, "--history", "3")
    assert sorted(fused) == sorted(written) == [3, 4, 5, 6, 7]
    for epoch, path in written.items():
        on_disk = torch.load(path, weights_only=True)["model"]
        assert on_disk.keys() == fused[epoch].keys()
        for name, values in on_disk.items():
            assert torch.equal(values, fused[epoch][name]), (epoch, name)
    # the fused state moved the weights (the mask accepted something), and training went on from it
    plain = torch.load(tmp_path / "live" / "epoch_7.pt", weights_only=True)["model"]
    assert any(not torch.equal(plain[k], fused[7][k]) for k in plain)
    # the same store: windows (with the fused states as lineage), masks and counts
    assert history(tmp_path / "live") == history(tmp_path / "cli")
    report = json.loads(pdt("report", tmp_path / "live", "--json")[1])
    assert [h["command"] for h in report["history"]] == ["in-loop"] * 5
    assert report["window"][-1]["kind"] == "fused" and report["window"][-1]["name"] == "epoch_7.pt"
    # a `pdt predict` after the loop finds nothing to do: training already resumed from that state
    code, output = pdt("predict", tmp_path / "live", "--json")
    assert code == 0 and json.loads(output)["status"] == "up-to-date"
    # and `pdt apply` writes that state to a file, to resume a crashed run from
    code, output = pdt("apply", tmp_path / "live", "--json")
    assert code == 0, output
    on_disk = torch.load(tmp_path / "live" / "epoch_7.pdt.pt", weights_only=True)["model"]
    assert all(torch.equal(v, fused[7][k]) for k, v in on_disk.items())


def test_in_loop_honours_start_and_every(tmp_path):
    steps = PDTStep(tmp_path / "live", start=4, every=1, **OPTIONS)
    statuses = {}
    loop(tmp_path / "live", 8, None, on_epoch=lambda epoch, net: statuses.update(
        {epoch: steps.step(net, tmp_path / "live" / f"epoch_{epoch}.pt").status}))
    assert statuses == {1: "waiting", 2: "waiting", 3: "not-due", 4: "loaded", 5: "not-due", 6: "loaded",
                        7: "not-due", 8: "loaded"}
    code, text = pdt("report", tmp_path / "live")
    assert "after every 1 plain checkpoint(s)" in " ".join(text.split()), text


def _unchanged_after(net: nn.Module, step) -> None:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.warns(PDTStepWarning, match="the model is unchanged") as caught:
        assert step() is None
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) or (before[k].isnan() == after[k].isnan()).all() for k in before)
    return str(caught[0].message)


def test_a_full_disk_leaves_the_model_and_the_store_as_they_were_and_training_goes_on(tmp_path, monkeypatch):
    folder = tmp_path / "live"
    steps = PDTStep(folder, **OPTIONS)
    full = {"on": False}
    commit = Store.commit

    def commit_or_fail(self):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        commit(self)

    monkeypatch.setattr(Store, "commit", commit_or_fail)
    seen = []

    def each(epoch, net):
        path = folder / f"epoch_{epoch}.pt"
        if epoch == 4:
            full["on"] = True
            seen.append(_unchanged_after(net, lambda: steps.step(net, path)))
            full["on"] = False
        else:
            seen.append(steps.step(net, path).status)

    loop(folder, 6, None, on_epoch=each)
    assert seen[:3] == ["waiting", "waiting", "loaded"]
    assert "No space left on device" in seen[3]
    assert seen[4:] == ["loaded", "loaded"]  # the next epochs fuse again: the store stayed valid
    report = json.loads(pdt("report", folder, "--json")[1])
    assert [h["window_steps"][-1] for h in report["history"]] == [3, 5, 6]


def test_nan_weights_or_a_locked_store_leave_the_model_unchanged(tmp_path):
    folder = tmp_path / "live"
    steps = PDTStep(folder, **OPTIONS)
    messages = []

    def each(epoch, net):
        path = folder / f"epoch_{epoch}.pt"
        if epoch == 4:
            with filelock.FileLock(str(folder / ".pdt" / "lock")):  # a `pdt` from cron holds the store
                messages.append(_unchanged_after(net, lambda: steps.step(net, path)))
        elif epoch == 5:
            with torch.no_grad():
                net[0].weight[0, 0] = float("nan")
            messages.append(_unchanged_after(net, lambda: steps.step(net, path)))
        else:
            steps.step(net, path)

    loop(folder, 5, None, on_epoch=each)
    assert "locked" in messages[0] or "lock" in messages[0]
    assert "holds NaN or Inf" in messages[1]
    assert Store.open(folder / ".pdt").history  # the store still opens, with the steps before


def test_the_saved_checkpoint_is_read_only_for_its_header(tmp_path, monkeypatch):
    """The values come from memory: neither hashed nor read from the file just saved."""
    from safetensors.torch import save_file

    import pdtcli.identity
    from pdtcli.formats.safetensors_file import SafetensorsReader

    reads: list[str] = []
    hashed: list[str] = []
    real_read, real_hash = SafetensorsReader.read, pdtcli.identity.sha256_path
    monkeypatch.setattr(SafetensorsReader, "read", lambda self, name: reads.append(self.path.name)
                        or real_read(self, name))
    monkeypatch.setattr(pdtcli.identity, "sha256_path", lambda path: hashed.append(path.name) or real_hash(path))
    folder = tmp_path / "live"
    folder.mkdir()
    steps = PDTStep(folder, **OPTIONS)
    statuses = []

    def each(epoch, net):
        path = folder / f"epoch_{epoch}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        statuses.append(steps.step(net, path).status)

    loop(tmp_path / "elsewhere", 4, None, on_epoch=each)
    assert statuses == ["waiting", "waiting", "loaded", "loaded"]
    assert reads == [] and hashed == []


def test_values_in_memory_are_never_fused_into_a_model_they_did_not_come_from(tmp_path):
    """Named as an older checkpoint than the newest, or as one that is no checkpoint of the folder,
    the live values are not taken in, and no fused values computed from files replace them."""
    folder = tmp_path / "live"
    steps = PDTStep(folder, **OPTIONS)
    messages = []

    def each(epoch, net):
        if epoch == 4:  # a newer checkpoint is already there (saved by another process)
            torch.save({"model": net.state_dict(), "epoch": 5}, folder / "epoch_5.pt")
            messages.append(_unchanged_after(net, lambda: steps.step(net, folder / "epoch_4.pt")))
            (folder / "epoch_5.pt").unlink()
        elif epoch == 3:
            messages.append(_unchanged_after(net, lambda: steps.step(net, tmp_path / "elsewhere.pt")))
        else:
            steps.step(net, folder / f"epoch_{epoch}.pt")

    loop(folder, 4, None, on_epoch=each)
    assert "not the one the live model was saved to" in messages[0]
    assert "not the one the live model was saved to" in messages[1]


def distance_to_plain(folder: Path) -> Callable[[nn.Module], float]:
    """A held-out criterion that every fused state fails: the squared distance of the model's weights to the
    checkpoint the loop saved last (0 for the optimizer's own weights, more for any fused state)."""
    def loss(net: nn.Module) -> float:
        newest = max(folder.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
        saved = torch.load(newest, weights_only=True)["model"]
        return float(sum(((v.double() - saved[k].double()) ** 2).sum() for k, v in net.state_dict().items()))
    return loss


def test_the_loss_gate_keeps_the_optimizers_weights_when_the_fused_state_is_worse(tmp_path):
    """verify= that prefers the plain state: every fused state is turned down, the model keeps bit for bit
    the weights it was saved with, and the store forgets each fused state (its window holds the checkpoints,
    the history has an audit row per rejection)."""
    folder = tmp_path / "gated"
    gate = PDTStep(folder, verify=distance_to_plain(folder), **OPTIONS)
    after: dict[int, dict] = {}
    statuses = []
    folder.mkdir()
    x, y = training.data()
    net = training.model()
    optim = training.optimizer(net, "sgd")
    for epoch in range(1, 7):
        training.train_epoch(net, optim, x, y, epoch)
        path = folder / f"epoch_{epoch}.pt"
        torch.save({"model": net.state_dict(), "optimizer": optim.state_dict(), "epoch": epoch}, path)
        statuses.append(gate.step(net, path).status)
        after[epoch] = {k: v.clone() for k, v in net.state_dict().items()}
    assert statuses == ["waiting", "waiting", "rejected", "rejected", "rejected", "rejected"]
    assert gate.rejected == [f"epoch_{e}.pt" for e in range(3, 7)]
    for epoch, state in after.items():
        saved = torch.load(folder / f"epoch_{epoch}.pt", weights_only=True)["model"]
        assert all(torch.equal(saved[k], state[k]) for k in saved), epoch
    report = json.loads(pdt("report", folder, "--json")[1])
    assert [h["command"] for h in report["history"]] == ["in-loop", "in-loop rejected"] * 4
    assert [w["kind"] for w in report["window"]] == ["checkpoint"] * 3


def test_the_loss_gate_keeps_a_fused_state_that_is_not_worse(tmp_path):
    """verify= that prefers the fused state: the gated loop is bit for bit the ungated one."""
    plain = distance_to_plain(tmp_path / "gated")
    fused = loop(tmp_path / "gated", 5, PDTStep(tmp_path / "gated", verify=lambda net: -plain(net), **OPTIONS))
    ungated = loop(tmp_path / "free", 5, PDTStep(tmp_path / "free", **OPTIONS))
    assert sorted(fused) == sorted(ungated) == [3, 4, 5]
    for epoch, state in ungated.items():
        assert all(torch.equal(state[k], fused[epoch][k]) for k in state), epoch
