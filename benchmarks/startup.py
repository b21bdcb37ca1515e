"""What `pdt` costs before it does anything: the commands that touch no tensor, in fresh processes.

    python benchmarks/startup.py --runs 7

Makes a folder of 6 small torch checkpoints, runs `pdt predict` on it once, then times (median wall
time of `--runs` fresh `python -m pdtcli ...` processes each, side by side in one run): `--version`,
`--help`, `predict` with nothing new, `predict` on a folder still waiting for checkpoints, `report`,
and for reference `python -c "import torch"` and `python -c pass`. Each pdt command runs once more
under a probe that says which torch modules it imported; the benchmark exits 1 when any did (issue 23:
these paths never import torch), and prints whether the 0.5 s aim was met.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AIM = 0.5  # seconds, issue 23
PROBE = """
import json, runpy, sys
sys.argv = ["pdt", *sys.argv[1:]]
try:
    runpy.run_module("pdtcli", run_name="__main__")
except SystemExit:
    pass
sys.stdout.flush()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "torch")), file=sys.stderr)
"""


def checkpoints(folder: Path, count: int) -> None:
    """`count` checkpoints of a drifting random walk (a 64-64-10 MLP's shapes), as `torch.save` writes them."""
    import torch

    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    shapes = {"0.weight": (64, 64), "0.bias": (64,), "2.weight": (10, 64), "2.bias": (10,)}
    weights = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    drift = {name: torch.randn(shape, generator=gen) * 1e-2 for name, shape in shapes.items()}
    for epoch in range(1, count + 1):
        weights = {name: w + drift[name] + torch.randn(w.shape, generator=gen) * 1e-3 for name, w in weights.items()}
        torch.save({"model": weights, "epoch": epoch}, folder / f"epoch_{epoch}.pt")


def wall(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def torch_modules(args: list[str], env: dict[str, str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stderr.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per command (the median is shown)")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: compiled once (by the set-up runs), then cached
    with tempfile.TemporaryDirectory() as tmp:
        full, few = Path(tmp) / "full", Path(tmp) / "few"
        checkpoints(full, 6)
        checkpoints(few, 2)
        pdt = [sys.executable, "-m", "pdtcli"]
        for folder in (full, few):  # the first run ingests (and on `full` writes): not what is measured
            subprocess.run([*pdt, "predict", str(folder)], env=env, check=True, capture_output=True)
        cases = {
            "pdt --version": ["--version"],
            "pdt --help": ["--help"],
            "pdt predict (nothing new)": ["predict", str(full)],
            "pdt predict (waiting)": ["predict", str(few)],
            "pdt report": ["report", str(full)],
            "pdt report --json": ["report", str(full), "--json"],
        }
        reference = {'python -c "import torch"': [sys.executable, "-c", "import torch"],
                     "python -c pass": [sys.executable, "-c", "pass"]}
        commands = {**{name: [*pdt, *argv] for name, argv in cases.items()}, **reference}
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):  # interleaved, so that a burst of load on the machine hits every command alike
            for name, command in commands.items():
                times[name].append(wall(command, env))
        imported = {name: torch_modules(argv, env) for name, argv in cases.items()}
    print(f"{'command':<28} {'median':>8} {'min':>7} {'max':>7}  torch imported  ({args.runs} fresh processes each)")
    for name, seconds in times.items():
        torch = "" if name in reference else ("yes: " + ", ".join(imported[name][:3]) if imported[name] else "no")
        print(f"{name:<28} {statistics.median(seconds):>7.3f}s {min(seconds):>6.3f}s {max(seconds):>6.3f}s  {torch}")
    slowest = max(statistics.median(times[name]) for name in cases)
    print(f"slowest pdt median {slowest:.3f} s: {'within' if slowest <= AIM else 'over'} the {AIM} s aim")
    if any(imported.values()):
        print("FAIL: torch imported on a path that touches no tensor", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
