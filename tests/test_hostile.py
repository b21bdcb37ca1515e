"""Checkpoint folders written by someone else: nothing outside the folder may change.

Each attack is built from real checkpoints (real training runs, saved by the framework's own
functions) and then altered the way a hostile or careless writer of the folder could alter
it. Every test puts a file outside the folder that the unprotected code would have read or
written, and asserts that its bytes and modification time are unchanged, that the exit code
is the documented one, and that no output or temporary was left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import training
from conftest import digest_tree
from typer.testing import CliRunner

from pdtcli.cli import app
from pdtcli.store.h5file import checksum as _checksum


def pdt(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def snapshot_of(path: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and modification time of a file, or of every file under a folder."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pdt: error: "), output
    return lines[0]


def no_temporaries(*folders: Path) -> bool:
    return not [p for folder in folders for p in folder.rglob("*") if ".pdt-tmp-" in p.name]


# ---- Keras: HDF5 data stored in other files ------------------------------------------------


@pytest.fixture(scope="module")
def _keras_run(tmp_path_factory) -> Path:
    import keras

    folder = tmp_path_factory.mktemp("keras")
    x, y = (t.numpy() for t in training.data())
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((training.INPUTS,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(training.CLASSES)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for epoch in range(1, 6):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
        model.save_weights(folder / f"epoch_{epoch}.weights.h5")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("how", ["external", "external-link", "virtual"])
def test_keras_weights_stored_in_another_file_are_refused(_keras_run, tmp_path, how):
    run = shutil.copytree(_keras_run, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.bin"
    newest = run / "epoch_5.weights.h5"
    name = "layers/dense/vars/0"
    with h5py.File(newest, "r+") as f:
        kernel = f[name][()]
        del f[name]
        if how == "external":  # the dataset's bytes live in the victim file
            victim.write_bytes(kernel.tobytes())
            f.create_dataset(name, shape=kernel.shape, dtype=kernel.dtype,
                             external=[(str(victim), 0, h5py.h5f.UNLIMITED)])
        elif how == "external-link":
            victim = outside / "victim.h5"
            with h5py.File(victim, "w") as other:
                other["kernel"] = kernel
            f[name] = h5py.ExternalLink(str(victim), "kernel")
        else:
            victim = outside / "victim.h5"
            with h5py.File(victim, "w") as other:
                other["kernel"] = kernel
            layout = h5py.VirtualLayout(shape=kernel.shape, dtype=kernel.dtype)
            layout[...] = h5py.VirtualSource(str(victim), "kernel", shape=kernel.shape)
            f.create_virtual_dataset(name, layout)
    before, inputs = snapshot_of(outside), digest_tree(run)
    code, output = pdt("predict", run)
    assert code == 3, output
    line = one_error_line(output)
    assert "epoch_5.weights.h5" in line and "refused" in line and name in line
    assert snapshot_of(outside) == before and digest_tree(run) == inputs
    assert not (run / "epoch_5.pdt.weights.h5").exists() and no_temporaries(run, outside)


# ---- Hugging Face: a shard index naming files outside the checkpoint ----------------------------


def _hf_run(folder: Path, epochs: int = 5) -> Path:
    from huggingface_hub import save_torch_state_dict

    for epoch, net in enumerate(_trained(epochs), start=1):
        step = folder / f"checkpoint-{epoch}"
        step.mkdir(parents=True)
        save_torch_state_dict({f"net.{k}": v for k, v in net.items()}, step, max_shard_size=600)
        (step / "trainer_state.json").write_text(json.dumps({"global_step": epoch}))
        (step / "optimizer.pt").write_bytes(b"optimizer state")
    return folder


def _trained(epochs: int):
    x, y = training.data()
    net = training.model()
    optim = training.optimizer(net, "adamw")
    for _ in range(epochs):
        for i in range(0, len(x), 64):
            optim.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64]).backward()
            optim.step()
        yield {k: v.clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_a_shard_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, where):
    run = _hf_run(tmp_path / "run")
    newest = run / "checkpoint-5"
    index_path = newest / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "x.safetensors"
    shutil.copy(newest / shard, victim)  # a real shard: without the check it would be read and rewritten
    name = "../../outside/x.safetensors" if where == "dotdot" else str(victim)
    index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    before, inputs = snapshot_of(outside), digest_tree(run)
    code, output = pdt("predict", run)
    assert code == 3, output
    line = one_error_line(output)
    assert "checkpoint-5" in line and "model.safetensors.index.json" in line and "x.safetensors" in line
    assert snapshot_of(outside) == before and digest_tree(run) == inputs
    assert not (tmp_path / "run.pdt" / "checkpoint-5.pdt").exists() and no_temporaries(run, outside)


def test_a_checkpoint_folder_linking_outside_is_refused(tmp_path):
    run = _hf_run(tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_text("someone else's file")
    newest = run / "checkpoint-5"
    (newest / "optimizer.pt").unlink()
    (newest / "optimizer.pt").symlink_to(secret)  # a non-weight file the fused copy would copy
    before = snapshot_of(outside)
    code, output = pdt("predict", run)
    assert code == 3, output
    line = one_error_line(output)
    assert "checkpoint-5" in line and "optimizer.pt" in line and "symbolic link" in line
    assert snapshot_of(outside) == before
    assert not (tmp_path / "run.pdt" / "checkpoint-5.pdt").exists() and no_temporaries(run)


# ---- PyTorch DCP: metadata naming files outside the checkpoint --------------------------------


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
def test_dcp_metadata_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, where):
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    for epoch, state in enumerate(_trained(5), start=1):
        dcp.save({"model": state, "step": epoch}, checkpoint_id=run / f"step_{epoch}")
    newest = run / "step_5"
    outside = tmp_path / "outside"
    outside.mkdir()
    data_file = next(newest.glob("*.distcp"))
    victim = outside / data_file.name
    shutil.copy(data_file, victim)  # the real bytes, so the rewrite would have gone through
    name = f"../../outside/{data_file.name}" if where == "dotdot" else str(victim)
    with open(newest / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)
    metadata.storage_data = {index: dataclasses.replace(info, relative_path=name)
                             for index, info in metadata.storage_data.items()}
    with open(newest / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    before, inputs = snapshot_of(outside), digest_tree(run)
    code, output = pdt("predict", run)
    assert code == 3, output
    line = one_error_line(output)
    assert "step_5" in line and ".metadata" in line and data_file.name in line
    assert snapshot_of(outside) == before and digest_tree(run) == inputs
    assert not (run / "step_5.pdt").exists() and no_temporaries(run, outside)


# ---- links where pdt writes -------------------------------------------------------------------


def test_in_place_on_a_symlinked_newest_checkpoint_is_refused(sgd_run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "epoch_8.pt"
    os.replace(sgd_run / "epoch_8.pt", target)
    (sgd_run / "epoch_8.pt").symlink_to(target)
    before = snapshot_of(outside)
    code, output = pdt("predict", sgd_run, "--in-place")
    assert code == 5, output
    line = one_error_line(output)
    assert "epoch_8.pt" in line and "symbolic link" in line
    assert snapshot_of(outside) == before and no_temporaries(outside, sgd_run)
    assert (sgd_run / "epoch_8.pt").is_symlink()
    # the default output is still there for whoever wants it, and is written beside the link
    code, output = pdt("predict", sgd_run, "--json")
    assert code == 0 and json.loads(output)["output"] == str(sgd_run / "epoch_8.pdt.pt")
    assert snapshot_of(outside) == before


def test_links_planted_where_pdt_writes_are_replaced_or_refused_never_followed(sgd_run, tmp_path):
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "file.bin").write_bytes(b"keep me")
    (outside / "dir" / "inner.bin").write_bytes(b"keep me too")
    before = snapshot_of(outside)
    # a leftover-looking temporary that is a link to a folder: sweeping it must not empty the folder
    (sgd_run / ".epoch_8.pdt.pt.pdt-tmp-1").symlink_to(outside / "dir")
    # the default output name, planted as a link: the output replaces the link
    (sgd_run / "epoch_8.pdt.pt").symlink_to(outside / "file.bin")
    # the store's matrix file, planted before the store exists
    (sgd_run / ".pdt").mkdir()
    (sgd_run / ".pdt" / "snapshots.bin").symlink_to(outside / "file.bin")
    code, output = pdt("predict", sgd_run, "--json")
    assert code == 0, output
    assert snapshot_of(outside) == before
    fused = sgd_run / "epoch_8.pdt.pt"
    assert not fused.is_symlink() and torch.load(fused, weights_only=True)["epoch"] == 8
    assert not (sgd_run / ".pdt" / "snapshots.bin").is_symlink()
    assert not (sgd_run / ".epoch_8.pdt.pt.pdt-tmp-1").exists()


@pytest.mark.parametrize("name", ["lock", ".pdt"])
def test_a_linked_lock_or_store_folder_is_refused(sgd_run, tmp_path, name):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file.bin").write_bytes(b"truncating this would lose it")
    if name == "lock":
        (sgd_run / ".pdt").mkdir()
        (sgd_run / ".pdt" / "lock").symlink_to(outside / "file.bin")
    else:
        (sgd_run / ".pdt").symlink_to(outside)
    before = snapshot_of(outside)
    code, output = pdt("predict", sgd_run)
    assert code == 4, output
    assert "symbolic link" in one_error_line(output)
    assert snapshot_of(outside) == before


def _edit_store(folder: Path, edit) -> None:
    """Change the store's records as a determined attacker would: checksum recomputed."""
    path = folder / ".pdt" / "store.h5"
    with h5py.File(path, "r+") as f:
        records = {name: f[name][()] for name in ("state", "layout", "history")}
        records.update({f"{g}/{n}": f[g][n][()] for g in ("fit", "mask", "matrix") if g in f for n in f[g]})
        state = json.loads(records["state"])
        edit(state)
        records["state"] = json.dumps(state)
        del f["state"]
        f.create_dataset("state", data=records["state"])
        f.attrs["checksum"] = _checksum(records)


@pytest.mark.parametrize("field", ["path", "backup"])
def test_restore_never_writes_where_a_crafted_store_points(sgd_run, tmp_path, field):
    assert pdt("predict", sgd_run, "--in-place")[0] == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.pt"
    victim.write_bytes(b"not yours")

    def point_outside(state: dict) -> None:
        state["outputs"][-1][field] = str(victim)

    _edit_store(sgd_run, point_outside)
    before, inputs = snapshot_of(outside), digest_tree(sgd_run)
    code, output = pdt("restore", sgd_run)
    assert code == 4, output
    assert "outside" in one_error_line(output)
    assert snapshot_of(outside) == before and digest_tree(sgd_run) == inputs


def test_a_store_naming_a_checkpoint_outside_its_folder_writes_nothing_there(sgd_run, tmp_path):
    assert pdt("predict", sgd_run, "--dry-run")[0] == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "epoch_8.pt").write_bytes(b"not yours")

    def move_newest(state: dict) -> None:
        newest = state["snapshots"][str(state["fit"]["window"][-1])]
        newest["path"] = str(outside / "epoch_8.pt")

    _edit_store(sgd_run, move_newest)
    before = snapshot_of(outside)
    for args in (["apply", sgd_run], ["apply", sgd_run, "--in-place"]):
        code, output = pdt(*args)
        assert code == 4, output
        assert "outside its checkpoint folder" in one_error_line(output)
    assert snapshot_of(outside) == before and sorted(p.name for p in outside.iterdir()) == ["epoch_8.pt"]


def test_a_hard_linked_newest_checkpoint_is_replaced_not_written_through(sgd_run, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.link(sgd_run / "epoch_8.pt", outside / "epoch_8.pt")
    before = snapshot_of(outside)
    assert pdt("predict", sgd_run, "--in-place")[0] == 0
    assert snapshot_of(outside) == before
    assert (sgd_run / "epoch_8.pt").read_bytes() != before[str(outside / "epoch_8.pt")][0]


# ---- a damaged store ----------------------------------------------------------------------------


def _record_bytes(path: Path) -> list[int]:
    """Where in store.h5 the records' own bytes lie (contiguous datasets: offset and size)."""
    spans = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name != "snapshots" and obj.id.get_offset() is not None:
                start = obj.id.get_offset()
                spans.extend(range(start, start + obj.id.get_storage_size()))
        f.visititems(visit)
    return spans


def test_a_damaged_store_is_refused_and_rebuilt(sgd_run):
    assert pdt("predict", sgd_run, "--dry-run")[0] == 0
    clean = json.loads(pdt("predict", sgd_run, "--dry-run", "--json")[1])
    path = sgd_run / ".pdt" / "store.h5"
    original = path.read_bytes()
    rng = np.random.default_rng(0)
    records = _record_bytes(path)
    anywhere = [int(i) for i in rng.integers(len(original), size=40)]
    in_records = [records[int(i)] for i in rng.integers(len(records), size=20)]
    for where in anywhere + in_records:
        damaged = bytearray(original)
        damaged[where] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(damaged))
        code, output = pdt("predict", sgd_run, "--dry-run", "--json")
        if code == 0:  # the flip hit bytes nobody reads (free space, padding): the result is the clean one
            assert where not in records
            result = json.loads(output)
            assert (result["fit"], result["mask"]) == (clean["fit"], clean["mask"]), where
        else:
            assert code == 4, (where, output)
            assert "--rebuild" in output.splitlines()[0]
        path.write_bytes(original)

    path.write_bytes(original[: len(original) // 2])
    code, output = pdt("report", sgd_run)
    assert code == 4 and "--rebuild" in one_error_line(output)
    code, output = pdt("snapshot", sgd_run, "--rebuild", "--json")
    assert code == 0 and len(json.loads(output)["ingested"]) == 5
    assert pdt("predict", sgd_run, "--json")[0] == 0


def test_a_store_whose_records_lack_a_field_is_a_store_error(sgd_run):
    assert pdt("snapshot", sgd_run)[0] == 0
    _edit_store(sgd_run, lambda state: state.pop("window"))
    code, output = pdt("predict", sgd_run)
    assert code == 4 and "'window'" in one_error_line(output) and "--rebuild" in output


# ---- found by an adversarial review: each once let a folder reach outside itself -------------------


def _store_records(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        records = {name: f[name][()] for name in ("state", "layout", "history")}
        records.update({f"{g}/{n}": f[g][n][()] for g in ("fit", "mask", "matrix") if g in f for n in f[g]})
    return records


def test_a_store_planted_at_the_top_of_a_folder_cannot_name_another_folder(sgd_run, tmp_path):
    assert pdt("predict", sgd_run)[0] == 0
    victim_folder = tmp_path / "outside"
    victim_folder.mkdir()
    victim = victim_folder / "canary.bin"
    victim.write_bytes(b"keep me")
    planted = tmp_path / "downloaded"
    shutil.copytree(sgd_run, planted, ignore=shutil.ignore_patterns(".pdt"))
    for name in ("store.h5", "snapshots.bin"):
        shutil.copy(sgd_run / ".pdt" / name, planted / name)
    (planted / "backups").mkdir()
    (planted / "backups" / "p").write_bytes(b"ATTACKER PAYLOAD")
    records = _store_records(planted / "store.h5")
    state = json.loads(records["state"])
    stat = victim.stat()
    state["folder"] = str(victim_folder)
    state["pending_in_place"] = {"path": str(victim), "backup": str(planted / "backups" / "p"),
                                 "size": stat.st_size, "mtime": stat.st_mtime}
    records["state"] = json.dumps(state)
    with h5py.File(planted / "store.h5", "r+") as f:
        del f["state"]
        f.create_dataset("state", data=records["state"])
        f.attrs["checksum"] = _checksum(records)
    before = snapshot_of(victim_folder)
    for command in ("report", "restore", "predict"):
        code, output = pdt(command, planted)
        assert code == 4 and "is not the .pdt folder" in one_error_line(output), (command, output)
    assert snapshot_of(victim_folder) == before


def test_a_store_cannot_read_records_through_links_or_other_files(sgd_run, tmp_path):
    assert pdt("predict", sgd_run)[0] == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("victim secret key material\n")
    path = sgd_run / ".pdt" / "store.h5"
    records = _store_records(path)
    with h5py.File(path, "w") as f:  # an old-format store (no checksum) with a link to an outside file
        f.attrs["format_version"] = 1
        for key, value in records.items():
            f[key] = value
        f.create_dataset("snapshots", shape=(27,), dtype="u1", external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
        f["fit/leak"] = h5py.SoftLink("/snapshots")
    before = path.read_bytes()
    code, output = pdt("report", sgd_run)
    assert code == 4 and "refused" in one_error_line(output)
    assert path.read_bytes() == before


def test_a_hard_linked_snapshot_matrix_is_refused(sgd_run, tmp_path):
    (sgd_run / "epoch_8.pt").rename(tmp_path / "epoch_8.pt")
    assert pdt("snapshot", sgd_run)[0] == 0
    matrix = sgd_run / ".pdt" / "snapshots.bin"
    victim = tmp_path / "victim.bin"
    victim.write_bytes(matrix.read_bytes())
    matrix.unlink()
    os.link(victim, matrix)
    (tmp_path / "epoch_8.pt").rename(sgd_run / "epoch_8.pt")
    before = snapshot_of(victim)
    code, output = pdt("snapshot", sgd_run)
    assert code == 4 and "hard links" in one_error_line(output)
    assert snapshot_of(victim) == before


def test_a_file_planted_under_the_backup_name_does_not_replace_the_backup(sgd_run):
    original = (sgd_run / "epoch_8.pt").read_bytes()
    assert pdt("snapshot", sgd_run)[0] == 0
    backups = sgd_run / ".pdt" / "backups"
    backups.mkdir()
    for snapshot_id in range(1, 12):  # every name the backup of epoch_8 could take
        (backups / f"{snapshot_id}-epoch_8.pt").write_bytes(b"planted")
    assert pdt("predict", sgd_run, "--in-place")[0] == 0
    assert (sgd_run / "epoch_8.pt").read_bytes() != original
    assert pdt("restore", sgd_run)[0] == 0
    assert (sgd_run / "epoch_8.pt").read_bytes() == original


def _dcp_run(folder: Path, epochs: int = 5) -> Path:
    import torch.distributed.checkpoint as dcp

    for epoch, state in enumerate(_trained(epochs), start=1):
        dcp.save({"model": state, "step": epoch}, checkpoint_id=folder / f"step_{epoch}")
    return folder


@pytest.mark.slow
def test_a_pipe_in_a_checkpoint_folder_is_refused_without_blocking(tmp_path):
    run = _dcp_run(tmp_path / "run")
    os.mkfifo(run / "step_5" / "pipe.distcp")
    done = subprocess.run([sys.executable, "-m", "pdtcli", "predict", str(run)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3 and "pipe.distcp" in done.stderr and "not a regular file" in done.stderr


class _Allocate:
    """A .metadata entry that would call a torch constructor found in DCP's own module."""

    def __reduce__(self):
        from torch.distributed.checkpoint import filesystem

        return (filesystem.Tensor, (2 ** 40,))


def test_dcp_metadata_may_name_only_dcp_record_types(tmp_path):
    run = _dcp_run(tmp_path / "run")
    with open(run / "step_5" / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)
    metadata.planner_data = _Allocate()
    with open(run / "step_5" / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    code, output = pdt("predict", run)
    assert code == 3 and "refused .metadata" in one_error_line(output)


@pytest.mark.parametrize("case", ["nested-msgpack", "nul-shard", "loop-link"])
def test_malformed_inputs_end_in_one_line_not_a_traceback(tmp_path, sgd_run, case):
    if case == "nested-msgpack":  # under msgpack's own depth limit, over Python's recursion limit
        (sgd_run / "x.msgpack").write_bytes(b"\x81\xa1a" * 990 + b"\xc0")
        code, output = pdt("predict", sgd_run)
        assert code == 0 or (code == 3 and "x.msgpack" in one_error_line(output)), output
        return
    run = _hf_run(tmp_path / "run")
    newest = run / "checkpoint-5"
    if case == "nul-shard":
        index_path = newest / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"] = {k: "model\x00.safetensors" for k in index["weight_map"]}
        index_path.write_text(json.dumps(index))
    else:
        (newest / "loop").symlink_to(".")
    code, output = pdt("predict", run)
    assert code == 3 and "checkpoint-5" in one_error_line(output), output


def test_a_store_folder_that_is_a_file_is_a_store_error(sgd_run):
    (sgd_run / ".pdt").write_bytes(b"not a folder")
    code, output = pdt("predict", sgd_run)
    assert code == 4 and "is not a folder" in one_error_line(output)


# ---- found by a review of the restructured store -------------------------------------------------


def test_a_rebuild_that_fails_puts_the_old_store_back(sgd_run):
    assert pdt("predict", sgd_run)[0] == 0
    before = _store_records(sgd_run / ".pdt" / "store.h5")
    data = (sgd_run / "epoch_8.pt").read_bytes()
    (sgd_run / "epoch_8.pt").write_bytes(data[: len(data) // 2])  # the rebuild will meet a bad checkpoint
    code, output = pdt("snapshot", sgd_run, "--rebuild")
    assert code == 3 and "epoch_8.pt" in one_error_line(output)
    after = _store_records(sgd_run / ".pdt" / "store.h5")
    assert json.loads(after["state"])["window"] == json.loads(before["state"])["window"]
    assert not [p for p in (sgd_run / ".pdt").iterdir() if p.name.startswith("before-rebuild")]
    (sgd_run / "epoch_8.pt").write_bytes(data)
    assert pdt("snapshot", sgd_run, "--rebuild")[0] == 0
    assert not [p for p in (sgd_run / ".pdt").iterdir() if p.name.startswith("before-rebuild")]


@pytest.mark.parametrize("damage", ["window-id", "path-type", "short-offsets", "length"])
def test_a_store_whose_records_disagree_is_a_store_error(sgd_run, damage):
    assert pdt("predict", sgd_run, "--dry-run")[0] == 0
    path = sgd_run / ".pdt" / "store.h5"
    records = _store_records(path)
    state = json.loads(records["state"])
    if damage == "window-id":
        state["window"][-1] = 99
    elif damage == "path-type":
        next(iter(state["snapshots"].values()))["path"] = 7
    elif damage == "length":
        state["n"] -= 1
    else:
        records["mask/byte_offsets"] = records["mask/byte_offsets"][:-1]
    records["state"] = json.dumps(state)
    with h5py.File(path, "r+") as f:
        for key in ("state", "mask/byte_offsets"):
            del f[key]
            f.create_dataset(key, data=records[key])
        f.attrs["checksum"] = _checksum(records)
    for command in ("report", "predict", "apply"):
        code, output = pdt(command, sgd_run)
        assert code == 4 and "unreadable store" in one_error_line(output), (command, output)


def test_a_recorded_backup_named_dot_dot_is_refused(sgd_run):
    assert pdt("predict", sgd_run, "--in-place")[0] == 0

    def point_up(state: dict) -> None:
        state["outputs"][-1]["backup"] = str(sgd_run / ".pdt" / "backups" / "..")

    _edit_store(sgd_run, point_up)
    code, output = pdt("restore", sgd_run)
    assert code == 4 and "outside" in one_error_line(output)


def test_a_writer_that_skips_a_predicted_tensor_publishes_nothing(sgd_run, monkeypatch):
    from pdtcli.formats.torch_pickle import TorchReader

    real = TorchReader.write_fused

    def skipping(self, out, fuse):
        class Blind:
            def wants(self, name):
                return fuse.wants(name) and name != "0.weight"

            def __call__(self, name, tensor):
                return fuse(name, tensor)

        real(self, out, Blind())

    monkeypatch.setattr(TorchReader, "write_fused", skipping)
    code, output = pdt("predict", sgd_run)
    assert code == 3 and "never reached tensor '0.weight'" in one_error_line(output)
    assert not (sgd_run / "epoch_8.pdt.pt").exists() and no_temporaries(sgd_run)


def test_a_failed_ingest_never_leaves_a_fit_reading_half_overwritten_values(sgd_run):
    later = sgd_run.parent / "later"
    later.mkdir()
    os.replace(sgd_run / "epoch_8.pt", later / "epoch_8.pt")
    assert pdt("predict", sgd_run)[0] == 0  # fused at 7: the fit reads 7's parent slot, outside the window
    bad = torch.load(later / "epoch_8.pt", weights_only=True)
    names = list(bad["model"])
    bad["model"][names[2]].view(-1)[0] = float("nan")  # fails after the first tensors were written
    torch.save(bad, sgd_run / "epoch_8.pt")
    code, output = pdt("predict", sgd_run)
    assert code == 3 and "NaN" in one_error_line(output)
    (sgd_run / "epoch_8.pt").unlink()
    code, output = pdt("apply", sgd_run, "-o", sgd_run.parent / "audit.pt")
    assert code == 6 and "newer checkpoint replaced the fit's window" in one_error_line(output)
    os.replace(later / "epoch_8.pt", sgd_run / "epoch_8.pt")
    assert json.loads(pdt("predict", sgd_run, "--json")[1])["status"] == "written"
