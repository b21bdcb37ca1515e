"""The operating system refuses: every such error is one line and a documented exit code.

Each condition is real, not mocked: a small tmpfs filled to the byte (ENOSPC), a file-size
limit on the pdt process (`ulimit -f`: EFBIG, as CPython ignores SIGXFSZ), a read-only bind
mount (EROFS), files of another user (EACCES) and a file where a folder is expected
(ENOTDIR). Files "of another user" are met by a pdt process whose uid is 0 but which lacks
root's capabilities to override file permissions (CAP_DAC_OVERRIDE and friends): the kernel
then checks modes and owners as for any user, and the process needs no access to the
interpreter's own folders that an unprivileged uid may lack. Mounting needs root; a test
whose condition this machine cannot make is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import training
from conftest import digest_tree
from typer.testing import CliRunner

from pdtcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
OTHER_USER = 65534  # nobody
# What lets root ignore file modes, dropped from the bounding set of the pdt process (util-linux's
# setpriv, as its own exec: no fork of this multi-threaded test process runs Python code)
WITHOUT_FILE_CAPABILITIES = ("setpriv", "--bounding-set", "-chown,-dac_override,-dac_read_search,-fowner,-fsetid",
                             "--")


def pdt(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def pdt_fails(expected: int, *args) -> str:
    """The one error line of an in-process `pdt` that must exit with `expected`."""
    code, output = pdt(*args)
    return one_error_line(output, code, expected)


def pdt_process(*args, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`pdt` in a process of its own, started through `prefix` (a command that sets a limit, then execs)."""
    return subprocess.run([*prefix, sys.executable, "-m", "pdtcli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def one_error_line(output: str, code: int, expected: int) -> str:
    """The one line a failure prints (no traceback, no 'a bug in pdt'), after checking the exit code."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == expected and len(lines) == 1 and lines[0].startswith("pdt: error: "), (code, output)
    return lines[0]


def files_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, the store's included, by relative name."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine cannot mount ({done.stderr.strip()}); run the test as root")


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    run_mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk))
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def leave_free(disk: Path, kib: int) -> Path:
    """Fill `disk` so that `kib` KiB stay free; the filler's path (remove it to free the space again)."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - kib * 1024
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` as a read-only bind mount of itself, while in the block."""
    run_mount("--bind", str(folder), str(folder))
    try:
        run_mount("-o", "remount,bind,ro", str(folder))
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def as_a_user(*args) -> subprocess.CompletedProcess:
    """`pdt` in a process that file modes and owners bind (see the module's docstring)."""
    if os.geteuid() != 0:
        pytest.skip("dropping root's file capabilities needs root")
    return pdt_process(*args, prefix=WITHOUT_FILE_CAPABILITIES)


def owned_by_another_user(path: Path) -> None:
    """`path` and all below it owned by another user, who lets others read but not write (folders 0755)."""
    for item in [path, *path.rglob("*")]:
        os.chown(item, OTHER_USER, OTHER_USER)
        if item.is_dir():
            item.chmod(0o755)


def new_checkpoint(folder: Path) -> None:
    """One more epoch of the same training, saved as the next checkpoint."""
    training.train(folder, 1, resume=folder / "epoch_8.pt")


# ---- a full disk: the snapshot matrix, store.h5, torch.save ------------------------------------


@pytest.mark.slow
def test_a_full_disk_while_writing_snapshots_bin_is_a_store_error_and_leaves_nothing(small_disk, tmp_path):
    # a model whose snapshot matrix (6 x 5892 float32, 141 KB) is far bigger than store.h5's first commit
    training.train(tmp_path / "big", 6, hidden=256)
    run = shutil.copytree(tmp_path / "big", small_disk / "ckpts")
    before = files_bytes(run)
    filler = leave_free(small_disk, 64)
    line = pdt_fails(4, "predict", run)
    assert "snapshots.bin: cannot write the snapshot matrix: No space left on device" in line
    assert files_bytes(run) == before  # no store left half made, no output
    filler.unlink()
    assert pdt("predict", run)[0] == 0


@pytest.mark.slow
def test_a_full_disk_while_writing_store_h5_is_one_line_and_keeps_the_store(small_disk, sgd_run):
    run = shutil.copytree(sgd_run, small_disk / "ckpts")
    assert pdt("predict", run)[0] == 0
    before = files_bytes(run)
    leave_free(small_disk, 0)
    line = pdt_fails(4, "mask", run, "--criteria", "sign")  # HDF5's message spans lines
    assert line.startswith(f"pdt: error: {run / '.pdt' / 'store.h5'}: cannot write: No space left on device")
    assert files_bytes(run) == before


@pytest.mark.slow
def test_a_full_disk_inside_torch_save_is_an_output_error(small_disk, sgd_run, tmp_path):
    """Given a path, torch's zip writer says `RuntimeError ... inline_container` on a full disk."""
    run = shutil.copytree(sgd_run, small_disk / "ckpts")
    store = tmp_path / "store"  # on another disk: only the output meets the full one
    assert pdt("snapshot", run, "--store", store)[0] == 0
    inputs, records = files_bytes(run), (store / "store.h5").read_bytes()
    filler = leave_free(small_disk, 0)
    line = pdt_fails(5, "predict", run, "--store", store)
    assert f"{run / 'epoch_8.pdt.pt'}: cannot write: No space left on device" in line
    # the fused values went only into a slot the committed records do not use
    assert files_bytes(run) == inputs and (store / "store.h5").read_bytes() == records
    filler.unlink()
    assert pdt("predict", run, "--store", store)[0] == 0 and (run / "epoch_8.pdt.pt").is_file()


@pytest.mark.slow
def test_a_file_size_limit_is_one_line(sgd_run):
    """`ulimit -f`: CPython ignores SIGXFSZ, so the write fails with EFBIG instead of killing pdt."""
    before = digest_tree(sgd_run)
    done = pdt_process("predict", sgd_run, prefix=("prlimit", "--fsize=16384", "--"))  # below the 17760-byte matrix
    line = one_error_line(done.stderr, done.returncode, 4)
    assert "snapshots.bin: cannot make the snapshot matrix: File too large" in line and "ulimit -f" in line
    assert digest_tree(sgd_run) == before and not (sgd_run / ".pdt").exists()


# ---- other users' files, read-only media -----------------------------------------------------


@pytest.mark.slow
def test_a_folder_the_user_may_not_write_is_a_store_error(sgd_run):
    owned_by_another_user(sgd_run)
    before = files_bytes(sgd_run)
    done = as_a_user("predict", sgd_run)
    line = one_error_line(done.stderr, done.returncode, 4)
    assert f"{sgd_run / '.pdt'}: cannot make the store folder" in line and "Permission denied" in line
    assert files_bytes(sgd_run) == before


@pytest.mark.slow
def test_a_store_of_another_user_is_reported_but_not_changed(sgd_run):
    assert pdt("predict", sgd_run)[0] == 0
    new_checkpoint(sgd_run)
    owned_by_another_user(sgd_run / ".pdt")
    before = files_bytes(sgd_run)
    done = as_a_user("predict", sgd_run)
    line = one_error_line(done.stderr, done.returncode, 4)
    assert f"{sgd_run / '.pdt' / 'lock'}: cannot lock the store" in line and "Permission denied" in line
    report = as_a_user("report", sgd_run)
    assert report.returncode == 0 and "upper+sign" in report.stdout, report.stderr
    assert report.stderr.strip() == (f"pdt: note: {sgd_run / '.pdt'}: read without the lock (Permission denied); "
                                     "it shows the store as last committed")
    assert files_bytes(sgd_run) == before


@pytest.mark.slow
@pytest.mark.parametrize("when", ["hashed-first", "hashed-behind", "carried-over"])
def test_an_unreadable_checkpoint_is_a_checkpoint_error(sgd_run, when):
    """More new checkpoints than the window holds are hashed before any is opened; one new checkpoint is
    opened first and hashed on a thread beside the read; the newest of the window, touched since it was
    ingested, is hashed again before its content is carried over into the output: each meets the
    unreadable file."""
    newest = sgd_run / "epoch_8.pt"
    if when != "hashed-first":
        assert pdt("snapshot", sgd_run)[0] == 0
    if when == "hashed-behind":
        new_checkpoint(sgd_run)
        newest = sgd_run / "epoch_9.pt"
    if when == "carried-over":
        os.utime(newest, (1, 1))
    newest.chmod(0)
    before = files_bytes(sgd_run)
    done = as_a_user("predict", sgd_run)
    line = one_error_line(done.stderr, done.returncode, 3)
    assert f"{newest}: cannot read: Permission denied" in line
    after = files_bytes(sgd_run)
    if when == "carried-over":  # the touched file was noted as passed over (a commit of its own) before the fit
        del before[".pdt/store.h5"], after[".pdt/store.h5"]
    assert after == before and (sgd_run / ".pdt").exists() == (when != "hashed-first")


@pytest.mark.slow
def test_a_read_only_mount_refuses_changes_and_still_reports(sgd_run):
    assert pdt("predict", sgd_run)[0] == 0
    new_checkpoint(sgd_run)
    before = files_bytes(sgd_run)
    with read_only(sgd_run):
        line = pdt_fails(4, "predict", sgd_run)
        assert "cannot lock the store" in line and "Read-only file system" in line
        code, output = pdt("report", sgd_run, "--json")
        assert code == 0 and '"unlocked": "read without the lock (Read-only file system)' in output, output
    assert files_bytes(sgd_run) == before


# ---- a file where a folder is expected ---------------------------------------------------------


def test_a_store_below_a_regular_file_is_one_line(sgd_run, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    before = digest_tree(sgd_run)
    line = pdt_fails(4, "predict", sgd_run, "--store", tmp_path / "file" / "store")
    assert f"{tmp_path / 'file' / 'store'}: cannot make the store folder" in line
    assert "Not a directory; a part of this path is a file, not a folder" in line
    assert digest_tree(sgd_run) == before and (tmp_path / "file").read_text() == "not a folder"
