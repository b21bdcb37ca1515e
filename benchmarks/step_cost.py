"""Time and peak memory of one `pdt predict` step against the I/O floor, measured side by side.

For each size (float32 parameters), it writes a synthetic training window of safetensors
checkpoints (a smooth trajectory plus noise, split into a few tensors), then measures in
fresh processes, so that each peak RSS is its own:

- floor: read the h checkpoints of the window once and write one checkpoint of that size
  (safetensors' own load and save), which is the least any tool doing this step must do;
- first run: `pdt predict` on the folder with h checkpoints (ingests all h, fits, masks, writes);
- steady step: one more checkpoint appears and `pdt predict` runs again, as from cron
  (ingests 1, fits, masks, writes): the step a user pays for every epoch.

    python benchmarks/step_cost.py --sizes 10M 100M
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

FLOOR = """
import sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
paths = [Path(p) for p in sys.argv[1:-1]]
total = 0.0
for path in paths:
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        total += sum(float(t[0]) for t in tensors.values())
save_file(tensors, sys.argv[-1])
"""


# Runs a module (or -c code) and reports the process's own peak RSS (VmHWM) on exit. Measured
# inside the child because ru_maxrss of a forked child counts the parent's pages too.
PEAK = """
import atexit, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            sys.stderr.write("PEAK_KB " + line.split()[1] + "\\n")
atexit.register(report)
if sys.argv[1] == "-c":
    code = sys.argv[2]
    sys.argv = ["-c"] + sys.argv[3:]
    exec(compile(code, "<floor>", "exec"))
else:
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def parse_size(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].isalpha() else int(text)


def make_window(folder: Path, n: int, count: int, seed: int = 0) -> list[Path]:
    """`count` checkpoints of a trajectory w_t = w_0 + a t + b t^2 + noise, in 4 tensors."""
    rng = np.random.default_rng(seed)
    sizes = [n // 2, n // 4, n - n // 2 - n // 4 - 1000, 1000]
    start = [rng.standard_normal(s, dtype=np.float32) for s in sizes]
    velocity = [0.01 * rng.standard_normal(s, dtype=np.float32) for s in sizes]
    paths = []
    for t in range(1, count + 1):
        tensors = {}
        for i, (w0, v) in enumerate(zip(start, velocity, strict=True)):
            noise = 0.002 * rng.standard_normal(w0.shape[0], dtype=np.float32)
            w = w0 + v * (t - 0.03 * t * t) + noise
            tensors[f"layer{i}.weight"] = torch.from_numpy(w)
        path = folder / f"step_{t:04d}.safetensors"
        save_file(tensors, path)
        paths.append(path)
    return paths


def timed(argv: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of a fresh Python process running argv."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed: {proc.stderr}")
    peak_kb = int(proc.stderr.rsplit("PEAK_KB ", 1)[1].split()[0])
    return elapsed, peak_kb / 1024, proc.stdout


def drop_output(folder: Path) -> None:
    for path in folder.glob("*.pdt.*"):
        path.unlink()


def run(n: int, h: int, work: Path, device: str) -> dict:
    folder = work / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = make_window(folder, n, h + 1)
    extra = paths[-1]
    hidden = extra.rename(work / extra.name)  # appears later, for the steady step
    window = paths[:h]
    pdt = ["pdtcli", "predict", str(folder), "--json", "--device", device]

    floor_s, floor_mb, _ = timed(["-c", FLOOR, *map(str, window), str(work / "floor.safetensors")])
    first_s, first_mb, first_out = timed(pdt)
    ratio = json.loads(first_out)["mask"]["totals"]["ratio"]
    hidden.rename(folder / extra.name)
    steady_s, steady_mb, steady_out = timed(pdt)
    assert json.loads(steady_out)["status"] == "written"
    # the floor for the steady step: the same read-window-once + write-one, over the new window
    floor2_s, floor2_mb, _ = timed(["-c", FLOOR, *map(str, paths[1:]), str(work / "floor.safetensors")])
    (work / "floor.safetensors").unlink()
    shutil.rmtree(folder)
    checkpoint_mb = n * 4 / 2**20
    return {
        "params": n,
        "checkpoint_MiB": round(checkpoint_mb, 1),
        "floor_s": round(floor_s, 2),
        "floor_peak_MiB": round(floor_mb),
        "first_run_s": round(first_s, 2),
        "first_run_peak_MiB": round(first_mb),
        "steady_step_s": round(steady_s, 2),
        "steady_floor_s": round(floor2_s, 2),
        "steady_peak_MiB": round(steady_mb),
        "steady_over_floor": round(steady_s / floor2_s, 2),
        "first_over_floor": round(first_s / floor_s, 2),
        "steady_floor_peak_MiB": round(floor2_mb),
        "steady_peak_minus_floor_MiB": round(steady_mb - floor2_mb),
        "mask_ratio": round(ratio, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10M", "100M"])
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (needs ~ (2h+2) x checkpoint)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pdt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}, h = {args.history}")
    rows = [run(parse_size(s), args.history, work, args.device) for s in args.sizes]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
