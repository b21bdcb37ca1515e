"""`pdt` unattended: from cron, in scripts, in pipes. Every run leaves one JSON line under `--json`, usage
errors and failures included; a reader that stops early is no bug; a long first run says in one line
what it passed over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import training
from typer.testing import CliRunner

from pdtcli import __version__
from pdtcli.cli import app

runner = CliRunner()


def run_json(*args: object) -> tuple[int, list[str]]:
    """Exit code and the lines printed on stdout by `pdt ARGS --json`."""
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    return result.exit_code, result.stdout.splitlines()


def one_record(lines: list[str], command: str) -> dict:
    """The run's one JSON line: a whole object, stamped with its time, pdt's version and the command."""
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert record["pdt"] == __version__ and record["command"] == command
    assert record["time"].endswith("+00:00")
    return record


def test_a_run_is_one_json_line(sgd_run):
    code, lines = run_json("predict", sgd_run)
    assert code == 0 and one_record(lines, "predict")["status"] == "written"
    code, lines = run_json("predict", sgd_run)  # a no-op too: tail -1 of a log is the last run
    assert code == 0 and one_record(lines, "predict")["status"] == "up-to-date"
    code, lines = run_json("report", sgd_run)
    assert code == 0 and one_record(lines, "report")["mask"]["label"]


@pytest.mark.parametrize("args", [["--tua", "3"], ["--tau", "0"], ["--history", "1"]])
def test_a_usage_error_is_a_json_line_too(sgd_run, args):
    code, lines = run_json("predict", sgd_run, *args)
    record = one_record(lines, "predict")
    assert code == 2 and record["exit_code"] == 2 and record["status"] == "error"
    assert args[0] in record["error"] or args[0][:4] in record["error"]
    assert not (sgd_run / ".pdt").exists()  # and nothing was done


def test_every_failure_is_a_json_line(sgd_run, tmp_path):
    cases = {
        2: ["predict", tmp_path / "no-such-folder"],
        6: ["apply", sgd_run],                                      # no fit yet
    }
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "epoch_1.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    cases[3] = ["predict", tmp_path / "bad"]
    for expected, args in cases.items():
        code, lines = run_json(*args)
        record = one_record(lines, args[0])
        assert code == expected == record["exit_code"], (args, record)
        assert record["status"] == "error" and record["error"]


@pytest.mark.slow
def test_a_reader_that_stops_early_is_not_a_bug(sgd_run):
    """`pdt predict D --json | head -1`: head exits before pdt prints. The step is done, nothing is said."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "pdtcli", "predict", str(sgd_run), "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before pdt writes a byte: its write gets EPIPE
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 0, stderr
    assert "Traceback" not in stderr and "bug" not in stderr and "Broken pipe" not in stderr, stderr
    assert (sgd_run / "epoch_8.pdt.pt").exists()


def test_a_long_first_run_passes_over_in_one_line(tmp_path):
    folder = tmp_path / "long"
    training.train(folder, 12)  # epoch_1 .. epoch_12, the window takes the newest 5
    result = runner.invoke(app, ["predict", str(folder)])
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.stderr.splitlines() if line.startswith("skipped")]
    assert skipped == ["skipped 7 checkpoints (epoch_1.pt … epoch_7.pt): older than the newest 5 new checkpoints"]


def test_help_takes_minus_h():
    result = runner.invoke(app, ["predict", "-h"])
    assert result.exit_code == 0 and "--tau" in result.stdout


def test_verbose_says_the_step_once(sgd_run):
    result = runner.invoke(app, ["snapshot", str(sgd_run), "--order", "step", "-v"])
    assert result.exit_code == 0, result.output
    assert "step step" not in result.stderr
    assert "to ingest: epoch_8.pt (step" in result.stderr


def test_the_readme_cron_line_names_pdt_by_its_path():
    """cron's PATH is /usr/bin:/bin: a bare `pdt` there is 'command not found' every half hour."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    cron = [line.split("*/30 * * * * ", 1)[1] for line in readme.splitlines() if "*/30 * * * * " in line]
    assert cron and all(line.split()[0].startswith("/") and line.split()[0].endswith("/bin/pdt") for line in cron), cron


@pytest.mark.parametrize("command", ["snapshot", "predict", "mask", "apply", "restore", "report"])
def test_help_reads_at_80_columns(command):
    """Plain metavars (no `{DIR}`, `<bool>`, `[default: (5)]`), every line within 80 columns, examples one
    per line, and `predict --help` about two screens (it was 142 lines)."""
    result = runner.invoke(app, [command, "--help"], prog_name="pdt", env={"COLUMNS": "80"}, terminal_width=80)
    text = result.stdout
    assert result.exit_code == 0 and f"Usage: pdt {command} [OPTIONS] DIR" in text
    for noise in ("{DIR}", "<bool>", "<int", "<float>", "<str>", "default: ("):
        assert noise not in text, noise
    assert max(len(line) for line in text.splitlines()) <= 80
    examples = [line for line in text.split("Example")[1].split("\n\n")[0].splitlines() if line.startswith("    ")]
    assert examples and all(line.count(f" {command} ") == 1 for line in examples), examples
    assert len(text.splitlines()) <= 100



@pytest.mark.slow
@pytest.mark.parametrize("command", [["report"], ["predict", "--dry-run"]])
def test_a_reader_that_stops_early_reading_text_is_not_a_bug(sgd_run, command):
    """`pdt report D | head`: the text report (rich's console, not a JSON line) meets a closed pipe."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-m", "pdtcli", "snapshot", str(sgd_run)], env=env).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "pdtcli", command[0], str(sgd_run), *command[1:]], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 0, stderr
    assert "Traceback" not in stderr and "Error" not in stderr and "bug" not in stderr, stderr
