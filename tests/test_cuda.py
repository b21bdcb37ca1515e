"""The CUDA path against the CPU result; it runs only where torch sees a GPU (CI has none)."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import training
from safetensors.torch import load_file
from test_hostile import pdt

import pdtcli.formats.base as base

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _close_enough(cpu_totals: dict, gpu_totals: dict) -> None:
    # float64 on both; a reduction order that differs may move an element sitting exactly on a bound
    assert abs(cpu_totals["accepted"] - gpu_totals["accepted"]) <= max(1, cpu_totals["elements"] // 10_000)


def test_cuda_and_cpu_give_the_same_mask_and_fused_weights(sgd_run, tmp_path):
    results = {}
    for device in ("cpu", "cuda"):
        run = shutil.copytree(sgd_run, tmp_path / device)
        code, output = pdt("predict", run, "--json", "--device", device)
        assert code == 0, output
        results[device] = (json.loads(output)["mask"]["totals"],
                           torch.load(run / "epoch_8.pdt.pt", weights_only=True)["model"])
    (cpu_totals, cpu), (gpu_totals, gpu) = results["cpu"], results["cuda"]
    _close_enough(cpu_totals, gpu_totals)
    for name, tensor in cpu.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(gpu[name], tensor, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_in_pieces_and_blocks_matches_the_cpu(tmp_path, monkeypatch, dtype):
    """Tensors fed in pieces that end inside a byte of the mask, blocks smaller than a piece, and a bf16
    store (moved to the GPU as bf16, widened there): the same outputs as the CPU, and a second step on
    the fused state too."""
    source = tmp_path / "run"
    training.train(source, 7, fmt="safetensors", opt="adamw", hidden=37, dtype=getattr(torch, dtype))
    (source / "epoch_7.safetensors").rename(tmp_path / "epoch_7.safetensors")
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 100)
    outputs = {}
    for device in ("cpu", "cuda"):
        run = shutil.copytree(source, tmp_path / device)
        steps = []
        for newest in (6, 7):
            if newest == 7:
                shutil.copy(tmp_path / "epoch_7.safetensors", run)
            code, output = pdt("predict", run, "--json", "--device", device, "--block", 48)
            assert code == 0, output
            steps.append((json.loads(output), load_file(run / f"epoch_{newest}.pdt.safetensors")))
        outputs[device] = steps
    for (cpu_json, cpu), (gpu_json, gpu) in zip(outputs["cpu"], outputs["cuda"], strict=True):
        _close_enough(cpu_json["mask"]["totals"], gpu_json["mask"]["totals"])
        for name, tensor in cpu.items():
            torch.testing.assert_close(gpu[name].float(), tensor.float(), rtol=1e-5, atol=1e-6)


def _syncs(*args) -> int:
    """Synchronizing CUDA calls made by one `pdt` run in this process."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code, output = pdt(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert code == 0, output
    return sum("synchronizing" in str(w.message) for w in caught)


def test_cuda_waits_only_for_the_transfers_streaming_needs(safetensors_run, tmp_path):
    """Per row block, pass 1 moves the window in and pass 2 moves the window and the newest values in and
    the fused values and accepted flags out: at most 5 waits a block, whatever the mask counts (read once
    per tensor). Measured as the slope over two block sizes, so that per-run and per-tensor waits cancel."""
    counts = {}
    for block in (64, 32):
        run = shutil.copytree(safetensors_run, tmp_path / f"b{block}")
        counts[block] = _syncs("predict", run, "--device", "cuda", "--block", block)
    sizes = [t.numel() for t in load_file(next(safetensors_run.glob("*.safetensors"))).values()
             if t.is_floating_point()]
    blocks = {b: sum(-(-n // b) for n in sizes) for b in (64, 32)}
    slope = (counts[32] - counts[64]) / (blocks[32] - blocks[64])
    print(f"syncs {counts}, blocks {blocks}, per block {slope:.2f}")
    assert slope <= 5.5, (counts, blocks)
