"""The evidence: pdt against a learning-rate-tuned baseline, a random mask, no mask, the official code's mask,
checkpoint averaging (LAWA) and the loss gate, on three families, seeds x variants, in one process per family.

Families (all AdamW, weight decay 0.01, linear warm-up then cosine decay over the run, a checkpoint every
`save_every` steps saved to a folder as `step_<N>.pt`, pdt's in-loop step `PDTStep` right after it):

    mlp   sklearn's digits (8x8), 64-128-10 ReLU MLP, batch 64, one checkpoint per epoch
    cnn   the same digits as 1x8x8 images, two 3x3 convolutions (16, 32 channels), max-pool, a linear head
    gpt   the byte-level GPT-2 of examples/train_gpt.py (4 layers, width 128) on Python's documentation

Data: digits split 70/15/15 (train / validation / test, fixed); the GPT's held-out tenth split in halves
(validation / test). Only the loss gate looks at the validation split; every loss reported is on the training
split ("train") or the test split ("held-out").

Per family: the baseline over a learning-rate grid (`--lrs`, seeds `--tune-seeds`, default `--seeds`); the best
rate is the one whose baseline reaches the lowest held-out loss, mean over those seeds (the script says when it is
at an edge of the grid). At that rate, per seed of `--seeds`:

    baseline   no pdt (the tuned baseline)
    default    pdt's defaults (history 5, tau 5, criteria upper+sign)
    random     a random mask at the default's per-tensor ratio (--random)
    none       every prediction accepted (--criteria none)
    official   the official code's mask (--criteria official)
    gate       the default with the loss gate: PDTStep(verify=validation loss)
    pertensor  the default with DMD fitted per tensor (--dmd-scope tensor)
    horizon-lr the default with tau following the learning rate: PDTStep(horizon="lr", optimizer=the run's)
    backoff    the gate with tau halved after each rejection, doubled back after each acceptance (horizon="backoff")
    lawa       no run of its own: the mean of the baseline's last k=5 checkpoints, measured at each checkpoint

Against the same seed's tuned baseline: steps and wall-clock (training, saving and pdt included; measuring the
losses excluded) to the baseline's best training loss and best held-out loss; the final held-out loss.

    python benchmarks/evidence.py --out benchmarks/results/evidence --families mlp cnn gpt --seeds 0 1 2

`--cache DIR` keeps every run, so that a later invocation with more variants or seeds reuses the runs made.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

VARIANTS: dict[str, dict[str, Any] | None] = {
    "baseline": None,
    "default": {},
    "random": {"random": True},
    "none": {"criteria": "none"},
    "official": {"criteria": "official"},
    "gate": {"gate": True},
    "pertensor": {"dmd_scope": "tensor"},
    "horizon-lr": {"horizon": "lr"},
    "backoff": {"gate": True, "horizon": "backoff"},
}
LAWA_K = 5


@dataclass
class Family:
    """A model and its data: `batches(step)` gives the (inputs, targets) of a step, `loss(model, split)` the mean
    loss on a split ("train", "val", "test")."""

    build: Callable[[int], nn.Module]
    batches: Callable[[int, int], Any]
    loss: Callable[[nn.Module, str], float]
    steps: int
    save_every: int
    warmup: int
    lrs: tuple[float, ...]
    threads: int


def digits_family(kind: str, epochs: int) -> Family:
    """The digits MLP or CNN: 1257 training images, batches of 64, one checkpoint per epoch."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images / 16.0, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut1, cut2 = int(0.7 * len(x)), int(0.85 * len(x))
    splits = {"train": order[:cut1], "val": order[cut1:cut2], "test": order[cut2:]}
    if kind == "cnn":
        x = x.view(-1, 1, 8, 8)
    per_epoch = math.ceil(len(splits["train"]) / 64)

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if kind == "mlp":
            return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    def batches(seed: int, step: int):
        epoch, index = divmod(step, per_epoch)
        shuffled = splits["train"][torch.randperm(len(splits["train"]),
                                                  generator=torch.Generator().manual_seed(seed * 1000 + epoch))]
        chosen = shuffled[index * 64:(index + 1) * 64]
        return x[chosen], y[chosen]

    @torch.no_grad()
    def loss(model: nn.Module, split: str) -> float:
        return float(nn.functional.cross_entropy(model(x[splits[split]]), y[splits[split]]))

    return Family(build, batches, loss, steps=epochs * per_epoch, save_every=per_epoch, warmup=per_epoch,
                  lrs=(3e-3, 1e-2, 3e-2, 1e-1), threads=1)


def gpt_family(steps: int) -> Family:
    """The small GPT-2 of examples/train_gpt.py: batches of 16 blocks of 128 bytes, a checkpoint every 50 steps."""
    from train_gpt import loss_on, make_model, text_blocks

    train, held_out = text_blocks(128)
    half = len(held_out) // 2
    splits = {"train": train[torch.randperm(len(train), generator=torch.Generator().manual_seed(99))[:256]],
              "val": held_out[:half], "test": held_out[half:]}

    def batches(seed: int, step: int):
        chosen = torch.randint(len(train), (16,), generator=torch.Generator().manual_seed(seed * 100_000 + step))
        return train[chosen], None

    def loss(model: nn.Module, split: str) -> float:
        return loss_on(model, splits[split])

    return Family(lambda seed: make_model(seed, 128, 128, 4), batches, loss, steps=steps, save_every=50, warmup=30,
                  lrs=(3e-4, 1e-3, 3e-3), threads=2)


def train_step(model: nn.Module, batch) -> None:
    inputs, targets = batch
    if targets is None:
        model(input_ids=inputs, labels=inputs).loss.backward()
    else:
        nn.functional.cross_entropy(model(inputs), targets).backward()


def schedule(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the rate, then cosine decay to 0 at `total` (Trainer's `cosine`)."""
    return lambda s: s / max(1, warmup) if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                               max(1, total - warmup)))


def run(family: Family, lr: float, seed: int, options: dict[str, Any] | None, folder: Path) -> dict[str, Any]:
    """One training run; rows at each checkpoint (after pdt's step): step, wall_s, train/held-out loss, mask
    ratio; for the baseline also LAWA's losses (the mean of the last k checkpoints)."""
    from pdtcli.integrations import PDTStep

    torch.set_num_threads(family.threads)
    model = family.build(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(family.warmup, family.steps))
    pdt = None
    if options is not None:
        extra = {k: v for k, v in options.items() if k != "gate"}
        verify = (lambda m: family.loss(m, "val")) if options.get("gate") else None
        pdt = PDTStep(folder, history=5, tau=5, verify=verify, optimizer=optimizer, **extra)  # optimizer: "lr"
    folder.mkdir(parents=True)
    rows: list[dict[str, Any]] = []
    recent: deque[dict[str, torch.Tensor]] = deque(maxlen=LAWA_K)
    wall, statuses = 0.0, []
    for step in range(1, family.steps + 1):
        began = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        train_step(model, family.batches(seed, step - 1))
        optimizer.step()
        scheduler.step()
        if step % family.save_every == 0:
            path = folder / f"step_{step:06d}.pt"
            torch.save({"model": model.state_dict()}, path)
            result = pdt.step(model, path) if pdt is not None else None
            statuses.append(None if result is None else result.status)
            wall += time.perf_counter() - began
            ratio = (result.mask or {}).get("totals", {}).get("ratio") if result is not None else None
            rows.append({"step": step, "wall_s": wall, "train_loss": family.loss(model, "train"),
                         "val_loss": family.loss(model, "test"), "ratio": ratio})
            if options is None:
                rows[-1].update(lawa(family, model, recent, began_wall=wall))
        else:
            wall += time.perf_counter() - began
    return {"rows": rows, "statuses": statuses, "wall_s": wall,
            "pdt_s": sum(pdt.seconds) if pdt is not None else 0.0,
            "rejected": len(pdt.rejected) if pdt is not None else 0}


def lawa(family: Family, model: nn.Module, recent: deque, began_wall: float) -> dict[str, Any]:
    """LAWA at this checkpoint: the mean of the last k saved states, its losses, and its wall-clock (the
    baseline's, plus the averaging)."""
    began = time.perf_counter()
    recent.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
    averaged = {k: torch.stack([s[k].float() for s in recent]).mean(0).to(v.dtype) for k, v in plain.items()}
    model.load_state_dict(averaged)
    spent = time.perf_counter() - began
    out = {"lawa_train_loss": family.loss(model, "train"), "lawa_val_loss": family.loss(model, "test"),
           "lawa_wall_s": began_wall + spent}
    model.load_state_dict(plain)
    return out


def first(rows: list[dict], key: str, target: float, at: str) -> float | None:
    return next((r[at] for r in rows if r[key] is not None and r[key] <= target), None)


def crossing(rows: list[dict], key: str, target: float) -> float | None:
    """The step at which the loss `key` first reaches `target`, linear between the checkpoint before and the
    one that reaches it: finer than the checkpoints' spacing, for variants that reach it at the same one."""
    before = None
    for row in rows:
        if row[key] <= target:
            if before is None or before[key] == row[key]:
                return float(row["step"])
            return before["step"] + (row["step"] - before["step"]) * (before[key] - target) / (before[key] - row[key])
        before = row
    return None


def compare(base: dict, runs: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per variant (and LAWA), one seed: steps and seconds to the tuned baseline's best train and held-out loss,
    the savings against the baseline's own, the final held-out loss, the mean mask ratio and the rejections.

    Seconds compare within one run, never across runs (a shared machine's load differs from run to run): a
    variant's time to a target is its steps at the baseline's cost per step, stretched by pdt's share of the
    variant's own wall-clock, `share` = pdt's seconds / the run's seconds (training, saving and pdt), both
    measured in that run: time saved = 1 - (steps / baseline's steps) / (1 - share). LAWA's seconds are measured
    in the baseline's own run (the averaging included)."""
    rows = base["rows"]
    targets = {"train": min(r["train_loss"] for r in rows), "val": min(r["val_loss"] for r in rows)}
    out: dict[str, dict[str, Any]] = {}
    lawa_rows = [{"step": r["step"], "wall_s": r["lawa_wall_s"], "train_loss": r["lawa_train_loss"],
                  "val_loss": r["lawa_val_loss"], "ratio": None} for r in rows]
    for name, run_rows in [(n, r["rows"]) for n, r in runs.items()] + [("lawa", lawa_rows)]:
        entry: dict[str, Any] = {"final_val_loss": run_rows[-1]["val_loss"],
                                 "best_val_loss": min(r["val_loss"] for r in run_rows)}
        for which, target in targets.items():
            key = f"{which}_loss"
            steps, wall = first(run_rows, key, target, "step"), first(run_rows, key, target, "wall_s")
            base_steps, base_wall = first(rows, key, target, "step"), first(rows, key, target, "wall_s")
            entry[f"steps_to_{which}"] = steps
            fine, base_fine = crossing(run_rows, key, target), crossing(rows, key, target)
            entry[f"fine_saved_{which}"] = None if fine is None else 1 - fine / base_fine
            entry[f"steps_saved_{which}"] = None if steps is None else 1 - steps / base_steps
            if name == "lawa":
                entry[f"time_saved_{which}"] = None if wall is None else 1 - wall / base_wall
            else:
                share = runs[name]["pdt_s"] / runs[name]["wall_s"]
                entry[f"time_saved_{which}"] = None if steps is None else 1 - steps / base_steps / (1 - share)
                entry["pdt_share"] = share
        ratios = [r["ratio"] for r in run_rows if r["ratio"] is not None]
        entry["mean_ratio"] = statistics.fmean(ratios) if ratios else None
        entry["rejected"] = runs.get(name, {}).get("rejected", 0)
        out[name] = entry
    return out


def tune(family: Family, seeds: list[int], tune_seeds: list[int], runner, log) -> tuple[float, dict, dict]:
    """The baseline over the grid on `tune_seeds`; returns the best rate, the baseline's runs at it for every seed
    of `seeds`, and each rate's mean best held-out loss."""
    grid: dict[float, dict[int, dict]] = {}
    for lr in family.lrs:
        grid[lr] = {seed: runner(lr, seed, "baseline") for seed in tune_seeds}
        best = [round(min(r["val_loss"] for r in g["rows"]), 4) for g in grid[lr].values()]
        log(f"  lr {lr:g}: best held-out by seed {best}")
    score = {lr: statistics.fmean(min(r["val_loss"] for r in g["rows"]) for g in runs.values())
             for lr, runs in grid.items()}
    best = min(score, key=score.get)
    if best in (min(family.lrs), max(family.lrs)):
        log(f"  warning: the best rate {best:g} is at an edge of the grid {family.lrs}")
    return best, {seed: grid[best].get(seed) or runner(best, seed, "baseline") for seed in seeds}, score


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, Any]]:
    """Mean over seeds of each column; a seed that never reaches a target counts as 0 saved (and is counted)."""
    table: dict[str, dict[str, Any]] = {}
    for name in next(iter(per_seed.values())):
        entries = [by_name[name] for by_name in per_seed.values()]
        row: dict[str, Any] = {}
        for column in ("steps_saved_train", "steps_saved_val", "time_saved_train", "time_saved_val",
                       "fine_saved_val"):
            values = [e[column] for e in entries]
            row[column] = statistics.fmean(0.0 if v is None else v for v in values)
            row[column + "_per_seed"] = values
            row[column.replace("saved", "reached")] = sum(v is not None for v in values)
        row["final_val_loss"] = statistics.fmean(e["final_val_loss"] for e in entries)
        ratios = [e["mean_ratio"] for e in entries if e["mean_ratio"] is not None]
        row["mean_ratio"] = statistics.fmean(ratios) if ratios else None
        row["rejected"] = sum(e["rejected"] for e in entries)
        shares = [e["pdt_share"] for e in entries if "pdt_share" in e]
        row["pdt_share"] = statistics.fmean(shares) if shares else None
        table[name] = row
    return table


def markdown(results: dict[str, dict], command: str) -> str:
    pct = (lambda v: "—" if v is None else f"{100 * v:+.0f}%")  # noqa: E731
    lines = [f"Reproduce: `{command}`", ""]
    for family, result in results.items():
        n = len(result["seeds"])
        grid = ", ".join(f"{k}: {v:.4f}" for k, v in result["grid"].items())
        lines += [f"### {family}: tuned lr {result['lr']:g} (grid {grid}"
                  " = best held-out loss by rate, mean over seeds), "
                  f"{n} seed(s), {result['steps']} steps, a checkpoint every {result['save_every']}", "",
                  "| variant | steps saved to best held-out | per seed | between checkpoints "
                  "| time saved to best held-out "
                  "| steps saved to best train | time saved to best train | final held-out loss | mask ratio "
                  "| gate rejections | pdt's share of the time |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in result["table"].items():
            per_seed = ", ".join(pct(v) for v in row["steps_saved_val_per_seed"])
            lines.append(
                f"| {name} | {pct(row['steps_saved_val'])} ({row['steps_reached_val']}/{n} reached) | {per_seed} "
                f"| {pct(row['fine_saved_val'])} | {pct(row['time_saved_val'])} "
                f"| {pct(row['steps_saved_train'])} ({row['steps_reached_train']}/{n}) "
                f"| {pct(row['time_saved_train'])} | {row['final_val_loss']:.4f} "
                f"| {'—' if row['mean_ratio'] is None else format(row['mean_ratio'], '.3f')} | {row['rejected']} "
                f"| {'—' if row['pdt_share'] is None else format(row['pdt_share'], '.1%')} |")
        lines.append("")
    lines += ["Saved: 1 − (steps or seconds to reach the same seed's tuned baseline's best loss) / (the baseline's "
              "own), mean over seeds, a seed that never reaches it counted as 0%; measured at checkpoints (between "
              "checkpoints: the step where the loss reaches the target, linear between the two checkpoints around "
              "it, for each run). "
              "Seconds: training, saving and pdt (the gate's evaluations included), not the loss measurements; "
              "a variant's = its steps at the baseline's cost per step / (1 − pdt's share of its own run's "
              "seconds), both measured in that run, since runs side by side on a shared machine differ in load. "
              "Held-out = the test split; the gate looks only at the validation split. "
              "LAWA: the mean of the baseline's last 5 checkpoints, measured at each checkpoint."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    """Per family: each variant's held-out loss minus the tuned baseline's, mean over seeds (below 0 is ahead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), layout="constrained", squeeze=False)
    for ax, (family, result) in zip(axes[0], results.items(), strict=True):
        seeds = result["runs"]["baseline"]
        curves = {name: by_seed for name, by_seed in result["runs"].items()}
        curves["lawa"] = {s: {"rows": [{"step": r["step"], "val_loss": r["lawa_val_loss"]} for r in run["rows"]]}
                          for s, run in seeds.items()}
        for index, (name, by_seed) in enumerate(curves.items()):
            steps = [r["step"] for r in next(iter(by_seed.values()))["rows"]]
            gap = [statistics.fmean(run["rows"][i]["val_loss"] - seeds[s]["rows"][i]["val_loss"]
                                    for s, run in by_seed.items()) for i in range(len(steps))]
            ax.plot(steps, gap, color=f"C{index}", label=name, lw=2 if name == "baseline" else 1.2)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set(title=f"{family} (lr {result['lr']:g}): held-out loss − tuned baseline's", xlabel="step")
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def cached_runner(name: str, family: Family, scratch: Path, cache: Path | None):
    """`runner(lr, seed, variant)`: one run, kept as JSON under `cache` (when given) by family, steps, rate, seed
    and variant, so that a later invocation (more variants, more seeds) reuses the runs already made."""

    def runner(lr: float, seed: int, variant: str) -> dict:
        key = f"{name}-{family.steps}-{lr:g}-{seed}-{variant}"
        kept = cache / f"{key}.json" if cache is not None else None
        if kept is not None and kept.exists():
            return json.loads(kept.read_text())
        result = run(family, lr, seed, VARIANTS[variant], scratch / key)
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(result))
        return result

    return runner


def evaluate_family(name: str, family: Family, seeds: list[int], tune_seeds: list[int], variants: list[str],
                    scratch: Path, cache: Path | None, log) -> dict[str, Any]:
    """The grid, then the variants at the tuned rate, compared per seed and summarized."""
    log(f"{name}: tuning over {family.lrs} on seeds {tune_seeds}")
    runner = cached_runner(name, family, scratch, cache)
    lr, base_runs, grid = tune(family, seeds, tune_seeds, runner, log)
    runs: dict[str, dict[int, dict]] = {"baseline": base_runs}
    for variant in variants:
        if variant == "baseline":
            continue
        runs[variant] = {}
        for seed in seeds:
            runs[variant][seed] = runner(lr, seed, variant)
            log(f"  {variant} seed {seed}: final held-out {runs[variant][seed]['rows'][-1]['val_loss']:.4f}")
    per_seed = {seed: compare(base_runs[seed], {v: runs[v][seed] for v in runs}) for seed in seeds}
    return {"lr": lr, "grid": {f"{k:g}": v for k, v in grid.items()}, "steps": family.steps,
            "save_every": family.save_every, "seeds": seeds, "per_seed": per_seed, "table": summarize(per_seed),
            "runs": runs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--families", nargs="+", default=["mlp", "cnn", "gpt"], choices=("mlp", "cnn", "gpt"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tune-seeds", type=int, nargs="+", default=None,
                   help="seeds of the learning-rate grid (default: --seeds); the baseline at the tuned rate runs on "
                        "every seed")
    p.add_argument("--cache", type=Path, default=None,
                   help="keep each run as JSON here and reuse it on a later invocation")
    p.add_argument("--gpt-seeds", type=int, nargs="+", default=None, help="seeds of the GPT (default: --seeds)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=40, help="epochs of the digits families")
    p.add_argument("--gpt-steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per run (default: 1 for the digits, 2 for the GPT); 1 when invocations "
                        "sharing a --cache run side by side")
    p.add_argument("--gpt-lrs", type=float, nargs="+", default=None, help="the GPT's grid (default 3e-4 1e-3 3e-3)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="the digits' grid (default 3e-3 1e-2 3e-2 1e-1)")
    p.add_argument("--from-runs", action="store_true",
                   help="train nothing: recompute the tables and curves of the families in --out's runs.json")
    args = p.parse_args(argv)
    logging.getLogger("pdtcli").setLevel(logging.ERROR)  # the lineage notes of each step, not needed here
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "runs.json"
    results: dict[str, dict] = json.loads(saved.read_text())["results"] if saved.exists() else {}
    command = "python benchmarks/evidence.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(text: str) -> None:
        print(text, flush=True)

    if args.from_runs:
        for name in args.families:
            runs, command = results[name]["runs"], results[name]["command"]
            results[name]["per_seed"] = {seed: compare(base, {v: runs[v][seed] for v in runs})
                                         for seed, base in runs["baseline"].items()}
            results[name]["table"] = summarize(results[name]["per_seed"])
        saved.write_text(json.dumps({"results": results}, indent=1))
        (args.out / "results.md").write_text(markdown(results, command))
        plot(results, args.out / "curves.png")
        return
    with tempfile.TemporaryDirectory(prefix="pdt-evidence-") as scratch:
        for name in args.families:
            family = digits_family(name, args.epochs) if name != "gpt" else gpt_family(args.gpt_steps)
            grid = args.gpt_lrs if name == "gpt" else args.lrs
            if grid:
                family.lrs = tuple(grid)
            seeds = args.gpt_seeds if name == "gpt" and args.gpt_seeds else args.seeds
            family.threads = args.threads or family.threads
            tune_seeds = [s for s in (args.tune_seeds or seeds) if s in seeds] or seeds
            results[name] = evaluate_family(name, family, seeds, tune_seeds, args.variants, Path(scratch),
                                            args.cache, log)
            results[name]["command"] = command
            saved.write_text(json.dumps({"results": results}, indent=1))  # each family as soon as it is done
            (args.out / "results.md").write_text(markdown(results, command))
            plot(results, args.out / "curves.png")
            log(markdown({name: results[name]}, command))


if __name__ == "__main__":
    main()
