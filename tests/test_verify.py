"""`pdt predict --verify CMD` (and `pdt apply --verify`): the user's command judges the fused checkpoint under
a temporary name before it is published; a rejection publishes nothing, leaves every input as it was, and the
store forgets the fused state (a history row says so). The commands are real processes (slow tier)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import training
from test_hostile import no_temporaries, one_error_line, pdt, snapshot_of

TESTS = Path(__file__).parent


def script(folder: Path, name: str, body: str) -> str:
    """A Python script written into `folder` (outside the checkpoints), as the `--verify` command that runs it."""
    path = folder / name
    path.write_text(f"import json, os, sys\nsys.path.insert(0, {str(TESTS)!r})\n{body}")
    return f"{sys.executable} {path}"


def held_out_loss(path: Path) -> float:
    """The tiny model's cross-entropy on data it was not trained on (another seed), its weights from `path`."""
    net = training.model()
    net.load_state_dict(torch.load(path, weights_only=True)["model"])
    net.eval()
    x, y = training.data(seed=1)
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(net(x), y))


EVALUATE = """
import torch, training
from test_verify import held_out_loss
with open(os.environ["RUNS"], "a") as runs:
    runs.write(sys.argv[-1] + "\\n")
print("evaluating", sys.argv[-1])
print(repr(float(os.environ["SIGN"]) * held_out_loss(sys.argv[-1])))
"""


def checkpoints_of(folder: Path) -> tuple[list[str], dict]:
    """The folder's entries beside the store, and the bytes and times of every file there."""
    beside = [p for p in folder.iterdir() if p.name != ".pdt"]
    return sorted(p.name for p in beside), {name: kept for p in beside for name, kept in snapshot_of(p).items()}


def runs_of(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def report(folder: Path) -> dict:
    code, output = pdt("report", folder, "--json")
    assert code == 0, output
    return json.loads(output)


@pytest.mark.slow
def test_an_exit_code_that_rejects_publishes_nothing_and_the_store_forgets_the_fused_state(sgd_run, tmp_path,
                                                                                         monkeypatch):
    log = tmp_path / "runs.log"
    monkeypatch.setenv("RUNS", str(log))
    command = script(tmp_path, "no.py", "open(os.environ['RUNS'], 'a').write(sys.argv[1] + '\\n')\nsys.exit(1)")
    before = checkpoints_of(sgd_run)
    code, output = pdt("predict", sgd_run, "--json", "--verify", command)
    assert code == 0, output
    result = json.loads(output)
    assert result["status"] == "rejected" and result["output"] is None
    assert result["verify"] == {"accepted": False, "why": "the command exited 1", "loss": None, "plain_loss": None,
                                "exit_code": 1}
    assert "rejected epoch_8.pdt.pt (--verify: the command exited 1); nothing written" in result["message"]
    assert not (sgd_run / "epoch_8.pdt.pt").exists()
    assert checkpoints_of(sgd_run) == before  # the checkpoints, bytes and times; no candidate left behind
    assert no_temporaries(sgd_run)
    state = report(sgd_run)
    assert [h["command"] for h in state["history"]] == ["predict --verify rejected"]
    assert [w["kind"] for w in state["window"]] == ["checkpoint"] * 5
    assert len(runs_of(log)) == 1
    # a rerun with nothing new does not judge the same fused checkpoint again (the command would say the same)
    code, output = pdt("predict", sgd_run, "--json", "--verify", command)
    assert code == 0 and json.loads(output)["status"] == "up-to-date", output
    assert len(runs_of(log)) == 1
    # in words: one line (after the one on stderr of the old checkpoints passed over), the rejection and why
    (sgd_run / ".pdt").rename(tmp_path / "old-store")
    code, output = pdt("predict", sgd_run, "--verify", command)
    assert code == 0 and output.splitlines()[1:] == [
        "rejected epoch_8.pdt.pt (--verify: the command exited 1); nothing written"], output


@pytest.mark.slow
def test_a_printed_loss_is_compared_with_the_newest_checkpoints(_adamw_run, tmp_path, monkeypatch):
    """The command loads each checkpoint with torch and prints its held-out loss (times SIGN): the fused
    checkpoint is published exactly when its loss is not above the plain one's, as computed here; with the sign
    turned the same comparison goes the other way, so one of the two runs accepts and the other rejects."""
    outcomes = {}
    for sign in ("1", "-1"):
        folder = shutil.copytree(_adamw_run, tmp_path / f"sign{sign}")  # the same checkpoints, a store each
        log = tmp_path / f"runs{sign}.log"
        monkeypatch.setenv("RUNS", str(log))
        monkeypatch.setenv("SIGN", sign)
        code, output = pdt("predict", folder, "--json", "--verify", script(tmp_path, "evaluate.py", EVALUATE))
        assert code == 0, output
        result = json.loads(output)
        candidate, plain = runs_of(log)
        assert Path(candidate).name == "epoch_8.pdt.pt" and plain == str(folder / "epoch_8.pt")
        # the same fused checkpoint, written from the stored fit and mask, as an audit copy to evaluate here
        code, output = pdt("apply", folder, "-o", tmp_path / f"audit{sign}.pt", "--json")
        assert code == 0, output
        fused, newest = held_out_loss(tmp_path / f"audit{sign}.pt"), held_out_loss(folder / "epoch_8.pt")
        s = float(sign)
        assert result["verify"]["loss"] == s * fused and result["verify"]["plain_loss"] == s * newest
        accepted = s * fused <= s * newest
        assert result["status"] == ("written" if accepted else "rejected"), result
        assert (folder / "epoch_8.pdt.pt").exists() == accepted
        if accepted:
            assert held_out_loss(folder / "epoch_8.pdt.pt") == fused
        outcomes[sign] = result["status"]
    assert sorted(outcomes.values()) == ["rejected", "written"]


@pytest.mark.slow
def test_the_command_sees_the_candidate_in_the_outputs_format_before_the_output_exists(sgd_run, tmp_path):
    marker = tmp_path / "seen.json"
    final = sgd_run / "epoch_8.pdt.pt"
    body = f"""
import torch
path = sys.argv[1]
model = torch.load(path, weights_only=True)["model"]
json.dump({{"name": os.path.basename(path), "folder": os.path.dirname(os.path.dirname(path)),
           "final_exists": os.path.exists({str(final)!r}), "tensors": sorted(model)}}, open({str(marker)!r}, "w"))
"""
    code, output = pdt("predict", sgd_run, "--json", "--verify", script(tmp_path, "look.py", body) + " {} --quiet")
    assert code == 0, output
    assert json.loads(output)["status"] == "written"
    seen = json.loads(marker.read_text())
    assert seen["name"] == "epoch_8.pdt.pt" and seen["folder"] == str(sgd_run)  # same folder: a rename publishes it
    assert seen["final_exists"] is False
    assert seen["tensors"] == sorted(torch.load(final, weights_only=True)["model"])
    assert no_temporaries(sgd_run)


@pytest.mark.slow
def test_in_place_and_a_rejection_leave_the_original_byte_identical(sgd_run, tmp_path):
    before = checkpoints_of(sgd_run)
    code, output = pdt("predict", sgd_run, "--in-place", "--json", "--verify", script(tmp_path, "no.py", "sys.exit(3)"))
    assert code == 0, output
    assert json.loads(output)["status"] == "rejected"
    assert checkpoints_of(sgd_run) == before
    assert not list((sgd_run / ".pdt" / "backups").glob("*"))  # nothing was replaced, so nothing backed up
    code, output = pdt("restore", sgd_run)
    assert code == 6, output  # no in-place write to undo


def test_a_command_that_cannot_run_is_a_usage_error_before_any_work(sgd_run, tmp_path):
    before = checkpoints_of(sgd_run)
    code, output = pdt("predict", sgd_run, "--verify", "no-such-evaluator-here {}")
    assert code == 2
    assert one_error_line(output) == ("pdt: error: --verify: cannot run 'no-such-evaluator-here': no such executable "
                                      "(give its path, or put it on PATH)")
    assert checkpoints_of(sgd_run) == before and not (sgd_run / ".pdt").exists()


@pytest.mark.slow
def test_a_command_past_its_timeout_rejects(sgd_run, tmp_path):
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes: none does
    command = script(tmp_path, "hang.py", f"open({str(fifo)!r}).read()")
    code, output = pdt("predict", sgd_run, "--json", "--verify", command, "--verify-timeout", "1")
    assert code == 0, output
    result = json.loads(output)
    assert result["status"] == "rejected" and result["verify"]["why"] == "the command ran past --verify-timeout 1 s"
    assert not (sgd_run / "epoch_8.pdt.pt").exists() and no_temporaries(sgd_run)


@pytest.mark.slow
def test_apply_verifies_too(sgd_run, tmp_path):
    code, output = pdt("predict", sgd_run, "--dry-run")
    assert code == 0, output
    code, output = pdt("apply", sgd_run, "--json", "--verify", script(tmp_path, "no.py", "sys.exit(1)"))
    assert code == 0 and json.loads(output)["status"] == "rejected", output
    assert not (sgd_run / "epoch_8.pdt.pt").exists()
    assert [h["command"] for h in report(sgd_run)["history"]] == ["predict --dry-run", "apply --verify rejected"]
    code, output = pdt("apply", sgd_run, "--json", "--verify", script(tmp_path, "yes.py", "print('fine')"))
    assert code == 0 and json.loads(output)["status"] == "written", output
    assert (sgd_run / "epoch_8.pdt.pt").exists()


@pytest.mark.slow
def test_a_folder_checkpoint_is_judged_as_a_folder(tmp_path, monkeypatch):
    """A sharded Hugging Face folder: the command gets the candidate folder under the output's name, every
    shard in it, before `step-5.pdt` exists; rejected, neither it nor a temporary is left; in place and
    rejected, the checkpoint folder keeps every byte."""
    from huggingface_hub import save_torch_state_dict
    from test_folders import _save_hf_epochs

    run = tmp_path / "run"
    _save_hf_epochs(run, 5, lambda state, folder: save_torch_state_dict(state, folder, max_shard_size=600))
    marker = tmp_path / "seen.json"
    body = f"""
path = sys.argv[1]
json.dump({{"name": os.path.basename(path), "files": sorted(os.listdir(path)),
           "final_exists": os.path.exists({str(run / "step-5.pdt")!r})}}, open({str(marker)!r}, "w"))
sys.exit(int(os.environ.get("REJECT", "0")))
"""
    command = script(tmp_path, "look.py", body)
    before = checkpoints_of(run)
    monkeypatch.setenv("REJECT", "1")
    for flags in (("predict",), ("apply", "--in-place")):  # apply: a rerun of predict would judge nothing again
        code, output = pdt(*flags, run, "--json", "--verify", command)
        assert code == 0 and json.loads(output)["status"] == "rejected", output
        assert checkpoints_of(run) == before and no_temporaries(run)
    monkeypatch.delenv("REJECT")
    code, output = pdt("apply", run, "--json", "--no-in-place", "--verify", command)
    assert code == 0 and json.loads(output)["status"] == "written", output
    seen = json.loads(marker.read_text())
    assert seen["name"] == "step-5.pdt" and seen["final_exists"] is False
    assert seen["files"] == sorted(p.name for p in (run / "step-5.pdt").iterdir()) == sorted(
        p.name for p in (run / "step-5").iterdir())
    assert no_temporaries(run)
