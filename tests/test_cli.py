"""`pdt` end to end, as a user calls it, on real training runs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import training
from conftest import digest_tree
from reference import dmd_predictions, mask
from safetensors import safe_open
from typer.testing import CliRunner

from pdtcli.cli import EXIT_UP_TO_DATE, EXIT_WAITING, app
from pdtcli.dmd import FitOptions
from pdtcli.mask import DEFAULT_CRITERIA

NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
runner = CliRunner()


def pdt(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def pdt_json(*args: str) -> dict:
    code, output = pdt(*args, "--json")
    assert code == 0, output
    return json.loads(output)


def assert_matches_reference(run, fused: dict, modes: str, tau: int) -> None:
    """The fused weights are where(reference mask, reference prediction, w_h), from dense float64 DMD."""
    w = training.flat_weights([run / f"epoch_{e}.pt" for e in range(4, 9)], NAMES).numpy()
    preds, _ = dmd_predictions(w, tau, modes)
    expected_mask = mask(w[:, -2], w[:, -1], preds, DEFAULT_CRITERIA)  # what `pdt predict` applies
    got = torch.cat([fused["model"][n].reshape(-1) for n in NAMES]).double().numpy()
    ours_mask = got != w[:, -1]
    assert 0.01 < expected_mask.mean() < 0.9
    assert np.mean(ours_mask != expected_mask) < 1e-3
    both = ours_mask & expected_mask
    assert np.allclose(got[both], preds[both, -1], rtol=1e-6, atol=1e-7)


def test_predict_writes_the_fused_checkpoint_the_reference_predicts(sgd_run):
    before = digest_tree(sgd_run)
    code, output = pdt("predict", sgd_run)
    assert code == 0, output
    fused_path = sgd_run / "epoch_8.pdt.pt"
    assert f"wrote {fused_path}" in output.replace("\n", "")
    assert "accepted" in output and "most accepted" in output
    assert digest_tree(sgd_run) == {**before, "epoch_8.pdt.pt": digest_tree(sgd_run)["epoch_8.pdt.pt"]}

    newest = torch.load(sgd_run / "epoch_8.pt", weights_only=True)
    fused = torch.load(fused_path, weights_only=True)
    assert fused.keys() == newest.keys() and fused["epoch"] == 8
    assert fused["model"].keys() == newest["model"].keys()
    assert torch.equal(fused["optimizer"]["state"][0]["momentum_buffer"],
                       newest["optimizer"]["state"][0]["momentum_buffer"])
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):  # carried over
        assert torch.equal(fused["model"][name], newest["model"][name])
        assert fused["model"][name].dtype == newest["model"][name].dtype

    assert_matches_reference(sgd_run, fused, FitOptions().modes, tau=5)  # pdt's default modes


def test_second_run_with_nothing_new_recomputes_nothing(sgd_run):
    assert pdt("predict", sgd_run)[0] == 0
    store_file = sgd_run / ".pdt" / "store.h5"
    stamp = (store_file.stat().st_mtime_ns, (sgd_run / "epoch_8.pdt.pt").stat().st_mtime_ns)
    code, output = pdt("predict", sgd_run)
    assert code == 0 and "nothing new" in output and len(output.strip().splitlines()) <= 3
    assert (store_file.stat().st_mtime_ns, (sgd_run / "epoch_8.pdt.pt").stat().st_mtime_ns) == stamp
    assert pdt("predict", sgd_run, "--strict")[0] == EXIT_UP_TO_DATE


def test_too_few_checkpoints_says_how_many_more(tmp_path):
    folder = tmp_path / "young"
    training.train(folder, 3)
    code, output = pdt("predict", folder)
    assert code == 0 and "need 2 more checkpoint" in output
    assert pdt("predict", folder, "--strict")[0] == EXIT_WAITING
    assert not list(folder.glob("*.pdt.*"))
    payload = pdt_json("predict", folder)
    assert payload["status"] == "waiting" and payload["needed"] == 2


def test_resume_from_fused_then_next_step_measures_from_it(sgd_run):
    assert pdt("predict", sgd_run)[0] == 0
    fused_path = sgd_run / "epoch_8.pdt.pt"
    training.train(sgd_run, 1, resume=fused_path)  # the user's training resumes from pdt's output
    payload = pdt_json("predict", sgd_run, "--dry-run")
    assert payload["status"] == "dry-run" and payload["ingested"] == [str(sgd_run / "epoch_9.pt")]
    report = pdt_json("report", sgd_run)
    kinds = [w["kind"] for w in report["window"]]
    assert kinds == ["checkpoint", "checkpoint", "checkpoint", "fused", "checkpoint"]
    assert report["window"][3]["path"] == str(fused_path)
    # the store's fused snapshot is exactly the file training resumed from
    from pdtcli.store import Store

    store = Store.open(sgd_run / ".pdt")
    fused_id = report["window"][3]["id"]
    values = store.matrix.read([store.slot_of(fused_id)], 0, store.n)[0]
    fused = torch.load(fused_path, weights_only=True)["model"]
    assert np.array_equal(values, torch.cat([fused[n].reshape(-1) for n in NAMES]).numpy())
    assert not any("pdt" in p for p in payload["ingested"])  # its own output is never a training checkpoint


def test_stage_by_stage_and_report(sgd_run):
    snap = pdt_json("snapshot", sgd_run)
    assert snap["status"] == "ingested" and len(snap["ingested"]) == 5
    dry = pdt_json("predict", sgd_run, "--dry-run")
    assert not list(sgd_run.glob("*.pdt.*"))
    paper_ratio = dry["mask"]["totals"]["ratio"]
    lower = pdt_json("mask", sgd_run, "--criteria", "lower")
    assert lower["mask"]["label"] == "lower" and lower["mask"]["totals"]["ratio"] > paper_ratio
    none = pdt_json("mask", sgd_run, "--criteria", "none")
    assert none["mask"]["totals"]["ratio"] == 1.0
    rnd = pdt_json("mask", sgd_run, "--random", "--seed", "3")
    assert abs(rnd["mask"]["totals"]["ratio"] - paper_ratio) < 0.03
    again = pdt_json("mask", sgd_run)  # back to the paper mask: same counts as the dry run
    assert again["mask"]["totals"] == dry["mask"]["totals"]
    out = sgd_run.parent / "resume.pt"
    applied = pdt_json("apply", sgd_run, "-o", out)
    assert applied["status"] == "written" and out.is_file()
    report = pdt_json("report", sgd_run)
    assert report["model"] == dry["mask"]["totals"]
    assert sum(t["elements"] for t in report["tensors"]) == report["predicted_elements"]
    assert {t["layer_type"] for t in report["tensors"]} == {"linear", "bias", "norm"}
    assert [h["command"] for h in report["history"]] == ["predict --dry-run", "mask", "mask", "mask", "mask",
                                                         "apply"]
    skipped = {s["name"]: s["reason"] for s in report["skipped_tensors"]}
    assert skipped["1.running_mean"] == "normalisation running statistic"
    # a store path works as well as the folder (the same report, but for the second its JSON line was made in)
    assert {**pdt_json("report", sgd_run / ".pdt"), "time": None} == {**report, "time": None}
    assert pdt_json("report", sgd_run / ".pdt" / "store.h5")["model"] == report["model"]
    code, text = pdt("report", sgd_run)
    assert code == 0 and "per layer type" in text and "audits (masks, dry runs" in text  # none was a step


def test_apply_twice_keeps_lineage_consistent(sgd_run):
    pdt_json("predict", sgd_run, "--dry-run")
    resume = sgd_run / "epoch_8.pdt.pt"
    pdt_json("apply", sgd_run)
    first = resume.read_bytes()
    pdt_json("mask", sgd_run, "--criteria", "lower,upper")
    code, output = pdt("apply", sgd_run)  # the resume output exists: apply replaces nothing without --force
    assert code == 5 and "--force" in output and resume.read_bytes() == first
    pdt_json("apply", sgd_run, "--force")
    report = pdt_json("report", sgd_run)
    assert report["window"][-1]["kind"] == "fused" and report["window"][-1]["path"] == str(resume)
    assert report["resumed_from"] == str(resume)
    assert resume.read_bytes() != first


def test_audit_outputs_never_enter_the_window(sgd_run, tmp_path):
    pdt_json("predict", sgd_run, "--dry-run")
    before = pdt_json("report", sgd_run)
    audit = tmp_path / "audit.pt"
    assert pdt_json("apply", sgd_run, "-o", audit)["status"] == "written"
    assert pdt_json("predict", sgd_run, "-o", tmp_path / "audit2.pt")["status"] == "written"
    after = pdt_json("report", sgd_run)
    assert after["window"] == before["window"] and after["resumed_from"] == before["resumed_from"]
    assert all(w["kind"] == "checkpoint" for w in after["window"])
    assert [h["output"] for h in after["history"]][-2:] == [str(audit), str(tmp_path / "audit2.pt")]


def test_block_size_and_device_do_not_change_the_output(sgd_run, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    pdt_json("predict", sgd_run, "--dry-run", "--block", "8", "--device", "cpu")
    counts_small = pdt_json("report", sgd_run)["tensors"]
    pdt_json("apply", sgd_run, "-o", a, "--block", "8")
    pdt_json("apply", sgd_run, "-o", b, "--block", "1048576")
    pdt_json("predict", sgd_run, "--dry-run", "--tau", "5", "--rtol", "1e-7")  # other fit options: refit
    pdt_json("predict", sgd_run, "--dry-run", "--rtol", "1e-6", "--block", "1048576")
    assert pdt_json("report", sgd_run)["tensors"] == counts_small
    left, right = torch.load(a, weights_only=True)["model"], torch.load(b, weights_only=True)["model"]
    assert all(torch.equal(left[k], right[k]) for k in left)


def test_projected_modes_option_matches_the_reference(sgd_run):
    payload = pdt_json("predict", sgd_run, "--modes", "projected", "--tau", "3")
    assert payload["fit"]["options"]["modes"] == "projected" and payload["status"] == "written"
    assert_matches_reference(sgd_run, torch.load(payload["output"], weights_only=True), "projected", tau=3)


def test_safetensors_roundtrip_keeps_header_and_untouched_bytes(safetensors_run):
    payload = pdt_json("predict", safetensors_run)
    out = safetensors_run / "epoch_6.pdt.safetensors"
    assert payload["output"] == str(out)
    src = safetensors_run / "epoch_6.safetensors"
    with safe_open(src, "pt") as a, safe_open(out, "pt") as b:
        assert a.metadata() == b.metadata() == {"epoch": "6", "note": "kept"}
        assert list(a.keys()) == list(b.keys())
        for key in a.keys():  # noqa: SIM118 - safe_open is not a dict
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape
            if "running" in key or "num_batches" in key:
                assert torch.equal(x, y)
        assert not torch.equal(a.get_tensor("0.weight"), b.get_tensor("0.weight"))
    header_len = int.from_bytes(src.read_bytes()[:8], "little")
    assert src.read_bytes()[: 8 + header_len] == out.read_bytes()[: 8 + header_len]


def test_explicit_output_that_exists_is_refused_without_force(sgd_run, tmp_path):
    target = tmp_path / "precious.pt"
    target.write_bytes(b"do not lose me")
    code, output = pdt("predict", sgd_run, "-o", target)
    assert code == 5 and "precious.pt" in output and "--force" in output
    assert target.read_bytes() == b"do not lose me"
    assert pdt("predict", sgd_run, "-o", target, "--force")[0] == 0
    assert torch.load(target, weights_only=True)["epoch"] == 8


def test_output_inside_the_folder_is_never_ingested(sgd_run):
    out = sgd_run / "epoch_100.pt"  # a name that looks like a later checkpoint
    assert pdt("predict", sgd_run, "-o", out)[0] == 0
    payload = pdt_json("snapshot", sgd_run)
    assert payload["status"] == "up-to-date" and payload["ingested"] == []


def test_bad_checkpoints_fail_with_one_line_naming_the_file(sgd_run):
    nan = torch.load(sgd_run / "epoch_8.pt", weights_only=True)
    nan["model"]["0.weight"][0, 0] = float("nan")
    torch.save(nan, sgd_run / "epoch_9.pt")
    code, output = pdt("predict", sgd_run)
    assert code == 3 and "epoch_9.pt" in output and "NaN" in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("pdt: error: ")

    other = sgd_run.parent / "other"
    training.train(other, 1, hidden=8)
    (sgd_run / "epoch_9.pt").unlink()
    another_model = torch.load(other / "epoch_1.pt", weights_only=True)
    another_model["epoch"] = 10  # saved as the run's epoch 10, as its name says
    torch.save(another_model, sgd_run / "epoch_10.pt")
    code, output = pdt("predict", sgd_run)  # a model change, not a bad checkpoint: the window waits for h of it
    assert code == 0 and output.splitlines()[-1] == ("the model changed at epoch_10.pt (0.weight 32×16 → 8×16; "
                                                     "0.bias 32 → 8; 1.weight 32 → 8; 2 more); the window restarts "
                                                     "once 5 checkpoints of the new layout exist: 4 more"), output


@pytest.mark.slow
def test_installed_entry_point_runs(sgd_run):
    result = subprocess.run([sys.executable, "-m", "pdtcli", "predict", str(sgd_run), "--json"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "written"
    helped = subprocess.run([sys.executable, "-m", "pdtcli", "predict", "--help"], capture_output=True, text=True)
    assert "Examples" in helped.stdout and "--dry-run" in helped.stdout


@pytest.mark.parametrize("bad", [["--criteria", "sideways"], ["--modes", "magic"], ["--tau", "0"]])
def test_bad_options_are_usage_errors(sgd_run, bad):
    assert pdt("predict", sgd_run, *bad)[0] == 2


def test_the_arithmetic_runs_on_one_thread_unless_told_and_the_caller_keeps_its_own(sgd_run, monkeypatch):
    """One torch thread by default (threads waiting on each other made a step 6x slower on a busy machine),
    `--threads N` or OMP_NUM_THREADS otherwise; the caller's count is back afterwards, since an in-loop call
    runs inside training."""
    import pdtcli.fuse as fuse

    seen = []
    fit = fuse.accumulate_r

    def counting(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit(*args, **kwargs)

    monkeypatch.setattr(fuse, "accumulate_r", counting)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for extra, expected in (([], 1), (["--threads", "3"], 3)):
            result = CliRunner().invoke(app, ["predict", str(sgd_run), "--dry-run", *extra])
            assert result.exit_code == 0, result.output
            assert seen[-1] == expected and torch.get_num_threads() == 2
            (sgd_run / ".pdt").rename(sgd_run.parent / f"store-{expected}")  # the next run fits again
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert CliRunner().invoke(app, ["predict", str(sgd_run), "--dry-run"]).exit_code == 0
        assert seen[-1] == 2
    finally:
        torch.set_num_threads(before)
