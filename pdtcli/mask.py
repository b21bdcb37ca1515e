"""The mask of paper eqs. 6 and 7, elementwise, on one block, and its counts.

With delta = w_h - w_{h-1} (the optimizer's last step) and w_pred(0) = w_h:
lower bound  |delta| < |w_pred(tau) - w_h|
upper bound  |w_pred(tau) - w_h| <= tau |delta|
sign         sign(w_pred(k) - w_pred(k-1)) = sign(delta) for every k = 1..tau
A non-finite prediction is rejected in its own category (and only there).

The default is the upper bound and the sign (`DEFAULT_CRITERIA`); `all` is the paper's
mask, all three. `official` is the mask of the paper's official code (`OFFICIAL_RULE`): all three
criteria, read as aicip/PDT's `kcl/lib/trainers/pdt_trainer.py` (`PDTTrainer.compute_mask`) computes them.
The audit settings of the paper's ablations are subsets of the criteria
(each alone, or none: non-selective Koopman training) and a random mask at the criteria's
ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats.base import split_piece
from .lazy import torch
from .selection import LAYER_TYPES

CRITERIA = ("lower", "upper", "sign")
# The default keeps eq. 6's upper bound (the paper's convergence argument rests on it) and eq. 7,
# and drops eq. 6's lower bound: on a transformer trained with AdamW the lower bound rejected
# 85-95% of the elements and the mask then did no better than a random one at its ratio,
# and without it the step gained more on the digits MLP too (benchmarks/results/gpt, speedup).
DEFAULT_CRITERIA = ("upper", "sign")
# The official code (aicip/PDT, kcl/lib/trainers/pdt_trainer.py, `compute_mask`) differs from the paper's
# equations: lower bound |move| >= |delta| (inclusive), upper bound |move| <= (tau + 1) |delta|, and the sign of the
# final move w_pred(tau) - w_h against delta's (not every increment). Its move is measured from the newest window
# state and the prediction replaces the weights there, which is how pdt applies every mask: w_h + move.
OFFICIAL_RULE = "official"
RULES = ("paper", OFFICIAL_RULE)
COUNT_COLUMNS = ("elements", "accepted", "fail_lower", "fail_upper", "fail_sign", "nonfinite")


@dataclass(frozen=True)
class MaskOptions:
    criteria: tuple[str, ...] = DEFAULT_CRITERIA
    random: bool = False
    seed: int = 0
    rule: str = "paper"  # how the criteria are read: the paper's equations, or the official code's (`RULES`)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown mask rule {self.rule!r}; use one of {', '.join(RULES)}")
        unknown = set(self.criteria) - set(CRITERIA)
        if unknown:
            raise ValueError(f"unknown criteria {sorted(unknown)}; use {', '.join(CRITERIA)} or none")
        if not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"--seed {self.seed}: use a whole number from 0 to 2**64 - 1")
        object.__setattr__(self, "criteria", tuple(c for c in CRITERIA if c in self.criteria))

    @property
    def label(self) -> str:
        base = OFFICIAL_RULE if self.rule == OFFICIAL_RULE else "+".join(self.criteria) if self.criteria else "none"
        return f"random@{base}(seed={self.seed})" if self.random else base

    def as_dict(self) -> dict:
        """The options as the store keeps them; the rule only when not the paper's, so that the masks of stores
        made before the official rule existed still match theirs."""
        rule = {} if self.rule == "paper" else {"rule": self.rule}
        return {"criteria": list(self.criteria), "random": self.random, "seed": self.seed, **rule}

    @classmethod
    def from_dict(cls, data: dict) -> MaskOptions:
        return cls(tuple(data["criteria"]), bool(data["random"]), int(data["seed"]), data.get("rule", "paper"))


def criteria_of(label: str) -> tuple[str, ...]:
    """The criteria a mask applied, read back from its label (`MaskOptions.label`, which every mask and
    history record keeps): `random@upper+sign(seed=3)` -> ("upper", "sign"), `none` -> (), `official` -> all three."""
    base = label.removeprefix("random@").split("(seed=")[0]
    if base == OFFICIAL_RULE:
        return CRITERIA
    return tuple(c for c in base.split("+") if c in CRITERIA)


@dataclass
class BlockVerdict:
    """Per element of a block: accepted, and which criteria failed (they may overlap)."""

    accepted: torch.Tensor
    fail_lower: torch.Tensor
    fail_upper: torch.Tensor
    fail_sign: torch.Tensor
    nonfinite: torch.Tensor | None  # None: every prediction is known to be finite

    def tallies(self) -> torch.Tensor:
        """The COUNT_COLUMNS of the block as an int64 tensor on its device: added up over a tensor's
        blocks and read once, so that a GPU is not waited for at every block."""
        nonfinite = self.accepted.new_zeros(0) if self.nonfinite is None else self.nonfinite
        columns = (self.accepted, self.fail_lower, self.fail_upper, self.fail_sign, nonfinite)
        elements = self.accepted.new_full((), self.accepted.numel(), dtype=torch.int64)
        return torch.stack([elements] + [c.sum() for c in columns])

    def counts(self) -> np.ndarray:
        return self.tallies().cpu().numpy()


def step_matrix(coefficients: np.ndarray) -> np.ndarray:
    """E (h x tau+2) such that E^T W gives, per element, everything the mask needs.

    Rows of E^T W: the increments w_pred(k) - w_pred(k-1) for k = 1..tau (with
    w_pred(0) = w_h), then the move w_pred(tau) - w_h, then delta = w_h - w_{h-1}. Taking
    differences in coefficient space costs nothing and avoids subtracting nearly equal
    N-vectors, and one small matmul replaces a dozen elementwise passes.
    """
    h, tau = coefficients.shape
    newest = np.zeros(h)
    newest[-1] = 1.0
    previous_state = np.column_stack([newest, coefficients[:, :-1]])
    delta = newest.copy()
    delta[-2] -= 1.0
    return np.column_stack([coefficients - previous_state, coefficients[:, -1] - newest, delta])


# Below this bound on |E^T W| nothing can overflow float64 on the way (the largest double is 1.8e308).
FINITE_BOUND = 1e300


def finite_guaranteed(steps: np.ndarray, column_norms: np.ndarray) -> bool:
    """Whether every entry of E^T W is finite, known from h-sized quantities alone.

    Each element of W's column i is at most its 2-norm |w_i| (the norm of R's column i), so
    |(E^T W)_kj| <= sum_i |E_ik| |w_i|. The window is checked finite at ingest, so when this bound
    is finite and far from overflow no prediction can be non-finite, and the per-element test
    (a fifth of the second pass) is not needed.
    """
    bound = np.abs(steps).T @ np.asarray(column_norms, dtype=np.float64)
    return bool(np.all(np.isfinite(bound)) and bound.max(initial=0.0) < FINITE_BOUND)


def _same_sign_throughout(increments: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """sign(increment_k) == sign(delta) for every k, row by row: a reduction over the short first
    axis of a (tau, b) block strides through memory, and is about 4x slower than tau row tests."""
    direction = torch.sign(delta)
    same = torch.sign(increments[0]) == direction
    for row in increments[1:]:
        same &= torch.sign(row) == direction
    return same


def evaluate(rows: torch.Tensor, criteria: tuple[str, ...], all_finite: bool = False,
             rule: str = "paper") -> BlockVerdict:
    """Apply the criteria to a block, given `rows` = E^T W_b (tau + 2, b) from `step_matrix`.

    `all_finite`: every entry of `rows` is known to be finite (`finite_guaranteed`), so the
    per-element test is skipped; the verdicts are the same. `rule`: the paper's equations, or the
    official code's reading of them (`OFFICIAL_RULE`).
    """
    tau = rows.shape[0] - 2
    increments, move, delta = rows[:tau], rows[tau], rows[tau + 1]
    distance, step = move.abs(), delta.abs()
    if rule == OFFICIAL_RULE:
        fail_lower = ~(distance >= step)
        fail_upper = ~(distance <= (tau + 1) * step)
        fail_sign = torch.sign(move) != torch.sign(delta)
    else:
        fail_lower = ~(step < distance)
        fail_upper = ~(distance <= tau * step)
        fail_sign = ~_same_sign_throughout(increments, delta)
    nonfinite = None
    if not all_finite:
        finite = torch.isfinite(move) & torch.isfinite(increments).all(dim=0)
        fail_lower &= finite
        fail_upper &= finite
        fail_sign &= finite
        nonfinite = ~finite
    accepted = torch.ones_like(fail_lower) if nonfinite is None else ~nonfinite
    for name, failed in (("lower", fail_lower), ("upper", fail_upper), ("sign", fail_sign)):
        if name in criteria:
            accepted &= ~failed
    return BlockVerdict(accepted, fail_lower, fail_upper, fail_sign, nonfinite)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_accept(start: int, stop: int, ratio: float, seed: int) -> np.ndarray:
    """A Bernoulli(ratio) mask for flat elements start..stop-1, the same whatever the blocking.

    Each element's draw is a hash of (seed, its flat index), so the mask depends on
    neither block size nor device.
    """
    with np.errstate(over="ignore"):
        index = np.arange(start, stop, dtype=np.uint64)
        keyed = _splitmix64(index ^ _splitmix64(np.array([seed], dtype=np.uint64)))
    uniform = (keyed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return uniform < ratio


def counts_row(counts: np.ndarray) -> dict:
    """One row of counts by column name, with the accepted ratio."""
    row = {name: int(value) for name, value in zip(COUNT_COLUMNS, counts, strict=False)}
    row["ratio"] = row["accepted"] / row["elements"] if row["elements"] else 0.0
    return row


def type_totals(layer_types: list[str], counts: np.ndarray) -> np.ndarray:
    """Per-tensor counts summed by layer type: (len(LAYER_TYPES), len(COUNT_COLUMNS)), a fixed shape that
    the ranks of a distributed step add up."""
    counts = np.asarray(counts, dtype=np.int64).reshape(len(layer_types), len(COUNT_COLUMNS))
    totals = np.zeros((len(LAYER_TYPES), len(COUNT_COLUMNS)), dtype=np.int64)
    for index, kind in enumerate(LAYER_TYPES):
        totals[index] = counts[[i for i, t in enumerate(layer_types) if t == kind]].sum(axis=0)
    return totals


def summary_of(totals: np.ndarray) -> dict:
    """The by-layer-type rows (types with elements, in the order of `LAYER_TYPES`) and the model's row."""
    by_type = {kind: counts_row(row) for kind, row in zip(LAYER_TYPES, totals, strict=True) if row[0]}
    return {"model": counts_row(totals.sum(axis=0)), "by_layer_type": by_type}


def summarize_counts(layer_types: list[str], counts: np.ndarray) -> dict:
    """Roll per-tensor counts up by layer type (in the order of `LAYER_TYPES`) and for the model."""
    return summary_of(type_totals(layer_types, counts))


def whole_rows(shares: list[list[dict] | None], order: list[str] | None = None) -> list[dict] | None:
    """The per-tensor rows of a distributed step's ranks as one process would give them: the pieces
    of a tensor (`name@offsets`, from several ranks) added up under its name, its shape the extent
    of the pieces; tensors in the checkpoint's `order` (else as they first appear, rank by rank)."""
    if any(rows is None for rows in shares):
        return None
    merged = join_pieces([row for rows in shares for row in rows], COUNT_COLUMNS)
    if order:
        place = {name: index for index, name in enumerate(order)}
        merged.sort(key=lambda row: place.get(row["name"], len(place)))
    for row in merged:
        row["ratio"] = row["accepted"] / row["elements"] if row["elements"] else 0.0
    return merged


def join_pieces(rows: list[dict], summed: tuple[str, ...] = ()) -> list[dict]:
    """Rows of tensors and pieces of tensors (`name@offsets`, with the piece's `shape`) as rows of whole
    tensors: the `summed` columns added up, the shape the extent of the pieces; first-seen order."""
    merged: dict[str, dict] = {}
    for row in rows:
        name, offsets = split_piece(row["name"])
        if offsets is None or len(offsets) != len(row["shape"]):
            name, offsets = row["name"], [0] * len(row["shape"])  # a whole tensor (whose name may hold the mark)
        extent = [o + d for o, d in zip(offsets, row["shape"], strict=True)]
        if name not in merged:
            merged[name] = {**row, "name": name, "shape": extent}
            continue
        whole = merged[name]
        whole["shape"] = [max(a, b) for a, b in zip(whole["shape"], extent, strict=True)]
        for column in summed:
            whole[column] += row[column]
    return list(merged.values())


def tensor_rows(entries: list[dict], counts: np.ndarray) -> list[dict]:
    """Per-tensor rows (name, layer type, shape and counts) of a layout's tensors."""
    return [{"name": e["name"], "layer_type": e["layer_type"], "shape": e["shape"], **counts_row(np.asarray(c))}
            for e, c in zip(entries, counts, strict=False)]
