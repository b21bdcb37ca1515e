"""The in-loop step under DDP, on real ranks: 2 gloo processes started by `torchrun`, a plain loop
around `DistributedDataParallel`, the Hugging Face Trainer and Lightning's `strategy="ddp"`, and a plain loop around
FSDP2 (`fully_shard`) that saves DCP folders. Every rank ends each step with the same parameters (under FSDP2,
its shards of them), bit for bit those `pdt predict` writes for the same checkpoints; a step that fails on one
rank leaves every rank as it was, with a warning on each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import launch
from safetensors.torch import load_file
from test_hostile import pdt
from test_integrations import replay

from pdtcli.formats.torch_dcp import DcpReader

pytestmark = pytest.mark.slow
WORKER = Path(__file__).parent / "ddp_worker.py"


def torchrun(mode: str, folder: Path, out: Path) -> list[dict]:
    """`tests/ddp_worker.py MODE` as 2 ranks under torchrun; what each rank recorded, in rank order."""
    folder.mkdir()
    out.mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), mode, str(folder), str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def same_on_every_rank(ranks: list[dict]) -> dict:
    """The ranks' records agree bit for bit (statuses and fused parameters; a rank's buffers are its own
    until DDP's next forward); rank 0's."""
    first, other = ranks
    assert first["statuses"] == other["statuses"]
    assert first["fused"].keys() == other["fused"].keys()
    for step, state in first["fused"].items():
        for name in first["parameters"]:
            assert torch.equal(state[name], other["fused"][step][name]), (step, name)
    return first


def test_a_plain_ddp_loop_gives_every_rank_the_fused_weights_of_pdt_predict(tmp_path):
    ranks = torchrun("loop", tmp_path / "live", tmp_path / "out")
    first = same_on_every_rank(ranks)
    assert [r["warnings"] for r in ranks] == [[], []]
    names = [f"epoch_{epoch}.pt" for epoch in range(1, 6)]
    written = replay(tmp_path / "live", tmp_path / "cli", names, "--history", "3")
    assert sorted(first["fused"]) == [3, 4, 5] and sorted(written) == names[2:]
    for epoch in (3, 4, 5):
        path = written[f"epoch_{epoch}.pt"]
        on_disk = torch.load(path, weights_only=True)["model"]
        for name, values in on_disk.items():
            assert torch.equal(values, first["fused"][epoch][name]), (epoch, name)
        plain = torch.load(tmp_path / "live" / f"epoch_{epoch}.pt", weights_only=True)["model"]
        assert any(not torch.equal(plain[k], on_disk[k]) for k in plain)
    report = json.loads(pdt("report", tmp_path / "live", "--json")[1])
    assert [h["command"] for h in report["history"]] == ["in-loop"] * 3  # one store, written by rank 0


def the_warning_at_epoch_4(mode: str, tmp_path: Path) -> list[str]:
    """Run the loop in `mode`, where the step at epoch 4 fails: every rank unchanged there (the steps at 3
    and 5 still load), one warning on each rank; those warnings."""
    ranks = torchrun(mode, tmp_path / "live", tmp_path / "out")
    first = same_on_every_rank(ranks)
    assert first["statuses"][4] is None and sorted(first["fused"]) == [3, 5]
    for rank in ranks:
        assert len(rank["warnings"]) == 1, rank["warnings"]
    return [rank["warnings"][0] for rank in ranks]


def test_a_step_that_fails_on_rank_0_leaves_every_rank_unchanged_with_a_warning_on_each(tmp_path):
    for warning in the_warning_at_epoch_4("locked", tmp_path):
        assert "epoch_4.pt, the model is unchanged: rank 0:" in warning
        assert "lock" in warning


def test_a_rank_whose_model_cannot_take_the_values_leaves_every_rank_unchanged(tmp_path):
    for warning in the_warning_at_epoch_4("differ", tmp_path):
        assert "epoch_4.pt, the model is unchanged: rank 1: its model has no tensor '0.weight'" in warning


def test_a_rank_0_that_dies_in_the_step_leaves_the_other_rank_unchanged_with_a_warning_not_hanging(tmp_path):
    (tmp_path / "live").mkdir()
    (tmp_path / "out").mkdir()
    worker = [str(WORKER)]
    results = launch(2, ["dies", str(tmp_path / "live"), str(tmp_path / "out")], before_rank={0: worker, 1: worker})
    assert [r.returncode for r in results] == [3, 0], results[1].stderr[-3000:]
    survivor = torch.load(tmp_path / "out" / "rank1.pt", weights_only=False)
    assert survivor["statuses"][4] is None and survivor["unchanged"]
    assert len(survivor["warnings"]) == 1
    assert "epoch_4.pt, the model is unchanged: rank 1 did not receive rank 0's fused values" in \
        survivor["warnings"][0]


def test_the_hf_trainer_under_ddp_gives_every_rank_the_fused_weights_of_pdt_predict(tmp_path):
    ranks = torchrun("hf", tmp_path / "live", tmp_path / "out")
    first = same_on_every_rank(ranks)
    assert [r["warnings"] for r in ranks] == [[], []]
    names = [f"checkpoint-{step}" for step in range(10, 41, 10)]
    written = replay(tmp_path / "live", tmp_path / "cli", names, "--history", "3", "--files", "checkpoint-*")
    assert sorted(written) == names[2:] and sorted(first["fused"]) == [30, 40]
    for name, path in written.items():
        on_disk = load_file(path / "model.safetensors")
        for key, values in on_disk.items():
            assert torch.equal(values, first["fused"][int(name.split("-")[1])][key]), (name, key)


def _lightning_run(kind: str, tmp_path: Path) -> tuple[dict, list[str], list[int], dict[str, Path]]:
    """A Lightning run under torchrun (`kind` of tests/ddp_worker.py), its 5 checkpoints replayed through `pdt
    predict --history 3`: (rank 0's record, the checkpoints' names, their steps, `pdt predict`'s outputs), after
    checking that the ranks agree, none warned, and the steps fused are those the command line wrote but the last
    (saved when training ends: no batch follows, so nothing to fuse into)."""
    ranks = torchrun(kind, tmp_path / "live", tmp_path / "out")
    first = same_on_every_rank(ranks)
    assert [r["warnings"] for r in ranks] == [[], []]
    names = sorted(p.name for p in (tmp_path / "live").glob("*.ckpt"))
    assert len(names) == 5
    written = replay(tmp_path / "live", tmp_path / "cli", names, "--history", "3")
    steps = [int(name.split("step=")[1].split(".")[0]) for name in names]
    assert sorted(written) == names[2:] and sorted(k for k, v in first["statuses"].items() if v == "loaded") == \
        steps[2:4]
    return first, names, steps, written


def test_lightning_ddp_gives_every_rank_the_fused_weights_of_pdt_predict(tmp_path):
    first, names, steps, written = _lightning_run("lightning", tmp_path)
    for name, step in zip(names[2:4], steps[2:4], strict=True):
        on_disk = torch.load(written[name], weights_only=True)["state_dict"]
        for key, values in on_disk.items():
            assert torch.equal(values, first["fused"][step][key]), (name, key)


def test_a_plain_fsdp2_loop_gives_every_rank_its_shards_of_what_pdt_predict_writes(tmp_path):
    ranks = torchrun("fsdp", tmp_path / "live", tmp_path / "out")
    first = same_on_every_rank(ranks)
    assert [r["warnings"] for r in ranks] == [[], []]
    for step, state in first["fused"].items():  # the buffers too: every rank took rank 0's saved ones, fused
        assert all(torch.equal(values, ranks[1]["fused"][step][name]) for name, values in state.items())
    names = [f"step_{epoch}" for epoch in range(1, 6)]
    written = replay(tmp_path / "out" / "saved", tmp_path / "cli", names, "--history", "3")
    assert sorted(first["fused"]) == [3, 4, 5] and sorted(written) == names[2:]
    for epoch in (3, 4, 5):
        on_disk = DcpReader(written[f"step_{epoch}"])
        for name, values in first["fused"][epoch].items():
            assert torch.equal(on_disk.read(f"model.{name}"), values), (epoch, name)
        plain = DcpReader(tmp_path / "out" / "saved" / f"step_{epoch}")
        assert any(not torch.equal(plain.read(f"model.{k}"), v) for k, v in first["fused"][epoch].items())
        assert _files(tmp_path / "live" / f"step_{epoch}.pdt") == _files(written[f"step_{epoch}"])
    report = json.loads(pdt("report", tmp_path / "live", "--json")[1])
    assert [h["command"] for h in report["history"]] == ["in-loop"] * 3  # the ranks' parts of one store


def test_lightning_fsdp2_gives_every_rank_its_shards_of_what_pdt_predict_writes(tmp_path):
    first, names, steps, written = _lightning_run("lightning-fsdp", tmp_path)  # DCP folders, the step in meta.pt
    for name, step in zip(names[2:4], steps[2:4], strict=True):
        on_disk = DcpReader(written[name])
        for key, values in first["fused"][step].items():
            assert torch.equal(on_disk.read(f"state_dict.{key}"), values), (name, key)
        assert _files(tmp_path / "live" / f"{name}.pdt") == _files(written[name])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def the_sharded_warning_at_epoch_4(mode: str, tmp_path: Path) -> list[str]:
    """`the_warning_at_epoch_4` under FSDP2: every rank's shards also bit for bit as before the failed step, which
    took less than its dist_timeout (60 s: no rank waited for it)."""
    warnings = the_warning_at_epoch_4(mode, tmp_path)
    for rank in range(2):
        record = torch.load(tmp_path / "out" / f"rank{rank}.pt", weights_only=False)
        assert record["unchanged"][4] and record["seconds"][4] < 60
    return warnings


def test_a_sharded_step_that_fails_on_one_rank_leaves_every_rank_unchanged_with_a_warning_on_each(tmp_path):
    for warning in the_sharded_warning_at_epoch_4("fsdp-fails", tmp_path):  # the next step still loads
        assert warning == ("pdt: no fused step at step_4, the model is unchanged: rank 1: "
                           f"{tmp_path / 'live' / 'step_4'}: truncated: 'model.1.bias@16' runs past the end of "
                           "__1_0.distcp; every rank keeps its own weights")
    assert not (tmp_path / "live" / "step_4.pdt").exists()


def test_a_rank_that_cannot_take_its_fused_shards_leaves_every_rank_unchanged(tmp_path):
    for warning in the_sharded_warning_at_epoch_4("fsdp-differ", tmp_path):  # after the fused folder is published
        assert warning == ("pdt: no fused step at step_4, the model is unchanged: rank 1: "
                           f"{tmp_path / 'live' / 'step_4.pdt'}: tensor 'model.0.weight' of the fused checkpoint is "
                           "not in the model's state dict (get_model_state_dict); save the model's own state dict; "
                           "every rank keeps its own weights")
