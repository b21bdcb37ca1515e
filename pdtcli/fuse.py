"""The two streaming passes over the window: R for the fit, then predict-mask-fuse.

Only one row block of the snapshot matrix (h x block elements) is in memory at a time,
whatever the model size; the blocks move to the compute device (CUDA when there is
one) and are evaluated in float64 there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .dmd import accumulate_r
from .errors import UsageError
from .mask import MaskOptions, evaluate, random_accept, step_matrix
from .store import Store

DEFAULT_BLOCK = 1 << 18


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


@dataclass
class Window:
    """The snapshots of one fit, oldest first, readable block by block."""

    store: Store
    slots: list[int]
    device: torch.device
    block: int = DEFAULT_BLOCK
    _buffer: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.block = max(8, self.block - self.block % 8)  # whole bytes of packed mask bits

    def blocks(self, start: int, stop: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self._buffer is None:
            self._buffer = np.empty((len(self.slots), self.block), dtype=self.store.dtype)
        for a in range(start, stop, self.block):
            b = min(stop, a + self.block)
            values = self.store.read_block(self.slots, a, b, out=self._buffer)
            yield a, b, torch.from_numpy(values).to(device=self.device, dtype=torch.float64, copy=True)

    def qr_factor(self) -> np.ndarray:
        """Pass 1: R of W = QR over the whole window."""
        return accumulate_r((w for _, _, w in self.blocks(0, self.store.n)), len(self.slots))


@dataclass
class TensorResult:
    counts: np.ndarray  # COUNT_COLUMNS
    bits: np.ndarray  # packed accepted mask, uint8
    fused: torch.Tensor | None


class Predictor:
    """Pass 2, one tensor at a time: P = W_b C, the mask, and the fused values."""

    def __init__(self, window: Window, coefficients: np.ndarray, options: MaskOptions) -> None:
        self.window = window
        self.steps_t = torch.from_numpy(np.ascontiguousarray(step_matrix(coefficients).T)).to(window.device)
        self.options = options

    def _blocks(self, entry: dict) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        start = int(entry["offset"])
        for a, b, w in self.window.blocks(start, start + int(entry["numel"])):
            yield a - start, b - start, w, self.steps_t @ w

    def _ratio(self, entry: dict) -> float:
        counts = np.zeros(6, dtype=np.int64)
        for *_, p in self._blocks(entry):
            counts += evaluate(p, self.options.criteria).counts()
        return counts[1] / max(1, counts[0])

    def run(self, entry: dict, original: torch.Tensor | None = None, stored_bits: np.ndarray | None = None,
            lineage_slot: int | None = None) -> TensorResult:
        """Mask (or take `stored_bits`) and, given the newest checkpoint's tensor, fuse it.

        With `lineage_slot`, the fused values also go into that snapshot slot, since the
        fused state is what training resumes from (Algorithm 1, line 17).
        """
        counts = np.zeros(6, dtype=np.int64)
        ratio = self._ratio(entry) if self.options.random and stored_bits is None else None
        flat = original.reshape(-1).clone() if original is not None else None
        unpacked = None
        if stored_bits is not None:
            unpacked = np.unpackbits(stored_bits, count=int(entry["numel"])).astype(bool)
        bits = []
        offset = int(entry["offset"])
        for a, b, w, p in self._blocks(entry):
            if unpacked is not None:
                accepted = torch.from_numpy(unpacked[a:b])
            else:
                verdict = evaluate(p, self.options.criteria)
                counts += verdict.counts()
                accepted = verdict.accepted.cpu()
                if ratio is not None:
                    accepted = torch.from_numpy(random_accept(offset + a, offset + b, ratio, self.options.seed))
                    accepted &= ~verdict.nonfinite.cpu()
                bits.append(np.packbits(accepted.numpy()))
            if flat is not None:
                target = flat[a:b]
                predicted = (w[-1] + p[-2]).cpu()  # w_pred(tau) = w_h + move
                if not flat.dtype.is_floating_point:
                    predicted = predicted.round()
                target.copy_(torch.where(accepted, predicted.to(flat.dtype), target))
                if lineage_slot is not None:
                    self.window.store.write_segment(lineage_slot, offset + a, target.to(torch.float64).numpy())
        if unpacked is None and ratio is not None:
            counts[1] = int(np.unpackbits(np.concatenate(bits), count=int(entry["numel"])).sum())
        packed = stored_bits if stored_bits is not None else (np.concatenate(bits) if bits else np.zeros(0, np.uint8))
        fused = flat.reshape(original.shape) if flat is not None else None
        return TensorResult(counts, packed, fused)
