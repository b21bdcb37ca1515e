"""The report as pictures: the paper's masked-ratio curves, the rejections, and the DMD spectrum.

Three panels from one report (`report.build_report`): the accepted ratio per layer type at
every step of the history; the share of elements each criterion rejected at every step; and
the eigenvalues of the current fit against the unit circle (a mode outside it grows, one
near 1 is the slow drift the prediction follows). matplotlib is an optional extra
(`pip install 'pdtcli[plot]'`); the figure is written atomically, PNG, SVG or PDF by suffix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import UsageError

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


def _steps(history: list[dict]) -> tuple[list[float], str]:
    """The x axis: the newest step of each run's window when every run has one, else the run's number."""
    steps = [h["window_steps"][-1] if h["window_steps"] else None for h in history]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        return [float(s) for s in steps], "step of the newest checkpoint"
    return [float(i + 1) for i in range(len(history))], "run"


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """Draw the three panels of `report` into `path` (its suffix picks the format)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UsageError(f"--plot writes {', '.join(SUFFIXES)} files (by suffix)", path)
    history = [h for h in report["history"] if h.get("totals")]
    if not history and not report.get("fit"):
        raise UsageError("nothing to plot yet: the store has no fit (run `pdt predict` first)", report["store"])
    plt = _pyplot()
    figure, (ratios, rejected, spectrum) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
    x, label = _steps(history)

    types = sorted({t for h in history for t in h["by_layer_type"]})
    for layer_type in types:
        ratios.plot(x, [h["by_layer_type"].get(layer_type, {}).get("ratio", np.nan) for h in history],
                    marker="o", ms=3, label=layer_type)
    ratios.plot(x, [h["totals"]["ratio"] for h in history], color="black", lw=2, label="model")
    ratios.set(title="accepted by the mask, per layer type", xlabel=label, ylabel="masked ratio", ylim=(0, None))
    ratios.legend(fontsize=8)

    for key, name in REJECTIONS:
        rejected.plot(x, [h["totals"][key] / max(1, h["totals"]["elements"]) for h in history], marker="o", ms=3,
                      label=name)
    rejected.set(title="rejected, per criterion (overlapping)", xlabel=label, ylabel="share of elements",
                 ylim=(0, 1.02))
    rejected.legend(fontsize=8)

    circle = np.linspace(0, 2 * np.pi, 400)
    spectrum.plot(np.cos(circle), np.sin(circle), color="grey", lw=1)
    fit = report.get("fit")
    if fit:
        eig = np.asarray(fit["eigenvalues"], dtype=float).reshape(-1, 2)
        spectrum.scatter(eig[:, 0], eig[:, 1], color="C3", zorder=3)
        steps = [v.get("step") for v in report.get("fit_window", [])]
        spectrum.set_title(f"DMD eigenvalues, rank {fit['rank']} (window steps {steps[0]}–{steps[-1]})"
                           if steps and None not in steps else f"DMD eigenvalues, rank {fit['rank']}")
    spectrum.axhline(0, color="grey", lw=0.5)
    spectrum.axvline(0, color="grey", lw=0.5)
    spectrum.set(xlabel="Re λ", ylabel="Im λ", aspect="equal")

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=110)
    plt.close(figure)
    return path
