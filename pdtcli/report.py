"""What the mask accepted and rejected, per tensor, per layer type and for the model.

Rejection columns overlap: an element failing several criteria is counted under each,
so they do not add up to the rejected total. Non-finite predictions are counted only
under `nonfinite`. With a random mask, `accepted` is the random selection while the
failure columns still describe the criteria.

The rendering must stay readable at 80 columns (cron mail, narrow terminals) and at 40:
tables have no vertical rules, long counts are abbreviated (the JSON keeps them exact),
tensor names lose their common prefix, a name too long for the width left is shortened in
the middle (`shorten`) and never wrapped, and columns that do not fit beside the names go
to a second table that repeats them (`_tables`).

The history is two histories: the steps of training (runs whose output training resumes
from) and the audits (masks, dry runs, copies written with `-o`), in tables of their own.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .mask import CRITERIA, criteria_of, summarize_counts, tensor_rows
from .options import as_flags
from .selection import LAYER_TYPES
from .store.lineage import FUSED_ABOVE, PLAIN_BELOW
from .store.schedule import every_text

OVERLAP_NOTE = ("failure columns overlap: an element that fails several criteria is counted under each; "
                "non-finite predictions only under nonfinite")
LEGEND = "acc %: accepted; lower, upper, sign, non-fin: failures per test, overlapping"  # one line at 80
_NAME_PARTS = re.compile(r"(?<=[./])")  # split after each separator: "a.b/c" -> "a.", "b/", "c"
_SEPARATOR = re.compile(r"[./]")
ELLIPSIS = "…"
NAME_LEAST = 12  # characters a name column keeps however narrow the console: `0.…c_fc.weight`
GAP = 2  # characters between two columns of `_table` (its blank rule and the padding)
COUNT_COLUMNS = (("elements", "elements"), ("acc %", "ratio"), ("lower", "fail_lower"), ("upper", "fail_upper"),
                 ("sign", "fail_sign"), ("non-fin", "nonfinite"))


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
        "adapter": layout.get("adapter"),  # the run trains a fine-tuning adapter (PEFT LoRA), not the model
        "fit": data["fit"],
        "mask": data["mask"],
        "history": data["history"],
        "note": OVERLAP_NOTE,
        "waiting": data.get("waiting"),  # before the first fit: the checkpoints the window still lacks
        "unlocked": data.get("unlocked"),  # why the store was read without its lock, if it was
        "notes": data.get("notes", []),  # a store adopted from the folder it was copied from
    }
    if data["mask"]:
        applied = criteria_of(data["mask"]["label"])
        report["criteria"] = {name: {"applied": name in applied} for name in CRITERIA}
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


def shorten(names: list[str], width: int) -> list[str]:
    """Each name in at most `width` characters (at least 3), never wrapped: a longer one keeps its head
    up to its first separator (when that is short: a layer's number, `model.`) and as much of its tail
    (the leaf that tells a weight from a bias) as fits, with `…` in the middle, where the names of one
    model differ least. Names that come out the same keep their heads up to where they differ
    (`model.layers.0.…q_proj.weight`); any still the same, the later one's cut moves until it differs."""
    width = max(3, width)
    heads = [_head(name, width) for name in names]
    short = [_cut(name, width, head) for name, head in zip(names, heads, strict=True)]
    groups: dict[str, list[int]] = {}
    for i, text in enumerate(short):
        groups.setdefault(text, []).append(i)
    for group in groups.values():
        ordered = sorted(group, key=names.__getitem__)
        for a, b in itertools.pairwise(ordered):  # neighbours in sorted order: the longest shared heads
            differ = len(os.path.commonprefix([names[a], names[b]]))
            for i in (a, b):
                heads[i] = max(heads[i], _through_part(names[i], differ, width))
        for i in group:
            short[i] = _cut(names[i], width, heads[i])
    for i, name in enumerate(names):
        if short.count(short[i]) > 1 and len(name) > width:
            others = set(short[:i] + short[i + 1:])
            short[i] = next((c for c in (_cut(name, width, h) for h in range(width - 1)) if c not in others),
                            short[i])
    return short


def _through_part(name: str, index: int, width: int) -> int:
    """The head of `name` through the part that holds character `index`, if it leaves a third of `width`
    to the tail, else 0."""
    found = _SEPARATOR.search(name, index)
    end = found.end() if found else len(name)
    return end if end < len(name) and end + 1 + width // 3 <= width else 0


def _head(name: str, width: int) -> int:
    """How many leading characters a shortened name keeps: its first part with its separator, if that
    takes at most a third of the width, else none."""
    first = len(_NAME_PARTS.split(name, maxsplit=1)[0])
    return first if first < len(name) and first <= width // 3 else 0


def _cut(name: str, width: int, head: int) -> str:
    """`name` in `width` characters: its first `head`, `…`, and its tail (without a separator next to the `…`)."""
    if len(name) <= width:
        return name
    tail = name[len(name) - (width - head - 1):]
    return name[:head] + ELLIPSIS + (tail[1:] if tail[0] in "./" else tail)


@dataclass
class Column:
    """A column of a report table: its header, its cells (text), and how it gives way when narrow."""

    header: str
    cells: list[str]
    right: bool = False  # numbers: right-justified
    name: bool = False  # names: shortened in the middle (`shorten`) to the width the other columns leave

    @property
    def natural(self) -> int:
        """Characters it takes when nothing is shortened."""
        return max([len(self.header), *map(len, self.cells)])

    @property
    def least(self) -> int:
        """Characters it takes at the narrowest: a name column NAME_LEAST (or its header), any other all."""
        return min(self.natural, max(len(self.header), NAME_LEAST)) if self.name else self.natural


def _tables(columns: list[Column], width: int, keys: int = 1) -> list[Table]:
    """The columns as tables no wider than `width`: the first `keys` columns (those that name a row) in
    each, then the others in order, as many as fit beside them; name columns take what is left.

    One table at 80 columns for every table pdt prints; at 40, two or three, each with its names.
    """
    named, rest = columns[:keys], columns[keys:]
    base = sum(c.least + GAP for c in named)
    groups: list[list[Column]] = []
    used = width
    for column in rest:
        if used + column.least > width:  # a new table (also the first): the key columns again
            groups.append([])
            used = base
        groups[-1].append(column)
        used += column.least + GAP
    return [_table_of(named + group, width) for group in groups or [[]]]


def _table_of(columns: list[Column], width: int) -> Table:
    """One table of `columns`, its name columns shortened to share the width the others leave (in
    proportion to what each lacks)."""
    spare = max(0, width - sum(c.least for c in columns) - GAP * (len(columns) - 1))
    lacking = [c.natural - c.least if c.name else 0 for c in columns]
    table = _table()
    cells = []
    for column, lacks in zip(columns, lacking, strict=True):
        size = column.least + min(lacks, spare * lacks // max(1, sum(lacking)))
        cells.append(shorten(column.cells, size) if column.name else column.cells)
        table.add_column(column.header, justify="right" if column.right else "left", no_wrap=True)
    for row in zip(*cells, strict=True):
        table.add_row(*map(escape, row))
    return table


def _table() -> Table:
    """A table without vertical rules: at 80 columns every character goes to the cells."""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)


def _show(console: Console, title: str, *tables: Table) -> None:
    """A blank line, then the title on its own line (as a table title it would wrap to a narrow table's
    width), then the tables (more than one when the console is too narrow for one)."""
    console.print()
    console.print(title, style="italic", highlight=False, markup=False)
    for index, table in enumerate(tables):
        if index:
            console.print()
        console.print(table)


def _not_applied(report: dict) -> list[str]:
    """The criteria the stored mask did not apply: their failures are shown for reference only."""
    return [name for name, how in (report.get("criteria") or {}).items() if not how["applied"]]


def _counts_tables(rows: list[tuple[str, dict]], first: str, skipped: list[str], width: int) -> list[Table]:
    """Counts per row (elements, accepted %, failures per criterion): a criterion in `skipped`, which the
    mask did not apply, has its header in parentheses."""
    columns = [Column(first, [label for label, _ in rows], name=True)]
    for header, key in COUNT_COLUMNS:
        shown = f"({header})" if header in skipped else header
        columns.append(Column(shown, [_pct(row[key]) if key == "ratio" else _count(row[key]) for _, row in rows],
                              right=True))
    return _tables(columns, width)


def _shown_path(path: str, folder: str) -> str:
    """The file name when it lies in the checkpoint folder (named at the top), else the whole path."""
    return Path(path).name if Path(path).parent == Path(folder) else path


def _adapter_line(adapter: dict) -> str:
    """`adapter run: LoRA adapter (peft), r=8, alpha=16, target modules q, v`: what the predicted tensors are."""
    kind = "LoRA" if adapter["type"] == "LORA" else adapter["type"]
    parts = [f"{kind} adapter ({adapter['library']})"]
    parts += [f"{key}={adapter[key]}" for key in ("r", "alpha") if adapter.get(key) is not None]
    if adapter.get("target_modules"):
        parts.append("target modules " + ", ".join(adapter["target_modules"]))
    return "adapter run: " + ", ".join(parts) + "; the predicted tensors are the adapter's, the base model is not read"


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
    """Rich tables at the console's width: the fit, per tensor, per layer type, the model, and the
    history of training steps and of audits."""
    console.print(f"store {report['store']} for {report['folder']}", highlight=False, markup=False)
    if report.get("adapter"):
        console.print(_adapter_line(report["adapter"]), highlight=False, markup=False)
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
        console.print(f"schedule: {start}, {every_text(schedule['every'])}; {schedule['next']}",
                      highlight=False, markup=False)
    kept = as_flags(report.get("settings") or {}) or "none yet (the defaults)"
    console.print(f"settings kept for the flags a run is not given: {kept}", highlight=False, markup=False)
    fit = report["fit"]
    if fit:
        _render_fit(report, fit, console)
    if "tensors" not in report:
        console.print(_next_step(report), markup=False, highlight=False)
        return
    tensors = report["tensors"]
    shown = tensors if top is None else sorted(tensors, key=lambda r: -r["elements"])[:top]
    prefix = common_prefix([r["name"] for r in shown])
    relative = f"\nnames below are relative to `{prefix}`" if prefix else ""
    skipped, width = _not_applied(report), console.width
    _show(console, f"per tensor (mask: {report['mask']['label']}){relative}",
          *_counts_tables([(r["name"].removeprefix(prefix), r) for r in shown], "tensor", skipped, width))
    _show(console, "per layer type",
          *_counts_tables(list(report["by_layer_type"].items()), "layer type", skipped, width))
    _show(console, "model", *_counts_tables([("all predicted", report["model"])], "", skipped, width))
    console.print(LEGEND, style="dim", highlight=False, markup=False)
    if skipped:
        console.print(f"({'), ('.join(skipped)}): not applied by the mask {report['mask']['label']}; its failures "
                      "are shown for reference", style="dim", highlight=False, markup=False)
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


def _render_fit(report: dict, fit: dict, console: Console) -> None:
    """The fit's window (as steps, else names), its options, and its singular values and eigenvalues."""
    steps = ", ".join(_label(w) for w in report["fit_window"])
    each = fit.get("per_tensor")
    if each:  # one fit per tensor: their ranges in one line, no spectrum of one fit to show
        console.print(f"DMD fit per tensor on {steps}: {fit['options']['modes']} modes, tau "
                      f"{fit['options']['tau']}; {each['tensors']} fits, rank {_span(each['rank'], 'd')}, "
                      f"spectral radius {_span(each['spectral_radius'], '.4f')}, {each['growing_tensors']} with "
                      f"|λ| > 1", highlight=False, markup=False)
        return
    console.print(f"DMD fit on {steps}: {fit['options']['modes']} modes, tau {fit['options']['tau']}, "
                  f"rank {fit['rank']}", highlight=False, markup=False)
    console.print(f"{fit['growing_modes']} eigenvalue(s) with |λ| > 1; "
                  f"|w_pred(0) - w_h| / |w_h| = {fit['start_offset']:.2e}", highlight=False, markup=False)
    modes = _table()
    for column in ("#", "σ", "λ", "|λ|"):
        modes.add_column(column, justify="right", no_wrap=True)
    eigenvalues = [complex(real, imag) for real, imag in fit["eigenvalues"]]
    for i, sigma in enumerate(fit["singular_values"]):
        lam = eigenvalues[i] if i < len(eigenvalues) else None
        modes.add_row(str(i + 1), f"{sigma:.4g}", "" if lam is None else f"{lam:.5g}",
                      "" if lam is None else f"{abs(lam):.5f}")
    _show(console, "singular values of X and eigenvalues of Ã", modes)


def _span(bounds: list, spec: str) -> str:
    """A range `lo–hi` (one value when both are the same)."""
    lo, hi = (format(b, spec) for b in bounds)
    return lo if lo == hi else f"{lo}–{hi}"


def _next_step(report: dict) -> str:
    """What to run for a mask to report, as the one next step: before the first fit, the checkpoints
    the window lacks (no command can fit before they are saved)."""
    if report.get("waiting"):
        return f"no fit yet: {report['waiting']}; run `pdt predict` once training has saved them"
    if not report["fit"]:
        return "no fit yet: run `pdt predict` (or `pdt predict --dry-run` to fit and mask only)"
    return "no mask yet: run `pdt mask` (or `pdt predict`)"


def _step(h: dict) -> str:
    """A history row's step: the newest of its fit's window, else that checkpoint's file name."""
    newest = h["window_steps"][-1] if h["window_steps"] else None
    return str(newest) if newest is not None else Path(h["newest"]).name


def render_history(history: list[dict], console: Console) -> None:
    """The steps of training, their accepted ratio per layer type (the paper's masked-ratio curves), and
    apart from them the audits (`HistoryEntry.training`). Each table names its rows by # and step."""
    training = [h for h in history if h.get("training", True)]
    audits = [h for h in history if not h.get("training", True)]
    width = console.width
    if training:
        keys = [Column("#", [str(i) for i in range(1, len(training) + 1)], right=True),
                Column("step", [_step(h) for h in training], name=True)]
        _show(console, "training history (step = newest checkpoint of the fit's window)", *_tables(keys + [
            Column("when (UTC)", [_when(h["at"]) for h in training]),
            Column("command", [_command(h["command"]) for h in training]),
            Column("rank", [str(h["rank"]) for h in training], right=True),
            Column("mask", [_short_mask(h["mask"]) for h in training], name=True),
            Column("output", [Path(h["output"]).name if h["output"] else "" for h in training], name=True)],
            width, keys=2))
        kinds = [k for k in LAYER_TYPES if any(k in h["by_layer_type"] for h in training)]
        ratios = [Column("model", [_pct(h["totals"]["ratio"]) for h in training], right=True)]
        ratios += [Column(k, [_pct(h["by_layer_type"][k]["ratio"]) if k in h["by_layer_type"] else ""
                              for h in training], right=True) for k in kinds]
        _show(console, "training history: accepted ratio, model and per layer type",
              *_tables(keys + ratios, width, keys=2))
    if audits:
        _show(console, "audits (masks, dry runs, -o copies: training did not resume from them)", *_tables([
            Column("#", [str(i) for i in range(1, len(audits) + 1)], right=True),
            Column("step", [_step(h) for h in audits], name=True),
            Column("when (UTC)", [_when(h["at"]) for h in audits]),
            Column("command", [_command(h["command"]) for h in audits]),
            Column("mask", [_short_mask(h["mask"]) for h in audits], name=True),
            Column("acc %", [_pct(h["totals"]["ratio"]) for h in audits], right=True),
            Column("output", [Path(h["output"]).name if h["output"] else "" for h in audits], name=True)],
            width, keys=2))


def render_summary(result: dict, tensors: list[dict] | None, console: Console) -> None:
    """The few lines `pdt predict` prints: warnings, ratio, rejections per criterion, extreme layers.

    One fact per line, so that at 80 columns no line breaks inside a number or a name; the failures of
    a criterion the mask did not apply are on a line of their own, for reference.
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
    applied = criteria_of(mask["label"])
    failing = [f"{name} {totals['fail_' + name]:,}" for name in CRITERIA if name in applied]
    failing.append(f"nonfinite {totals['nonfinite']:,}")
    console.print(f"failing (overlapping): {', '.join(failing)}", highlight=False, markup=False)
    skipped = [f"{name} {totals['fail_' + name]:,}" for name in CRITERIA if name not in applied]
    if skipped:
        console.print(f"not applied, shown for reference: {', '.join(skipped)} would fail", highlight=False,
                      markup=False)
    if tensors:
        ranked = sorted((r for r in tensors if r["elements"]), key=lambda r: r["ratio"])
        if ranked:
            most, fewest = ranked[-1], ranked[0]
            console.print(f"most accepted: {most['name']} {_pct(most['ratio'])}", highlight=False, markup=False)
            console.print(f"fewest accepted: {fewest['name']} {_pct(fewest['ratio'])}", highlight=False,
                          markup=False)
