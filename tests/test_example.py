"""The README's workflow on the shipped example: train, pdt predict, resume from the fused file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]



pytestmark = pytest.mark.slow  # a training loop with real processes

def run(*argv: str) -> str:
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_predict_resume_loop(tmp_path):
    folder = tmp_path / "digits"
    run("examples/train_digits.py", "--out", str(folder), "--epochs", "5", "--hidden", "32")
    for _ in range(2):  # two PDT steps, each followed by one resumed epoch
        step = json.loads(run("-m", "pdtcli", "predict", str(folder), "--json"))
        assert step["status"] == "written"
        fused = Path(step["output"])
        assert torch.load(fused, weights_only=True)["optimizer"]["state"]  # optimizer state carried over
        rows = [json.loads(line) for line in run("examples/train_digits.py", "--out", str(folder), "--epochs", "1",
                                                 "--hidden", "32", "--resume", str(fused)).splitlines()]
        assert rows[-1]["epoch"] == torch.load(fused, weights_only=True)["epoch"] + 1
        assert rows[-1]["test_acc"] > 0.5
    report = json.loads(run("-m", "pdtcli", "report", str(folder), "--json"))
    assert [h["command"] for h in report["history"]] == ["predict", "predict"]
    assert sum(w["kind"] == "fused" for w in report["window"]) == 2
