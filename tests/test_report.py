"""`pdt report` and `pdt predict`'s summary: readable at 80 columns, with the steps the window is ordered by.

Most tests build the report from a hand-made store state (a GPT-2-sized name set, every
layer type, name-less checkpoints under each order rule); one runs real training
checkpoints through the CLI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from pdtcli.cli import app
from pdtcli.report import LEGEND, build_report, common_prefix, render_report, render_summary
from pdtcli.selection import layer_type
from pdtcli.store import Store
from pdtcli.store.records import HistoryEntry, Layout

FOLDER = "/runs/gpt/ckpts"
GPT2_BLOCK = [("ln_1.weight", [768]), ("ln_1.bias", [768]), ("attn.c_attn.weight", [768, 2304]),
              ("attn.c_attn.bias", [2304]), ("attn.c_proj.weight", [768, 768]), ("attn.c_proj.bias", [768]),
              ("ln_2.weight", [768]), ("ln_2.bias", [768]), ("mlp.c_fc.weight", [768, 3072]),
              ("mlp.c_fc.bias", [3072]), ("mlp.c_proj.weight", [3072, 768]), ("mlp.c_proj.bias", [768])]


def transformer_tensors() -> list[tuple[str, list[int]]]:
    """150 tensors named like GPT-2's, plus a conv stem and a scalar so that all six layer types occur."""
    tensors = [(f"transformer.h.{i}.{leaf}", shape) for i in range(12) for leaf, shape in GPT2_BLOCK]
    return tensors + [("transformer.wte.weight", [50257, 768]), ("transformer.wpe.weight", [1024, 768]),
                      ("transformer.ln_f.weight", [768]), ("transformer.ln_f.bias", [768]),
                      ("transformer.stem.conv.weight", [768, 3, 16, 16]), ("transformer.logit_scale", [])]


def numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def checkpoint(path: str, name_step: int | None, recorded_step: int | None, kind: str = "checkpoint") -> dict:
    return {"kind": kind, "path": path, "name_step": name_step, "recorded_step": recorded_step, "size": 1,
            "mtime": 0.0, "at": "2026-11-25T17:03:54+00:00"}


def make_data(tensors: list[tuple[str, list[int]]], snapshots: dict[int, dict], window: list[int], *,
              order: str = "name", fit_window: list[int] | None = None, history: list[dict] | None = None,
              masked: bool = True) -> dict:
    """What `api.load_state` returns, for a store with this layout, snapshots and window."""
    entries, offset = [], 0
    for name, shape in tensors:
        entries.append({"name": name, "shape": shape, "dtype": "float32", "offset": offset, "numel": numel(shape),
                        "layer_type": layer_type(name, tuple(shape))})
        offset += numel(shape)
    counts = [[e["numel"], e["numel"] // 3, e["numel"] // 4, e["numel"] // 2, e["numel"] // 5, 0] for e in entries]
    fit = None if fit_window is None else {
        "id": 1, "window": fit_window, "options": {"tau": 5, "modes": "exact", "rank": None, "rtol": 1e-6},
        "at": "2026-11-25T17:03:54+00:00", "rank": 4, "singular_values": [22.7, 1.77, 0.51, 0.32],
        "eigenvalues": [[1.0089, 0.0], [0.586, 0.0], [-0.2, 0.13], [-0.2, -0.13]], "growing_modes": 1,
        "start_offset": 3.3e-16}
    if fit is not None:
        fit["eigenvalue_magnitudes"] = [abs(complex(*z)) for z in fit["eigenvalues"]]
    mask = {"id": 1, "fit_id": 1, "label": "lower+upper+sign", "options": {}, "at": "2026-11-25T17:03:54+00:00",
            "totals": {}, "by_layer_type": {}} if masked and fit else None
    slots = sorted(snapshots)
    records = {str(i): dict(r, id=i, slot=slots.index(i)) for i, r in snapshots.items()}
    state = {"folder": FOLDER, "order": order, "history_len": len(window), "capacity": len(slots), "n": offset,
             "dtype": "float32", "snapshots": records,
             "slots": slots, "window": window, "next_id": max(slots, default=0) + 1, "ingested": [], "fit": fit,
             "mask": mask, "outputs": []}
    layout = Layout.from_dict({"tensors": entries, "skipped": [], "selection": {"include": [], "exclude": []},
                               "n": offset})
    arrays = {"mask/counts": np.array(counts, dtype=np.int64)} if mask else {}
    store = Store(Path(f"{FOLDER}/.pdt"), state, layout, [HistoryEntry.from_dict(h) for h in history or []], arrays)
    return store.describe()


def render(report: dict, width: int = 80, **kwargs) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed with console
    render_report(report, console, **kwargs)
    console.file.close()
    return console.export_text()


def section(text: str, title: str) -> list[str]:
    """The lines of the table under `title`: from its header to the blank line after it."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def assert_fits(text: str, width: int = 80) -> None:
    """Nothing cut short: no ellipsis anywhere, and no line wider than the console."""
    assert "…" not in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= width


def history_entry(command: str, steps: list[int | None], newest: str, output: str | None, mask: str,
                  kinds: list[str]) -> dict:
    return {"at": "2026-11-25T17:03:54+00:00", "command": command, "window_steps": steps, "newest": newest,
            "fit_id": 1, "rank": 4, "growing_modes": 1, "mask": mask, "totals": {"ratio": 0.347},
            "by_layer_type": {k: {"ratio": 0.25} for k in kinds}, "per_tensor_accepted": [], "output": output}


def gpt_report(**kwargs) -> dict:
    snapshots = {i: checkpoint(f"{FOLDER}/step_{i * 1000}.pt", i * 1000, None) for i in range(1, 6)}
    return build_report(make_data(transformer_tensors(), snapshots, [1, 2, 3, 4, 5], fit_window=[1, 2, 3, 4, 5],
                                  **kwargs))


def test_transformer_audit_is_readable_at_80_columns():
    report = gpt_report()
    assert {t["layer_type"] for t in report["tensors"]} == {"linear", "conv", "norm", "embedding", "bias", "other"}
    text = render(report)
    assert_fits(text)
    assert "names below are relative to `transformer.`" in text
    first_words = {line.split()[0] for line in text.splitlines() if line.strip()}
    for row in report["tensors"]:  # every name whole, without the shared prefix
        assert row["name"].removeprefix("transformer.") in first_words
    header = next(line for line in text.splitlines() if line.startswith("tensor "))
    assert header.split() == ["tensor", "elements", "acc", "%", "lower", "upper", "sign", "non-fin"]
    assert LEGEND in text and len(LEGEND) <= 80
    wte = next(line for line in text.splitlines() if line.startswith("wte.weight "))
    assert wte.split()[1] == "38.6M"  # 50257 x 768, abbreviated to fit; the JSON keeps the exact count
    assert next(t for t in report["tensors"] if t["name"] == "transformer.wte.weight")["elements"] == 38_597_376


def test_top_strips_the_prefix_of_the_rows_shown():
    text = render(gpt_report(), top=3)
    assert "relative to `transformer.`" in text  # wte and two blocks' MLP weights share only `transformer.`
    only_blocks = render(build_report(make_data(transformer_tensors()[:24], {1: checkpoint("/x/a_1.pt", 1, None)},
                                                [1], fit_window=[1])))
    assert "names below are relative to `transformer.h.`" in only_blocks
    assert "0.attn.c_attn.weight" in only_blocks.split()


def test_a_name_too_long_for_the_column_is_shortened_in_the_middle_on_one_line():
    long_name = "encoder.block.0.layer.1.DenseReluDense.wi_a_very_long_projection_name_indeed.weight"
    tensors = [(long_name, [512, 2048]), ("decoder.final_layer_norm.weight", [512])]
    text = render(build_report(make_data(tensors, {1: checkpoint("/x/a_1.pt", 1, None)}, [1], fit_window=[1])))
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    row = next(line for line in text.splitlines() if line.startswith("encoder."))
    shown = row.split()[0]  # whole on its line: its head, `…`, and the tail that names the weight
    assert shown.startswith("encoder.…") and shown.endswith("name_indeed.weight")


def test_common_prefix_stops_at_separators_and_never_takes_a_whole_name():
    assert common_prefix(["transformer.h.0.attn.weight", "transformer.h.1.attn.weight"]) == "transformer.h."
    assert common_prefix(["model/dense/kernel", "model/dense_1/kernel"]) == "model/"
    assert common_prefix(["layer.weight", "layer.bias"]) == "layer."
    assert common_prefix(["layer.weight", "layer"]) == ""
    assert common_prefix(["0.weight", "1.weight"]) == ""


def test_history_with_every_layer_type_and_long_labels_is_readable_at_80_columns():
    kinds = ["linear", "conv", "norm", "embedding", "bias", "other"]
    history = [history_entry("predict --dry-run", [4000, 5000], f"{FOLDER}/step_5000.pt", None,
                             "lower+upper+sign", kinds),
               history_entry("mask", [4000, 5000], f"{FOLDER}/step_5000.pt", None,
                             "random@lower+upper+sign(seed=3)", kinds),
               history_entry("apply", [None, None], f"{FOLDER}/checkpoint-final-averaged.safetensors",
                             f"{FOLDER}/checkpoint-final-averaged.pdt.safetensors", "lower+upper+sign", kinds)]
    text = render(gpt_report(history=history))
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 80
    runs = section(text, "training history (step = newest checkpoint of the fit's window)")
    assert runs[0].split() == ["#", "step", "when", "(UTC)", "command", "rank", "mask", "output"]
    row = runs[2].split()  # no step known: the file name, shortened in the middle as the output's
    assert row[2:7] == ["11-25", "17:03", "apply", "4", "all"] and len(row) == 8
    assert row[1].endswith("raged.safetensors") and "…" in row[1]
    assert row[7].endswith("aged.pdt.safetensors") and "…" in row[7]
    ratios = section(text, "training history: accepted ratio, model and per layer type")
    assert ratios[0].split() == ["#", "step", "model", *kinds] and len(ratios) == 3
    audits = section(text, "audits (masks, dry runs, -o copies: training did not resume from them)")
    rows = [line.split() for line in audits[2:]]
    assert [r[:5] for r in rows] == [["1", "5000", "11-25", "17:03", "dry-run"],
                                     ["2", "5000", "11-25", "17:03", "mask"]]
    assert [r[5] for r in rows] == ["all", "random@all(seed=3)"]  # `--criteria all`, whole


def test_the_step_shown_is_the_one_that_orders_the_window():
    snapshots = {1: checkpoint("/x/alpha.pt", None, 100), 2: checkpoint("/x/bravo.pt", None, 200),
                 3: checkpoint("/x/epoch_7.pt", 7, 300)}
    by_step = build_report(make_data([("w", [4])], snapshots, [1, 2, 3], order="step", fit_window=[1, 2, 3]))
    assert [w["step"] for w in by_step["window"]] == [100, 200, 300]
    assert [w["name"] for w in by_step["window"]] == ["alpha.pt", "bravo.pt", "epoch_7.pt"]
    assert "window (oldest first, * = fused by pdt): 100, 200, 300" in render(by_step)

    nameless = {1: checkpoint("/x/alpha.pt", None, None), 2: checkpoint("/x/bravo.pt", None, None),
                3: checkpoint("/x/epoch_7.pt", 7, None)}
    by_mtime = build_report(make_data([("w", [4])], nameless, [1, 2, 3], order="mtime", fit_window=[1, 2, 3]))
    assert [w["step"] for w in by_mtime["window"]] == [None, None, 7]
    text = render(by_mtime)
    assert "window (oldest first, * = fused by pdt): alpha.pt, bravo.pt, 7" in text and "None" not in text

    by_name = build_report(make_data([("w", [4])], snapshots, [1, 2, 3], order="name", fit_window=[1, 2, 3]))
    assert [w["step"] for w in by_name["window"]] == [None, None, 7]


def test_fit_window_reads_as_steps_even_after_its_snapshots_left_the_store():
    snapshots = {2: checkpoint("/x/e_2.pt", 2, None), 3: checkpoint("/x/e_3.pt", 3, None),
                 4: checkpoint("/x/e_4.pt", 4, None)}
    report = build_report(make_data([("w", [4])], snapshots, [2, 3, 4], fit_window=[1, 2, 3]))
    assert [(w["id"], w["step"]) for w in report["fit_window"]] == [(1, None), (2, 2), (3, 3)]
    assert report["fit_window"][0]["path"] is None  # snapshot 1's slot holds a newer checkpoint now
    assert "DMD fit on snapshot 1, 2, 3:" in render(report)
    assert json.loads(json.dumps(report))["fit_window"] == report["fit_window"]
    assert build_report(make_data([("w", [4])], snapshots, [2, 3, 4]))["fit_window"] == []


def test_resumed_from_is_the_fused_output_when_pdt_wrote_one_else_the_newest_checkpoint():
    snapshots = {1: checkpoint("/x/e_1.pt", 1, None), 2: checkpoint("/x/e_2.pt", 2, None),
                 3: checkpoint("/x/e_2.pdt.pt", 2, None, kind="fused")}
    fused = build_report(make_data([("w", [4])], snapshots, [1, 3], fit_window=[1, 2]))
    assert fused["resumed_from"] == "/x/e_2.pdt.pt"
    plain = build_report(make_data([("w", [4])], snapshots, [1, 2], fit_window=[1, 2]))
    assert plain["resumed_from"] == "/x/e_2.pt"
    assert build_report(make_data([("w", [4])], {}, []))["resumed_from"] is None
    assert "training assumed to resume from: /x/e_2.pt (the newest checkpoint)" in render(plain)


def test_summary_prints_warnings_and_stays_readable_at_80_columns():
    tensors = [{"name": "transformer.h.11.attn.c_attn.weight", "elements": 1_769_472, "ratio": 0.41},
               {"name": "transformer.h.0.mlp.c_proj.bias", "elements": 768, "ratio": 0.02}]
    totals = {"elements": 124_439_808, "accepted": 43_185_012, "ratio": 0.347, "fail_lower": 31_000_000,
              "fail_upper": 52_000_000, "fail_sign": 61_000_000, "nonfinite": 0}
    result = {"message": f"wrote {FOLDER}/step_5000.pdt.pt", "warnings": ["the window spans a learning-rate drop"],
              "mask": {"label": "lower+upper+sign", "totals": totals}}
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 - closed below
    render_summary(result, tensors, console)
    console.file.close()
    text = console.export_text()
    assert_fits(text)
    lines = text.splitlines()
    assert lines[0] == f"wrote {FOLDER}/step_5000.pdt.pt"
    assert "warning: the window spans a learning-rate drop" in lines
    assert "mask lower+upper+sign: accepted 43,185,012 of 124,439,808 (34.7%)" in lines
    assert "most accepted: transformer.h.11.attn.c_attn.weight 41.0%" in lines
    assert "fewest accepted: transformer.h.0.mlp.c_proj.bias 2.0%" in lines


@pytest.fixture
def nameless_run(sgd_run: Path) -> Path:
    """The 8 real checkpoints renamed to words without numbers: the order is the epoch saved inside."""
    words = ["hotel", "golf", "foxtrot", "echo", "delta", "charlie", "bravo", "alpha"]
    for epoch, word in enumerate(words, start=1):
        os.rename(sgd_run / f"epoch_{epoch}.pt", sgd_run / f"{word}.pt")
    return sgd_run


def cli_report(folder: Path) -> dict:
    result = CliRunner().invoke(app, ["report", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_real_run_report_before_and_after_the_fused_write(nameless_run):
    runner = CliRunner()
    assert runner.invoke(app, ["snapshot", str(nameless_run)]).exit_code == 0
    before = cli_report(nameless_run)
    assert [w["step"] for w in before["window"]] == [4, 5, 6, 7, 8]
    assert before["resumed_from"] == str(nameless_run / "alpha.pt")
    text = render(before)
    assert_fits(text)
    assert "window (oldest first, * = fused by pdt): 4, 5, 6, 7, 8" in text
    assert "training assumed to resume from: alpha.pt (the newest checkpoint)" in text

    result = runner.invoke(app, ["predict", str(nameless_run)])
    assert result.exit_code == 0, result.output
    after = cli_report(nameless_run)
    assert after["resumed_from"] == str(nameless_run / "alpha.pdt.pt")
    assert [w["step"] for w in after["fit_window"]] == [4, 5, 6, 7, 8]
    assert [w["kind"] for w in after["window"]][-1] == "fused"
    assert after["history"][-1]["window_steps"] == [4, 5, 6, 7, 8]
    for key in ("store", "folder", "window", "history_len", "predicted_elements", "selection", "skipped_tensors",
                "fit", "mask", "history", "note", "tensors", "model", "by_layer_type"):
        assert key in after
    text = render(after)
    assert_fits(text)
    assert "window (oldest first, * = fused by pdt): 4, 5, 6, 7, 8*" in text
    assert "training assumed to resume from: alpha.pdt.pt (fused by pdt)" in text
    assert "DMD fit on 4, 5, 6, 7, 8:" in text
    assert "None" not in text


def test_plot_draws_the_history_and_the_spectrum_from_a_real_store(sgd_run, tmp_path, monkeypatch):
    from test_hostile import pdt

    for epochs in (6, 7, 8):  # three steps of history, as cron would run them
        later = [p for p in sgd_run.glob("epoch_*.pt") if ".pdt" not in p.name and int(p.stem.split("_")[1]) > epochs]
        hidden = tmp_path / f"later{epochs}"
        hidden.mkdir()
        for p in later:
            p.rename(hidden / p.name)
        assert pdt("predict", sgd_run)[0] == 0
        for p in hidden.iterdir():
            p.rename(sgd_run / p.name)
    code, output = pdt("report", sgd_run, "--plot", tmp_path / "pdt.png", "--json")
    assert code == 0 and json.loads(output)["plot"] == str(tmp_path / "pdt.png")
    assert (tmp_path / "pdt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _ = pdt("report", sgd_run, "--plot", tmp_path / "pdt.svg")
    svg = (tmp_path / "pdt.svg").read_text()
    assert code == 0 and "accepted ratio" in svg and "DMD eigenvalues" in svg and "linear" in svg
    code, output = pdt("report", sgd_run, "--plot", tmp_path / "pdt.jpg")
    assert code == 2 and "pdt.jpg" in output and not (tmp_path / "pdt.jpg").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    code, output = pdt("report", sgd_run, "--plot", tmp_path / "other.png")
    assert code == 2 and "pip install 'pdtcli[plot]'" in output
