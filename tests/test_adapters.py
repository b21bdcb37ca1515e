"""A Trainer + PEFT LoRA run is a checkpoint folder of its own kind: each `checkpoint-N/` holds the
adapter (`adapter_model.safetensors`, `adapter_config.json`) and the Trainer's state, no model. pdt
predicts the adapter, writes a fused adapter beside the rest of the folder unchanged, and the Trainer
and `PeftModel.from_pretrained` resume from it (issue 22 §3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_hostile import pdt
from test_integrations import gpt, trainer_for

pytestmark = pytest.mark.slow
peft = pytest.importorskip("peft")


def lora(seed: int = 0):
    """The tiny GPT-2 of test_integrations with a rank-4 LoRA on its attention projection."""
    return peft.get_peft_model(gpt(seed), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                          fan_in_fan_out=True, task_type="CAUSAL_LM"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A real LoRA fine-tuning run saving `checkpoint-10` … `checkpoint-50`."""
    run = tmp_path_factory.mktemp("lora") / "run"
    trainer_for(lora(), run, 50).train()
    return run


def test_a_lora_run_is_predicted_and_resumed_from(lora_run, tmp_path):
    newest = lora_run / "checkpoint-50"
    assert (newest / "adapter_model.safetensors").is_file() and not (newest / "model.safetensors").exists()
    code, output = pdt("predict", lora_run, "--files", "checkpoint-*", "--json")
    assert code == 0, output  # the original code: exit 2, "no checkpoints here"
    fused_dir = Path(json.loads(output)["output"])
    assert fused_dir == lora_run.parent / "run.pdt" / "checkpoint-50.pdt"
    fused = load_file(fused_dir / "adapter_model.safetensors")
    plain = load_file(newest / "adapter_model.safetensors")
    assert sorted(fused) == sorted(plain) and all("lora_" in name for name in fused)
    assert any(not torch.equal(fused[k], plain[k]) for k in plain)
    kept = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert kept == sorted(p.relative_to(fused_dir) for p in fused_dir.rglob("*") if p.is_file())
    for name in kept:  # everything but the adapter as the Trainer saved it
        if name.name != "adapter_model.safetensors":
            assert (fused_dir / name).read_bytes() == (newest / name).read_bytes(), name

    loaded = peft.PeftModel.from_pretrained(gpt(1), fused_dir)
    state = peft.get_peft_model_state_dict(loaded)
    assert sorted(state) == sorted(fused)
    for name, values in fused.items():
        assert torch.equal(state[name], values), name

    resumed = trainer_for(lora(2), tmp_path / "resumed", 60)
    result = resumed.train(resume_from_checkpoint=str(fused_dir))
    assert resumed.state.global_step == 60 and torch.isfinite(torch.tensor(result.training_loss))


def test_a_fused_adapter_converts_to_one_torch_file_and_other_names_are_refused(lora_run, tmp_path):
    """A folder's output keeps its format under any name without a file suffix, or converts."""
    fused_dir = Path(json.loads(pdt("predict", lora_run, "--files", "checkpoint-*", "--json")[1])["output"])
    audit = tmp_path / "adapter.pt"
    code, output = pdt("apply", lora_run, "-o", audit)
    assert code == 0, output
    converted, fused = torch.load(audit, weights_only=True), load_file(fused_dir / "adapter_model.safetensors")
    assert sorted(converted) == sorted(fused)
    assert all(torch.equal(converted[name], values) for name, values in fused.items())
    assert pdt("apply", lora_run, "-o", tmp_path / "copy.pdt")[0] == 0
    assert (tmp_path / "copy.pdt" / "adapter_model.safetensors").read_bytes() == (
        fused_dir / "adapter_model.safetensors").read_bytes()
    code, output = pdt("apply", lora_run, "-o", tmp_path / "adapter.npz")
    assert code == 2 and "pdt writes this run's hf-folder checkpoints as a folder name without a file suffix, or " \
        "converts them to .safetensors, .pt (the model tensors only); .npz is none of these" in output, output


def test_the_report_says_the_run_trains_an_adapter(lora_run):
    assert pdt("predict", lora_run, "--files", "checkpoint-*")[0] == 0
    code, output = pdt("report", lora_run, "--json")
    assert code == 0, output
    adapter = json.loads(output)["adapter"]
    assert adapter == {"type": "LORA", "library": "peft", "r": 4, "alpha": 8, "target_modules": ["c_attn"],
                       "base_model": adapter["base_model"]}
    code, output = pdt("report", lora_run)
    assert code == 0 and "adapter run: LoRA adapter (peft), r=4, alpha=8, target modules c_attn" in output, output
