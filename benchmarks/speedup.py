"""Does training reach its target sooner with pdt? Real training, resumed from pdt's fused checkpoints.

For each optimizer and seed this runs the loop of `examples/pdt_loop.py` (train one epoch,
`pdt predict`, resume from the fused checkpoint) for each variant:

    baseline      no pdt
    exact         pdt's defaults: exact DMD modes, the mask's upper bound and sign (eqs. 6 and 7
                  without eq. 6's lower bound)
    projected     the same with the paper's projected DMD modes
    random        a random mask at the default mask's per-tensor ratio (--random)
    paper         the paper's mask in full, with the lower bound (--criteria all)
    paper_random  a random mask at the paper mask's ratio
    sign          only the sign criterion (eq. 7), no bounds on the move (--criteria sign)
    none          every prediction accepted (--criteria none: non-selective Koopman training)

and reports, against the same seed's baseline: epochs and wall-clock to the baseline's best
train loss, final test accuracy, mean mask ratio, and pdt's time per call next to one epoch.

`--mode api` runs everything in one process through `pdtcli.api` (pdt's overhead floor);
`--cli-seeds K` additionally runs baseline and the default variant for the first K seeds as
separate processes, exactly as a user's cron job would, to time process start-up honestly.

    python benchmarks/speedup.py --out benchmarks/results/speedup
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from pdt_loop import LoopConfig, Round, run_loop  # noqa: E402

VARIANTS = {
    "baseline": {"pdt": False},
    "exact": {"pdt": True, "modes": "exact"},  # pdt's defaults: exact modes, the upper bound and the sign
    "projected": {"pdt": True, "modes": "projected"},
    "random": {"pdt": True, "random": True},  # a random mask at the default mask's per-tensor ratio
    "paper": {"pdt": True, "criteria": "all"},  # eqs. 6 and 7 in full: with the lower bound
    "paper_random": {"pdt": True, "criteria": "all", "random": True},
    "sign": {"pdt": True, "criteria": "sign"},
    "none": {"pdt": True, "criteria": "none"},
}
LEARNING_RATES = {"sgd": 0.05, "adamw": 0.001}


def default_modes() -> str:
    from pdtcli.dmd import FitOptions

    return FitOptions().modes


def epochs_to(rounds: list[Round], target: float) -> int | None:
    return next((r.epoch for r in rounds if r.train_loss <= target), None)


def seconds_to(rounds: list[Round], target: float) -> float | None:
    elapsed = 0.0
    for r in rounds:
        elapsed += r.train_s + r.pdt_s
        if r.train_loss <= target:
            return elapsed
    return None


def summarize(runs: dict[str, dict[int, list[Round]]], epochs: int) -> dict[str, dict]:
    """Per variant, against the same seed's baseline: reductions, accuracy, mask ratio, timings."""
    base = runs["baseline"]
    out = {}
    for variant, by_seed in runs.items():
        rows = []
        for seed, rounds in by_seed.items():
            target = min(r.train_loss for r in base[seed])
            e_base, t_base = epochs_to(base[seed], target), seconds_to(base[seed], target)
            e, t = epochs_to(rounds, target), seconds_to(rounds, target)
            ratios = [r.ratio for r in rounds if r.ratio is not None]
            rows.append({
                "seed": seed,
                "epochs": e,
                "seconds": t,
                "epoch_reduction": None if e is None else 1 - e / e_base,
                "time_reduction": None if t is None else 1 - t / t_base,
                "final_test_acc": rounds[-1].test_acc,
                "acc_vs_baseline": rounds[-1].test_acc - base[seed][-1].test_acc,
                "diverged": any(r.status == "diverged" for r in rounds) or len(rounds) < epochs,
                "mask_ratio": statistics.fmean(ratios) if ratios else None,
                "epoch_s": statistics.median(r.train_s for r in rounds),
                "pdt_s": statistics.median([r.pdt_s for r in rounds if r.status == "written"] or [0.0]),
            })
        out[variant] = {"seeds": rows, **_medians(rows)}
    return out


def _median_of(rows: list[dict], key: str) -> float | None:
    """Median over seeds; a seed that never reached the target counts as no reduction at all."""
    values = [r[key] if r[key] is not None else float("-inf") for r in rows]
    value = statistics.median(values)
    return None if value == float("-inf") else value


def _medians(rows: list[dict]) -> dict:
    accs = [r["final_test_acc"] for r in rows]
    ratios = [r["mask_ratio"] for r in rows if r["mask_ratio"] is not None]
    return {
        "median_epoch_reduction": _median_of(rows, "epoch_reduction"),
        "median_time_reduction": _median_of(rows, "time_reduction"),
        "reached": sum(r["epochs"] is not None for r in rows),
        "diverged": sum(r["diverged"] for r in rows),
        "acc_mean": statistics.fmean(accs),
        "acc_std": statistics.pstdev(accs),
        "acc_vs_baseline": statistics.fmean(r["acc_vs_baseline"] for r in rows),
        "mask_ratio": statistics.fmean(ratios) if ratios else None,
        "epoch_s": statistics.median(r["epoch_s"] for r in rows),
        "pdt_s": statistics.median(r["pdt_s"] for r in rows),
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.0f}%"


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "—" if value is None else f"{value:{fmt}}{unit}"


def table(title: str, summary: dict[str, dict]) -> list[str]:
    lines = [f"### {title}", "",
             "| variant | epochs to baseline best, per seed | median epoch reduction | median time reduction "
             "| reached | final test acc % | Δacc vs baseline | mean mask ratio | epoch | pdt call |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, s in summary.items():
        per_seed = ", ".join("—" if r["epochs"] is None else str(r["epochs"]) for r in s["seeds"])
        note = f" ({s['diverged']} diverged)" if s["diverged"] else ""
        pdt_call = _num(s["pdt_s"], ".3g", " s") if variant != "baseline" else "—"
        lines.append(
            f"| {variant} | {per_seed} | {_pct(s['median_epoch_reduction'])} | {_pct(s['median_time_reduction'])} "
            f"| {s['reached']}/{len(s['seeds'])}{note} | {100 * s['acc_mean']:.2f} ± {100 * s['acc_std']:.2f} "
            f"| {100 * s['acc_vs_baseline']:+.2f} pt | {_num(s['mask_ratio'], '.3f')} "
            f"| {_num(s['epoch_s'], '.3g', ' s')} | {pdt_call} |")
    return [*lines, ""]


def run_matrix(optimizer: str, seeds: list[int], variants: list[str], epochs: int, mode: str, work: Path,
               tau: int) -> dict[str, dict[int, list[Round]]]:
    runs: dict[str, dict[int, list[Round]]] = {v: {} for v in variants}
    if mode == "api":  # pay the one-time imports and first calls before any timed run
        run_loop(LoopConfig(epochs=7, optimizer=optimizer, lr=LEARNING_RATES[optimizer], pdt=True, mode=mode),
                 work / "warm-up")
        shutil.rmtree(work / "warm-up")
    for seed in seeds:
        for variant in variants:
            cfg = LoopConfig(epochs=epochs, optimizer=optimizer, lr=LEARNING_RATES[optimizer], seed=seed, mode=mode,
                             tau=tau)
            cfg = replace(cfg, **VARIANTS[variant])
            folder = work / f"{mode}-{optimizer}-{variant}-{seed}"
            started = time.perf_counter()
            runs[variant][seed] = run_loop(cfg, folder)
            shutil.rmtree(folder)
            last = runs[variant][seed][-1]
            print(f"  {mode} {optimizer} seed {seed} {variant:9s} {time.perf_counter() - started:6.1f} s  "
                  f"final loss {last.train_loss:.4g}  acc {last.test_acc:.4f}", file=sys.stderr, flush=True)
    return runs


def plot(results: dict, default: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = list(results)
    fig, axes = plt.subplots(len(optimizers), 2, figsize=(12, 4.2 * len(optimizers)), squeeze=False)
    for row, optimizer in enumerate(optimizers):
        runs = results[optimizer]["runs"]
        loss_ax, ratio_ax = axes[row]
        for variant, by_seed in runs.items():
            curves = list(by_seed.values())
            length = min(len(c) for c in curves)
            median = [statistics.median(c[i].train_loss for c in curves) for i in range(length)]
            loss_ax.plot(range(1, length + 1), median, label=variant, lw=2.2 if variant in ("baseline", default) else 1)
        target = statistics.median(min(r.train_loss for r in c) for c in runs["baseline"].values())
        loss_ax.axhline(target, color="grey", ls=":", lw=1, label="baseline best (median)")
        loss_ax.set(yscale="log", xlabel="epoch", ylabel="train loss (median over seeds)",
                    title=f"{optimizer}: train loss, resumed from pdt's fused checkpoints")
        low = min(r.train_loss for by_seed in runs.values() for c in by_seed.values() for r in c if r.train_loss > 0)
        loss_ax.set_ylim(low / 2, 10)  # a diverging run (none) would squash every other curve
        loss_ax.legend(fontsize=8)
        shown = default if default in runs else next((v for v in runs if v != "baseline"), None)
        if shown is None:
            continue
        curves = list(runs[shown].values())
        kinds = sorted({k for c in curves for r in c for k in r.ratio_by_layer_type})
        for kind in kinds:
            points = {}
            for c in curves:
                for r in c:
                    if kind in r.ratio_by_layer_type:
                        points.setdefault(r.epoch, []).append(r.ratio_by_layer_type[kind])
            xs = sorted(points)
            ratio_ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker=".", label=kind)
        ratio_ax.set(xlabel="epoch", ylabel="accepted fraction (mean over seeds)",
                     title=f"{optimizer}: mask ratio per layer type ({shown})")
        ratio_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def overhead_lines(cli: dict) -> list[str]:
    lines = ["### Wall-clock as a user runs it (separate processes)", "",
             "| optimizer | seeds | train process per epoch | pdt process per call | pdt share of a round "
             "| median time reduction | same epochs as in-process |", "|---|---|---|---|---|---|---|"]
    for optimizer, data in cli.items():
        s = data["summary"]
        default = data["default"]
        call, epoch = s[default]["pdt_s"], s["baseline"]["epoch_s"]
        lines.append(f"| {optimizer} | {len(s['baseline']['seeds'])} | {epoch:.2f} s | {call:.2f} s "
                     f"| {100 * call / (call + epoch):.0f}% | {_pct(s[default]['median_time_reduction'])} "
                     f"| {'yes' if data['same_epochs'] else 'no'} |")
    calls = [data["summary"][data["default"]]["pdt_s"] for data in cli.values()]
    worst = max(calls)
    lines += ["", f"A pdt call from the command line costs {worst:.2f} s here, most of it interpreter and torch "
              f"start-up; it drops below 5% of an epoch once an epoch takes {20 * worst:.0f} s or more "
              f"(20 × the call).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speedup")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tau", type=int, default=LoopConfig.tau)
    parser.add_argument("--optimizers", nargs="+", default=list(LEARNING_RATES), choices=list(LEARNING_RATES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--mode", choices=("api", "cli"), default="api", help="how the full matrix runs")
    parser.add_argument("--cli-seeds", type=int, default=1,
                        help="seeds to rerun baseline and the default variant as separate processes")
    parser.add_argument("--replot", action="store_true", help="redraw speedup.png from --out's runs.json")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((args.out / "runs.json").read_text(encoding="utf-8"))
        runs = {opt: {"runs": {v: {int(seed): [Round(**r) for r in rounds] for seed, rounds in by.items()}
                               for v, by in saved[opt]["runs"].items()}} for opt in saved if opt != "cli"}
        plot(runs, default_modes(), args.out / "speedup.png")
        return
    variants = ["baseline", *[v for v in args.variants if v != "baseline"]]
    seeds = [100 * i for i in range(args.seeds)]  # the paper's seeds: 0, 100, 200, 300, 400
    default = default_modes()
    args.out.mkdir(parents=True, exist_ok=True)
    results, cli = {}, {}
    with tempfile.TemporaryDirectory(prefix="pdt-speedup-") as tmp:
        work = Path(tmp)
        for optimizer in args.optimizers:
            runs = run_matrix(optimizer, seeds, variants, args.epochs, args.mode, work, args.tau)
            results[optimizer] = {"runs": runs, "summary": summarize(runs, args.epochs)}
            if args.cli_seeds and args.mode == "api":
                cli_runs = run_matrix(optimizer, seeds[: args.cli_seeds], ["baseline", default], args.epochs, "cli",
                                      work, args.tau)
                same = all([r.epoch for r in cli_runs[v][s]] == [r.epoch for r in runs[v][s]]
                           and [r.train_loss for r in cli_runs[v][s]] == [r.train_loss for r in runs[v][s]]
                           for v in cli_runs for s in cli_runs[v])
                cli[optimizer] = {"runs": cli_runs, "summary": summarize(cli_runs, args.epochs), "default": default,
                                  "same_epochs": same}
    command = "python benchmarks/speedup.py " + " ".join(sys.argv[1:])
    md = ["# pdt speed-up on real training (sklearn digits MLP)", "",
          f"Reproduce: `{command.strip()}`", "",
          f"{args.seeds} seeds ({', '.join(map(str, seeds))}), {args.epochs} epochs, one checkpoint and one "
          f"`pdt predict` per epoch from epoch 5 (h = 5, tau = {args.tau}), resuming from the fused checkpoint. "
          f"Learning rates: {', '.join(f'{k} {v:g}' for k, v in LEARNING_RATES.items())}. "
          f"Matrix run {'in one process through pdtcli.api' if args.mode == 'api' else 'as separate processes'}; "
          f"pdt's default modes: **{default}**. Target = the same seed's baseline best train loss; a seed that "
          "never reaches it counts as no reduction.", ""]
    for optimizer, data in results.items():
        md += table(f"{optimizer} (lr {LEARNING_RATES[optimizer]:g})", data["summary"])
    if cli:
        md += overhead_lines(cli)
    md += ["![train loss and mask ratio](speedup.png)", ""]
    (args.out / "results.md").write_text("\n".join(md), encoding="utf-8")
    plot(results, default, args.out / "speedup.png")
    dump = {opt: {"summary": d["summary"], "runs": {v: {s: [asdict(r) for r in rr] for s, rr in by.items()}
                                                    for v, by in d["runs"].items()}}
            for opt, d in results.items()}
    dump["cli"] = {opt: {"summary": d["summary"], "same_epochs": d["same_epochs"]} for opt, d in cli.items()}
    (args.out / "runs.json").write_text(json.dumps(dump, indent=1), encoding="utf-8")
    print("\n".join(md))
    print(f"\nwrote {args.out / 'results.md'}, {args.out / 'speedup.png'}, {args.out / 'runs.json'}")
    print(f"reproduce: {command.strip()}")


if __name__ == "__main__":
    main()
