"""The README's workflow as a loop: train one epoch, run pdt on the folder, resume from its output.

Each round resumes the training script from the newest checkpoint (pdt's fused one when pdt
wrote one), trains one epoch, then runs `pdt predict` on the folder. Without `--pdt` the same
loop runs with no pdt step: the baseline, with the same seeds and the same data order.

`--mode cli` runs both as separate processes, exactly as a user or cron job would (process
start, reading and writing all counted); `--mode api` runs both inside this process through
`pdtcli.api`, which measures the floor of pdt's per-call overhead.

    python examples/pdt_loop.py --out runs/loop-base --epochs 30
    python examples/pdt_loop.py --out runs/loop-pdt --epochs 30 --pdt
    python examples/pdt_loop.py --out runs/loop-pdt --epochs 30 --pdt --modes exact --mode api
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from train_digits import train  # pdt_loop is only ever found beside it, in examples/

HERE = Path(__file__).resolve().parent
TRAIN_SCRIPT = HERE / "train_digits.py"


@dataclass
class LoopConfig:
    """One run of the loop: the training run's settings and pdt's."""

    epochs: int = 30
    optimizer: str = "sgd"
    lr: float = 0.05
    hidden: int = 64
    seed: int = 0
    pdt: bool = False
    modes: str | None = None  # None: pdt's default
    criteria: str | None = None  # None: pdt's default
    random: bool = False
    tau: int = 5
    mode: str = "cli"  # cli | api


@dataclass
class Round:
    epoch: int
    train_loss: float
    test_acc: float
    train_s: float
    pdt_s: float = 0.0
    status: str = ""
    ratio: float | None = None
    ratio_by_layer_type: dict[str, float] = field(default_factory=dict)


def _train_args(cfg: LoopConfig) -> list[str]:
    return ["--optimizer", cfg.optimizer, "--lr", str(cfg.lr), "--hidden", str(cfg.hidden), "--seed", str(cfg.seed)]


def _pdt_args(cfg: LoopConfig) -> list[str]:
    args = ["--tau", str(cfg.tau)] + (["--criteria", cfg.criteria] if cfg.criteria else [])
    args += ["--modes", cfg.modes] if cfg.modes else []
    return [*args, "--random"] if cfg.random else args


def _train_cli(cfg: LoopConfig, out: Path, resume: Path | None) -> dict:
    argv = [sys.executable, str(TRAIN_SCRIPT), "--out", str(out), "--epochs", "1", *_train_args(cfg)]
    if resume is not None:
        argv += ["--resume", str(resume)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def _pdt_cli(cfg: LoopConfig, out: Path) -> dict:
    argv = [sys.executable, "-m", "pdtcli", "predict", str(out), "--json", *_pdt_args(cfg)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pdt predict failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def _train_api(cfg: LoopConfig, out: Path, resume: Path | None) -> dict:
    return train(out, 1, resume, cfg.optimizer, cfg.lr, cfg.hidden, cfg.seed)[-1]


def _pdt_api(cfg: LoopConfig, out: Path) -> dict:
    from pdtcli import api

    chosen = {k: v for k, v in (("modes", cfg.modes), ("criteria", cfg.criteria)) if v}  # else pdt's defaults
    settings = api.Settings.build(tau=cfg.tau, random=cfg.random, **chosen)
    return api.predict(out, settings=settings).as_dict()


def run_loop(cfg: LoopConfig, out: Path, log=None) -> list[Round]:
    """Train `cfg.epochs` epochs one at a time, with a pdt step after each when `cfg.pdt`."""
    train_one, pdt_one = (_train_cli, _pdt_cli) if cfg.mode == "cli" else (_train_api, _pdt_api)
    out.mkdir(parents=True, exist_ok=True)
    resume: Path | None = None
    rounds: list[Round] = []
    for _ in range(cfg.epochs):
        start = time.perf_counter()
        metrics = train_one(cfg, out, resume)
        row = Round(metrics["epoch"], metrics["train_loss"], metrics["test_acc"], time.perf_counter() - start)
        resume = out / f"epoch_{row.epoch:04d}.pt"
        if not math.isfinite(row.train_loss):  # diverged: pdt would refuse the checkpoint, and rightly
            row.status = "diverged"
            rounds.append(row)
            if log is not None:
                log(row)
            break
        if cfg.pdt:
            start = time.perf_counter()
            step = pdt_one(cfg, out)
            row.pdt_s = time.perf_counter() - start
            row.status = step["status"]
            if step["status"] == "written":
                resume = Path(step["output"])
                row.ratio = step["mask"]["totals"]["ratio"]
                row.ratio_by_layer_type = {k: v["ratio"] for k, v in step["mask"]["by_layer_type"].items()}
        rounds.append(row)
        if log is not None:
            log(row)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder (should start empty)")
    parser.add_argument("--epochs", type=int, default=LoopConfig.epochs)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--lr", type=float, default=LoopConfig.lr)
    parser.add_argument("--hidden", type=int, default=LoopConfig.hidden)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pdt", action="store_true", help="run `pdt predict` after each epoch")
    parser.add_argument("--modes", help="pdt --modes [default: pdt's]")
    parser.add_argument("--criteria", help="pdt --criteria [default: pdt's]")
    parser.add_argument("--random", action="store_true", help="pdt --random")
    parser.add_argument("--tau", type=int, default=LoopConfig.tau)
    parser.add_argument("--mode", choices=("cli", "api"), default="cli", help="processes, or one process")
    args = parser.parse_args()
    cfg = LoopConfig(args.epochs, args.optimizer, args.lr, args.hidden, args.seed, args.pdt, args.modes,
                     args.criteria, args.random, args.tau, args.mode)
    run_loop(cfg, args.out, log=lambda row: print(json.dumps(asdict(row)), flush=True))


if __name__ == "__main__":
    main()
