"""Checkpoints that are folders: Hugging Face Trainer `checkpoint-N/` and PyTorch DCP.

Each folder is written by the framework's own save function during a real training run,
and the fused folder is loaded back (and resumed from) with the framework's own loader.
The fused weights are compared bit for bit with pdt's output for the same trajectory
saved as single safetensors files, so the folder readers and writers add nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import training
from conftest import digest_tree
from ranks import save_dcp_by_ranks
from safetensors.torch import load_file, save_file
from test_formats import predict
from typer.testing import CliRunner

from pdtcli.cli import app
from pdtcli.formats import open_checkpoint
from pdtcli.formats.torch_dcp import _model_names


def reference_fused(tmp_path: Path, states: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """pdt's fused weights for the same trajectory, saved as one safetensors file per step."""
    folder = tmp_path / "reference"
    folder.mkdir()
    for step, state in states.items():
        save_file({k: v.contiguous() for k, v in state.items()}, folder / f"step_{step}.safetensors")
    return load_file(predict(folder)["output"])


# ---- Hugging Face ----------------------------------------------------------------------


def _hf_classes():
    from transformers import PretrainedConfig, PreTrainedModel

    class Config(PretrainedConfig):
        model_type = "pdt-test-mlp"

        def __init__(self, hidden: int = 32, **kwargs) -> None:
            self.hidden = hidden
            super().__init__(**kwargs)

    class Model(PreTrainedModel):
        config_class = Config

        def __init__(self, config: Config) -> None:
            super().__init__(config)
            self.net = training.model(config.hidden)
            self.post_init()

        def forward(self, x, labels=None):
            logits = self.net(x)
            loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
            return {"loss": loss, "logits": logits}

    return Config, Model


def _trainer(folder: Path, epochs: int):
    from transformers import Trainer, TrainingArguments

    Config, Model = _hf_classes()
    x, y = training.data()
    dataset = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    args = TrainingArguments(str(folder), num_train_epochs=epochs, per_device_train_batch_size=64,
                             save_strategy="epoch", logging_strategy="no", report_to=[], use_cpu=True,
                             learning_rate=3e-3, seed=0, disable_tqdm=True)
    torch.manual_seed(0)
    return Trainer(model=Model(Config()), args=args, train_dataset=dataset)


@pytest.mark.slow
def test_trainer_checkpoint_folders_round_trip_and_resume(tmp_path):
    run = tmp_path / "run"
    _trainer(run, 6).train()
    steps = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert len(steps) == 6
    newest = run / f"checkpoint-{steps[-1]}"
    before = {p.name: digest_tree(p) for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")}

    payload = predict(run)
    fused = tmp_path / "run.pdt" / f"checkpoint-{steps[-1]}.pdt"  # beside the run: the Trainer rotates checkpoint-*
    assert payload["output"] == str(fused)
    assert {p.name: digest_tree(p) for p in run.iterdir() if p.name in before} == before  # inputs untouched
    # every file but the weights is the newest checkpoint's, byte for byte
    carried, original = digest_tree(fused), digest_tree(newest)
    assert set(carried) == set(original)
    assert {k: v for k, v in carried.items() if k != "model.safetensors"} == {
        k: v for k, v in original.items() if k != "model.safetensors"}
    assert carried["model.safetensors"] != original["model.safetensors"]

    reference = reference_fused(tmp_path, {s: load_file(run / f"checkpoint-{s}" / "model.safetensors")
                                           for s in steps[1:]})
    _, Model = _hf_classes()
    loaded = Model.from_pretrained(fused).state_dict()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(loaded["net.1.running_mean"], load_file(newest / "model.safetensors")["net.1.running_mean"])
    with open_checkpoint(newest) as reader:
        assert reader.recorded_step() == steps[-1]  # trainer_state.json's global_step

    # Trainer resumes from the fused folder: its optimizer, scheduler and counters, pdt's weights
    resumed = _trainer(tmp_path / "resumed", 8)
    resumed.train(resume_from_checkpoint=str(fused))
    plain = _trainer(tmp_path / "plain", 8)
    plain.train(resume_from_checkpoint=str(newest))
    assert resumed.state.global_step == plain.state.global_step == steps[-1] + 2 * steps[0]
    assert not torch.equal(resumed.model.net[0].weight, plain.model.net[0].weight)


def _epochs(epochs: int):
    """Real AdamW training of the test MLP; yields (epoch, model, optimizer) after each epoch."""
    x, y = training.data()
    net = training.model()
    optim = training.optimizer(net, "adamw")
    for epoch in range(1, epochs + 1):
        for i in range(0, len(x), 64):
            optim.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            optim.step()
        yield epoch, net, optim


def _save_hf_epochs(folder: Path, epochs: int, save) -> dict[int, dict[str, torch.Tensor]]:
    """Train and save each epoch with `save(state_dict, epoch_folder)`, as Hugging Face tools do."""
    states = {}
    for epoch, net, _ in _epochs(epochs):
        state = {f"net.{k}": v.clone() for k, v in net.state_dict().items()}
        (folder / f"step-{epoch}").mkdir(parents=True)
        save(state, folder / f"step-{epoch}")
        (folder / f"step-{epoch}" / "trainer_state.json").write_text(json.dumps({"global_step": epoch}))
        states[epoch] = state
    return states


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_sharded_folders_keep_their_sharding(tmp_path, safe):
    from huggingface_hub import load_state_dict_from_file, save_torch_state_dict

    def save(state, folder):
        save_torch_state_dict(state, folder, max_shard_size=600, safe_serialization=safe)

    run = tmp_path / "run"
    states = _save_hf_epochs(run, 6, save)
    newest = run / "step-6"
    index = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    shards = sorted(set(json.loads((newest / index).read_text())["weight_map"].values()))
    assert len(shards) >= 3

    fused = Path(predict(run)["output"])
    assert fused == run / "step-6.pdt"
    assert sorted(p.name for p in fused.iterdir()) == sorted(p.name for p in newest.iterdir())
    assert (fused / index).read_bytes() == (newest / index).read_bytes()
    reference = reference_fused(tmp_path, {e: s for e, s in states.items() if e > 1})
    loaded = {}
    for shard in shards:
        part = load_state_dict_from_file(fused / shard, safe=safe, weights_only=True)
        original = load_state_dict_from_file(newest / shard, safe=safe, weights_only=True)
        assert set(part) == set(original)  # the same tensors in the same shard
        loaded.update(part)
    assert set(loaded) == set(states[6])
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name


def test_a_folder_whose_index_names_a_missing_shard_is_refused(tmp_path):
    from huggingface_hub import save_torch_state_dict

    run = tmp_path / "run"
    _save_hf_epochs(run, 5, lambda s, f: save_torch_state_dict(s, f, max_shard_size=600))
    shard = sorted((run / "step-5").glob("model-*.safetensors"))[-1]
    shard.unlink()
    before = {p.name: digest_tree(p) for p in run.iterdir() if not p.name.startswith(".")}
    result = CliRunner().invoke(app, ["predict", str(run)])
    assert result.exit_code == 3
    assert "step-5" in result.output and shard.name in result.output and "missing" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert {p.name: digest_tree(p) for p in run.iterdir() if not p.name.startswith(".")} == before
    assert not (run / "step-5.pdt").exists()


# ---- PyTorch distributed checkpoints ---------------------------------------------------


def _dcp_epochs(folder: Path, epochs: int) -> dict[int, dict[str, torch.Tensor]]:
    """Real AdamW training, saved each epoch with `torch.distributed.checkpoint.save`."""
    states = {}
    for epoch, net, optim in _epochs(epochs):
        dcp.save({"model": net.state_dict(), "optim": optim.state_dict(), "step": epoch},
                 checkpoint_id=folder / f"step_{epoch}")
        states[epoch] = {f"model.{k}": v.clone() for k, v in net.state_dict().items()}
    return states


def test_dcp_folders_round_trip_and_resume(tmp_path):
    run = tmp_path / "run"
    states = _dcp_epochs(run, 6)
    newest = run / "step_6"
    before = {p.name: digest_tree(p) for p in run.iterdir() if not p.name.startswith(".")}
    fused = Path(predict(run)["output"])
    assert fused == run / "step_6.pdt"
    assert {p.name: digest_tree(p) for p in run.iterdir() if p.name in before} == before
    assert (fused / ".metadata").read_bytes() == (newest / ".metadata").read_bytes()
    with open_checkpoint(newest) as reader:
        assert reader.recorded_step() == 6
        assert [i.name for i in reader.tensors()] == list(states[6])  # the optimizer's are not the model's

    # load it back with DCP itself, into a model and optimizer, and keep training
    net = training.model()
    optim = training.optimizer(net, "adamw")
    target = {"model": net.state_dict(), "optim": optim.state_dict(), "step": 0}
    plain = {"model": training.model().state_dict(), "optim": training.optimizer(training.model(), "adamw")
             .state_dict(), "step": 0}
    dcp.load(target, checkpoint_id=fused)
    dcp.load(plain, checkpoint_id=newest)
    assert target["step"] == 6
    for group, state in plain["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(target["optim"]["state"][group][key], value)  # carried bit-exact
    reference = reference_fused(tmp_path, {e: s for e, s in states.items() if e > 1})
    for name, tensor in reference.items():
        assert torch.equal(target["model"][name.removeprefix("model.")], tensor), name
    assert torch.equal(target["model"]["1.running_var"], plain["model"]["1.running_var"])
    net.load_state_dict(target["model"])
    optim.load_state_dict(target["optim"])
    x, y = training.data()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    optim.step()
    assert torch.isfinite(loss)


@pytest.mark.slow
def test_dcp_saved_by_two_ranks_is_read_and_rewritten_chunk_by_chunk(tmp_path):
    states = _dcp_epochs(tmp_path / "unsharded", 6)
    run = tmp_path / "run"
    save_dcp_by_ranks(run, {e: {k.removeprefix("model."): v for k, v in s.items()} for e, s in states.items()}, 2)
    assert sorted(p.name for p in (run / "step_6").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    with open_checkpoint(run / "step_6") as reader:  # whole tensors, assembled from both ranks' chunks
        for name, tensor in states[6].items():
            assert torch.equal(reader.read(name), tensor), name
    fused = Path(predict(run)["output"])
    reference = reference_fused(tmp_path, {e: s for e, s in states.items() if e > 1})
    model = training.model().state_dict()
    dcp.load({"model": model}, checkpoint_id=fused)
    for name, tensor in reference.items():
        assert torch.equal(model[name.removeprefix("model.")], tensor), name


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    run = tmp_path / "run"
    _dcp_epochs(run, 5)
    marker = tmp_path / "pwned"
    (run / "step_5" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    result = CliRunner().invoke(app, ["predict", str(run)])
    assert result.exit_code == 3
    assert "step_5" in result.output and "refused" in result.output
    assert not marker.exists()


def test_dcp_entries_that_would_run_code_are_carried_not_loaded(tmp_path):
    run = tmp_path / "run"
    marker = tmp_path / "pwned"
    net = training.model()
    x, y = training.data()
    optim = training.optimizer(net, "sgd")
    for epoch in range(1, 6):
        optim.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optim.step()
        dcp.save({"model": net.state_dict(), "step": _Payload(marker)}, checkpoint_id=run / f"step_{epoch}")
    assert not marker.exists()
    fused = Path(predict(run)["output"])
    assert not marker.exists()
    assert [p.name for p in fused.iterdir()] and (fused / ".metadata").read_bytes() == (
        run / "step_5" / ".metadata").read_bytes()


def test_the_step_of_a_lightning_dcp_folder_is_read_from_its_meta_pt_without_running_it(tmp_path):
    folder = tmp_path / "epoch=3-step=40.ckpt"  # as Lightning's ModelParallelStrategy saves it: counters apart
    dcp.save({"state_dict": training.model().state_dict()}, checkpoint_id=folder)
    marker = tmp_path / "pwned"
    torch.save({"epoch": 3, "global_step": 40, "loops": _Payload(marker)}, folder / "meta.pt")
    with open_checkpoint(folder) as reader:
        assert reader.recorded_step() == 40
    assert not marker.exists()


def test_model_tensors_are_found_under_the_state_dict_key_or_beside_the_optimizer():
    names = ["model.0.weight", "optim.state.0.exp_avg", "step"]
    assert _model_names(names) == ["model.0.weight"]
    assert _model_names(["0.weight", "optimizer.state.0.momentum_buffer"]) == ["0.weight"]


def test_copied_folder_is_a_duplicate(tmp_path):
    run = tmp_path / "run"
    _dcp_epochs(run, 5)
    shutil.copytree(run / "step_5", run / "step_6")
    result = CliRunner().invoke(app, ["snapshot", str(run), "--json"])
    payload = json.loads(result.output)
    assert any(s["path"].endswith("step_6") and "same content" in s["reason"] for s in payload["skipped"])


def test_folder_output_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    from huggingface_hub import save_torch_state_dict

    from pdtcli.formats.safetensors_file import SafetensorsReader

    run = tmp_path / "run"
    _save_hf_epochs(run, 5, lambda s, f: save_torch_state_dict(s, f, max_shard_size=600))
    fused = run / "step-5.pdt"
    write = SafetensorsReader.write_fused
    calls = []

    def disk_full_on_the_second_shard(self, out, replace):
        calls.append(out)
        write(self, out, replace)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SafetensorsReader, "write_fused", disk_full_on_the_second_shard)
    result = CliRunner().invoke(app, ["predict", str(run)])
    assert result.exit_code == 5 and "No space left" in result.output
    assert not fused.exists()
    assert [p.name for p in run.iterdir() if ".pdt-tmp-" in p.name] == []
    monkeypatch.setattr(SafetensorsReader, "write_fused", write)

    first = digest_tree(Path(predict(run)["output"]))
    second = digest_tree(Path(predict(run, "--tau", "2")["output"]))  # a new mask replaces the folder whole
    assert set(first) == set(second) and first != second
    assert sorted(p.name for p in run.iterdir()) == [".pdt", *sorted(f"step-{e}" for e in range(1, 6)),
                                                     "step-5.pdt"]
