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
import resource
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


# The peers: the step as a user would write it by hand, everything in memory in float64 (load the
# h checkpoints, DMD by a dense SVD or by PyDMD, the same mask, save). They share the loading and
# the mask-and-save; only the fit differs.
PEER_LOAD = """
import sys, numpy as np, torch
from safetensors.torch import load_file, save_file
paths, out, tau = sys.argv[1:-1], sys.argv[-1], 5
states = [load_file(p) for p in paths]
names = list(states[-1])
W = np.stack([torch.cat([s[k].double().reshape(-1) for k in names]).numpy() for s in states], axis=1)
del states[:-1]
"""
PEER_SVD = """
X, Y = W[:, :-1], W[:, 1:]
U, S, Vt = np.linalg.svd(X, full_matrices=False)
r = int((S > 1e-6 * S[0]).sum())
U, S, V = U[:, :r], S[:r], Vt[:r].T
lam, psi = np.linalg.eig(U.T @ Y @ V / S)
Phi = Y @ (V / S) @ psi
b = np.linalg.lstsq(Phi, W[:, -1].astype(complex), rcond=None)[0]
preds = [np.real(Phi @ (lam ** k * b)) for k in range(1, tau + 1)]
"""
PEER_PYDMD = """
from pydmd import DMD
dmd = DMD(svd_rank=-1, exact=True)
dmd.fit(W)
dmd.dmd_time["tend"] = W.shape[1] - 1 + tau
rec = dmd.reconstructed_data.real
preds = [rec[:, W.shape[1] - 1 + k] for k in range(1, tau + 1)]
"""
PEER_SAVE = """
wh, delta = W[:, -1], W[:, -1] - W[:, -2]
move = preds[-1] - wh
ok = (np.abs(delta) < np.abs(move)) & (np.abs(move) <= tau * np.abs(delta))
previous = wh
for p in preds:
    ok &= np.sign(p - previous) == np.sign(delta)
    previous = p
fused = np.where(ok, preds[-1], wh)
tensors, offset = {}, 0
for k in names:
    t = states[-1][k]
    tensors[k] = torch.from_numpy(fused[offset:offset + t.numel()]).to(t.dtype).reshape(t.shape)
    offset += t.numel()
save_file(tensors, out)
"""
PEERS = {"dense_svd": PEER_LOAD + PEER_SVD + PEER_SAVE, "pydmd": PEER_LOAD + PEER_PYDMD + PEER_SAVE}


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


def tensor_sizes(n: int, shape: str) -> dict[str, int]:
    """Tensor names and sizes of an `n`-parameter model: `flat` is 4 tensors (the largest half the
    model); `gpt2` is GPT-2 small's layout (148 tensors from 768-element norms to a 38.6M-element
    embedding, 124M parameters), with layers added or removed to come near `n`."""
    if shape == "flat":
        sizes = [n // 2, n // 4, n - n // 2 - n // 4 - 1000, 1000]
        return {f"layer{i}.weight": size for i, size in enumerate(sizes)}
    d, vocab, positions = 768, 50257, 1024
    block = {"ln_1.weight": d, "ln_1.bias": d, "attn.c_attn.weight": d * 3 * d, "attn.c_attn.bias": 3 * d,
             "attn.c_proj.weight": d * d, "attn.c_proj.bias": d, "ln_2.weight": d, "ln_2.bias": d,
             "mlp.c_fc.weight": d * 4 * d, "mlp.c_fc.bias": 4 * d, "mlp.c_proj.weight": 4 * d * d,
             "mlp.c_proj.bias": d}
    fixed = vocab * d + positions * d + 2 * d
    layers = max(1, round((n - fixed) / sum(block.values())))
    sizes = {"wte.weight": vocab * d, "wpe.weight": positions * d}
    for layer in range(layers):
        sizes.update({f"h.{layer}.{name}": size for name, size in block.items()})
    sizes.update({"ln_f.weight": d, "ln_f.bias": d})
    return sizes


def make_window(folder: Path, n: int, count: int, seed: int = 0, shape: str = "flat",
                dtype: torch.dtype = torch.float32) -> list[Path]:
    """`count` checkpoints of a trajectory w_t = w_0 + a t + b t^2 + noise, saved in `dtype`.

    Each tensor's w_0 and a are drawn again from their own seeds for every checkpoint, so that
    only one checkpoint (and one tensor's draws) is in memory at a time, even at 1B parameters.
    """
    sizes = tensor_sizes(n, shape)
    paths = []
    for t in range(1, count + 1):
        tensors = {}
        for i, (name, size) in enumerate(sizes.items()):
            w = np.random.default_rng([seed, i, 0]).standard_normal(size, dtype=np.float32)
            w += np.float32(0.01 * (t - 0.03 * t * t)) * np.random.default_rng([seed, i, 1]).standard_normal(
                size, dtype=np.float32)
            w += np.float32(0.002) * np.random.default_rng([seed, i, 2, t]).standard_normal(size, dtype=np.float32)
            tensors[name] = torch.from_numpy(w).to(dtype)
        path = folder / f"step_{t:04d}.safetensors"
        save_file(tensors, path)
        del tensors
        paths.append(path)
    return paths


def timed(argv: list[str], memory_limit: int | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of a fresh Python process running argv; with
    `memory_limit` (bytes of address space), a MemoryError there raises MemoryError here."""
    def limit() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, check=False,
                          preexec_fn=limit)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0 and ("MemoryError" in proc.stderr or "can't allocate memory" in proc.stderr):
        raise MemoryError(argv[0])
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed: {proc.stderr}")
    peak_kb = int(proc.stderr.rsplit("PEAK_KB ", 1)[1].split()[0])
    return elapsed, peak_kb / 1024, proc.stdout


def du_mib(path: Path) -> float:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file()) / 2**20


def peer(name: str, n: int, window: list[Path], out: Path, limit: int) -> dict:
    """One peer's time and peak, or that it did not fit in `limit` bytes."""
    if name == "pydmd" and n > 20_000_000:
        return {}
    try:
        seconds, peak, _ = timed(["-c", PEERS[name], *map(str, window), str(out)], memory_limit=limit)
    except MemoryError:
        return {f"{name}_s": f"> {limit / 2**30:.0f} GiB"}
    finally:
        out.unlink(missing_ok=True)
    return {f"{name}_s": round(seconds, 2), f"{name}_peak_MiB": round(peak)}


def run(n: int, h: int, work: Path, devices: list[str], shape: str = "flat", dtype: str = "float32",
        peers: tuple[str, ...] = (), peer_limit: int = 22 * 2**30) -> list[dict]:
    """One row per device, each from a fresh store over the same window and floor."""
    n = sum(tensor_sizes(n, shape).values())  # as built (the gpt2 layout comes in whole layers)
    folder = work / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    paths = make_window(folder, n, h + 1, shape=shape, dtype=getattr(torch, dtype))
    extra = paths[-1]
    window = paths[:h]
    floor_s, _, _ = timed(["-c", FLOOR, *map(str, window), str(work / "floor.safetensors")])
    # the floor for the steady step: the same read-window-once + write-one, over the new window
    floor2_s, floor2_mb, _ = timed(["-c", FLOOR, *map(str, paths[1:]), str(work / "floor.safetensors")])
    (work / "floor.safetensors").unlink()
    rows = []
    for device in devices:
        shutil.rmtree(folder / ".pdt", ignore_errors=True)
        for output in folder.glob("*.pdt.*"):
            output.unlink()
        hidden = extra.rename(work / extra.name)  # appears later, for the steady step
        pdt = ["pdtcli", "predict", str(folder), "--json", "--device", device]
        first_s, _, first_out = timed(pdt)
        ratio = json.loads(first_out)["mask"]["totals"]["ratio"]
        hidden.rename(extra)
        steady_s, steady_mb, steady_out = timed(pdt)
        assert json.loads(steady_out)["status"] == "written"
        rows.append({
            "params": n,
            "tensors": len(tensor_sizes(n, shape)),
            "dtype": dtype,
            "device": device,
            "checkpoint_MiB": round(extra.stat().st_size / 2**20, 1),
            "store_MiB": round(du_mib(folder / ".pdt")),
            "floor_s": round(floor_s, 2),
            "first_run_s": round(first_s, 2),
            "first_over_floor": round(first_s / floor_s, 2),
            "steady_floor_s": round(floor2_s, 2),
            "steady_step_s": round(steady_s, 2),
            "steady_over_floor": round(steady_s / floor2_s, 2),
            "steady_ns_per_param": round(steady_s / n * 1e9, 1),
            "floor_peak_MiB": round(floor2_mb),
            "steady_peak_minus_floor_MiB": round(steady_mb - floor2_mb),
            "mask_ratio": round(ratio, 4),
        })
    row = rows[0]
    for name in peers:
        row.update(peer(name, n, paths[1:], work / "peer.safetensors", peer_limit))
        if f"{name}_s" in row and isinstance(row[f"{name}_s"], float):
            row[f"pdt_over_{name}"] = round(row["steady_step_s"] / row[f"{name}_s"], 2)
    shutil.rmtree(folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10M", "100M"])
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--device", nargs="+", default=["auto"],
                        help="one row per device over the same window (cpu cuda: both, side by side)")
    parser.add_argument("--shape", choices=("flat", "gpt2"), default="flat",
                        help="4 tensors, or GPT-2 small's 148-tensor layout (scaled in layers)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--peers", nargs="*", default=[], choices=sorted(PEERS),
                        help="also time the hand-written in-memory step (dense_svd) and PyDMD (pydmd, up to 20M)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (needs ~ (2h+2) x checkpoint)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pdt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, device {' '.join(args.device)}, h = {args.history}, "
          f"{args.shape} layout, {args.dtype}")
    rows = []
    for size in args.sizes:  # each row as soon as it is measured: a long run is read while it goes
        for row in run(parse_size(size), args.history, work, args.device, args.shape, args.dtype, tuple(args.peers)):
            rows.append(row)
            print(json.dumps(row), flush=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
