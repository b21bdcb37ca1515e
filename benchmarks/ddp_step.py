"""What the in-loop step costs each rank under DDP, against the same step in one process.

A stack of Linear layers (`--params` float32 parameters in all) is trained one batch per epoch
with SGD; after each epoch the checkpoint is saved (`torch.save`) and `PDTStep.step` runs. The
script runs the loop once as one process, then as `--ranks` gloo ranks under torchrun around
`DistributedDataParallel` (rank 0 saves and fuses, every rank takes the values by broadcast),
and prints, for the steps that loaded fused values, the median seconds of `PDTStep.step` for the
single process and for each rank (for ranks > 0 that is waiting for rank 0 plus receiving), and
what a bare broadcast of every parameter from rank 0 takes (what DDP adds to rank 0's step).
`--sharded`: the ranks train the stack under FSDP2 (`fully_shard`) instead and every rank saves its shards
(`dcp.save` of `get_model_state_dict`) before the step, in which each rank fuses and takes its own shards.

    python benchmarks/ddp_step.py --params 10M --ranks 2 [--sharded]
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

import torch
from torch import nn

EPOCHS = 7
HISTORY = 4
WIDTH = 1024


def model(params: int) -> nn.Module:
    torch.manual_seed(0)
    layers = max(1, params // (WIDTH * WIDTH + WIDTH))
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(layers)])


def loop(folder: Path, params: int, sharded: bool = False) -> dict[str, list[float]]:
    """Seconds of each step that loaded fused values, on this rank (`steps`), and of a bare
    broadcast of every parameter from rank 0 (`broadcast`: the share of the step that DDP adds;
    none when `sharded`: the ranks then run under FSDP2 and save DCP folders)."""
    from pdtcli.integrations import PDTStep

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    net = model(params)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        wrapped = fully_shard(net)
    else:
        wrapped = nn.parallel.DistributedDataParallel(net) if distributed else net
    optim = torch.optim.SGD(wrapped.parameters(), lr=1e-3, momentum=0.9)
    pdt = PDTStep(folder, history=HISTORY)
    gen = torch.Generator().manual_seed(rank)
    loaded = []
    for epoch in range(1, EPOCHS + 1):
        optim.zero_grad()
        wrapped(torch.randn(32, WIDTH, generator=gen)).square().mean().backward()
        optim.step()
        path = folder / (f"step_{epoch}" if sharded else f"epoch_{epoch}.pt")
        if sharded:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            dcp.save({"model": get_model_state_dict(wrapped)}, checkpoint_id=path)
        elif rank == 0:
            torch.save({"model": net.state_dict()}, path)
        if distributed:
            torch.distributed.barrier()
        result = pdt.step(wrapped, path)
        if result is not None and result.status == "loaded":
            loaded.append(pdt.seconds[-1])
    broadcast = []
    if distributed and not sharded:
        for _ in range(3):
            torch.distributed.barrier()
            started = time.perf_counter()
            for tensor in net.state_dict().values():
                torch.distributed.broadcast(tensor.clone(), src=0)
            broadcast.append(time.perf_counter() - started)
    if distributed:
        torch.distributed.destroy_process_group()
    return {"steps": loaded, "broadcast": broadcast}


def size(text: str) -> int:
    return int(float(text[:-1]) * {"K": 1e3, "M": 1e6}[text[-1].upper()]) if text[-1].isalpha() else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="10M")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sharded", action="store_true", help="the ranks under FSDP2, saving DCP folders")
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)  # a torchrun worker: where to write its seconds
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    params = size(args.params)
    if args.rank_out:
        seconds = loop(Path(args.folder), params, args.sharded)
        Path(f"{args.rank_out}.{os.environ['RANK']}").write_text(json.dumps(seconds))
        os._exit(0)  # gloo's threads can abort a normal interpreter exit
    with tempfile.TemporaryDirectory() as tmp:
        single = Path(tmp) / "single"
        single.mkdir()
        one = loop(single, params)["steps"]
        ranked = Path(tmp) / "ranks"
        ranked.mkdir()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(args.ranks), __file__, "--params", args.params, "--folder", str(ranked),
                        "--rank-out", str(Path(tmp) / "seconds"), *(["--sharded"] if args.sharded else [])],
                       check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.ranks))))
        per_rank = [json.loads((Path(tmp) / f"seconds.{r}").read_text()) for r in range(args.ranks)]
    numel = sum(p.numel() for p in model(params).parameters())
    print(f"{numel / 1e6:.1f}M float32 parameters, h={HISTORY}, {len(one)} steps that loaded fused values (median)")
    print(f"single process: {statistics.median(one):.3f} s")
    for rank, seconds in enumerate(per_rank):
        step = statistics.median(seconds["steps"])
        line = f"{'FSDP2' if args.sharded else 'DDP'} rank {rank} of {args.ranks}: {step:.3f} s " \
               f"({step / statistics.median(one):.2f}x the single process)"
        if seconds["broadcast"]:
            line += f"; a bare broadcast of the parameters: {statistics.median(seconds['broadcast']):.3f} s"
        print(line)


if __name__ == "__main__":
    main()
