"""The report as pictures: the paper's masked-ratio curves, the rejections, and the DMD spectrum.

Three panels from one report (`report.build_report`): the accepted ratio per layer type at
every step of training (audits, which training did not resume from, as separate markers);
the share of elements each criterion rejected at every step (a criterion the mask did not
apply dashed, for reference); and the eigenvalues of the current fit against the unit
circle, those inside (decaying) and outside it (growing) told apart. The x axis is always the
training step. matplotlib is an optional extra (`pip install 'pdtcli[plot]'`); the figure is
written atomically, PNG, SVG or PDF by suffix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import UsageError
from .mask import CRITERIA, criteria_of

SUFFIXES = (".png", ".svg", ".pdf")
REJECTIONS = (("fail_lower", "lower: moves less than the last step"), ("fail_upper", "upper: more than tau x it"),
              ("fail_sign", "sign: changes direction"), ("nonfinite", "non-finite"))


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib, an optional extra: pip install 'pdtcli[plot]'") from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


QUANTITY = "accepted ratio"  # the share of predicted elements the mask accepted: one name, on axis and title


def _at_steps(rows: list[dict]) -> tuple[list[dict], list[float]]:
    """The history rows whose step is known (the newest of the fit's window), and those steps: the x
    axis is the training step, and a row without one has no place on it."""
    placed = [h for h in rows if h["window_steps"] and h["window_steps"][-1] is not None]
    return placed, [float(h["window_steps"][-1]) for h in placed]


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Draw the three panels of `report` into `path` (its suffix picks the format)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--plot writes {', '.join(SUFFIXES)} files (by suffix)", path)
    rows = [h for h in report["history"] if h.get("totals")]
    if not rows and not report.get("fit"):
        raise UsageError("nothing to plot yet: the store has no fit (run `pdt predict` first)", report["store"])
    plt = _pyplot()
    figure, (ratios, rejected, spectrum) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    history, x = _at_steps([h for h in rows if h.get("training", True)])
    audits, audit_x = _at_steps([h for h in rows if not h.get("training", True)])
    unplaced = len(rows) - len(history) - len(audits)
    label = "training step (newest checkpoint of the fit)" + (f"; {unplaced} run(s) without a step not shown"
                                                              if unplaced else "")
    _ratios(ratios, history, x, audits, audit_x, label)
    _rejections(rejected, history, x, label)
    _spectrum(spectrum, report)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=110)
    plt.close(figure)
    return path


def _ratios(axes: Any, history: list[dict], x: list[float], audits: list[dict], audit_x: list[float],
            label: str) -> None:
    """The accepted ratio per layer type and of the model (markers, drawn last: never hidden) at each
    training step; audits as crosses of their own."""
    for layer_type in sorted({t for h in history for t in h["by_layer_type"]}):
        axes.plot(x, [h["by_layer_type"].get(layer_type, {}).get("ratio", np.nan) for h in history],
                  marker="o", ms=3, lw=1, label=layer_type)
    axes.plot(x, [h["totals"]["ratio"] for h in history], color="black", lw=2, marker="s", ms=5, zorder=4,
              label="model")
    if audits:
        axes.scatter(audit_x, [h["totals"]["ratio"] for h in audits], marker="x", color="grey", zorder=5,
                     label="model, audits (mask, -o, dry run)")
    axes.set(title=f"{QUANTITY}, model and per layer type", xlabel=label, ylabel=QUANTITY, ylim=(0, None))
    axes.legend(fontsize=8)
    axes.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers


def _rejections(axes: Any, history: list[dict], x: list[float], label: str) -> None:
    """The share of elements each criterion rejected at each training step; one that no step's mask
    applied dashed and named so (its failures describe the predictions, not the masks)."""
    applied_by_any = {c for h in history for c in criteria_of(h["mask"])} if history else set(CRITERIA)
    for key, name in REJECTIONS:
        applied = key.removeprefix("fail_") not in CRITERIA or key.removeprefix("fail_") in applied_by_any
        axes.plot(x, [h["totals"][key] / max(1, h["totals"]["elements"]) for h in history], marker="o", ms=3,
                  ls="-" if applied else "--", label=name if applied else f"{name} (not applied)")
    axes.set(title="rejected, per criterion (overlapping)", xlabel=label, ylabel="share of elements",
             ylim=(0, 1.02))
    axes.legend(fontsize=8)
    axes.xaxis.get_major_locator().set_params(integer=True)


def _spectrum(axes: Any, report: dict) -> None:
    """The fit's eigenvalues against the unit circle: inside (the mode decays) and outside (it grows)."""
    circle = np.linspace(0, 2 * np.pi, 400)
    axes.plot(np.cos(circle), np.sin(circle), color="grey", lw=1)
    fit = report.get("fit")
    each = fit.get("per_tensor") if fit else None
    if each:  # one fit per tensor: the store keeps their eigenvalues (fit/eigenvalues), the report their ranges
        (rank_lo, rank_hi), (lo, hi) = each["rank"], each["spectral_radius"]
        axes.set_title(f"DMD per tensor: {each['tensors']} fits, rank {rank_lo}–{rank_hi}, max |λ| {lo:.3f}–{hi:.3f}",
                       fontsize=10)
    elif fit:
        eig = np.asarray(fit["eigenvalues"], dtype=float).reshape(-1, 2)
        outside = np.hypot(eig[:, 0], eig[:, 1]) > 1
        axes.scatter(eig[~outside, 0], eig[~outside, 1], color="C0", marker="o", zorder=3,
                     label="|λ| ≤ 1 (decays)")
        axes.scatter(eig[outside, 0], eig[outside, 1], color="C3", marker="^", s=50, zorder=3,
                     label="|λ| > 1 (grows)")
        axes.legend(fontsize=8)
        steps = [v.get("step") for v in report.get("fit_window", [])]
        axes.set_title(f"DMD eigenvalues, rank {fit['rank']} (window steps {steps[0]}–{steps[-1]})"
                       if steps and None not in steps else f"DMD eigenvalues, rank {fit['rank']}")
    axes.axhline(0, color="grey", lw=0.5)
    axes.axvline(0, color="grey", lw=0.5)
    axes.set(xlabel="Re λ", ylabel="Im λ", aspect="equal")
