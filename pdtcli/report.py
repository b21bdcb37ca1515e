"""What the mask accepted and rejected, per tensor, per layer type and for the model.

Rejection columns overlap: an element failing several criteria is counted under each,
so they do not add up to the rejected total. Non-finite predictions are counted only
under `nonfinite`. With a random mask, `accepted` is the random selection while the
failure columns still describe the criteria.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .mask import COUNT_COLUMNS
from .selection import LAYER_TYPES

OVERLAP_NOTE = ("failure columns overlap: an element that fails several criteria is counted under each; "
                "non-finite predictions only under nonfinite")


def _row(counts: np.ndarray) -> dict:
    row = {name: int(value) for name, value in zip(COUNT_COLUMNS, counts, strict=False)}
    row["ratio"] = row["accepted"] / row["elements"] if row["elements"] else 0.0
    return row


def summarize_counts(entries: list[dict], counts: np.ndarray) -> dict:
    """Roll per-tensor counts up by layer type and for the whole model."""
    counts = np.asarray(counts, dtype=np.int64).reshape(len(entries), len(COUNT_COLUMNS))
    by_type = {}
    for kind in LAYER_TYPES:
        rows = [i for i, e in enumerate(entries) if e["layer_type"] == kind]
        if rows:
            by_type[kind] = _row(counts[rows].sum(axis=0))
    return {"model": _row(counts.sum(axis=0)), "by_layer_type": by_type}


def tensor_rows(entries: list[dict], counts: np.ndarray) -> list[dict]:
    return [
        {"name": e["name"], "layer_type": e["layer_type"], "shape": e["shape"], **_row(np.asarray(c))}
        for e, c in zip(entries, counts, strict=False)
    ]


def build_report(data: dict[str, Any]) -> dict:
    """The report as plain data: what `pdt report --json` prints and the tables show."""
    state = data["state"]
    entries = state["layout"]["tensors"]
    report: dict[str, Any] = {
        "store": data["store"],
        "folder": data["folder"],
        "window": [_snapshot_view(state, i) for i in state["window"]],
        "history_len": state["history_len"],
        "predicted_elements": state["n"],
        "selection": state["layout"]["selection"],
        "skipped_tensors": state["layout"]["skipped"],
        "fit": state["fit"],
        "mask": state["mask"],
        "history": state["history"],
        "note": OVERLAP_NOTE,
    }
    if data["counts"] is not None and state["mask"]:
        counts = np.asarray(data["counts"])
        report["tensors"] = tensor_rows(entries, counts)
        report.update(summarize_counts(entries, counts))
    return report


def _snapshot_view(state: dict, snapshot_id: int) -> dict:
    rec = state["snapshots"][str(snapshot_id)]
    return {"id": snapshot_id, "kind": rec["kind"], "path": rec["path"], "step": rec.get("name_step")}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _counts_table(title: str, rows: list[tuple[str, dict]], first: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(first)
    for column in ("elements", "accepted", "fail lower", "fail upper", "fail sign", "nonfinite"):
        table.add_column(column, justify="right")
    for label, row in rows:
        table.add_row(label, f"{row['elements']:,}", _pct(row["ratio"]), f"{row['fail_lower']:,}",
                      f"{row['fail_upper']:,}", f"{row['fail_sign']:,}", f"{row['nonfinite']:,}")
    return table


def render_report(report: dict, console: Console, *, top: int | None = None) -> None:
    """Rich tables: the fit, per tensor, per layer type, the model, and the history of steps."""
    console.print(f"store [bold]{report['store']}[/] for {report['folder']}")
    window = ", ".join(f"{w['step']}{'*' if w['kind'] == 'fused' else ''}" for w in report["window"])
    console.print(f"window (oldest first, * = fused state training resumed from): {window or 'empty'}")
    fit = report["fit"]
    if fit:
        console.print(f"DMD fit: {fit['options']['modes']} modes, tau {fit['options']['tau']}, rank {fit['rank']}, "
                      f"{fit['growing_modes']} eigenvalue(s) with |λ| > 1, "
                      f"|w_pred(0) - w_h| / |w_h| = {fit['start_offset']:.2e}", highlight=False)
        modes = Table(title="singular values of X and eigenvalues of Ã", title_justify="left")
        for column in ("#", "σ", "λ", "|λ|"):
            modes.add_column(column, justify="right")
        eigenvalues = [complex(re, im) for re, im in fit["eigenvalues"]]
        for i, sigma in enumerate(fit["singular_values"]):
            lam = eigenvalues[i] if i < len(eigenvalues) else None
            modes.add_row(str(i + 1), f"{sigma:.4g}", "" if lam is None else f"{lam:.5g}",
                          "" if lam is None else f"{abs(lam):.5f}")
        console.print(modes)
    if "tensors" not in report:
        console.print("no mask yet: run `pdt predict` or `pdt mask`")
        return
    tensors = report["tensors"]
    shown = tensors if top is None else sorted(tensors, key=lambda r: -r["elements"])[:top]
    console.print(_counts_table(f"per tensor (mask: {report['mask']['label']})",
                                [(r["name"], r) for r in shown], "tensor"))
    console.print(_counts_table("per layer type", list(report["by_layer_type"].items()), "layer type"))
    console.print(_counts_table("model", [("all predicted", report["model"])], ""))
    console.print(f"[dim]{report['note']}[/]")
    if report["skipped_tensors"]:
        reasons: dict[str, int] = {}
        for item in report["skipped_tensors"]:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        console.print("carried over, not predicted: " + ", ".join(f"{n} {r}" for r, n in reasons.items()))
    render_history(report["history"], console)


def render_history(history: list[dict], console: Console) -> None:
    """Mask ratio per step and per layer type across runs (the paper's masked-ratio curves)."""
    if not history:
        return
    kinds = [k for k in LAYER_TYPES if any(k in h["by_layer_type"] for h in history)]
    table = Table(title="history (mask ratio per step)", title_justify="left")
    for column in ("#", "when", "command", "newest step", "rank", "mask", "model", *kinds, "output"):
        table.add_column(column)
    for index, h in enumerate(history, 1):
        per_kind = [_pct(h["by_layer_type"][k]["ratio"]) if k in h["by_layer_type"] else "" for k in kinds]
        newest = h["window_steps"][-1] if h["window_steps"] else ""
        table.add_row(str(index), h["at"], h["command"], str(newest), str(h["rank"]), h["mask"],
                      _pct(h["totals"]["ratio"]), *per_kind, (h["output"] or "").rsplit("/", 1)[-1])
    console.print(table)


def render_summary(result: dict, tensors: list[dict] | None, console: Console) -> None:
    """The few lines `pdt predict` prints: ratio, rejections per criterion, extreme layers."""
    console.print(result["message"], soft_wrap=True, highlight=False)
    mask = result.get("mask")
    if not mask:
        return
    totals = mask["totals"]
    console.print(
        f"mask {mask['label']}: accepted {totals['accepted']:,} of {totals['elements']:,} ({_pct(totals['ratio'])}); "
        f"failing lower {totals['fail_lower']:,}, upper {totals['fail_upper']:,}, sign {totals['fail_sign']:,}, "
        f"nonfinite {totals['nonfinite']:,} (overlapping)"
    )
    if tensors:
        ranked = sorted((r for r in tensors if r["elements"]), key=lambda r: r["ratio"])
        if ranked:
            most, fewest = ranked[-1], ranked[0]
            console.print(f"most accepted: {most['name']} {_pct(most['ratio'])}; "
                          f"fewest: {fewest['name']} {_pct(fewest['ratio'])}")
