"""Per-rank cost of one distributed PDT step: bytes read, bytes written, peak memory, bytes exchanged.

Writes a window of PyTorch DCP checkpoints as FSDP saves them (each tensor sharded along its
first dimension over `--writers` gloo ranks; every writer makes only its own shard, so the
window is generated in bounded memory), then for each K in `--ranks` runs `pdt predict` as K
processes of one gloo process group (the variables torchrun sets), twice: the first run (ingest
h checkpoints, fit, mask, write) and a steady step (one more checkpoint). Each rank reports,
from inside its own process:

- bytes read and written (`/proc/self/io` rchar / wchar: every read and write call, page cache
  included), peak RSS (VmHWM);
- bytes it sent to the other ranks (the pickled payloads of its collectives) and received.

On this 2-core machine wall time does not scale with K (the ranks share the cores and the
disk); the per-rank figures are what must scale.

    python benchmarks/distributed.py --size 400M --writers 4 --ranks 1 2 4
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

ROOT = Path(__file__).resolve().parent.parent

# Each writer rank makes its own rows of each tensor of the trajectory w_t = w_0 + a t + b t^2 + noise
# (drawn from seeds of (tensor, rank), so the shards agree whatever process draws them) and saves them
# as a DTensor shard: the folder is exactly what FSDP + torch.distributed.checkpoint.save would write.
WRITER = """
import os, sys, numpy as np, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
rank, size, folder, n, count = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
dist.init_process_group("gloo", init_method="file://" + folder + "/.rendezvous", rank=rank, world_size=size)
mesh = init_device_mesh("cpu", (size,))
shapes = {f"layers.{i}.weight": (n // 4 // 1024, 1024) for i in range(4)}
for t in range(1, count + 1):
    state = {}
    for i, (name, (rows, cols)) in enumerate(shapes.items()):
        mine = rows // size + (1 if rank < rows % size else 0)
        draw = lambda k: np.random.default_rng([i, rank, *k]).standard_normal((mine, cols), dtype=np.float32)
        local = draw([0]) + np.float32(0.01 * (t - 0.03 * t * t)) * draw([1]) + np.float32(0.002) * draw([2, t])
        state[name] = DTensor.from_local(torch.from_numpy(local), mesh, [Shard(0)], run_check=False,
                                         shape=torch.Size((rows, cols)), stride=(cols, 1))
        del local
    dcp.save({"model": state, "step": t}, checkpoint_id=f"{folder}/step_{t:04d}")
    del state
dist.barrier()
dist.destroy_process_group()
os._exit(0)
"""

# Runs pdt in a rank and, at exit, reports its I/O, peak memory and the bytes of its collectives.
PROBE = """
import atexit, json, os, pickle, sys
import pdtcli.world as world
sent = [0, 0]
gather = world.World.gather
def counted(self, obj, what="a collective"):
    out = gather(self, obj, what)
    if self.active:
        sent[0] += len(pickle.dumps(obj))
        sent[1] += sum(len(pickle.dumps(o)) for i, o in enumerate(out) if i != self.rank)
    return out
world.World.gather = counted
def report():
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    with open(os.environ["PDT_PROBE"] + f".{os.environ.get('RANK', '0')}", "w") as f:
        json.dump({"read": int(io["rchar"]), "written": int(io["wchar"]), "peak_kb": peak,
                   "sent": sent[0], "received": sent[1]}, f)
atexit.register(report)
from pdtcli.cli import run
sys.argv = ["pdt", *sys.argv[1:]]
run()
"""


def parse_size(text: str) -> int:
    scale = {"K": 1e3, "M": 1e6, "G": 1e9}
    return int(float(text[:-1]) * scale[text[-1].upper()]) if text[-1].isalpha() else int(text)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_window(folder: Path, n: int, count: int, writers: int) -> None:
    folder.mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(r), str(writers), str(folder), str(n), str(count)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(writers)]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("\n".join(outputs))
    for leftover in folder.glob(".rendezvous*"):
        leftover.unlink()


def step(k: int, folder: Path, probe: Path) -> tuple[float, list[dict], dict]:
    """`pdt predict` as k ranks; (wall seconds, per-rank figures, rank 0's JSON result)."""
    port = str(free_port())
    start = time.perf_counter()
    procs = []
    for rank in range(k):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(k), LOCAL_WORLD_SIZE=str(k),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PDT_DISTRIBUTED="1", PDT_PROBE=str(probe),
                   PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE, "predict", str(folder), "--json"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate() for p in procs]
    elapsed = time.perf_counter() - start
    if any(p.returncode for p in procs):
        raise RuntimeError("\n".join(err for _, err in outs))
    figures = [json.loads(Path(f"{probe}.{rank}").read_text()) for rank in range(k)]
    return elapsed, figures, json.loads(outs[0][0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="400M")
    parser.add_argument("--writers", type=int, default=4, help="ranks that saved the checkpoints")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    n = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="pdt-dist-", dir=args.work))
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {n:,} float32 parameters in DCP saved by "
          f"{args.writers} ranks, h = {args.history}", flush=True)
    source = work / "source"
    write_window(source, n, args.history + 1, args.writers)
    checkpoint = sum(f.stat().st_size for f in (source / "step_0001").iterdir())
    print(f"one checkpoint: {checkpoint / 2**20:.0f} MiB in {len(list((source / 'step_0001').iterdir()))} files",
          flush=True)
    mib = 2**20
    # what a rank reads and writes before it does anything: Python, torch and pdt's own files
    subprocess.run([sys.executable, "-c", PROBE, "--version"], env=dict(os.environ, PDT_PROBE=str(work / "base")),
                   check=True, capture_output=True)
    base = json.loads(Path(f"{work / 'base'}.0").read_text())
    print(f"imports alone: {base['read'] / mib:.0f} MiB read, {base['written'] / mib:.1f} MiB written "
          "(subtracted below)", flush=True)
    rows = []
    try:
        for k in args.ranks:
            folder = work / f"k{k}"
            folder.mkdir()
            for path in sorted(source.iterdir()):  # hard links: pdt never writes into its inputs
                shutil.copytree(path, folder / path.name, copy_function=os.link)
            newest = sorted(folder.iterdir())[-1]
            newest.rename(work / "held")
            for run in ("first", "steady"):
                if run == "steady":
                    (work / "held").rename(newest)
                seconds, figures, result = step(k, folder, work / "probe")
                assert result["status"] == "written", result
                row = {
                    "ranks": k, "run": run, "wall_s": round(seconds, 1),
                    "read_MiB_per_rank": [round((f["read"] - base["read"]) / mib) for f in figures],
                    "written_MiB_per_rank": [round((f["written"] - base["written"]) / mib) for f in figures],
                    "peak_MiB_per_rank": [round(f["peak_kb"] / 1024) for f in figures],
                    "sent_KiB_per_rank": [round(f["sent"] / 1024, 1) for f in figures],
                    "received_KiB_per_rank": [round(f["received"] / 1024, 1) for f in figures],
                    "accepted": result["mask"]["totals"]["accepted"],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    accepted = {row["accepted"] for row in rows if row["run"] == "steady"}
    print(f"same mask for every K: {len(accepted) == 1}")
    print("| ranks | run | wall | read / rank (MiB) | written / rank (MiB) | peak / rank (MiB) | sent / rank (KiB) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['ranks']} | {row['run']} | {row['wall_s']} s | {max(row['read_MiB_per_rank'])} | "
              f"{max(row['written_MiB_per_rank'])} | {max(row['peak_MiB_per_rank'])} | "
              f"{max(row['sent_KiB_per_rank'])} |")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
