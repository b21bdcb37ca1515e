"""The mistakes a new user makes get one clear line and the documented exit code, and cost nothing.

Cron runs pdt unattended, so a wrong path must fail (not wait forever), a stray file must not
stop every run, and every failure must reach the log that `--json >>` writes.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import training
from test_hostile import one_error_line, pdt
from typer.testing import CliRunner

from pdtcli.cli import app
from pdtcli.ingest import NOT_A_CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]


def test_a_path_that_does_not_exist_is_a_usage_error(tmp_path):
    code, output = pdt("predict", tmp_path / "nosuchdir")
    assert code == 2 and "nosuchdir: does not exist" in one_error_line(output)
    assert not (tmp_path / "nosuchdir").exists()


@pytest.mark.slow
def test_errors_reach_a_json_log_as_one_object_on_stdout(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pdtcli", "predict", str(tmp_path / "nosuchdir"), "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2
    error = json.loads(done.stdout)
    assert {k: error.pop(k) for k in ("time", "pdt", "command")}["command"] == "predict"
    assert error == {"status": "error", "exit_code": 2, "error": f"{tmp_path / 'nosuchdir'}: does not exist",
                     "path": str(tmp_path / "nosuchdir")}
    assert done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr


def test_a_folder_without_checkpoints_fails_and_creates_nothing(sgd_run, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = pdt("predict", empty)
    assert code == 2 and "no checkpoints here" in one_error_line(output)
    assert list(empty.iterdir()) == []
    parent = sgd_run.parent  # the folder above the real one: say where the checkpoints are
    code, output = pdt("snapshot", parent)
    line = one_error_line(output)
    assert code == 2 and "sub-folders that hold checkpoints: ckpts/" in line
    assert not (parent / ".pdt").exists()


def test_a_folder_holding_only_non_checkpoints_fails_and_creates_nothing(tmp_path):
    torch.save({"lr": 0.1, "layers": [64, 64]}, tmp_path / "hparams.pt")
    code, output = pdt("predict", tmp_path)
    assert code == 2 and "hparams.pt holds no state dict" in one_error_line(output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hparams.pt"]


def test_a_stray_file_with_a_checkpoint_suffix_is_skipped_with_one_warning(sgd_run):
    hparams = sgd_run / "hparams.pt"
    torch.save({"lr": 0.05, "hidden": 32}, hparams)
    os.utime(hparams, (2e9, 2e9))  # newest by time, and without a number: it must not decide the order
    code, output = pdt("predict", sgd_run, "--json")
    payload = json.loads(output)
    assert code == 0 and payload["status"] == "written" and payload["output"].endswith("epoch_8.pdt.pt")
    assert [s for s in payload["skipped"] if s["path"].endswith("hparams.pt")] == [
        {"path": str(hparams), "reason": NOT_A_CHECKPOINT}]
    report = json.loads(pdt("report", sgd_run, "--json")[1])
    assert [w["step"] for w in report["window"]][:4] == [4, 5, 6, 7]  # name order, not mtime
    shutil.copy(sgd_run / "epoch_8.pt", sgd_run / "epoch_9.pt")
    payload = json.loads(pdt("predict", sgd_run, "--json")[1])
    assert not [s for s in payload["skipped"] if s["path"].endswith("hparams.pt")]  # said once


def _two_new_checkpoints_after_a_store(run: Path, tmp_path: Path) -> tuple[Path, bytes]:
    """A store of epochs 1-5, then epochs 6 and 7 arrive; epoch 8 waits in the returned folder.
    Returns that folder and the store's bytes before the new ones are seen."""
    later = tmp_path / "later"
    later.mkdir()
    for epoch in (6, 7, 8):
        os.replace(run / f"epoch_{epoch}.pt", later / f"epoch_{epoch}.pt")
    assert pdt("snapshot", run)[0] == 0
    store = (run / ".pdt" / "store.h5").read_bytes()
    for epoch in (6, 7):
        os.replace(later / f"epoch_{epoch}.pt", run / f"epoch_{epoch}.pt")
    return later, store


def test_a_bad_checkpoint_leaves_the_store_as_it_was_and_files_names_the_checkpoints(sgd_run, tmp_path):
    later, store = _two_new_checkpoints_after_a_store(sgd_run, tmp_path)
    data = (later / "epoch_8.pt").read_bytes()
    (sgd_run / "epoch_8.pt").write_bytes(data[: len(data) // 2])
    code, output = pdt("predict", sgd_run)
    assert code == 3 and "epoch_8.pt" in one_error_line(output)
    assert (sgd_run / ".pdt" / "store.h5").read_bytes() == store  # epochs 6 and 7 were not taken in either

    os.replace(sgd_run / "epoch_8.pt", sgd_run / "notes_8.pt")  # not a checkpoint, but it looks like one
    code, output = pdt("predict", sgd_run, "--files", "epoch_*.pt", "--json")
    payload = json.loads(output)
    assert code == 0 and [Path(p).name for p in payload["ingested"]] == ["epoch_6.pt", "epoch_7.pt"]
    (sgd_run / "epoch_8.pt").write_bytes(data)
    payload = json.loads(pdt("predict", sgd_run, "--json")[1])  # --files is kept in the store
    assert [Path(p).name for p in payload["ingested"]] == ["epoch_8.pt"]


def _safetensors_with_header(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("entry", ["a string", {"dtype": "F32", "shape": [2]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},
                                   {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}],
                         ids=["string", "no-offsets", "short", "negative"])
def test_a_malformed_safetensors_header_is_a_bad_checkpoint(safetensors_run, entry):
    newest = safetensors_run / "epoch_7.safetensors"
    _safetensors_with_header(newest, {"0.weight": entry, "__metadata__": {"epoch": "7"}}, bytes(8))
    code, output = pdt("predict", safetensors_run)
    line = one_error_line(output)
    assert code == 3 and "epoch_7.safetensors" in line and "corrupt safetensors header" in line


def test_overlapping_safetensors_tensors_are_a_bad_checkpoint_not_a_shifted_output(safetensors_run):
    """Each entry is sound alone, but two share bytes: the fused copy would write both in full under the
    same header, shifting every later tensor; pdt refuses the file instead."""
    newest = safetensors_run / "epoch_7.safetensors"
    header = {"0.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "0.bias": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}, "__metadata__": {"epoch": "7"}}
    _safetensors_with_header(newest, header, bytes(24))
    code, output = pdt("predict", safetensors_run)
    line = one_error_line(output)
    assert code == 3 and "epoch_7.safetensors" in line and "overlap" in line


def test_a_deeply_nested_msgpack_says_what_is_wrong(tmp_path):
    (tmp_path / "state_1.msgpack").write_bytes(b"\x81\xa6params" + b"\x91" * 100_000 + b"\x00")
    code, output = pdt("predict", tmp_path)
    line = one_error_line(output)
    assert code == 3 and "state_1.msgpack" in line and "nested deeper" in line


def test_ctrl_c_while_starting_is_one_line_and_exit_130(monkeypatch, capsys):
    import pdtcli.__main__ as entry

    real_import = builtins.__import__

    def interrupted(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "cli" and level == 1 or name == "pdtcli.cli":
            raise KeyboardInterrupt
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "pdtcli.cli")
    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as stopped:
        entry.main()
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted" in err and "Traceback" not in err


def test_a_mask_that_accepts_nothing_is_said_out_loud(sgd_run):
    # with tau = 1 the lower and upper bounds contradict each other: nothing can pass both
    code, output = pdt("predict", sgd_run, "--tau", "1", "--criteria", "all", "--json")
    payload = json.loads(output)
    assert code == 0 and payload["mask"]["totals"]["accepted"] == 0
    assert payload["warnings"] and "accepted no element" in payload["warnings"][0]
    code, output = pdt("mask", sgd_run, "--criteria", "lower,upper")
    assert code == 0 and "warning: the mask (lower+upper) accepted no element" in output


def test_help_names_paths_and_flags_plainly():
    result = CliRunner().invoke(app, ["predict", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    text = result.output
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "DIR" in usage and "target" not in usage  # typer writes a required argument as {DIR}
    assert "DIR/.pdt" in text and "[default: /.pdt]" not in text
    assert [line for line in text.splitlines() if "<bool>" in line and "--help" not in line] == []


def test_a_checkpoint_written_in_another_dtype_does_not_count_as_a_layout_change(tmp_path):
    # the same model saved in bf16 after fp32 checkpoints keeps names and shapes: it is ingested
    training.train(tmp_path, 5)
    state = torch.load(tmp_path / "epoch_5.pt", weights_only=True)
    state["model"] = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state["model"].items()}
    state["epoch"] = 6
    torch.save(state, tmp_path / "epoch_6.pt")
    code, output = pdt("predict", tmp_path, "--json")
    assert code == 0 and json.loads(output)["status"] == "written"


def test_an_unexpected_failure_still_ends_in_one_line_and_a_json_object(sgd_run, monkeypatch):
    from pdtcli import api

    def broken(*_args, **_kwargs):
        raise RuntimeError("something pdt did not foresee")

    monkeypatch.setattr(api, "predict", broken)
    result = CliRunner().invoke(app, ["predict", str(sgd_run), "--json"])
    assert result.exit_code == 1
    error = json.loads(result.stdout.strip().splitlines()[-1])
    assert error["status"] == "error" and error["exit_code"] == 1 and "did not foresee" in error["error"]
    assert "pdt: error: unexpected RuntimeError" in result.stderr


def test_verbose_says_why_checkpoints_were_skipped_and_fits_reused(sgd_run):
    torch.save({"lr": 0.05}, sgd_run / "hparams.pt")
    result = CliRunner().invoke(app, ["predict", str(sgd_run), "--dry-run", "-v"])
    assert result.exit_code == 0
    assert "pdt: skipped hparams.pt: holds no state dict" in result.stderr
    assert "pdt: skipped epoch_1.pt: older than the newest 5 new checkpoints" in result.stderr
    assert "fit: QR pass over the window, steps [4, 5, 6, 7, 8]" in result.stderr
    again = CliRunner().invoke(app, ["predict", str(sgd_run), "--dry-run", "--tau", "3", "-v"])
    assert "fit on the stored QR factor" in again.stderr
    quiet = CliRunner().invoke(app, ["predict", str(sgd_run), "--dry-run", "--tau", "3"])
    assert quiet.exit_code == 0 and "pdt: fit" not in quiet.stderr


def test_a_negative_seed_is_a_usage_error(sgd_run):
    code, output = pdt("predict", sgd_run, "--random", "--seed", "-1")
    assert code == 2 and not (sgd_run / ".pdt").exists()


def test_an_audit_output_run_again_with_nothing_new_is_up_to_date(sgd_run, tmp_path):
    audit = tmp_path / "audit.pt"
    assert json.loads(pdt("predict", sgd_run, "-o", audit, "--json")[1])["status"] == "written"
    payload = json.loads(pdt("predict", sgd_run, "-o", audit, "--json")[1])
    assert payload["status"] == "up-to-date" and payload["output"] == str(audit)
    report = json.loads(pdt("report", sgd_run, "--json")[1])
    assert len(report["history"]) == 1


def test_a_store_from_before_outputs_were_identified_still_opens(sgd_run):
    from test_hostile import _edit_store

    assert pdt("predict", sgd_run)[0] == 0

    def old_outputs(state: dict) -> None:  # outputs as the first pdt releases recorded them
        state["outputs"] = [{k: o[k] for k in ("path", "fit_id", "mask_id", "snapshot", "at")}
                            for o in state["outputs"]]

    _edit_store(sgd_run, old_outputs)
    assert pdt("report", sgd_run)[0] == 0
    assert json.loads(pdt("predict", sgd_run, "--json")[1])["status"] == "up-to-date"


def test_a_nan_in_one_of_several_new_checkpoints_leaves_an_existing_store_as_it_was(sgd_run, tmp_path):
    later, store = _two_new_checkpoints_after_a_store(sgd_run, tmp_path)
    bad = torch.load(later / "epoch_8.pt", weights_only=True)
    bad["model"]["3.weight"][0, 0] = float("nan")
    torch.save(bad, sgd_run / "epoch_8.pt")
    code, output = pdt("predict", sgd_run)
    assert code == 3 and "epoch_8.pt" in one_error_line(output) and "NaN" in output
    assert (sgd_run / ".pdt" / "store.h5").read_bytes() == store
