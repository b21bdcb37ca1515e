"""The two streaming passes over the window: R for the fit, then predict-mask-fuse.

Only one row block of the snapshot matrix (h x block elements) is in memory at a time,
whatever the model size; the blocks move to the compute device (CUDA when there is
one) and are evaluated in float64 there. The second pass hands each fused tensor to the
checkpoint's writer as the writer reaches it, so the output is written in one stream too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path, shared_atomic_path
from .dmd import accumulate_r
from .errors import CheckpointError, UsageError
from .formats import open_checkpoint, open_share, own_files, write_converted
from .identity import HeldStill
from .lazy import torch
from .live import Live
from .mask import (
    COUNT_COLUMNS,
    BlockVerdict,
    MaskOptions,
    evaluate,
    finite_guaranteed,
    random_accept,
    step_matrix,
)
from .progress import NoProgress, Progress
from .store import Store
from .store.records import TensorEntry
from .world import current

# Elements per row block, by device. On a CPU the block's float64 rows (the window, its E^T W_b,
# the mask's temporaries: about 20 rows) should stay in cache: 2^16 made pass 2 2-4x faster than
# 2^18 at 100M parameters (benchmarks/RESULTS.md). A GPU wants few, large kernel launches.
DEFAULT_BLOCK = {"cpu": 1 << 16, "cuda": 1 << 22}


def pick_device(name: str) -> torch.device:
    """`auto` is CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def widened(values: torch.Tensor) -> torch.Tensor:
    """A float64 copy. 16-bit floats go by way of float32: torch converts bf16 to float64 element by
    element (1.5 ns an element on this project's CPU), to float32 and then float64 in 0.25 ns."""
    if values.dtype in (torch.bfloat16, torch.float16):
        values = values.to(torch.float32)
    return values.to(torch.float64, copy=True)


@dataclass
class Window:
    """The snapshots of one fit, oldest first, readable block by block."""

    store: Store
    slots: list[int]
    device: torch.device
    block: int = DEFAULT_BLOCK["cpu"]
    _buffer: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.block = max(8, self.block - self.block % 8)  # whole bytes of packed mask bits

    def blocks(self, start: int, stop: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self._buffer is None:
            self._buffer = np.empty((len(self.slots), self.block), dtype=self.store.dtype)
        for a in range(start, stop, self.block):
            b = min(stop, a + self.block)
            values = self.store.values(self.store.matrix.read(self.slots, a, b, out=self._buffer))
            # moved in the store's dtype and widened on the device: torch would widen a host tensor on the
            # host first, sending twice the bytes (the same single copy on a CPU)
            yield a, b, widened(values.to(self.device))

    def checked(self) -> None:
        """Every value this pass read has passed its checksum (StoreError if not): the chunks a read cut
        into are checked whole now. Called before anything computed from the values is used."""
        self.store.matrix.finish_reads()

    def qr_factor(self) -> np.ndarray:
        """Pass 1: R of W = QR over the whole window."""
        r = accumulate_r((w for _, _, w in self.blocks(0, self.store.n)), len(self.slots))
        self.checked()
        return r

    def qr_factors(self, tensors: list[TensorEntry]) -> np.ndarray:
        """Pass 1 per tensor: (T, h, h), the R of each tensor's own rows of W (blocks never span two tensors)."""
        h = len(self.slots)
        factors = np.zeros((len(tensors), h, h))
        for out, entry in zip(factors, tensors, strict=True):
            out[:] = accumulate_r((w for _, _, w in self.blocks(entry.offset, entry.offset + entry.numel)), h)
        self.checked()
        return factors


def window_of(store: Store, ids: list[int], device: str, block: int | None = None) -> Window:
    """The window `ids` on `device`, read `block` elements at a time (None: the device's default)."""
    chosen = pick_device(device)
    return Window(store, [store.slot_of(i) for i in ids], chosen, block or DEFAULT_BLOCK[chosen.type])


@dataclass
class Operator:
    """What pass 2 applies of one fit: E^T (tau+2, h) on the device, and what the window's column norms
    guarantee of its results (no element's E^T W non-finite; |w_pred(tau)| at most `prediction_bound`)."""

    steps_t: torch.Tensor
    all_finite: bool
    prediction_bound: float

    @classmethod
    def of(cls, coefficients: np.ndarray, column_norms: np.ndarray | None, device: torch.device) -> Operator:
        """The operator of C (h, tau), bounded by the column norms (h,) of the rows it is applied to (None:
        no bound known)."""
        steps = step_matrix(coefficients)
        # |w_pred(tau)| <= sum_i |C_i,tau| |w_i|: where that is below a dtype's range, no prediction
        # can overflow it when it is written back
        return cls(torch.from_numpy(np.ascontiguousarray(steps.T)).to(device),
                   column_norms is not None and finite_guaranteed(steps, column_norms),
                   float(np.abs(coefficients[:, -1]) @ column_norms) if column_norms is not None else float("inf"))


class Predictor:
    """Pass 2, one tensor at a time: P = W_b C, the mask, and the fused values.

    `coefficients` (h, tau) is one fit of the whole model; (T, h, tau) is one fit per tensor of `tensors`
    (with `column_norms` (T, h), each tensor's rows' own), each tensor predicted with its own."""

    def __init__(self, window: Window, coefficients: np.ndarray, options: MaskOptions,
                 column_norms: np.ndarray | None = None, tensors: list[TensorEntry] | None = None) -> None:
        self.window = window
        self.options = options
        if coefficients.ndim == 2:
            self._model: Operator | None = Operator.of(coefficients, column_norms, window.device)
            self._each: dict[str, Operator] = {}
        else:
            norms = column_norms if column_norms is not None else [None] * len(coefficients)
            self._model = None
            self._each = {entry.name: Operator.of(c, n, window.device)
                          for entry, c, n in zip(tensors or [], coefficients, norms, strict=True)}

    def operator(self, entry: TensorEntry) -> Operator:
        """The fit that predicts this tensor."""
        return self._model if self._model is not None else self._each[entry.name]

    def _verdict(self, entry: TensorEntry, w: torch.Tensor, p: torch.Tensor) -> BlockVerdict:
        """The criteria on a block, with predictions that the tensor's own dtype cannot hold (an fp16
        weight predicted past 65504, an integer past its range) rejected as non-finite."""
        operator = self.operator(entry)
        verdict = evaluate(p, self.options.criteria, operator.all_finite, self.options.rule)
        dtype = getattr(torch, entry.dtype)
        if dtype == torch.bool:  # never predicted (selection refuses it), never out of range
            return verdict
        limit = torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max
        if operator.prediction_bound < limit:
            return verdict
        predicted = w[-1] + p[-2]
        if dtype.is_floating_point:
            unfit = ~torch.isfinite(predicted.to(dtype))
        else:
            rounded = predicted.round()
            unfit = (rounded < torch.iinfo(dtype).min) | (rounded > torch.iinfo(dtype).max)
        if verdict.nonfinite is not None:
            unfit &= ~verdict.nonfinite
        for failed in (verdict.fail_lower, verdict.fail_upper, verdict.fail_sign):
            failed &= ~unfit  # counted under non-finite only, as every other non-finite prediction
        verdict.accepted &= ~unfit
        verdict.nonfinite = unfit if verdict.nonfinite is None else verdict.nonfinite | unfit
        return verdict

    def _blocks(self, entry: TensorEntry, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Row blocks of elements start..stop of a tensor (positions within it): W_b and E^T W_b."""
        stop = entry.numel if stop is None else stop
        steps_t = self.operator(entry).steps_t
        for a, b, w in self.window.blocks(entry.offset + start, entry.offset + stop):
            yield a - entry.offset, b - entry.offset, w, steps_t @ w

    def _ratio(self, entry: TensorEntry) -> float:
        counts = sum(self._verdict(entry, w, p).tallies() for _, _, w, p in self._blocks(entry)).cpu().numpy()
        return counts[1] / max(1, counts[0])

    def stream(self, entry: TensorEntry, chunks: Iterable[torch.Tensor | None], bits: np.ndarray,
               stored: bool = False, lineage_slot: int | None = None
               ) -> Generator[torch.Tensor | None, None, np.ndarray]:
        """Mask and fuse a tensor fed as consecutive flat chunks of the newest checkpoint's values,
        yielding each fused chunk as it is done (None chunks: mask only), so that no more than a chunk
        of the tensor is in memory. The accepted flags go packed into `bits` (ceil(numel / 8) bytes:
        the tensor's place in the mask of the whole model, so that the mask is held once); `stored`:
        `bits` already holds a stored mask, which is applied instead. Returns the counts (of the
        criteria, when `stored`: zeros, the caller has the stored ones).

        With `lineage_slot`, the fused values also go into that snapshot slot, since the
        fused state is what training resumes from (Algorithm 1, line 17).

        On a GPU a block's work stays there: its counts are added up there and read once per tensor,
        and the only transfers are the ones streaming needs (the window and the chunk in, the fused
        values and the accepted flags out).
        """
        device = self.window.device
        tallies = torch.zeros(len(COUNT_COLUMNS), dtype=torch.int64, device=device)
        ratio = self._ratio(entry) if self.options.random and not stored else None
        packer = BitWriter(bits)
        drawn = 0  # elements the random mask accepted
        position = 0
        for chunk in chunks:
            width = entry.numel - position if chunk is None else chunk.numel()
            fused = chunk.reshape(-1).clone() if chunk is not None else None
            for a, b, w, p in self._blocks(entry, position, position + width):
                if stored:
                    accepted = torch.from_numpy(unpack_range(bits, a, b)).to(device)
                else:
                    verdict = self._verdict(entry, w, p)
                    tallies += verdict.tallies()
                    accepted = verdict.accepted
                    if ratio is not None:
                        accepted = torch.from_numpy(random_accept(entry.offset + a, entry.offset + b, ratio,
                                                                  self.options.seed)).to(device)
                        if verdict.nonfinite is not None:
                            accepted &= ~verdict.nonfinite
                        drawn += int(accepted.sum())
                    packer.add(accepted.cpu().numpy())
                if fused is not None:
                    target = fused[a - position:b - position]
                    here = target.to(device)
                    # w_pred(tau) = w_h + move, from the checkpoint's own w_h (exact even where the store
                    # keeps a narrower dtype than the checkpoint, as float32 for a float64 model)
                    predicted = widened(here) + p[-2]
                    if not fused.dtype.is_floating_point:
                        predicted = predicted.round()
                    target.copy_(torch.where(accepted, predicted.to(fused.dtype), here))
                    if lineage_slot is not None:
                        self.window.store.write_values(lineage_slot, entry.offset + a, target)
            position += width
            yield fused
        if position != entry.numel:
            raise CheckpointError(f"tensor {entry.name!r} came in {position} elements, not {entry.numel}")
        if not stored:
            packer.close()
        counts = tallies.cpu().numpy()
        if ratio is not None:
            counts[1] = drawn
        return counts


def _whole(steps: Iterator[torch.Tensor | None], original: torch.Tensor | None) -> torch.Tensor | None:
    """Run a tensor's stream fed with the whole tensor as one chunk (or none) to its end; its fused values."""
    fused = next(steps)
    for _ in steps:  # the stream records its counts and bits when it ends
        pass
    return fused.reshape(original.shape) if original is not None else None


class BitWriter:
    """Accepted flags packed 8 to a byte into `out` as they come, in runs of any length (chunks of a
    tensor need not end on whole bytes); once closed, `out` holds `np.packbits` of all of them."""

    def __init__(self, out: np.ndarray) -> None:
        self.out = out
        self._at = 0
        self._carry = np.zeros(0, dtype=bool)

    def add(self, flags: np.ndarray) -> None:
        joined = np.concatenate([self._carry, flags]) if self._carry.size else flags
        whole = joined.size - joined.size % 8
        self._put(np.packbits(joined[:whole]))
        self._carry = joined[whole:].copy()

    def close(self) -> None:
        if self._carry.size:
            self._put(np.packbits(self._carry))
        if self._at != self.out.size:
            raise ValueError(f"packed {self._at} bytes of flags into a place for {self.out.size}")

    def _put(self, packed: np.ndarray) -> None:
        self.out[self._at:self._at + packed.size] = packed
        self._at += packed.size


def unpack_range(packed: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Flags start..stop of `np.packbits` output, unpacking only the bytes that hold them."""
    first = start // 8
    flags = np.unpackbits(packed[first:(stop + 7) // 8])
    return flags[start - 8 * first: stop - 8 * first].astype(bool)


@dataclass
class Destination:
    """Where pass 2 writes the fused checkpoint, and from what."""

    path: Path
    source: Path  # the checkpoint whose non-predicted content is carried over
    lineage_slot: int | None = None  # training resumes from it: its values go into this slot too
    backup_to: Path | None = None  # in place: keep what `path` held here first
    before_publish: Callable[[Path], None] | None = None
    convert: str | None = None  # written as this `formats.convert.CONVERSIONS` suffix, not in the source's format
    accept: Callable[[Path], bool] | None = None  # judges the complete output before it is published (`--verify`)


@dataclass
class PassResult:
    counts: np.ndarray  # (tensors, COUNT_COLUMNS)
    bits: np.ndarray  # packed accepted bits of all tensors, in layout order
    byte_offsets: np.ndarray  # where each tensor's bits start in `bits`

    def arrays(self) -> dict[str, np.ndarray]:
        return {"bits": self.bits, "byte_offsets": self.byte_offsets, "counts": self.counts}


@dataclass
class _Fuser:
    """The writer's side of pass 2: which tensors are predicted, and their fused values."""

    index_of: dict[str, int]
    streamed: Callable[[int, Iterable[torch.Tensor]], Generator[torch.Tensor, None, None]]
    done: set[str] = field(default_factory=set)

    def wants(self, name: str) -> bool:
        return name in self.index_of and name not in self.done

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return _whole(self.stream(name, [tensor]), tensor)

    def stream(self, name: str, chunks: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The fused values of a tensor given in consecutive flat chunks, chunk by chunk (writers that
        can read and write a tensor in parts use this, so that memory does not grow with it)."""
        self.done.add(name)
        return self.streamed(self.index_of[name], chunks)


def _output(write: Destination) -> contextlib.AbstractContextManager[Path]:
    """Where the writer writes: a temporary that is renamed into place when complete; in a distributed
    step one that every rank writes its own files into, published when all have."""
    world = current()
    if not world.active:
        return atomic_path(write.path, backup_to=write.backup_to, before_publish=write.before_publish,
                           accept=write.accept)

    def prepare(tmp: Path) -> None:
        if write.source.is_dir():
            with open_checkpoint(write.source) as whole:
                whole.write_shared(tmp)

    return shared_atomic_path(write.path, world, prepare, lambda tmp: own_files(write.source, world, tmp))


def second_pass(store: Store, window: Window, options: MaskOptions, *, stored: dict[str, np.ndarray] | None = None,
                write: Destination | Live | None = None, progress: Progress | None = None) -> PassResult:
    """Pass 2 over every predicted tensor: the mask (or the `stored` one), and with `write`, the
    fused checkpoint, each tensor handed to the writer as it reaches it; or, `write` a live model,
    the fused values kept for it (`Live.fused`), loaded only once the store has them."""
    progress = progress or NoProgress()
    predictor = Predictor(window, store.coefficients, options, np.linalg.norm(store.qr_factor, axis=-2),
                          store.tensors)
    index_of = {entry.name: index for index, entry in enumerate(store.tensors)}
    counts = np.zeros((len(store.tensors), len(COUNT_COLUMNS)), dtype=np.int64)
    if stored is not None:  # the stored mask is the result: it is used in place, not copied
        bits, offsets = stored["bits"], stored["byte_offsets"]
    else:
        offsets = np.concatenate([[0], np.cumsum([-(-entry.numel // 8) for entry in store.tensors])]).astype(np.int64)
        bits = np.zeros(int(offsets[-1]), np.uint8)
    lineage_slot = write.lineage_slot if write else None

    with progress.task("predict + mask" + (" + write" if write else ""), store.n) as advance:
        def streamed(index: int, chunks: Iterable[torch.Tensor | None]) -> Generator[torch.Tensor | None, None, None]:
            entry = store.tensors[index]
            place = bits[offsets[index]:offsets[index + 1]]
            tallied = yield from predictor.stream(entry, chunks, place, stored is not None, lineage_slot)
            counts[index] = tallied if stored is None else stored["counts"][index]
            advance(entry.numel)

        def one(index: int, original: torch.Tensor | None) -> torch.Tensor | None:
            return _whole(streamed(index, [original]), original)

        if write is None:
            for index in range(len(store.tensors)):
                one(index, None)
            window.checked()
        elif isinstance(write, Live):
            for index, entry in enumerate(store.tensors):
                write.fused[entry.name] = one(index, write.values(entry.name))
            window.checked()
            store.matrix.sync()
        else:
            fuser = _Fuser(index_of, streamed)
            held = HeldStill(write.source)
            with _output(write) as tmp, open_share(write.source, current()) as reader:
                if write.convert:
                    write_converted(reader, tmp, fuser, write.convert)
                else:
                    reader.write_fused(tmp, fuser)
                missed = [name for name in index_of if name not in fuser.done]
                if missed:  # never publish (or store a mask for) an output that lacks a predicted tensor
                    raise CheckpointError(f"the writer never reached tensor {missed[0]!r} of the window", write.source)
                window.checked()  # before the output is published
                held.check()  # what the output carries over is of one version of the checkpoint
            store.matrix.sync()
    return PassResult(counts, bits, offsets)
