"""Training order: by the number in the name, by the step recorded inside, or by mtime.

Real checkpoints from a training run are renamed or re-timed so that each rule gives a
different order from the others; the order pdt ingests them in is the one asked for.
"""

from __future__ import annotations

import json
import os

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
