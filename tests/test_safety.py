"""Bad input and hostile conditions: a clear one-line error, a documented exit code, nothing lost.

The concurrency and kill tests use real `pdt` processes, as cron would start them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import training
from conftest import digest_tree
from typer.testing import CliRunner

from pdtcli import rawio
from pdtcli.cli import app

ROOT = Path(__file__).resolve().parents[1]


def pdt(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def pdt_process(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pdtcli", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def store_bytes(folder: Path) -> bytes:
    return (folder / ".pdt" / "store.h5").read_bytes()


class Payload:
    """What an attacker puts in a checkpoint: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_needs_code_is_carried_and_its_payload_never_runs(sgd_run, tmp_path):
    """pdt reads the archive's pickle without executing it: the payload is an inert placeholder, carried
    into the fused copy byte for byte (data.pkl as stored) and never called."""
    marker = tmp_path / "payload-ran"
    evil = torch.load(sgd_run / "epoch_8.pt", weights_only=True)
    evil["extra"] = Payload(marker)
    (sgd_run / "epoch_8.pt").unlink()
    torch.save(evil, sgd_run / "epoch_9.pt")
    code, output = pdt("predict", sgd_run)
    assert code == 0, output
    assert not marker.exists()
    with zipfile.ZipFile(sgd_run / "epoch_9.pt") as before, zipfile.ZipFile(sgd_run / "epoch_9.pdt.pt") as after:
        assert after.read("epoch_9/data.pkl") == before.read("epoch_9/data.pkl")


def test_a_legacy_pickle_that_needs_code_is_refused_and_its_payload_never_runs(sgd_run, tmp_path):
    """torch's pre-zip format is loaded by torch.load(weights_only=True), which refuses it."""
    marker = tmp_path / "payload-ran"
    evil = torch.load(sgd_run / "epoch_8.pt", weights_only=True)
    evil["extra"] = Payload(marker)
    (sgd_run / "epoch_8.pt").unlink()
    torch.save(evil, sgd_run / "epoch_9.pt", _use_new_zipfile_serialization=False)
    before = digest_tree(sgd_run)
    code, output = pdt("predict", sgd_run)
    assert code == 3
    assert output.strip().count("\n") == 0 and "epoch_9.pt" in output and "refused" in output
    assert not marker.exists()
    assert digest_tree(sgd_run) == before


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "npz"])
def test_a_truncated_newest_checkpoint_changes_nothing(tmp_path, fmt):
    training.train(tmp_path, 6, fmt=fmt)
    newest = tmp_path / f"epoch_6.{fmt}"
    data = newest.read_bytes()
    newest.unlink()
    assert pdt("snapshot", tmp_path)[0] == 0
    store = store_bytes(tmp_path)
    newest.write_bytes(data[: len(data) // 2])
    before = digest_tree(tmp_path)
    code, output = pdt("predict", tmp_path)
    assert code == 3, output
    assert output.strip().count("\n") == 0 and f"epoch_6.{fmt}" in output
    assert digest_tree(tmp_path) == before and store_bytes(tmp_path) == store


def test_duplicate_checkpoint_is_skipped_with_a_reason(sgd_run):
    shutil.copy(sgd_run / "epoch_8.pt", sgd_run / "epoch_9.pt")
    code, output = pdt("predict", sgd_run, "--json")
    payload = json.loads(output)
    assert code == 0 and payload["status"] == "written"
    assert any("same content as" in s["reason"] and s["path"].endswith("epoch_9.pt") for s in payload["skipped"])


def test_a_store_of_another_folder_or_a_newer_pdt_is_refused(sgd_run, tmp_path):
    assert pdt("predict", sgd_run)[0] == 0
    other = tmp_path / "other"  # a copy of the folder adopts its own .pdt (tests/test_runchange.py); --store
    shutil.copytree(sgd_run, other, ignore=shutil.ignore_patterns(".pdt"))  # naming another folder's is refused
    code, output = pdt("predict", other, "--store", sgd_run / ".pdt")
    assert code == 4 and "another folder" in output and "--store DIR" in output

    with h5py.File(sgd_run / ".pdt" / "store.h5", "r+") as f:
        f.attrs["format_version"] = 99
    store = store_bytes(sgd_run)
    code, output = pdt("report", sgd_run)
    assert code == 4 and "newer pdt" in output
    assert store_bytes(sgd_run) == store


def test_disk_full_while_writing_leaves_no_output_and_a_valid_store(sgd_run, monkeypatch):
    assert pdt("snapshot", sgd_run)[0] == 0

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)  # the torch writer's copy of the archive
    _disk_full_then_free(sgd_run, monkeypatch, "epoch_8.pdt.pt")


def _disk_full_then_free(run: Path, monkeypatch, output_name: str) -> None:
    """`predict` with the disk full (as patched): exit 5 naming the output, and nothing changed; with the
    disk free again, the step goes on."""
    before = digest_tree(run)
    code, output = pdt("predict", run)
    assert code == 5 and "No space left on device" in output and output_name in output
    assert digest_tree(run) == before  # no output, no temporary left behind
    monkeypatch.undo()
    code, output = pdt("predict", run, "--json")
    assert code == 0 and json.loads(output)["status"] == "written"


def test_output_folder_that_does_not_exist_is_an_output_error(sgd_run, tmp_path):
    code, output = pdt("predict", sgd_run, "-o", tmp_path / "missing" / "out.pt")
    assert code == 5 and "out.pt" in output


HOLD_LOCK = """
import sys
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()  # until the test says so
"""


@pytest.mark.slow
def test_a_second_pdt_waits_for_the_lock_or_fails_clearly(sgd_run):
    assert pdt("snapshot", sgd_run)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(sgd_run / ".pdt" / "lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waiting = pdt_process("predict", sgd_run, "--wait", "0.5")
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 4 and "locked by another pdt process" in err
    patient = pdt_process("predict", sgd_run, "--wait", "120", "--json")
    holder.communicate("release\n", timeout=60)  # the lock goes while the patient pdt waits or starts
    out, err = patient.communicate(timeout=180)
    assert patient.returncode == 0, err
    assert json.loads(out)["status"] == "written"


@pytest.mark.slow
def test_two_pdt_processes_at_once_never_corrupt_the_store(sgd_run):
    runs = [pdt_process("predict", sgd_run, "--json") for _ in range(2)]
    results = [(run.wait(timeout=120), run.stdout.read()) for run in runs]
    assert [code for code, _ in results] == [0, 0]
    statuses = sorted(json.loads(out)["status"] for _, out in results)
    assert statuses == ["up-to-date", "written"]
    fused = torch.load(sgd_run / "epoch_8.pdt.pt", weights_only=True)
    assert fused["epoch"] == 8
    assert pdt("report", sgd_run)[0] == 0


def _big_run(folder: Path) -> None:
    """Six checkpoints of a 2M-parameter trajectory, so that a step lasts long enough to be killed."""
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(2_000_000, generator=gen)
    velocity = torch.randn(2_000_000, generator=gen) * 1e-3
    for epoch in range(1, 7):
        weights = weights + velocity * (0.9 ** epoch)
        torch.save({"model": {"w": weights.reshape(1000, 2000).clone()}, "epoch": epoch}, folder / f"e_{epoch}.pt")


# Where a run is killed, in the order a step reaches them: mid-ingest, between two ingest
# commits, in the QR pass, half-way through writing the output, after the in-place backup,
# after the output is published but before the store records it, before the final commit,
# and before backups are pruned. Each is one SIGKILL at that call (tests/kill_at.py).
KILL_POINTS = [
    ("pdtcli.store.matrix:SnapshotMatrix.write", 1, "before"),
    ("pdtcli.store:Store.commit", 3, "after"),
    ("pdtcli.store.matrix:SnapshotMatrix.write", 3, "before"),
    ("pdtcli.fuse:Window.qr_factor", 1, "before"),
    ("pdtcli.formats.torch_pickle:_write", 1, "after"),  # the copy made, fused values half written
    ("pdtcli.atomic:keep_copy", 1, "after"),
    ("pdtcli.store.lineage:record_output", 1, "before"),
    ("pdtcli.store:Store.append_history", 1, "after"),
    ("pdtcli.api:prune_backups", 1, "before"),
]
IN_PLACE_ONLY = {"pdtcli.atomic:keep_copy", "pdtcli.api:prune_backups"}


def killed_at(point: tuple[str, int, str], *args) -> subprocess.CompletedProcess:
    target, nth, when = point
    return subprocess.run([sys.executable, str(ROOT / "tests" / "kill_at.py"), target, str(nth), when, "--",
                           *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("in_place", [False, True], ids=["beside", "in-place"])
def test_sigkill_at_any_point_leaves_inputs_store_and_outputs_valid(tmp_path, in_place):
    reference = tmp_path / "reference"
    _big_run(reference)
    assert pdt("predict", reference)[0] == 0
    expected = torch.load(reference / "e_6.pdt.pt", weights_only=True)["model"]["w"]

    folder = tmp_path / "killed"
    _big_run(folder)
    inputs = digest_tree(folder)
    args = ["predict", folder, *(["--in-place"] if in_place else [])]
    out = folder / ("e_6.pt" if in_place else "e_6.pdt.pt")
    backups = folder / ".pdt" / "backups"
    points = [p for p in KILL_POINTS if in_place or p[0] not in IN_PLACE_ONLY]
    for point in points:
        run = killed_at(point, *args)
        assert run.returncode == -signal.SIGKILL, (point, run.returncode, run.stderr)
        left = digest_tree(folder)
        if in_place and left["e_6.pt"] != inputs["e_6.pt"]:  # replaced: whole, and the original kept
            assert torch.equal(torch.load(out, weights_only=True)["model"]["w"], expected)
            assert inputs["e_6.pt"] in digest_tree(backups).values()
            left["e_6.pt"] = inputs["e_6.pt"]
        assert {k: v for k, v in left.items() if k in inputs} == inputs, point  # inputs untouched
        if out.exists() and not in_place:  # never half-written under its final name
            assert torch.equal(torch.load(out, weights_only=True)["model"]["w"], expected), point
    code, output = pdt(*args, "--json")
    assert code == 0, output
    assert torch.equal(torch.load(out, weights_only=True)["model"]["w"], expected)
    assert not [p for p in folder.iterdir() if ".pdt-tmp-" in p.name]
    assert np.isfinite(json.loads(pdt("report", folder, "--json")[1])["fit"]["singular_values"]).all()
    if in_place:
        assert inputs["e_6.pt"] in digest_tree(backups).values()
        assert pdt("restore", folder)[0] == 0
        assert digest_tree(folder) == inputs


def test_disk_full_on_the_writing_thread_leaves_no_output_and_a_valid_store(safetensors_run, monkeypatch):
    """The fused file is written by a thread beside pass 2 (`rawio.WriteBehind`): its failure must stop
    the step as one in the main thread would."""
    assert pdt("snapshot", safetensors_run)[0] == 0

    class FillsUp:
        def __init__(self, file) -> None:
            self.file, self.room = file, 3000  # the header and a few rows fit, then the disk is full

        def write(self, data) -> None:
            size = memoryview(data).nbytes
            if size > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= size
            self.file.write(data)

    start = rawio.WriteBehind.__init__
    monkeypatch.setattr(rawio.WriteBehind, "__init__", lambda self, dst, depth=2: start(self, FillsUp(dst), depth))
    _disk_full_then_free(safetensors_run, monkeypatch, ".pdt.safetensors")
