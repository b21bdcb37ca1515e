"""Paths the user chooses never land on what pdt reads, and `--force` replaces only what may go.

`-o`, the default output, `report --plot` and `--store` are refused (one line) when they are,
hold or lie inside the checkpoint folder, an input checkpoint or the store, with `--force` or
without; `--force` never replaces a folder pdt did not write, a device, a pipe or a socket. Each
refusal leaves every file's bytes and times as they were, the store's included. The folder is a
Trainer-style run: `checkpoint-N/` folders saved each epoch of real AdamW training with
safetensors' `save_file` (as `save_pretrained` saves) and `torch.save` (the optimizer).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest
import torch
import training
from safetensors.torch import save_file
from test_hostile import _edit_store, one_error_line, pdt, snapshot_of

from pdtcli.store.records import Seen

EVERY = 5  # steps between checkpoints: checkpoint-5 … checkpoint-30


def _save_trainer_epochs(run: Path, epochs: int) -> None:
    """Train the test MLP with AdamW and save `checkpoint-<step>/` after each epoch as Trainer does."""
    x, y = training.data()
    net = training.model()
    optim = training.optimizer(net, "adamw")
    for epoch in range(1, epochs + 1):
        training.train_epoch(net, optim, x, y, epoch)
        folder = run / f"checkpoint-{epoch * EVERY}"
        folder.mkdir(parents=True)
        save_file({f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}, folder / "model.safetensors",
                  metadata={"format": "pt"})
        torch.save(optim.state_dict(), folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": epoch * EVERY, "epoch": epoch}))
        (folder / "config.json").write_text(json.dumps({"model_type": "pdt-test-mlp", "hidden": 32}))


@pytest.fixture(scope="module")
def _trainer_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trainer") / "run"
    _save_trainer_epochs(run, 6)
    return run


@pytest.fixture
def run(_trainer_run, tmp_path) -> Path:
    """A private Trainer-style folder of six checkpoints, with a store that holds a fit and a mask."""
    run = shutil.copytree(_trainer_run, tmp_path / "run")
    code, output = pdt("predict", run, "--dry-run")
    assert code == 0, output
    return run


def state_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and times of every file under `folder`, the store's included (its lock aside: taking
    it is not a write of pdt's data), and the kind of every other entry."""
    found = {k: v for k, v in snapshot_of(folder).items() if Path(k).name != "lock"}
    found.update({str(p): (stat.S_IFMT(p.lstat().st_mode), p.lstat().st_rdev) for p in folder.rglob("*")
                  if not p.is_file() and not p.is_dir()})
    return found


def _refused(code: int, output: str, shown: Path, *words: str) -> None:
    line = one_error_line(output)
    assert code == 5, output
    assert line.startswith(f"pdt: error: {shown}: ") and all(w in line for w in words), line


# ---- the examples of the issue --------------------------------------------------------------------


OVER_INPUTS = {  # -o PATH (relative to the tmp folder that holds RUN) -> what the error line says
    "the folder": ("run", "is the checkpoint folder"),
    "the folder, named with ..": ("run/checkpoint-5/..", "is the checkpoint folder"),
    "a folder above it": ("run/..", "holds the checkpoint folder"),
    "the newest checkpoint": ("run/checkpoint-30", "is the input checkpoint"),
    "an older checkpoint, through ..": ("run/checkpoint-5/../checkpoint-10", "is the input checkpoint"),
    "a checkpoint, through a linked folder": ("link/checkpoint-30", "is the input checkpoint"),
    "a file of a checkpoint": ("run/checkpoint-30/model.safetensors", "lies inside the input checkpoint"),
    "the store's matrix": ("run/.pdt/snapshots.bin", "lies inside the store"),
    "the store": ("run/.pdt", "is the store"),
}


@pytest.mark.parametrize("command", ["apply", "predict"])
@pytest.mark.parametrize("case", list(OVER_INPUTS))
def test_an_output_on_the_inputs_or_the_store_is_refused_even_with_force(run, command, case):
    given, says = OVER_INPUTS[case]
    (run.parent / "link").symlink_to(run, target_is_directory=True)
    out = run.parent / given
    before = state_of(run.parent)
    code, output = pdt(command, run, "-o", out, "--force")
    _refused(code, output, out, says, "never writes over its inputs", "--in-place")
    assert state_of(run.parent) == before
    assert pdt("apply", run, "--force")[0] == 0  # the store still works


def test_a_relative_output_path_is_compared_resolved(run, monkeypatch):
    monkeypatch.chdir(run / "checkpoint-5")
    before = state_of(run)
    code, output = pdt("apply", "..", "-o", "../checkpoint-30", "--force")
    _refused(code, output, Path("../checkpoint-30"), "is the input checkpoint")
    assert state_of(run) == before


def test_a_folder_pdt_did_not_write_is_never_replaced(run, tmp_path):
    kept = tmp_path / "results"
    kept.mkdir()
    (kept / "notes.txt").write_text("a week of measurements")
    before = state_of(tmp_path)
    for command in ("apply", "predict"):
        code, output = pdt(command, run, "-o", kept, "--force")
        _refused(code, output, kept, "is a folder pdt did not write")
    assert state_of(tmp_path) == before


def _char_device(path: Path) -> None:
    os.mknod(path, 0o600 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)  # root may: a second /dev/null


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))


@pytest.mark.parametrize(("make", "kind"), [(_char_device, "a character device"), (os.mkfifo, "a pipe"),
                                            (_socket, "a socket")], ids=["device", "fifo", "socket"])
@pytest.mark.parametrize("command", ["apply", "predict"])
def test_a_device_pipe_or_socket_is_never_replaced(run, tmp_path, make, kind, command):
    node = tmp_path / "node"
    make(node)
    before = state_of(tmp_path)
    code, output = pdt(command, run, "-o", node, "--force")
    _refused(code, output, node, f"is {kind}")
    assert state_of(tmp_path) == before


def test_the_default_output_is_never_a_checkpoint_the_store_ingested(sgd_run):
    """A file of the user's that carries pdt's tag and that the store ingested as a checkpoint."""
    assert pdt("predict", sgd_run, "--dry-run")[0] == 0
    theirs = sgd_run / "epoch_8.pdt.pt"
    shutil.copy2(sgd_run / "epoch_7.pt", theirs)

    def ingested_theirs(state: dict) -> None:
        size, mtime = theirs.stat().st_size, theirs.stat().st_mtime
        state["ingested"].append(Seen(str(theirs), size, mtime, 8, None, None, "ingested", "now").as_dict())

    _edit_store(sgd_run, ingested_theirs)
    before = state_of(sgd_run)
    for args in (["predict"], ["apply", "--force"]):
        code, output = pdt(args[0], sgd_run, *args[1:])
        _refused(code, output, theirs, "is the input checkpoint")
    assert state_of(sgd_run) == before


# ---- what --force still replaces --------------------------------------------------------------------


@pytest.mark.parametrize("command", ["apply", "predict"])
def test_force_replaces_what_pdt_wrote_and_a_plain_file(run, tmp_path, command):
    audit = tmp_path / "audit"
    assert pdt("apply", run, "-o", audit)[0] == 0
    assert (audit / "model.safetensors").is_file()
    (audit / "stale.txt").write_text("left over")
    code, output = pdt(command, run, "-o", audit)
    assert code == 5 and "--force" in one_error_line(output)
    code, output = pdt(command, run, "-o", audit, "--force")
    assert code == 0, output
    assert not (audit / "stale.txt").exists() and (audit / "model.safetensors").is_file()

    plain = tmp_path / "plain.txt"  # a name a folder output may take (not a checkpoint file suffix: the -o rule)
    plain.write_bytes(b"an old note")
    code, output = pdt(command, run, "-o", plain, "--force")
    assert code == 0, output
    assert (plain / "model.safetensors").is_file()


def test_force_replaces_a_file_pdt_wrote_and_predict_renews_its_default_output(sgd_run, tmp_path):
    audit = tmp_path / "audit.pt"
    assert pdt("predict", sgd_run, "-o", audit)[0] == 0
    assert pdt("mask", sgd_run, "--criteria", "sign")[0] == 0
    first = audit.read_bytes()
    assert pdt("apply", sgd_run, "-o", audit, "--force")[0] == 0
    assert audit.read_bytes() != first
    assert pdt("predict", sgd_run)[0] == 0
    default = sgd_run / "epoch_8.pdt.pt"
    default.write_bytes(b"left by a killed run")  # not recorded: pdt's by its name
    assert pdt("predict", sgd_run, "--tau", "3")[0] == 0
    assert torch.load(default, weights_only=True)["epoch"] == 8


# ---- report --plot --------------------------------------------------------------------------------


PLOTS = {
    "in the store": ("run/.pdt/report.png", "lies inside the store"),
    "in a checkpoint": ("run/checkpoint-30/report.png", "lies inside the input checkpoint"),
    "the folder": ("run", "is the checkpoint folder"),
}


@pytest.mark.parametrize("case", list(PLOTS))
def test_a_plot_on_the_inputs_or_the_store_is_refused(run, case):
    given, says = PLOTS[case]
    path = run.parent / given
    before = state_of(run.parent)
    code, output = pdt("report", run, "--plot", path)
    _refused(code, output, path, says)
    assert state_of(run.parent) == before


def test_a_plot_replaces_a_file_never_a_pipe(run, tmp_path):
    pytest.importorskip("matplotlib")
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    before = state_of(tmp_path)
    code, output = pdt("report", run, "--plot", pipe)
    _refused(code, output, pipe, "is a pipe")
    assert state_of(tmp_path) == before
    old = tmp_path / "old.png"
    old.write_bytes(b"last week's picture")
    code, output = pdt("report", run, "--plot", old)
    assert code == 0, output
    assert old.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- --store ------------------------------------------------------------------------------------


STORES = {
    "the folder": ("run", "is the checkpoint folder"),
    "a folder above it": ("run/..", "holds the checkpoint folder"),
    "a checkpoint": ("run/checkpoint-30", "is the input checkpoint"),
    "inside a checkpoint": ("run/checkpoint-30/pdt", "lies inside the input checkpoint"),
}


@pytest.mark.parametrize("command", ["snapshot", "predict"])
@pytest.mark.parametrize("case", list(STORES))
def test_a_store_among_the_checkpoints_is_refused(_trainer_run, tmp_path, case, command):
    run = shutil.copytree(_trainer_run, tmp_path / "run")
    given, says = STORES[case]
    store = tmp_path / given
    before = state_of(tmp_path)
    code, output = pdt(command, run, "--store", store)
    line = one_error_line(output)
    assert code == 2, output
    assert line.startswith(f"pdt: error: {store}: --store {says}") and "(the default is" in line, line
    assert state_of(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_store_in_a_folder_of_other_files_is_refused(_trainer_run, tmp_path):
    run = shutil.copytree(_trainer_run, tmp_path / "run")
    theirs = tmp_path / "results"
    (theirs / "backups").mkdir(parents=True)
    (theirs / "backups" / "week1.csv").write_text("a week of measurements")
    (theirs / "snapshots.bin").write_bytes(b"a camera's frames")
    before = state_of(tmp_path)
    code, output = pdt("predict", run, "--store", theirs)
    line = one_error_line(output)
    assert code == 2 and line.startswith(f"pdt: error: {theirs}: --store names a folder that holds backups"), output
    assert state_of(tmp_path) == before


def test_a_store_apart_from_the_checkpoints_works(_trainer_run, tmp_path):
    run = shutil.copytree(_trainer_run, tmp_path / "run")
    (tmp_path / "empty").mkdir()
    for store in (tmp_path / "stores" / "run", run / "pdt-store", tmp_path / "empty"):
        code, output = pdt("predict", run, "--store", store)
        assert code == 0, output
        assert (store / "store.h5").is_file()
        assert (tmp_path / "run.pdt" / "checkpoint-30.pdt" / "model.safetensors").is_file()
