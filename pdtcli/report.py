"""What the mask accepted and rejected, per tensor, per layer type and for the model.

Rejection columns overlap: an element failing several criteria is counted under each,
so they do not add up to the rejected total. Non-finite predictions are counted only
under `nonfinite`. With a random mask, `accepted` is the random selection while the
failure columns still describe the criteria.

The rendering must stay readable at 80 columns (cron mail, narrow terminals): tables
have no vertical rules, long counts are abbreviated (the JSON keeps them exact), text
cells fold instead of ending in an ellipsis, and tensor names lose their common prefix.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .mask import CRITERIA, summarize_counts, tensor_rows
from .options import as_flags
from .selection import LAYER_TYPES
from .store.lineage import FUSED_ABOVE, PLAIN_BELOW

OVERLAP_NOTE = ("failure columns overlap: an element that fails several criteria is counted under each; "
                "non-finite predictions only under nonfinite")
LEGEND = "acc %: accepted; lower, upper, sign, non-fin: failures per test, overlapping"  # one line at 80
_NAME_PARTS = re.compile(r"(?<=[./])")  # split after each separator: "a.b/c" -> "a.", "b/", "c"


def build_report(data: dict[str, Any]) -> dict:
    """The report as plain data (what `pdt report --json` prints and the tables show), from what
    the store describes of itself (`Store.describe`)."""
    layout = data["layout"]
    report: dict[str, Any] = {
        "store": data["store"],
        "folder": data["folder"],
        "window": data["window"],
        "fit_window": data["fit_window"],
        "resumed_from": data["resumed_from"],
        "schedule": data.get("schedule"),
        "settings": data.get("settings") or {},  # what the last predict ran with; later runs keep it ({}: none yet)
        "history_len": data["history_len"],
        "predicted_elements": data["n"],
        "selection": layout["selection"],
        "skipped_tensors": layout["skipped"],
        "carried_objects": layout.get("objects", []),
        "fit": data["fit"],
        "mask": data["mask"],
        "history": data["history"],
        "note": OVERLAP_NOTE,
        "unlocked": data.get("unlocked"),  # why the store was read without its lock, if it was
        "notes": data.get("notes", []),  # a store adopted from the folder it was copied from
    }
    if data["counts"] is not None and data["mask"]:
        counts = np.asarray(data["counts"])
        report["tensors"] = tensor_rows(layout["tensors"], counts)
        report.update(summarize_counts([t["layer_type"] for t in layout["tensors"]], counts))
    return report


def _label(view: dict) -> str:
    """A snapshot as a user knows it: its step, else its file name (names without numbers)."""
    if view["step"] is not None:
        return str(view["step"])
    return view["name"] or f"snapshot {view['id']}"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _count(value: int) -> str:
    """Exact below a million, else three significant digits (38.6M): a count column stays 7 wide."""
    if value < 1_000_000:
        return f"{value:,}"
    scaled, unit = value / 1e6, "M"
    for bigger in ("G", "T"):
        if scaled < 999.5:  # below this, three digits do not round up to 1000
            break
        scaled, unit = scaled / 1000, bigger
    return f"{scaled:.3g}{unit}"


def _when(at: str) -> str:
    """An ISO timestamp as `MM-DD HH:MM` in UTC (the store records UTC)."""
    moment = _dt.datetime.fromisoformat(at)
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.timezone.utc)
    return moment.strftime("%m-%d %H:%M")


def _command(command: str) -> str:
    """`predict --dry-run` as `dry-run`: the last word names what the run did."""
    return command.split()[-1].lstrip("-")


def _short_mask(label: str) -> str:
    """`lower+upper+sign` as `all`, the word `--criteria` takes for it: `random@all(seed=3)` fits a column."""
    return label.replace("+".join(CRITERIA), "all")


def common_prefix(names: list[str]) -> str:
    """The dotted or slashed path every name starts with, ending at a separator and never a whole name."""
    parts = [_NAME_PARTS.split(name)[:-1] for name in names]
    prefix = []
    for pieces in zip(*parts, strict=False):  # as far as the shortest name
        if len(set(pieces)) > 1:
            break
        prefix.append(pieces[0])
    return "".join(prefix)


def _table() -> Table:
    """A table without vertical rules: at 80 columns every character goes to the cells."""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)


def _show(console: Console, title: str, table: Table) -> None:
    """A blank line, then the title on its own line: as a table title it would wrap to a narrow table's width."""
    console.print()
    console.print(title, style="italic", highlight=False, markup=False)
    console.print(table)


def _counts_table(rows: list[tuple[str, dict]], first: str) -> Table:
    table = _table()
    table.add_column(first, overflow="fold")  # the one column that gives way: names fold, never "…"
    for column in ("elements", "acc %", "lower", "upper", "sign", "non-fin"):
        table.add_column(column, justify="right", no_wrap=True)
    for label, row in rows:
        table.add_row(escape(label), _count(row["elements"]), _pct(row["ratio"]), _count(row["fail_lower"]),
                      _count(row["fail_upper"]), _count(row["fail_sign"]), _count(row["nonfinite"]))
    return table


def _shown_path(path: str, folder: str) -> str:
    """The file name when it lies in the checkpoint folder (named at the top), else the whole path."""
    return Path(path).name if Path(path).parent == Path(folder) else path


def _descent(view: dict, folder: str) -> str:
    """What a window checkpoint descends from, and how pdt knows (`lineage.Evidence`)."""
    evidence = view["lineage_evidence"]
    decided = evidence is not None and not PLAIN_BELOW <= evidence <= FUSED_ABOVE
    if evidence is None:
        how = "assumed: the fused state and its checkpoint are too close to tell apart"
    else:
        how = f"{'shown by its values' if decided else 'assumed: its values do not tell'}, evidence {evidence:.2f}"
    state = "fused by pdt" if view["descends_from"] == "fused" else "plain checkpoint"
    return f"{_label(view)} descends from {_shown_path(view['descends_path'], folder)} ({state}; {how})"


def render_report(report: dict, console: Console, *, top: int | None = None) -> None:
    """Rich tables: the fit, per tensor, per layer type, the model, and the history of steps."""
    console.print(f"store {report['store']} for {report['folder']}", highlight=False, markup=False)
    window = ", ".join(f"{_label(w)}{'*' if w['kind'] == 'fused' else ''}" for w in report["window"])
    console.print(f"window (oldest first, * = fused by pdt): {window or 'empty'}", highlight=False, markup=False)
    if report["resumed_from"]:
        how = "fused by pdt" if report["window"][-1]["kind"] == "fused" else "the newest checkpoint"
        console.print(f"training assumed to resume from: {_shown_path(report['resumed_from'], report['folder'])} "
                      f"({how})", highlight=False, markup=False)
    for view in report["window"]:
        if view.get("descends_from"):
            console.print(_descent(view, report["folder"]), highlight=False, markup=False)
    schedule = report.get("schedule")
    if schedule:
        start = "as soon as the window is full" if schedule["start"] is None else f"from step {schedule['start']}"
        console.print(f"schedule: {start}, every {schedule['every']} checkpoint(s); {schedule['next']}",
                      highlight=False, markup=False)
    kept = as_flags(report.get("settings") or {}) or "none yet (the defaults)"
    console.print(f"settings kept for the flags a run is not given: {kept}", highlight=False, markup=False)
    fit = report["fit"]
    if fit:
        steps = ", ".join(_label(w) for w in report["fit_window"])
        console.print(f"DMD fit on {steps}: {fit['options']['modes']} modes, tau {fit['options']['tau']}, "
                      f"rank {fit['rank']}", highlight=False, markup=False)
        console.print(f"{fit['growing_modes']} eigenvalue(s) with |λ| > 1; "
                      f"|w_pred(0) - w_h| / |w_h| = {fit['start_offset']:.2e}", highlight=False, markup=False)
        modes = _table()
        for column in ("#", "σ", "λ", "|λ|"):
            modes.add_column(column, justify="right")
        eigenvalues = [complex(real, imag) for real, imag in fit["eigenvalues"]]
        for i, sigma in enumerate(fit["singular_values"]):
            lam = eigenvalues[i] if i < len(eigenvalues) else None
            modes.add_row(str(i + 1), f"{sigma:.4g}", "" if lam is None else f"{lam:.5g}",
                          "" if lam is None else f"{abs(lam):.5f}")
        _show(console, "singular values of X and eigenvalues of Ã", modes)
    if "tensors" not in report:
        console.print("no mask yet: run `pdt predict` or `pdt mask`", markup=False)
        return
    tensors = report["tensors"]
    shown = tensors if top is None else sorted(tensors, key=lambda r: -r["elements"])[:top]
    prefix = common_prefix([r["name"] for r in shown])
    relative = f"\nnames below are relative to `{prefix}`" if prefix else ""
    _show(console, f"per tensor (mask: {report['mask']['label']}){relative}",
          _counts_table([(r["name"].removeprefix(prefix), r) for r in shown], "tensor"))
    _show(console, "per layer type", _counts_table(list(report["by_layer_type"].items()), "layer type"))
    _show(console, "model", _counts_table([("all predicted", report["model"])], ""))
    console.print(LEGEND, style="dim", highlight=False, markup=False)
    if report["skipped_tensors"]:
        reasons: dict[str, int] = {}
        for item in report["skipped_tensors"]:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        console.print("carried over, not predicted: " + ", ".join(f"{n} {r}" for r, n in reasons.items()),
                      highlight=False, markup=False)
    if report["carried_objects"]:
        console.print("carried over as stored, never loaded: " + ", ".join(
            f"{item['where']} ({item['type']})" for item in report["carried_objects"]), highlight=False, markup=False)
    render_history(report["history"], console)


def render_history(history: list[dict], console: Console) -> None:
    """What each run did, then its mask ratio per layer type (the paper's masked-ratio curves).

    Two tables joined by `#`: with six layer types one table would need over 100 columns.
    """
    if not history:
        return
    runs = _table()
    for column in ("#", "when (UTC)", "command", "step", "rank", "mask", "output"):
        runs.add_column(column, no_wrap=column not in ("step", "output"), overflow="fold")  # file names fold
    for index, h in enumerate(history, 1):
        newest = h["window_steps"][-1] if h["window_steps"] else None
        step = str(newest) if newest is not None else Path(h["newest"]).name
        runs.add_row(str(index), _when(h["at"]), _command(h["command"]), escape(step), str(h["rank"]),
                     escape(_short_mask(h["mask"])), escape(Path(h["output"]).name if h["output"] else ""))
    _show(console, "history (step = newest of the fit's window)", runs)
    kinds = [k for k in LAYER_TYPES if any(k in h["by_layer_type"] for h in history)]
    ratios = _table()
    for column in ("#", "model", *kinds):
        ratios.add_column(column, justify="right", no_wrap=True)
    for index, h in enumerate(history, 1):
        per_kind = [_pct(h["by_layer_type"][k]["ratio"]) if k in h["by_layer_type"] else "" for k in kinds]
        ratios.add_row(str(index), _pct(h["totals"]["ratio"]), *per_kind)
    _show(console, "history: accepted ratio, model and per layer type", ratios)


def render_summary(result: dict, tensors: list[dict] | None, console: Console) -> None:
    """The few lines `pdt predict` prints: warnings, ratio, rejections per criterion, extreme layers.

    One fact per line, so that at 80 columns no line breaks inside a number or a name.
    """
    console.print(result["message"], soft_wrap=True, highlight=False, markup=False)
    for warning in result.get("warnings") or ():
        console.print(f"warning: {warning}", soft_wrap=True, highlight=False, markup=False)  # one line, for logs
    mask = result.get("mask")
    if not mask:
        return
    totals = mask["totals"]
    console.print(f"mask {mask['label']}: accepted {totals['accepted']:,} of {totals['elements']:,} "
                  f"({_pct(totals['ratio'])})", highlight=False, markup=False)
    console.print(f"failing (overlapping): lower {totals['fail_lower']:,}, upper {totals['fail_upper']:,}, "
                  f"sign {totals['fail_sign']:,}, nonfinite {totals['nonfinite']:,}", highlight=False, markup=False)
    if tensors:
        ranked = sorted((r for r in tensors if r["elements"]), key=lambda r: r["ratio"])
        if ranked:
            most, fewest = ranked[-1], ranked[0]
            console.print(f"most accepted: {most['name']} {_pct(most['ratio'])}", highlight=False, markup=False)
            console.print(f"fewest accepted: {fewest['name']} {_pct(fewest['ratio'])}", highlight=False,
                          markup=False)
