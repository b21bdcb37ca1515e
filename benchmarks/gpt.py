"""Does pdt speed up a small transformer trained the way Trainer users train? Seeds x variants.

Each run is `examples/train_gpt.py` in its own process (a byte-level GPT-2 on Python's own
documentation, AdamW with weight decay, cosine schedule with warm-up, a checkpoint every
`--save-every` steps). Variants:

    baseline   no pdt
    callback   pdt inside the Trainer (`pdtcli.integrations.hf.PDTCallback`), default options
    cli        the same options, `pdt predict` as its own process between resumed segments
    random     the callback with a random mask at the criteria's per-tensor ratio (--random)

Any other variant is `name:flag=value,...` with train_gpt.py's flags (e.g. `tau3:tau=3`, and
`signup:criteria=sign+upper` for a comma list).
Against the same seed's baseline it reports the steps and the wall-clock (pdt included,
loss measurements not) to the baseline's best training loss, the final held-out loss, the
mean mask ratio and pdt's time per call beside the time between two checkpoints.

    python benchmarks/gpt.py --out benchmarks/results/gpt --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"pdt": "none"},
    "callback": {"pdt": "callback"},
    "cli": {"pdt": "cli"},
    "random": {"pdt": "callback", "random": True},
}


def variant(text: str) -> tuple[str, dict[str, Any]]:
    """`name` of a known variant, or `name:flag=value,...` (the callback with those flags)."""
    if ":" not in text:
        return text, VARIANTS[text]
    name, flags = text.split(":", 1)
    options: dict[str, Any] = {"pdt": "callback"}
    for item in filter(None, flags.split(",")):
        key, _, value = item.partition("=")
        options[key.replace("_", "-")] = value.replace("+", ",") if value else True  # criteria=sign+upper
    return name, options


def train(out: Path, seed: int, options: dict[str, Any], common: list[str]) -> dict[str, Any]:
    flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()]
    cmd = [sys.executable, str(ROOT / "examples" / "train_gpt.py"), "--out", str(out), f"--seed={seed}",
           *common, *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def first_at(rows: list[dict], target: float, key: str) -> float | None:
    return next((r[key] for r in rows if r["train_loss"] <= target), None)


def final_val(summary: dict) -> float:
    return [r["val_loss"] for r in summary["rows"] if r["val_loss"] is not None][-1]


def compare(runs: dict[str, dict[int, dict]]) -> dict[str, dict[str, Any]]:
    """Per variant: per seed, steps and seconds to the baseline's best train loss, and the rest."""
    table: dict[str, dict[str, Any]] = {}
    for name, by_seed in runs.items():
        per_seed = {}
        for seed, summary in by_seed.items():
            base = runs["baseline"][seed]
            target = min(r["train_loss"] for r in base["rows"])
            base_steps = first_at(base["rows"], target, "step")
            base_wall = first_at(base["rows"], target, "wall_s")
            steps = first_at(summary["rows"], target, "step")
            wall = first_at(summary["rows"], target, "wall_s")
            ratios = [r["ratio"] for r in summary["rows"] if r["ratio"] is not None]
            per_seed[seed] = {
                "steps_to_target": steps, "baseline_steps": base_steps,
                "steps_saved": None if steps is None else 1 - steps / base_steps,
                "time_saved": None if wall is None else 1 - wall / base_wall,
                "final_val_loss": final_val(summary), "best_train_loss": min(
                    r["train_loss"] for r in summary["rows"]),
                "mean_ratio": statistics.fmean(ratios) if ratios else None,
                "pdt_s_per_call": summary["pdt_s_per_call"], "interval_s": summary["interval_s"],
            }
        saved = [v["steps_saved"] for v in per_seed.values() if v["steps_saved"] is not None]
        table[name] = {"seeds": per_seed, "median_steps_saved": statistics.median(saved) if saved else None,
                       "reached": f"{len(saved)}/{len(per_seed)}"}
    return table


def markdown(table: dict[str, dict[str, Any]], runs: dict, command: str) -> str:
    lines = [f"Reproduce: `{command}`", "",
             "| variant | median steps saved | reached target | time saved (per seed) | final val loss (per seed) "
             "| mean mask ratio | pdt s/call | s between checkpoints |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        seeds = row["seeds"].values()
        pct = (lambda v: "—" if v is None else f"{100 * v:.0f}%")  # noqa: E731
        ratio = [v["mean_ratio"] for v in seeds if v["mean_ratio"] is not None]
        lines.append(
            f"| {name} | {pct(row['median_steps_saved'])} | {row['reached']} "
            f"| {', '.join(pct(v['time_saved']) for v in seeds)} "
            f"| {', '.join(format(v['final_val_loss'], '.3f') for v in seeds)} "
            f"| {'—' if not ratio else f'{100 * statistics.fmean(ratio):.1f}%'} "
            f"| {statistics.fmean(v['pdt_s_per_call'] for v in seeds):.3f} "
            f"| {statistics.fmean(v['interval_s'] for v in seeds):.2f} |")
    lines += ["", "Steps saved: 1 − (steps to reach the baseline's best training loss) / (the baseline's own), "
              "per seed against the same seed's baseline, measured at checkpoints. Time saved: the same on "
              "wall-clock, pdt's own time included, loss measurements excluded."]
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: Path) -> None:
    """Each variant's loss minus its seed's baseline, averaged over seeds: below zero is ahead."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (train_ax, val_ax) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
    for index, (name, by_seed) in enumerate(runs.items()):
        for ax, key in ((train_ax, "train_loss"), (val_ax, "val_loss")):
            curves = []
            for seed, summary in by_seed.items():
                base = {r["step"]: r[key] for r in runs["baseline"][seed]["rows"] if r[key] is not None}
                curves.append({r["step"]: r[key] - base[r["step"]] for r in summary["rows"]
                               if r[key] is not None and r["step"] in base})
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], color=f"C{index}", label=name,
                    lw=2 if name == "baseline" else 1.3)
    train_ax.set(title="training loss minus the baseline's (mean over seeds)", xlabel="step",
                 ylabel="Δ cross-entropy (nats/byte)")
    val_ax.set(title="held-out loss minus the baseline's, at checkpoints", xlabel="step")
    for ax in (train_ax, val_ax):
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--replot", action="store_true", help="redraw curves.png from --out's runs.json")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads((args.out / "runs.json").read_text())["runs"], args.out / "curves.png")
        return
    chosen = dict(variant(v) for v in args.variants)
    if "baseline" not in chosen:
        chosen = {"baseline": VARIANTS["baseline"], **chosen}
    common = [f"--steps={args.steps}", f"--save-every={args.save_every}"]
    runs: dict[str, dict[int, dict]] = {name: {} for name in chosen}
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pdt-gpt-") as scratch:
        for seed in args.seeds:
            for name, options in chosen.items():
                summary = train(Path(scratch) / f"{name}-{seed}", seed, options, common)
                runs[name][seed] = summary
                print(f"seed {seed} {name}: final val {final_val(summary):.4f}, "
                      f"{summary['wall_s']:.0f} s", flush=True)
    table = compare(runs)
    command = "python benchmarks/gpt.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "runs.json").write_text(json.dumps({"runs": runs, "table": table}, indent=1))
    (args.out / "results.md").write_text(markdown(table, runs, command))
    plot(runs, args.out / "curves.png")
    print(markdown(table, runs, command))


if __name__ == "__main__":
    main()
