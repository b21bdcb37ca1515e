"""The `-o` rule (issue 22 §5): an output's suffix either is the run's own format, or one of the
conversions pdt writes (`.safetensors`, `.pt`: the fused model tensors in one file), or the output is
refused with one line (exit 2). Each conversion is read back with the framework's own loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_hostile import one_error_line, pdt


def fused_default(run: Path) -> Path:
    """`pdt predict` on `run`: the fused checkpoint it writes by default, which conversions must equal."""
    code, output = pdt("predict", run, "--json")
    assert code == 0, output
    return Path(json.loads(output)["output"])


def test_a_torch_run_converts_to_safetensors(sgd_run, tmp_path):
    fused = torch.load(fused_default(sgd_run), weights_only=True)["model"]
    audit = tmp_path / "audit.safetensors"
    code, output = pdt("apply", sgd_run, "-o", audit, "--json")
    assert code == 0, output
    converted = load_file(audit)  # before: a torch pickle under this name, which safetensors cannot open
    assert sorted(converted) == sorted(fused)
    for name, values in fused.items():
        assert torch.equal(converted[name], values), name
    assert json.loads(output)["warnings"] == [
        f"audit.safetensors holds the model's tensors only: a .safetensors file has no place for the rest of "
        f"{sorted(sgd_run.glob('*.pt'))[-1].name} (optimizer state, counters, configuration, second names of "
        "shared tensors)"]


def test_a_safetensors_run_converts_to_a_torch_file(safetensors_run, tmp_path):
    fused = load_file(fused_default(safetensors_run))
    audit = tmp_path / "audit.pt"
    code, output = pdt("apply", safetensors_run, "-o", audit)
    assert code == 0, output
    converted = torch.load(audit, weights_only=True)  # before: safetensors bytes, which torch.load refuses
    assert sorted(converted) == sorted(fused)
    for name, values in fused.items():
        assert torch.equal(converted[name], values), name


def test_a_suffix_pdt_does_not_write_is_refused(sgd_run, tmp_path):
    assert pdt("predict", sgd_run, "--dry-run")[0] == 0
    for name in ("audit.npz", "audit"):
        audit = tmp_path / name
        code, output = pdt("apply", sgd_run, "-o", audit)
        assert code == 2
        suffix = audit.suffix or "no suffix"
        assert one_error_line(output) == (
            f"pdt: error: {audit}: pdt writes this run's torch checkpoints as .pt, .pth, .bin, .ckpt, .tar, or "
            f"converts them to .safetensors, .pt (the model tensors only); {suffix} is none of these: choose an -o "
            "name that ends in one")
        assert not audit.exists()
