"""Issue 23, the audit a person reads at 80 columns: `pdt report` (and `pdt predict`'s summary)
at COLUMNS=80 and 40 compared as text; criteria the mask did not apply marked; the fit's window
named after its snapshots left the ring; the schedule's count; audits apart from the training
history (tables and plot); one next step before the first fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import training
from rich.console import Console
from test_hostile import one_error_line, pdt
from test_report import FOLDER, checkpoint, history_entry, make_data, render, section
from test_schedule import hold_back

from pdtcli import api
from pdtcli import report as reports
from pdtcli.report import build_report, render_summary

LLAMA = [(f"model.layers.{i}.{leaf}", [64, 64]) for i in range(2) for leaf in (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight")] + [
    ("model.embed_tokens.weight", [1000, 64]), ("lm_head.weight", [1000, 64])]


def llama_report(history: list[dict] | None = None, label: str = "lower+upper+sign") -> dict:
    data = make_data(LLAMA, {i: checkpoint(f"{FOLDER}/epoch_{i:04d}.pt", i, None) for i in range(1, 6)},
                     [1, 2, 3, 4, 5], fit_window=[1, 2, 3, 4, 5], history=history)
    data["mask"]["label"] = label
    return build_report(data)


def test_shorten_keeps_the_tail_that_tells_names_apart_with_the_ellipsis_in_the_middle():
    names = ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"]
    assert reports.shorten(names, 40) == names
    assert reports.shorten(names, 32) == ["model.…0.self_attn.k_proj.weight", "model.…0.self_attn.q_proj.weight",
                                  "model.…1.self_attn.k_proj.weight", "lm_head.weight"]
    for width in (24, 16, 12):  # never longer than the width, never the same for two names
        short = reports.shorten(names, width)
        assert all(len(s) <= width for s in short) and len(set(short)) == len(names)
        assert all(s.endswith("weight") and (s == n or "…" in s) for s, n in zip(short, names, strict=True))


def name_cells(text: str, title: str, end: str) -> tuple[list[str], list[str]]:
    """The header lines and the first cell of every row of the tables from `title` to `end` (one table,
    or more at a narrow width)."""
    lines = text.splitlines()
    block = lines[lines.index(title) + 1:lines.index(end)]
    rows = [line for line in block if line.strip() and not line.startswith("─")]
    headers = [line for line in rows if line.startswith("tensor ")]
    return headers, [line.split()[0] for line in rows if line not in headers]


@pytest.mark.parametrize("width", [80, 40])
def test_long_names_are_shortened_in_the_middle_never_wrapped_and_never_vanish(width):
    text = render(llama_report(), width)
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width
    headers, cells = name_cells(text, "per tensor (mask: lower+upper+sign)", "per layer type")
    assert len(cells) == len(LLAMA) * len(headers)  # every row of every table has its name, on one line
    shown = set(cells)
    assert len(shown) == len(LLAMA)  # told apart
    assert all(c.endswith("weight") for c in shown)
    lines = text.splitlines()
    if width == 80:
        assert {"model.layers.0.…k_proj.weight", "model.layers.1.…k_proj.weight", "lm_head.weight"} <= shown
        assert "model.layers.0.self_attn.k_proj.we" not in text and not any(line.strip() == "ight"
                                                                           for line in lines)
    else:
        assert len(headers) == 2  # the columns that do not fit beside the names: a second table, names again
        layer_headers = [line for line in lines if line.startswith("layer type ")]
        assert [h.split()[2:] for h in layer_headers] == [["elements", "acc", "%", "lower"],
                                                          ["upper", "sign", "non-fin"]]


def test_history_has_a_step_column_and_whole_output_names_at_80_and_40_columns():
    history = [dict(history_entry("predict", [5, 6], f"{FOLDER}/epoch_0006.pt", f"{FOLDER}/epoch_0006.pdt.pt",
                                  "upper+sign", ["linear"]), training=True)]
    report = llama_report(history)
    wide = render(report, 80)
    assert section(wide, "training history (step = newest checkpoint of the fit's window)")[2].split() == [
        "1", "6", "11-25", "17:03", "predict", "4", "upper+sign", "epoch_0006.pdt.pt"]
    ratios = section(wide, "training history: accepted ratio, model and per layer type")
    assert [ratios[0], ratios[2]] == ["#  step  model  linear", "1  6     34.7%   25.0%"]
    narrow = render(report, 40)
    assert max(len(line.rstrip()) for line in narrow.splitlines()) <= 40
    lines = [line.rstrip() for line in narrow.splitlines()]
    start = lines.index("checkpoint of the fit's window)") + 1
    assert lines[start:start + 7:] == [
        "#  step  when (UTC)   command  rank", "─" * 35, "1  6     11-25 17:03  predict     4", "",
        "#  step  mask        output", "─" * 38, "1  6     upper+sign  epoch_0006.pdt.pt"]


def test_criteria_the_mask_did_not_apply_are_marked_in_the_report_the_summary_and_the_json():
    report = llama_report(label="upper+sign")
    assert report["criteria"] == {"lower": {"applied": False}, "upper": {"applied": True},
                                  "sign": {"applied": True}}
    text = render(report, 80)
    header = next(line for line in text.splitlines() if line.startswith("tensor "))
    assert header.split() == ["tensor", "elements", "acc", "%", "(lower)", "upper", "sign", "non-fin"]
    assert "(lower): not applied by the mask upper+sign; its failures are shown for reference" in words(text)
    assert llama_report()["criteria"]["lower"] == {"applied": True}
    assert "(lower)" not in render(llama_report(), 80)

    totals = {"elements": 740, "accepted": 532, "ratio": 0.719, "fail_lower": 108, "fail_upper": 82,
              "fail_sign": 177, "nonfinite": 0}
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed below
    render_summary({"message": "wrote x", "mask": {"label": "upper+sign", "totals": totals}}, None, console)
    console.file.close()
    assert console.export_text().splitlines()[1:] == ["mask upper+sign: accepted 532 of 740 (71.9%)",
                                                       "failing (overlapping): upper 82, sign 177, nonfinite 0",
                                                       "not applied, shown for reference: lower 108 would fail"]


def words(text: str) -> str:
    """Text with the lines a console wrapped joined again, spaces collapsed."""
    return " ".join(text.split())


def report_of(folder: Path, width: int = 80) -> tuple[dict, str]:
    """`pdt report`'s data and its text at `width`, as the command builds them."""
    data = build_report(api.load_state(folder))
    return data, render(data, width)


@pytest.mark.parametrize("not_due", [False, True])
def test_fit_window_names_its_checkpoints_after_one_more_is_ingested(sgd_run, tmp_path, not_due):
    """The fused state took the ring's spare slot; the next checkpoint takes the slot of the fit's oldest."""
    hold_back(sgd_run, tmp_path / "later", range(6, 9))
    assert pdt("predict", sgd_run, "--every", "1")[0] == 0  # epoch_5.pdt.pt
    if not_due:  # training resumed from the fused state: under --every 1 the next write is not due
        training.train(sgd_run, 1, resume=sgd_run / "epoch_5.pdt.pt")
    else:
        os.replace(tmp_path / "later" / "epoch_6.pt", sgd_run / "epoch_6.pt")
    code, output = pdt("predict" if not_due else "snapshot", sgd_run, "--json")
    assert code == 0 and json.loads(output)["status"] == ("not-due" if not_due else "ingested"), output
    data, text = report_of(sgd_run)
    assert [(w["kind"], w["step"], w["name"]) for w in data["fit_window"]] == [
        ("checkpoint", step, f"epoch_{step}.pt") for step in range(1, 6)]
    assert "DMD fit on 1, 2, 3, 4, 5: exact modes" in text and "snapshot" not in text


def test_schedule_says_every_checkpoint_and_counts_in_json(sgd_run, tmp_path):
    hold_back(sgd_run, tmp_path / "later", range(4, 9))
    assert pdt("snapshot", sgd_run)[0] == 0
    data, text = report_of(sgd_run)
    assert {k: data["schedule"][k] for k in ("every", "due_in", "due_now")} == {"every": 0, "due_in": 2,
                                                                                 "due_now": False}
    assert "every 0" not in text
    assert ("schedule: as soon as the window is full, a fused one at every checkpoint; the window needs 2 more "
            "checkpoint(s) first; the next fused checkpoint is due after 2 more checkpoint(s)") in words(text)
    for epoch in (4, 5):
        os.replace(tmp_path / "later" / f"epoch_{epoch}.pt", sgd_run / f"epoch_{epoch}.pt")
    assert pdt("snapshot", sgd_run)[0] == 0
    assert report_of(sgd_run)[0]["schedule"]["due_now"] is True


def test_before_the_first_fit_report_mask_and_apply_name_the_one_next_step(sgd_run, tmp_path):
    hold_back(sgd_run, tmp_path / "later", range(4, 9))
    assert pdt("snapshot", sgd_run)[0] == 0
    need = "need 2 more checkpoint(s) before DMD can fit (window holds 3 of 5)"
    _, text = report_of(sgd_run)
    assert words(text).endswith(f"no fit yet: {need}; run `pdt predict` once training has saved them")
    for command in ("mask", "apply"):
        code, output = pdt(command, sgd_run)
        assert code == 6
        assert one_error_line(output) == (f"pdt: error: {sgd_run / '.pdt'}: no fit yet: {need}; run `pdt predict` "
                                          "once training has saved them")
    code, output = pdt("predict", sgd_run, "--dry-run")
    assert code == 0 and need in output


def test_audits_are_kept_apart_from_the_training_history(sgd_run, tmp_path):
    hold_back(sgd_run, tmp_path / "later", range(7, 9))
    assert pdt("predict", sgd_run)[0] == 0
    assert pdt("mask", sgd_run, "--criteria", "all")[0] == 0
    assert pdt("apply", sgd_run, "-o", tmp_path / "ablation.pt")[0] == 0
    data, text = report_of(sgd_run)
    assert [(h["command"], h["training"]) for h in data["history"]] == [("predict", True), ("mask", False),
                                                                         ("apply", False)]
    training = section(text, "training history (step = newest checkpoint of the fit's window)")
    assert [line.split()[:2] + line.split()[4:5] for line in training[2:]] == [["1", "6", "predict"]]
    audits = section(text, "audits (masks, dry runs, -o copies: training did not resume from them)")
    assert audits[0].split() == ["#", "step", "when", "(UTC)", "command", "mask", "acc", "%", "output"]
    assert [line.split()[4] for line in audits[2:]] == ["mask", "apply"]
    assert audits[3].split()[-1] == "ablation.pt"


def test_history_of_an_old_store_tells_audits_from_steps_by_their_command():
    old = [history_entry(command, [5], f"{FOLDER}/epoch_0005.pt", None, "upper+sign", ["linear"])
           for command in ("predict", "mask", "predict --dry-run", "in-loop")]  # recorded without `training`
    assert [h["training"] for h in llama_report(old)["history"]] == [True, False, False, True]


def test_plot_x_axis_is_the_training_step_with_audits_apart(sgd_run, tmp_path):
    pytest.importorskip("matplotlib")
    hold_back(sgd_run, tmp_path / "later", range(7, 9))
    assert pdt("predict", sgd_run)[0] == 0
    assert pdt("mask", sgd_run, "--criteria", "all")[0] == 0  # two rows at step 6: the axis stayed "run" before
    code, _ = pdt("report", sgd_run, "--plot", tmp_path / "pdt.svg")
    svg = (tmp_path / "pdt.svg").read_text()
    assert code == 0
    assert "training step" in svg and "<!-- run -->" not in svg
    assert "<!-- accepted ratio -->" in svg and "accepted ratio, model and per layer type" in svg
    assert "masked ratio" not in svg
    assert "model, audits" in svg and "(not applied)" in svg  # the predict's default mask left out `lower`
    assert "(grows)" in svg and "(decays)" in svg


@pytest.mark.slow
def test_pdt_report_at_columns_40_in_a_real_process(sgd_run, tmp_path):
    hold_back(sgd_run, tmp_path / "later", range(7, 9))
    assert pdt("predict", sgd_run)[0] == 0
    env = dict(os.environ, COLUMNS="40")
    result = subprocess.run([sys.executable, "-m", "pdtcli", "report", str(sgd_run)], capture_output=True,
                            text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line.rstrip() for line in result.stdout.splitlines()]
    assert max(len(line.rstrip()) for line in lines) <= 40
    assert "tensor    elements   acc %  (lower)" in lines
    assert "0.weight       512" in " ".join(lines) or any(line.startswith("0.weight ") for line in lines)
    assert [line for line in lines if line.startswith("#  step  mask")] == ["#  step  mask        output"]
