"""The settings a run was started with are kept in the store, as `--files` and the schedule are (issue 23).

A person who ran `pdt predict --criteria all` once and then `pdt predict` gets the mask they asked for,
not the default; a later run given another value uses it, keeps it, and says so in one line. Audits
(`--dry-run`, `-o`, `pdt mask`) use the kept values for what they are not given and keep nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from pdtcli import api
from pdtcli.cli import app

runner = CliRunner()
KEPT_LINE = "settings changed from those kept in the store"


def pdt_json(*args: object) -> dict:
    result = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def notes(record: dict) -> list[str]:
    """The lines of a result about kept settings (a step may also say what the window's lineage showed)."""
    return [w for w in record["warnings"] if KEPT_LINE in w]


def held_back(run: Path, count: int = 1) -> list[Path]:
    """The run without its newest `count` checkpoints, which `arrive` then saves one by one, as training would."""
    later = run.parent / "later"
    later.mkdir()
    for epoch in range(9 - count, 9):
        shutil.move(run / f"epoch_{epoch}.pt", later / f"epoch_{epoch}.pt")
    return sorted(later.iterdir())


def arrive(aside: Path, run: Path) -> None:
    shutil.move(aside, run / aside.name)


def test_criteria_all_then_a_bare_predict_keeps_all(sgd_run):
    """The issue's example: `--criteria all` once, then `pdt predict` at the next checkpoint."""
    [later] = held_back(sgd_run)
    first = pdt_json("predict", sgd_run, "--criteria", "all")
    assert first["mask"]["label"] == "lower+upper+sign" and notes(first) == []  # a new store: nothing to change
    arrive(later, sgd_run)
    bare = pdt_json("predict", sgd_run)
    assert bare["status"] == "written" and bare["output"] == str(sgd_run / "epoch_8.pdt.pt")
    assert bare["mask"]["label"] == "lower+upper+sign" and bare["mask"]["options"]["criteria"] == [
        "lower", "upper", "sign"]
    assert notes(bare) == []


def test_another_value_is_used_kept_and_said_in_one_line(sgd_run):
    pdt_json("predict", sgd_run, "--criteria", "all")
    changed = runner.invoke(app, ["predict", str(sgd_run), "--criteria", "upper,sign"])
    assert changed.exit_code == 0, changed.output
    said = [line for line in changed.output.splitlines() if KEPT_LINE in line]
    assert said == [f"warning: {KEPT_LINE}: --criteria upper,sign (was all); kept from now on"]
    assert "mask upper+sign" in changed.output
    again = pdt_json("predict", sgd_run)  # nothing new, and the mask of the kept criteria is the stored one
    assert again["status"] == "up-to-date" and again["mask"]["label"] == "upper+sign" and notes(again) == []
    several = pdt_json("predict", sgd_run, "--tau", "3", "--modes", "projected")
    assert notes(several) == [f"{KEPT_LINE}: --tau 3 (was 5), --modes projected (was exact); kept from now on"]
    assert several["fit"]["options"] == {"tau": 3, "modes": "projected", "rank": None, "rtol": 1e-6}


def test_in_place_is_kept_until_no_in_place(sgd_run):
    seventh, eighth = held_back(sgd_run, 2)
    first = pdt_json("predict", sgd_run, "--in-place")
    assert first["output"] == str(sgd_run / "epoch_6.pt")
    arrive(seventh, sgd_run)
    bare = pdt_json("predict", sgd_run)  # a script that resumes from one path gets the fused state there again
    assert bare["status"] == "written" and bare["output"] == str(sgd_run / "epoch_7.pt")
    assert not list(sgd_run.glob("*.pdt.*"))
    audit = pdt_json("predict", sgd_run, "-o", sgd_run.parent / "audit.pt")  # -o: a kept --in-place gives way
    assert audit["output"] == str(sgd_run.parent / "audit.pt") and notes(audit) == []
    arrive(eighth, sgd_run)
    off = pdt_json("predict", sgd_run, "--no-in-place")
    assert off["output"] == str(sgd_run / "epoch_8.pdt.pt")
    assert notes(off) == [f"{KEPT_LINE}: --no-in-place (was --in-place); kept from now on"]


def test_audits_use_the_kept_settings_and_keep_none(sgd_run):
    pdt_json("predict", sgd_run, "--criteria", "all", "--tau", "3")
    dry = pdt_json("predict", sgd_run, "--dry-run", "--criteria", "none")
    assert dry["mask"]["label"] == "none" and dry["fit"]["options"]["tau"] == 3  # tau: the kept one
    assert notes(dry) == [f"{KEPT_LINE}: --criteria none (was all); for this run only (--dry-run keeps no setting)"]
    masked = pdt_json("mask", sgd_run, "--criteria", "lower")
    assert masked["mask"]["label"] == "lower"
    assert notes(masked) == [f"{KEPT_LINE}: --criteria lower (was all); for this run only (pdt mask keeps no "
                             "setting)"]
    assert pdt_json("mask", sgd_run)["mask"]["label"] == "lower+upper+sign"  # bare: the kept criteria
    report = pdt_json("report", sgd_run)
    assert report["settings"] == {"tau": 3, "modes": "exact", "rank": None, "rtol": 1e-6, "dmd_scope": "model",
                                  "criteria": "all", "random": False, "seed": 0, "in_place": False}
    text = " ".join(runner.invoke(app, ["report", str(sgd_run)]).output.split())
    assert ("settings kept for the flags a run is not given: --tau 3 --modes exact --rank none --rtol 1e-06 "
            "--dmd-scope model --criteria all --no-random --seed 0 --no-in-place") in text


def test_rtol_given_drops_a_kept_rank(sgd_run):
    assert pdt_json("predict", sgd_run, "--rank", "2")["fit"]["rank"] == 2
    back = pdt_json("predict", sgd_run, "--rtol", "1e-6")
    assert back["fit"]["options"]["rank"] is None and back["fit"]["rank"] > 2
    assert notes(back) == [f"{KEPT_LINE}: --rank none (was 2); kept from now on"]


def test_the_python_api_follows_the_same_rule(sgd_run):
    [later] = held_back(sgd_run)
    api.predict(sgd_run, settings=api.Settings.build(criteria="all", random=True, seed=4))
    arrive(later, sgd_run)
    result = api.predict(sgd_run)  # no settings: the kept ones
    assert result.mask["label"] == "random@lower+upper+sign(seed=4)" and notes(result.as_dict()) == []
