"""Real processes for distributed tests: checkpoints saved by several ranks, and pdt run as several.

The ranks meet through torch.distributed's env:// rendezvous on this machine (the variables
torchrun and Slurm set), each a separate Python process, so what crosses ranks really crosses
process boundaries over gloo.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

_SHARDED_SAVE = """
import os, sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
rank, size, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + folder + "/.rendezvous", rank=rank, world_size=size)
mesh = init_device_mesh("cpu", (size,))
states = torch.load(folder + "/states.pt", weights_only=True)
for epoch, state in states.items():
    sharded = {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() else v for k, v in state.items()}
    dcp.save({"model": sharded, "step": epoch}, checkpoint_id=f"{folder}/step_{epoch}")
dist.barrier()
dist.destroy_process_group()
os._exit(0)  # gloo's threads can abort a normal interpreter exit ("terminate called without an active exception")
"""


def save_dcp_by_ranks(run: Path, states: dict[int, dict[str, torch.Tensor]], writers: int) -> None:
    """Each epoch's state dict saved with `torch.distributed.checkpoint.save` by `writers` gloo ranks,
    every tensor sharded along its first dimension (as FSDP saves it): `run/step_E/__R_0.distcp`."""
    run.mkdir(parents=True, exist_ok=True)
    torch.save(states, run / "states.pt")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen([sys.executable, "-c", _SHARDED_SAVE, str(r), str(writers), str(run)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(writers)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, outputs
    (run / "states.pt").unlink()
    for leftover in run.glob(".rendezvous*"):
        leftover.unlink()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(ranks: int, argv: list[str], *, before_rank: dict[int, list[str]] | None = None,
           timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`python -m pdtcli argv` as `ranks` processes of one process group, as torchrun would start them
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), without torchrun's own supervision: a rank that dies
    is not cleaned up after, so what the others do is pdt's own doing. `before_rank[r]`: rank r runs
    `python *before_rank[r] argv` instead (`kill_at.py ... --`). A port taken by another process
    between choosing it and rank 0 binding it (other tests run beside this one) is chosen again."""
    for _ in range(3):
        results = _launch_once(ranks, argv, before_rank, timeout)
        if not any("address already in use" in r.stderr.lower() or "eaddrinuse" in r.stderr.lower()
                   for r in results):
            break
    return results


def _launch_once(ranks: int, argv: list[str], before_rank: dict[int, list[str]] | None,
                 timeout: float) -> list[subprocess.CompletedProcess]:
    port = str(free_port())
    procs = []
    for rank in range(ranks):
        variables = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                         LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PDT_DISTRIBUTED="1",
                         PYTHONWARNINGS="ignore")
        command = [sys.executable, *(before_rank or {}).get(rank, ["-m", "pdtcli"]), *argv]
        procs.append(subprocess.Popen(command, env=variables, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results
