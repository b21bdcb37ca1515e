"""Breaks found by an adversarial pass over the "nothing lost" work (issue 20), one test each.

Each builds its condition for real (real checkpoints from a tiny training run, real file modes, real
processes) and checks what the user sees: the exit code, the one error line, and the files kept.
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import test_oserrors
import training
from test_oserrors import as_a_user, files_bytes, leave_free, one_error_line, pdt, pdt_process
from test_safety import killed_at


def test_an_audit_copy_named_as_the_next_checkpoint_is_ingested_once_training_saves_over_it(sgd_run):
    """`pdt apply -o DIR/epoch_9.pt` puts an audit copy where training saves its next checkpoint; once
    training has saved over it, the file is training's checkpoint, never passed over as pdt's output
    (which left the window without epoch 9: a gap in the trajectory, or 'up-to-date' for ever)."""
    assert pdt("predict", sgd_run)[0] == 0
    audit = sgd_run / "epoch_9.pt"
    assert pdt("apply", sgd_run, "-o", audit)[0] == 0
    code, output = pdt("predict", sgd_run, "--json")
    assert code == 0 and json.loads(output)["status"] == "up-to-date", output  # the audit itself is pdt's
    training.train(sgd_run, 1, resume=sgd_run / "epoch_8.pt")  # saves epoch_9.pt over the audit
    code, output = pdt("predict", sgd_run, "--json")
    assert code == 0 and json.loads(output)["status"] == "written", output
    assert (sgd_run / "epoch_9.pdt.pt").is_file()
    code, output = pdt("apply", sgd_run, "-o", audit, "--force")  # now an input: refused, --force or not
    assert "is the input checkpoint" in one_error_line(output, code, 5)


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["sgd_run", "safetensors_run"])
def test_an_unreadable_checkpoint_of_the_window_names_the_way_out(fixture, request):
    """`pdt apply` (the window's newest checkpoint opened by its format's reader, not by ingest) on a
    checkpoint this user may not read: the line says what to do, as every other OS error does."""
    run = request.getfixturevalue(fixture)
    assert pdt("predict", run)[0] == 0
    newest = max((p for p in run.glob("epoch_*") if ".pdt" not in p.name),
                 key=lambda p: int(p.name.split("_")[1].split(".")[0]))
    newest.chmod(0)
    done = as_a_user("apply", run, "-o", run.parent / f"audit{newest.suffix}")
    line = one_error_line(done.stderr, done.returncode, 3)
    assert line.endswith(f"{newest}: cannot read: Permission denied; run pdt as a user who may, or give this "
                         "user access"), line


@pytest.mark.slow
@pytest.mark.parametrize("how", ["rebuild-killed", "store.h5-deleted"])
def test_backups_no_store_records_are_kept_not_pruned(sgd_run, how):
    """`--in-place` replaced epoch_9.pt, whose only other copy is `.pdt/backups/`. A rebuild killed just after
    it moved store.h5 aside (SIGKILL, before it moved backups/), or a store.h5 deleted by hand, leaves backups
    no store records: the next run must keep them aside as a rebuild does, never prune them as strangers."""
    training.train(sgd_run, 1, resume=sgd_run / "epoch_8.pt")
    original = (sgd_run / "epoch_9.pt").read_bytes()
    assert pdt("predict", sgd_run, "--in-place")[0] == 0
    if how == "rebuild-killed":  # the first rename of Store.set_aside moves store.h5
        killed = killed_at(("pdtcli.store:os.replace", 1, "after"), "snapshot", sgd_run, "--rebuild")
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert (sgd_run / ".pdt" / "backups").is_dir() and not (sgd_run / ".pdt" / "store.h5").exists()
    else:
        (sgd_run / ".pdt" / "store.h5").unlink()
    training.train(sgd_run, 1, resume=sgd_run / "epoch_9.pt")  # training goes on, pdt with it
    code, output = pdt("predict", sgd_run, "--in-place")
    assert code == 0, output
    kept = [p.read_bytes() for p in (sgd_run / ".pdt").glob("before-rebuild-*/backups/*")]
    assert original in kept


disk = test_oserrors.small_disk  # the 1 MiB tmpfs fixture, under a name of this module


@pytest.mark.slow
def test_a_disk_that_fills_while_hdf5_writes_store_h5_is_one_line_not_a_crash(disk, sgd_run):
    """With a few KiB free, store.h5's temporary starts but HDF5 meets the full disk while flushing in its
    object destructors: it printed a traceback per object, then the process crashed (SIGSEGV, or exit 1).
    Each amount of free space is the one documented line, and the store stays as it was."""
    run = shutil.copytree(sgd_run, disk / "ckpts")
    assert pdt("predict", run)[0] == 0
    before = files_bytes(run)
    for kib in range(0, (run / ".pdt" / "store.h5").stat().st_size // 1024, 4):  # too little for a new store.h5
        filler = leave_free(disk, kib)
        done = pdt_process("mask", run, "--criteria", "sign")
        line = one_error_line(done.stderr, done.returncode, 4)
        assert line.startswith(f"pdt: error: {run / '.pdt' / 'store.h5'}: cannot write: No space left on device")
        assert files_bytes(run) == before, kib
        filler.unlink()
