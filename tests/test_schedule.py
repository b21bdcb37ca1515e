"""Algorithm 1's schedule: a fused checkpoint from step T_0 on, and only every T_i plain checkpoints.

Real training checkpoints arrive one at a time, as cron sees them; runs that are not due
only ingest, say when the next write is due, and exit 0.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import training
from test_hostile import pdt

from pdtcli.cli import app  # noqa: F401 - the same CLI the helper drives


def arrive(run: Path, later: Path, epoch: int) -> None:
    os.replace(later / f"epoch_{epoch}.pt", run / f"epoch_{epoch}.pt")


def hold_back(run: Path, later: Path, epochs: range) -> None:
    later.mkdir()
    for epoch in epochs:
        os.replace(run / f"epoch_{epoch}.pt", later / f"epoch_{epoch}.pt")


def predict(run: Path, *args) -> dict:
    code, output = pdt("predict", run, "--json", *args)
    assert code == 0, output
    return json.loads(output)


def test_every_writes_only_after_that_many_plain_checkpoints(sgd_run, tmp_path):
    """T_i = 1, as the paper counts it: one plain checkpoint between two fused ones."""
    later = tmp_path / "later"
    hold_back(sgd_run, later, range(6, 9))
    assert predict(sgd_run, "--every", "1")["status"] == "written"  # the first write is due
    training.train(sgd_run, 1, resume=sgd_run / "epoch_5.pdt.pt")  # epoch 6, resumed from the fused checkpoint
    payload = predict(sgd_run)
    assert payload["status"] == "not-due" and payload["ingested"] == [str(sgd_run / "epoch_6.pt")]
    assert "after 1 more checkpoint(s) (--every 1: 0 plain since the last fused one)" in payload["message"]
    assert not (sgd_run / "epoch_6.pdt.pt").exists()
    training.train(sgd_run, 1, resume=sgd_run / "epoch_6.pt")
    assert predict(sgd_run)["output"] == str(sgd_run / "epoch_7.pdt.pt")
    assert predict(sgd_run, "--tau", "3")["status"] == "written"  # the same step again, other options
    report = json.loads(pdt("report", sgd_run, "--json")[1])
    assert report["schedule"] == {"start": None, "every": 1, "due_in": 2, "due_now": False,
                                  "next": "the next fused checkpoint is due after 2 more checkpoint(s)"}
    code, text = pdt("report", sgd_run)
    assert "schedule: as soon as the window is full, a fused one after every 1 plain checkpoint(s)" in " ".join(
        text.split())
    code, output = pdt("predict", sgd_run, "--every", "2")  # fixed once a fused checkpoint was written
    assert code == 2 and "--every" in output


def test_start_holds_writes_until_that_step_and_is_kept_in_the_store(sgd_run, tmp_path):
    later = tmp_path / "later"
    hold_back(sgd_run, later, range(7, 9))
    code, _ = pdt("snapshot", sgd_run)  # a store made without a schedule takes one until its first write
    payload = predict(sgd_run, "--start", "8")
    assert payload["status"] == "not-due"
    assert "due at checkpoint 8 (--start); the newest is checkpoint 6" in payload["message"]
    payload = predict(sgd_run, "--start", "7")
    assert payload["status"] == "not-due" and not list(sgd_run.glob("*.pdt.*"))
    arrive(sgd_run, later, 7)
    assert predict(sgd_run)["output"] == str(sgd_run / "epoch_7.pdt.pt")
    code, output = pdt("predict", sgd_run, "--start", "8")
    assert code == 2 and "--start" in output


def test_the_default_schedule_writes_at_every_new_checkpoint(sgd_run, tmp_path):
    later = tmp_path / "later"
    hold_back(sgd_run, later, range(7, 9))
    assert predict(sgd_run)["status"] == "written"
    for epoch in (7, 8):
        arrive(sgd_run, later, epoch)
        assert predict(sgd_run)["output"] == str(sgd_run / f"epoch_{epoch}.pdt.pt")


def test_new_checkpoints_passed_over_unread_still_count_as_epochs(sgd_run, tmp_path):
    later = tmp_path / "later"
    hold_back(sgd_run, later, range(6, 9))
    assert predict(sgd_run, "--every", "2", "--history", "2")["status"] == "written"
    for epoch in (6, 7, 8):  # three epochs arrive at once; with h = 2 the oldest is passed over unread
        arrive(sgd_run, later, epoch)
    payload = predict(sgd_run)
    assert any(s["path"].endswith("epoch_6.pt") for s in payload["skipped"])
    assert payload["output"] == str(sgd_run / "epoch_8.pdt.pt")  # c_e = 2 (epochs 6 and 7) >= T_i
