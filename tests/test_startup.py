"""Start-up that costs nothing: the commands that touch no tensor never import torch (issue 23).

`import torch` is most of a `pdt --version`; each path below runs `pdt` in a fresh interpreter and
asks that interpreter, once pdt has exited, whether torch was imported. Not timed: what the seconds
are is `benchmarks/startup.py`'s business; this only fails when torch comes back on these paths.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test is a fresh interpreter: real processes

ROOT = Path(__file__).resolve().parents[1]
# pdt's own main, then what the interpreter imported; printed last, on stdout, as one JSON line
PROBE = """
import json, runpy, sys
sys.argv = ["pdt", *sys.argv[1:]]
try:
    runpy.run_module("pdtcli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"exit": code or 0, "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""


def pdt_imports(*args: object) -> tuple[int, list[str]]:
    """(exit code, the torch modules imported) of `pdt ARGS` in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               COLUMNS="120")
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)
    result = json.loads(done.stdout.splitlines()[-1])
    return result["exit"], result["torch"]


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["--version"], ["predict", "--help"], ["snapshot", "-h"],
                                  ["report", "--help"], []])
def test_help_and_version_never_import_torch(args):
    code, torch = pdt_imports(*args)
    assert code in (0, 2) and torch == []  # bare `pdt` shows help, exit 2 as click does


def test_nothing_new_never_imports_torch(sgd_run):
    code, torch = pdt_imports("predict", sgd_run)
    assert code == 0 and torch  # this one reads checkpoints and computes
    for args in (["predict", sgd_run], ["predict", sgd_run, "--json"], ["snapshot", sgd_run],
                 ["report", sgd_run], ["report", sgd_run, "--json"], ["report", sgd_run / ".pdt"]):
        code, torch = pdt_imports(*args)
        assert (code, torch) == (0, []), args


def test_waiting_never_imports_torch(sgd_run, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for name in sorted(p.name for p in sgd_run.glob("*.pt"))[:2]:
        shutil.copy2(sgd_run / name, few / name)
    code, torch = pdt_imports("predict", few)  # ingests the two
    assert code == 0 and torch
    for args in (["predict", few], ["predict", few, "--json"], ["snapshot", few], ["report", few]):
        code, torch = pdt_imports(*args)
        assert (code, torch) == (0, []), args


def test_the_store_names_its_dtypes_without_torch():
    """The tables of dtypes that modules build when they are imported hold names until one is read."""
    code = ("import sys; from pdtcli.store import STORE_DTYPES; from pdtcli.formats.base import DTYPES; "
            "from pdtcli.formats import safetensors_file; assert 'bfloat16' in STORE_DTYPES and 'bool' in DTYPES; "
            "assert 'torch' not in sys.modules; print(DTYPES['bfloat16'], safetensors_file._DTYPES['BF16'])")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["torch.bfloat16", "torch.bfloat16"]


def test_the_thread_count_holds_when_torch_comes_late(sgd_run):
    """`--threads` (one by default) is set when the step first touches torch, which it no longer imports
    at start: the fit's pass runs on the count asked for."""
    code = f"""
import json, os, sys
import pdtcli.fuse as fuse
from typer.testing import CliRunner
from pdtcli.cli import app
seen, fit = [], fuse.accumulate_r
def counting(*args, **kwargs):
    seen.append(sys.modules["torch"].get_num_threads())
    return fit(*args, **kwargs)
fuse.accumulate_r = counting
assert "torch" not in sys.modules
os.environ.pop("OMP_NUM_THREADS", None)
codes = [CliRunner().invoke(app, ["predict", {str(sgd_run)!r}, "--dry-run", "--threads", "3"]).exit_code]
os.rename({str(sgd_run / ".pdt")!r}, {str(sgd_run.parent / "store-3")!r})
codes.append(CliRunner().invoke(app, ["predict", {str(sgd_run)!r}, "--dry-run"]).exit_code)
print(json.dumps([codes, seen]))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [[0, 0], [3, 1]]
