"""The speed-up workflow, shortened: the loop runs, fused checkpoints load and training resumes from them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from pdt_loop import LoopConfig, run_loop  # noqa: E402
from train_digits import train  # noqa: E402

pytestmark = pytest.mark.slow  # a training loop with real processes

def test_loop_resumes_from_each_fused_checkpoint_in_process(tmp_path):
    rounds = run_loop(LoopConfig(epochs=7, hidden=32, pdt=True, mode="api"), tmp_path)
    assert [r.epoch for r in rounds] == list(range(1, 8))
    assert [r.status for r in rounds] == ["waiting"] * 4 + ["written"] * 3
    for r in rounds[4:]:
        fused = torch.load(tmp_path / f"epoch_{r.epoch:04d}.pdt.pt", weights_only=True)
        assert fused["epoch"] == r.epoch and fused["optimizer"]["state"]
        assert 0 < r.ratio < 1 and set(r.ratio_by_layer_type) == {"linear", "bias"}
    # epochs 6 and 7 were trained from the fused files: resuming an unfused epoch 5 gives other weights
    resumed = torch.load(tmp_path / "epoch_0006.pt", weights_only=True)["model"]
    train(tmp_path / "plain", 1, tmp_path / "epoch_0005.pt", hidden=32)
    plain = torch.load(tmp_path / "plain" / "epoch_0006.pt", weights_only=True)["model"]
    assert not torch.equal(resumed["0.weight"], plain["0.weight"])
    assert rounds[-1].test_acc > 0.8


def test_benchmark_script_writes_its_table_and_plot(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speedup.py"), "--out", str(out), "--seeds", "1",
                           "--epochs", "7", "--optimizers", "sgd", "--variants", "baseline", "exact", "none",
                           "--cli-seeds", "0"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    table = (out / "results.md").read_text()
    assert "| baseline |" in table and "| exact |" in table and "| none |" in table
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = json.loads((out / "runs.json").read_text())
    assert len(runs["sgd"]["runs"]["exact"]["0"]) == 7
    assert "reproduce: python benchmarks/speedup.py" in done.stdout
