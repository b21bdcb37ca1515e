"""Ordinary events that must never end in a wrong fused checkpoint with exit 0.

A user copying the newest checkpoint, a state dict whose flattened names collide, a checkpoint
rewritten or truncated by training while pdt reads it: each is built from real checkpoints of a
tiny training run, and each must end either in the right result or in one error line with
the store and the inputs as they were.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import digest_tree
from typer.testing import CliRunner

from pdtcli.cli import app

HERE = Path(__file__).parent


def pdt(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pdt: error: "), output
    return lines[0]


# ---- flattened names that collide ---------------------------------------------------------------


def _colliding_pt(run: Path, key) -> None:
    """Every checkpoint's state dict gains a tensor under the flat key `key` and, beside it, a nested
    dict whose flattened name is the same: {"extra.bias": a, "extra": {"bias": b}} (or the key 1 beside "1")."""
    for path in sorted(run.glob("*.pt")):
        ckpt = torch.load(path, weights_only=True)
        bias = ckpt["model"]["3.bias"]
        if key == "int":
            ckpt["model"]["extra"] = {1: bias.clone(), "1": bias.clone() + 1}
        else:
            ckpt["model"]["extra.bias"] = bias.clone()
            ckpt["model"]["extra"] = {"bias": bias.clone() + 1}
        torch.save(ckpt, path)


@pytest.mark.parametrize("key", ["dotted", "int"])
def test_names_that_flatten_alike_in_a_pickle_are_refused_not_merged(sgd_run, key):
    _colliding_pt(sgd_run, key)
    before = digest_tree(sgd_run)
    code, output = pdt("predict", sgd_run)
    assert code == 3, output
    line = one_error_line(output)
    shown = ("['extra.bias']", "['extra']['bias']") if key == "dotted" else ("['extra'][1]", "['extra']['1']")
    assert "collide" in line and all(s in line for s in shown), line
    assert digest_tree(sgd_run) == before
    assert not (sgd_run / ".pdt").exists()  # a first run that fails leaves no store


def test_names_that_flatten_alike_in_a_flax_state_are_refused(tmp_path):
    from flax import serialization

    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    for epoch in range(1, 6):
        kernel = rng.standard_normal((4, 3)).astype(np.float32)
        tree = {"params": {"dense/kernel": kernel, "dense": {"kernel": kernel + 1}}, "step": epoch}
        (run / f"epoch_{epoch}.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    code, output = pdt("predict", run)
    assert code == 3, output
    line = one_error_line(output)
    assert "['params']['dense/kernel']" in line and "['params']['dense']['kernel']" in line, line


def test_a_safetensors_header_naming_a_tensor_twice_is_refused(safetensors_run):
    """JSON keeps the last of two equal keys silently; the fused copy would carry the first entry's
    bytes unfused under a name whose values it did fuse."""
    newest = sorted(safetensors_run.glob("*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))[-1]
    raw = newest.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + length].decode()
    entry = json.dumps(json.loads(header)["0.bias"], separators=(",", ":"))
    doubled = header.replace("{", '{"0.bias":' + entry + ",", 1)
    pad = len(doubled) + (-len(doubled)) % 8
    newest.write_bytes(struct.pack("<Q", pad) + doubled.ljust(pad).encode() + raw[8 + length:])
    code, output = pdt("predict", safetensors_run)
    assert code == 3, output
    assert "'0.bias'" in one_error_line(output) and "collide" in output


def test_an_npz_holding_one_member_twice_is_refused(tmp_path):
    import training

    run = tmp_path / "run"
    training.train(run, 5, fmt="npz")
    newest = run / "epoch_5.npz"
    with zipfile.ZipFile(newest) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(newest, "w") as archive:
        for info, data in [*members, members[0]]:
            archive.writestr(info.filename, data)
    code, output = pdt("predict", run)
    assert code == 3, output
    assert f"member {members[0][0].filename!r}" in one_error_line(output)


# ---- a user's copy of the newest checkpoint -------------------------------------------------------


def test_a_copy_of_the_newest_checkpoint_after_a_fused_step_is_a_duplicate(sgd_run):
    """`cp e_8.pt copy_8.pt` after pdt fused e_8: nothing new happened to training. The copy must not
    take the slot of the checkpoint the fused state came from (the next fit would start from the fused
    state and write `epoch_8.pdt.pdt.pt`)."""
    code, output = pdt("predict", sgd_run, "--json")
    assert code == 0 and json.loads(output)["status"] == "written", output
    fused = sgd_run / "epoch_8.pdt.pt"
    fused_bytes = fused.read_bytes()
    shutil.copy2(sgd_run / "epoch_8.pt", sgd_run / "copy_8.pt")
    code, output = pdt("predict", sgd_run, "--json")
    assert code == 0, output
    result = json.loads(output)
    assert result["status"] == "up-to-date", result
    assert result["ingested"] == []
    assert any(s["path"].endswith("copy_8.pt") and "same content" in s["reason"] for s in result["skipped"])
    assert fused.read_bytes() == fused_bytes
    assert sorted(p.name for p in sgd_run.glob("*.pdt.*")) == ["epoch_8.pdt.pt"]
    # the window still knows the optimizer's own epoch 8: a fit made now is the one made before
    code, output = pdt("predict", sgd_run, "--dry-run", "--json")
    assert code == 0 and json.loads(output)["fit"]["window"] == result["fit"]["window"], output
