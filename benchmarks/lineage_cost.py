"""What checking the lineage costs at ingest: one new checkpoint taken in after a fused write (its values
compared with the fused state, its parent and the state before) against one taken in after a dry run
(nothing to compare), on the same synthetic window.

    python benchmarks/lineage_cost.py --params 10M --repeat 3

Prints one line per case: the median wall time of `api.snapshot` ingesting the one new checkpoint, in
this process (no interpreter start-up), with the page cache warm.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pdtcli import api
from pdtcli.options import Settings


def size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def trajectory(folder: Path, params: int, count: int, start: int = 1) -> None:
    """`count` checkpoints of a drifting random walk, 16 tensors of params / 16 float32 values."""
    gen = torch.Generator().manual_seed(start)
    shape = (16, params // 16)
    weights = torch.randn(shape, generator=gen)
    drift = torch.randn(shape, generator=gen) * 1e-2
    for epoch in range(start, start + count):
        weights += drift + torch.randn(shape, generator=gen) * 1e-3
        save_file({f"layer{i}.weight": weights[i].clone() for i in range(16)}, folder / f"epoch_{epoch}.safetensors")


def one_ingest(params: int, write: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpts"
        folder.mkdir()
        trajectory(folder, params, 3)
        settings = Settings.build(history=3)
        api.predict(folder, settings=settings, dry_run=not write)
        trajectory(folder, params, 1, start=4)
        started = time.perf_counter()
        api.snapshot(folder, settings=settings)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="10M")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    params = size(args.params)
    for write, label in ((False, "after a dry run (nothing to compare)"), (True, "after a fused write (lineage)")):
        seconds = statistics.median(one_ingest(params, write) for _ in range(args.repeat))
        print(f"{args.params} float32: ingest of one checkpoint {label}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
