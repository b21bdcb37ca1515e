"""Which state training really resumed from: pdt checks it in the values of the next checkpoint.

After a fused checkpoint is written the store assumes training resumes from it (Algorithm 1,
line 17). These tests make training do otherwise, with real tiny runs: a "resume from the latest"
script that picks the plain checkpoint, a `pdt restore` after training went on from the fused
file, and a cron run that writes the fused checkpoint between the save and the in-loop step. In
each, the next step's acceptance ratio must be the one of a store that holds the true window (a
fresh store made from the states training really went through).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import training
from test_hostile import pdt
from test_in_loop import loop

from pdtcli.integrations import PDTStep


def predict(run: Path, *args) -> dict:
    code, output = pdt("predict", run, "--json", *args)
    assert code == 0, output
    return json.loads(output)


def report(run: Path) -> dict:
    code, output = pdt("report", run, "--json")
    assert code == 0, output
    return json.loads(output)


def true_window(run: Path, folder: Path, states: dict[int, Path]) -> Path:
    """A fresh folder whose checkpoints hold the states training went through (`states`: epoch -> file)."""
    folder.mkdir()
    for epoch, path in states.items():
        shutil.copy2(path, folder / f"epoch_{epoch}.pt")
    return folder


def ratio(payload: dict) -> float:
    return payload["mask"]["totals"]["ratio"]


def warnings_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("warning: ")]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_a_resume_script_that_picks_the_plain_checkpoint_is_seen_and_the_window_follows_it(tmp_path, opt):
    run = tmp_path / "run"
    training.train(run, 6, opt=opt)
    assert predict(run)["status"] == "written"  # epoch_6.pdt.pt: the store assumes training resumes from it
    latest = sorted(run.glob("epoch_*.pt"))[-1]  # "resume from the latest": the plain one sorts last
    assert latest.name == "epoch_6.pt"
    training.train(run, 1, opt=opt, resume=latest)

    code, output = pdt("predict", run)
    assert code == 0, output
    evidence = report(run)["window"][-1]["lineage_evidence"]  # epoch_7's fused state tells what epoch_7 descends from
    assert warnings_of(output) == [
        "warning: epoch_7.pt descends from epoch_6.pt, not from the fused epoch_6.pdt.pt: training resumed from the "
        f"plain checkpoint, so the window holds epoch_6.pt (evidence {evidence:.2f})"]
    reference = predict(true_window(run, tmp_path / "true", {e: run / f"epoch_{e}.pt" for e in range(3, 8)}))
    state = report(run)
    assert state["mask"]["totals"]["ratio"] == ratio(reference)
    assert [(w["name"], w["kind"]) for w in state["fit_window"]] == [(f"epoch_{e}.pt", "checkpoint")
                                                                     for e in range(3, 8)]
    newest = state["window"][-1]
    assert newest["descends_from"] == "plain" and newest["descends_path"] == str(run / "epoch_6.pt")
    assert newest["lineage_evidence"] < 0.35
    assert state["resumed_from"] == str(run / "epoch_7.pdt.pt")  # the step just written; not epoch_6.pdt.pt
    code, text = pdt("report", run)
    assert "7 descends from epoch_6.pt (plain checkpoint; shown by its values, evidence " in text, text


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_training_that_resumed_from_the_fused_file_keeps_it_in_the_window_without_a_word(tmp_path, opt):
    run = tmp_path / "run"
    training.train(run, 6, opt=opt)
    assert predict(run)["status"] == "written"
    fused = run / "epoch_6.pdt.pt"
    training.train(run, 1, opt=opt, resume=fused)

    code, output = pdt("predict", run)
    assert code == 0 and warnings_of(output) == [], output
    states = {**{e: run / f"epoch_{e}.pt" for e in (3, 4, 5, 7)}, 6: fused}
    reference = predict(true_window(run, tmp_path / "true", dict(sorted(states.items()))))
    state = report(run)
    assert state["mask"]["totals"]["ratio"] == ratio(reference)
    assert [w["kind"] for w in state["fit_window"]] == ["checkpoint"] * 3 + ["fused", "checkpoint"]
    assert state["window"][-1]["descends_from"] == "fused" and state["window"][-1]["lineage_evidence"] > 0.65


def test_restore_after_training_went_on_from_the_in_place_file_keeps_the_fused_state_in_the_lineage(tmp_path):
    """`pdt predict --in-place`, training resumes from that file and saves epoch_7, then `pdt restore`:
    the next step sees in epoch_7's values that training resumed from the fused state."""
    run = tmp_path / "run"
    training.train(run, 6)
    assert predict(run, "--in-place")["status"] == "written"
    fused = tmp_path / "fused.pt"
    shutil.copy2(run / "epoch_6.pt", fused)  # the state training resumes from
    training.train(run, 1, resume=run / "epoch_6.pt")
    code, output = pdt("restore", run)
    assert code == 0, output
    assert (run / "epoch_6.pt").read_bytes() != fused.read_bytes()  # the plain checkpoint is back

    code, output = pdt("predict", run, "--no-in-place")  # the store keeps --in-place; epoch_7.pt stays training's
    assert code == 0, output
    evidence = report(run)["window"][-1]["lineage_evidence"]
    assert warnings_of(output) == [
        "warning: settings changed from those kept in the store: --no-in-place (was --in-place); kept from now on",
        "warning: epoch_7.pt descends from the fused state pdt wrote over epoch_6.pt, not from epoch_6.pt as "
        "restored: training resumed from the fused state before `pdt restore`, so the window holds it "
        f"(evidence {evidence:.2f})"]
    states = {**{e: run / f"epoch_{e}.pt" for e in (3, 4, 5, 7)}, 6: fused}
    reference = predict(true_window(run, tmp_path / "true", dict(sorted(states.items()))))
    state = report(run)
    assert state["mask"]["totals"]["ratio"] == ratio(reference)
    assert [w["kind"] for w in state["fit_window"]] == ["checkpoint"] * 3 + ["fused", "checkpoint"]
    assert state["window"][-1]["descends_from"] == "fused"


def test_restore_after_the_newer_checkpoint_was_ingested_puts_the_file_back_and_keeps_the_lineage(tmp_path):
    """The fused state training went on from stays in the window and counts for the schedule: with
    --every 1, the step after it is not due."""
    run = tmp_path / "run"
    training.train(run, 6)
    assert predict(run, "--in-place", "--every", "1")["status"] == "written"
    training.train(run, 1, resume=run / "epoch_6.pt")
    assert pdt("snapshot", run)[0] == 0  # epoch_7, which descends from the fused state, is in
    code, output = pdt("restore", run)
    assert code == 0, output
    assert warnings_of(output) == [
        "warning: training had already resumed from the fused state (epoch_7.pt descends from it): the store keeps "
        "it in the window; only the file was put back"]
    payload = predict(run)
    assert payload["status"] == "not-due", payload  # one plain checkpoint since the fused one, as --every 1 wants
    assert [w["kind"] for w in report(run)["window"]] == ["checkpoint"] * 3 + ["fused", "checkpoint"]


def test_an_in_loop_step_after_a_cron_run_loads_the_fused_values_cron_wrote(tmp_path):
    """Cron's `pdt predict` runs between the save of epoch_7.pt and the step: the step loads the
    fused values of epoch_7.pdt.pt, and training goes on exactly as if the step had made them."""
    folder = tmp_path / "live"
    steps = PDTStep(folder, history=3)
    statuses, loaded = {}, {}

    def each(epoch, net):
        path = folder / f"epoch_{epoch}.pt"
        if epoch == 7:
            assert predict(folder)["status"] == "written"
        result = steps.step(net, path)
        statuses[epoch] = result.status
        loaded[epoch] = {k: v.clone() for k, v in net.state_dict().items()}

    loop(folder, 8, None, on_epoch=each)
    assert statuses[7] == "loaded" and statuses[8] == "loaded"
    on_disk = torch.load(folder / "epoch_7.pdt.pt", weights_only=True)["model"]
    assert all(torch.equal(values, loaded[7][name]) for name, values in on_disk.items())

    reference = loop(tmp_path / "reference", 8, PDTStep(tmp_path / "reference", history=3))
    for epoch in (7, 8):
        assert all(torch.equal(reference[epoch][name], loaded[epoch][name]) for name in reference[epoch]), epoch
    ratios = [h["totals"]["ratio"] for h in report(folder)["history"]]
    assert ratios[-1] == report(tmp_path / "reference")["history"][-1]["totals"]["ratio"]
    assert report(folder)["window"][-1]["descends_from"] == "fused"
