"""`--in-place`: for training scripts that always save to and resume from one path.

The loop here is that script: each epoch resumes from `last.pt` and saves over it (the
same file, rewritten), and pdt runs between epochs with `--in-place`. What pdt replaced
is kept as a backup, and `pdt restore` puts it back.
"""

from __future__ import annotations

import json
import shutil

import training
from typer.testing import CliRunner

from pdtcli import api
from pdtcli.cli import app


def pdt(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def train_epoch(folder, scratch) -> bytes:
    """One epoch resumed from last.pt (when there is one), saved over last.pt; returns what was saved."""
    last = folder / "last.pt"
    shutil.rmtree(scratch, ignore_errors=True)
    saved = training.train(scratch, 1, resume=last if last.exists() else None)[0]
    data = saved.read_bytes()
    last.write_bytes(data)  # rewrites the same file, as torch.save(state, "last.pt") does
    return data


def test_in_place_loop_keeps_backups_and_restores(tmp_path):
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    run.mkdir()
    statuses, saved = [], []
    for _ in range(7):
        saved.append(train_epoch(run, scratch))
        code, output = pdt("predict", run, "--in-place", "--json")
        assert code == 0, output
        payload = json.loads(output)
        statuses.append(payload["status"])
        if payload["status"] == "written":
            assert payload["output"] == str((run / "last.pt").resolve())
    assert statuses == ["waiting"] * 4 + ["written"] * 3
    assert sorted(p.name for p in run.iterdir()) == [".pdt", "last.pt"]
    last = run / "last.pt"
    assert last.read_bytes() != saved[-1]  # the fused state is where training resumes from
    backups = sorted((run / ".pdt" / "backups").iterdir())
    assert saved[-1] in [b.read_bytes() for b in backups]  # epoch 7 as training saved it
    assert len(backups) <= 6  # one per checkpoint the store still holds (h + 1)

    fused = last.read_bytes()
    assert pdt("predict", run, "--in-place", "--json")[0] == 0  # nothing new: up to date, untouched
    assert last.read_bytes() == fused

    code, output = pdt("restore", run, "--json")
    assert code == 0, output
    assert last.read_bytes() == saved[-1]
    state = api.load_state(run)
    assert state["window"][-1]["kind"] == "checkpoint" and state["resumed_from"] == str(last)
    # writing again from the restored checkpoint gives the same fused file, and keeps the one backup
    assert json.loads(pdt("predict", run, "--in-place", "--json")[1])["status"] == "written"
    assert last.read_bytes() == fused
    assert sorted((run / ".pdt" / "backups").iterdir()) == backups


def test_restore_refuses_to_overwrite_newer_training(tmp_path):
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    run.mkdir()
    for _ in range(5):
        train_epoch(run, scratch)
        assert pdt("predict", run, "--in-place")[0] == 0
    assert (run / ".pdt" / "backups").is_dir()
    newer = train_epoch(run, scratch)  # training resumed from the fused file and saved over it
    code, output = pdt("restore", run)
    assert code == 5 and "last.pt" in output and "--force" in output
    assert (run / "last.pt").read_bytes() == newer
    assert pdt("restore", run, "--force")[0] == 0
    assert (run / "last.pt").read_bytes() != newer


def test_in_place_takes_no_output_and_restore_needs_a_write(sgd_run):
    code, output = pdt("predict", sgd_run, "--in-place", "-o", sgd_run / "x.pt")
    assert code == 2 and "--in-place" in output
    assert not (sgd_run / "x.pt").exists()
    assert pdt("snapshot", sgd_run)[0] == 0
    code, output = pdt("restore", sgd_run)
    assert code == 6 and "no in-place write" in output
