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
import subprocess
import sys
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


# ---- a checkpoint saved over or cut short while pdt reads it --------------------------------------


def _saving_over_on_first_read(monkeypatch, victim: Path, replacement: Path, method: str = "chunks") -> None:
    """Training saves over `victim` (with `replacement`'s content, as its next torch.save would) the first
    time pdt's torch reader reads a tensor of it (or, `write_fused`, once the fused copy is written)."""
    from pdtcli.formats import torch_pickle

    original = getattr(torch_pickle.TorchReader, method)
    done = []

    def wrapped(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.path == victim and not done:
            done.append(True)
            torch.save(torch.load(replacement, weights_only=True), victim)
        return result

    monkeypatch.setattr(torch_pickle.TorchReader, method, wrapped)


def test_a_checkpoint_saved_over_while_ingested_leaves_no_snapshot(sgd_run, tmp_path, monkeypatch):
    """The snapshot would mix the tensors read before the save with those after: not a state training was
    ever in. It is not committed; the next run takes the new version whole, as a run on it alone does."""
    held_back = tmp_path / "epoch_8.pt"
    shutil.move(sgd_run / "epoch_8.pt", held_back)
    clean = tmp_path / "clean"  # the same run with nobody saving over anything
    shutil.copytree(sgd_run, clean)
    for folder in (sgd_run, clean):
        code, output = pdt("snapshot", folder)
        assert code == 0, output
    store_before = (sgd_run / ".pdt" / "store.h5").read_bytes()
    shutil.copy2(held_back, sgd_run / "epoch_8.pt")
    victim = sgd_run / "epoch_8.pt"
    resaved = torch.load(held_back, weights_only=True)  # epoch 8 saved again, with other values
    resaved["model"]["0.weight"] *= 1.01
    torch.save(resaved, tmp_path / "resaved.pt")
    _saving_over_on_first_read(monkeypatch, victim, tmp_path / "resaved.pt")
    code, output = pdt("predict", sgd_run)
    assert code == 3, output
    line = one_error_line(output)
    assert str(victim) in line and "changed while pdt read it" in line, line
    assert (sgd_run / ".pdt" / "store.h5").read_bytes() == store_before
    assert not list(sgd_run.glob("*.pdt.*"))
    monkeypatch.undo()
    shutil.copy2(tmp_path / "resaved.pt", clean / "epoch_8.pt")  # what training left
    for folder in (sgd_run, clean):
        code, output = pdt("predict", folder)
        assert code == 0, output
    # the archives differ in their inner names and torch.save's serialization id, which the copies carry
    got, want = (torch.load(folder / "epoch_8.pdt.pt", weights_only=True) for folder in (sgd_run, clean))
    assert got.keys() == want.keys() and all(torch.equal(got["model"][k], v) for k, v in want["model"].items())


def test_a_checkpoint_saved_over_while_the_fused_copy_is_written_publishes_nothing(sgd_run, monkeypatch):
    """The output carries the newest checkpoint's optimizer state: a save over it mid-write would give a
    fused file whose parts come from two saves, with exit 0."""
    newest = sgd_run / "epoch_8.pt"
    _saving_over_on_first_read(monkeypatch, newest, sgd_run / "epoch_2.pt", "write_fused")
    code, output = pdt("predict", sgd_run)
    assert code == 3, output
    assert "changed while pdt read it" in one_error_line(output)
    assert not list(sgd_run.glob("*.pdt.*")) and not list(sgd_run.glob(".*pdt-tmp*"))


TRUNCATE_ON_FIRST_READ = """
import os, sys
from pdtcli.formats import torch_pickle
from pdtcli.cli import run
victim, original = sys.argv[1], torch_pickle.TorchReader.chunks
def chunks(self, name):
    if str(self.path) == victim:
        os.truncate(victim, 1024)  # cut short under pdt, as a torch.save over it does first
    return original(self, name)
torch_pickle.TorchReader.chunks = chunks
sys.argv = ["pdt", "predict", os.path.dirname(victim)]
run()
"""


@pytest.mark.slow
def test_a_checkpoint_cut_short_while_read_is_one_error_not_a_crash(sgd_run):
    """torch.load(mmap=True) maps the file; touching a mapped page past a new end of file is SIGBUS, which
    kills pdt with no message. Values are read by byte range instead: a short read is one error, exit 3."""
    victim = sgd_run / "epoch_8.pt"
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_ON_FIRST_READ, str(victim)], capture_output=True,
                          text=True, timeout=300, cwd=HERE)
    assert proc.returncode == 3, (proc.returncode, proc.stderr[-2000:])
    line = one_error_line(proc.stderr)
    assert str(victim) in line and "truncated while pdt read it" in line, line
    assert not (sgd_run / ".pdt").exists()


def test_a_failed_ingest_after_a_fused_step_never_fits_from_the_fused_state_alone(sgd_run):
    """A new checkpoint takes the slot of the one the fused state came from before its values are checked;
    when it then fails (NaN), the window's newest is the fused state with nothing to fit it from. That is
    not a step to take again (it wrote `epoch_8.pdt.pdt.pt`): pdt waits for the next checkpoint."""
    code, output = pdt("predict", sgd_run)
    assert code == 0, output
    bad = torch.load(sgd_run / "epoch_8.pt", weights_only=True)
    bad["model"]["0.bias"][0] = float("nan")
    torch.save(bad, sgd_run / "epoch_9.pt")
    code, output = pdt("predict", sgd_run)
    assert code == 3 and "NaN" in one_error_line(output), output
    (sgd_run / "epoch_9.pt").unlink()
    code, output = pdt("predict", sgd_run, "--json")
    assert code == 0, output
    assert json.loads(output)["status"] in ("waiting", "up-to-date"), output
    assert sorted(p.name for p in sgd_run.glob("*.pdt.*")) == ["epoch_8.pdt.pt"]
