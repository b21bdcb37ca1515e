"""The CUDA path against the CPU result; it runs only where torch sees a GPU (CI has none)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_hostile import pdt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cuda_and_cpu_give_the_same_mask_and_fused_weights(sgd_run, tmp_path):
    results = {}
    for device in ("cpu", "cuda"):
        run = shutil.copytree(sgd_run, tmp_path / device)
        code, output = pdt("predict", run, "--json", "--device", device)
        assert code == 0, output
        results[device] = (json.loads(output)["mask"]["totals"],
                           torch.load(run / "epoch_8.pdt.pt", weights_only=True)["model"])
    (cpu_totals, cpu), (gpu_totals, gpu) = results["cpu"], results["cuda"]
    # float64 on both; a reduction order that differs may move an element sitting exactly on a bound
    assert abs(cpu_totals["accepted"] - gpu_totals["accepted"]) <= max(1, cpu_totals["elements"] // 10_000)
    for name, tensor in cpu.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(gpu[name], tensor, rtol=1e-6, atol=1e-7)
