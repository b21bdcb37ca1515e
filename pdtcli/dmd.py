"""Dynamic Mode Decomposition in the form that streams: a blocked TSQR, then h-sized algebra.

With W = [w_1 .. w_h] (N x h) and its thin QR, W = Q R, every quantity DMD needs is a
product of R: X = Q R[:, :h-1], Y = Q R[:, 1:], w_h = Q R[:, h-1]. So DMD on the h x h
matrix R *is* DMD on W, seen in an orthonormal basis, and each predicted state comes out
as a fixed linear combination of the snapshot columns, w_pred(k) = W C[:, k-1].

R is accumulated block by block in float64 (R <- qr([R; W_b]).R), which is as well
conditioned as a dense QR of W and never squares the condition number as the Gram
matrix W^T W would (snapshots are nearly collinear: condition numbers of 1e7 are normal).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .lazy import torch

MODES = ("projected", "exact")
# What one fit covers: the whole model (one W of all predicted elements), or each tensor (a W of its own rows,
# its own modes). The official code (aicip/PDT) fits DMD per layer group for its largest model.
SCOPES = ("model", "tensor")


QR_ROWS = 16384  # rows per QR update: small enough to stay in cache, which is 2-4x faster


def accumulate_r(blocks: Iterable[torch.Tensor], h: int) -> np.ndarray:
    """R of the thin QR of W, from row blocks given as (h, b) float64 tensors."""
    r: torch.Tensor | None = None
    for block in blocks:
        for start in range(0, block.shape[1], QR_ROWS):
            part = block[:, start: start + QR_ROWS]
            # [R; part^T] built as the transpose of a row-major (h, k) tensor is column-major,
            # the layout LAPACK works in, so no copy is made for it.
            stacked = (part if r is None else torch.cat([r.T, part], dim=1)).T
            r = torch.linalg.qr(stacked, mode="r").R
    out = np.zeros((h, h))
    if r is not None:
        dense = r.cpu().numpy()
        out[: dense.shape[0]] = dense
    return out


def combine_r(factors: list[np.ndarray]) -> np.ndarray:
    """R of the whole window from the R of each rank's rows: W's rows split over ranks, W = [W_1; W_2; ..]
    = [Q_1 R_1; Q_2 R_2; ..], so the R of the stacked [R_1; R_2; ..] is an R of W (the last level of
    the same TSQR tree). One factor is returned as it is, so one process computes what it always did."""
    if len(factors) == 1:
        return factors[0]
    stacked = np.vstack(factors)
    return np.linalg.qr(stacked, mode="r")


@dataclass(frozen=True)
class FitOptions:
    """The fit's settings. Exact modes are the default: on real training runs they reached the
    baseline's best loss in fewer epochs than the paper's projected modes for both SGD and AdamW
    (benchmarks/results/speedup/results.md), and at full rank they start from w_h exactly."""

    tau: int = 5
    modes: str = "exact"
    rank: int | None = None
    rtol: float = 1e-6
    scope: str = "model"

    def __post_init__(self) -> None:
        """Refuse options no fit can use before any data is read."""
        if self.modes not in MODES:
            raise ValueError(f"--modes {self.modes!r}: use one of {', '.join(MODES)}")
        if self.tau < 1:
            raise ValueError(f"--tau {self.tau}: predict at least one checkpoint ahead")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"--rank {self.rank}: keep at least one mode")
        if not 0 <= self.rtol < 1:
            raise ValueError(f"--rtol {self.rtol:g}: use a relative threshold from 0 up to 1")
        if self.scope not in SCOPES:
            raise ValueError(f"--dmd-scope {self.scope!r}: use one of {', '.join(SCOPES)}")

    @property
    def per_tensor(self) -> bool:
        return self.scope == "tensor"

    def as_dict(self) -> dict:
        """The options as the store records them with its fit; a whole-model fit's as stores always had them
        (no scope), so that a fit made before per-tensor fits existed is still found up to date."""
        options = {"tau": self.tau, "modes": self.modes, "rank": self.rank, "rtol": self.rtol}
        return {**options, "scope": self.scope} if self.per_tensor else options


@dataclass
class Fit:
    """The solved DMD: C maps the window's columns to the predicted states k = 1..tau."""

    coefficients: np.ndarray  # (h, tau) float64
    singular_values: np.ndarray  # of X, all h-1 of them
    rank: int
    eigenvalues: np.ndarray  # of A-tilde, complex, r of them
    start_offset: float  # |w_pred(0) - w_h| / |w_h|: what projected modes drop of w_h

    def summary(self) -> dict:
        mags = np.abs(self.eigenvalues)
        return {
            "rank": self.rank,
            "singular_values": [float(s) for s in self.singular_values],
            "eigenvalues": [[float(z.real), float(z.imag)] for z in self.eigenvalues],
            "eigenvalue_magnitudes": [float(m) for m in mags],
            "growing_modes": int(np.sum(mags > 1.0 + 1e-12)),
            "start_offset": float(self.start_offset),
        }


def choose_rank(singular_values: np.ndarray, rank: int | None, rtol: float) -> int:
    """Keep singular values above `rtol` times the largest, or exactly `rank` of them."""
    if singular_values.size == 0 or singular_values[0] <= 0:
        return 0
    if rank is not None:
        return max(1, min(rank, int(np.sum(singular_values > 0))))
    return max(1, int(np.sum(singular_values > rtol * singular_values[0])))


def solve(r: np.ndarray, options: FitOptions) -> Fit:
    """DMD of the window whose QR factor is `r` (h x h), and its coefficient matrix C."""
    h = r.shape[1]
    rx, ry, rh = r[:, : h - 1], r[:, 1:], r[:, h - 1]
    u_full, s_full, vt_full = np.linalg.svd(rx, full_matrices=False)
    rank = choose_rank(s_full, options.rank, options.rtol)
    coefficients = np.zeros((h, options.tau))
    if rank == 0:
        return Fit(coefficients, s_full, 0, np.zeros(0, complex), 1.0)
    u, s, v = u_full[:, :rank], s_full[:rank], vt_full[:rank].T
    a_tilde = (u.T @ ry @ v) / s  # U^T Y V Sigma^-1, columns scaled by 1/s
    eigenvalues, psi = np.linalg.eig(a_tilde)
    norm_h = np.linalg.norm(rh) or 1.0
    if options.modes == "projected":
        # Phi Lambda^k Phi^+ w_h = U A^k U^T w_h = X V Sigma^-1 A^k U^T w_h: real, no eigenvectors.
        z = u.T @ rh
        start_offset = np.linalg.norm(u @ z - rh) / norm_h
        for k in range(options.tau):
            z = a_tilde @ z
            coefficients[: h - 1, k] = v @ (z / s)
    elif options.modes == "exact":
        # Phi = Y V Sigma^-1 Psi = Y B; amplitudes b = Phi^+ w_h by least squares in R's basis.
        b_modes = (v / s) @ psi
        phi_r = ry @ b_modes
        amplitudes = np.linalg.lstsq(phi_r, rh.astype(complex), rcond=None)[0]
        start_offset = np.linalg.norm(phi_r @ amplitudes - rh) / norm_h
        for k in range(options.tau):
            coefficients[1:, k] = np.real(b_modes @ (eigenvalues ** (k + 1) * amplitudes))
    else:
        raise ValueError(f"unknown modes {options.modes!r}; use one of {MODES}")
    return Fit(coefficients, s_full, rank, eigenvalues, float(start_offset))


def combine_each(shares: list[tuple[list[str], np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-tensor R factors combined tensor by tensor: `shares` holds, per rank in rank order, the names of its
    tensors (the pieces of one tensor under the one name) and their (T, h, h) factors; returns each tensor's
    R of all its rows (`combine_r` over the factors given under its name)."""
    factors: dict[str, list[np.ndarray]] = {}
    for names, rs in shares:
        for name, r in zip(names, rs, strict=True):
            factors.setdefault(name, []).append(r)
    return {name: combine_r(parts) for name, parts in factors.items()}


def solve_each(factors: np.ndarray, options: FitOptions) -> list[Fit]:
    """`solve` on each tensor's (h x h) factor of a (T, h, h) stack: the DMD of each tensor's rows alone.
    Each costs a few h x h decompositions (tens of microseconds), so thousands of tensors take well under
    a second."""
    return [solve(r, options) for r in factors]


def each_arrays(fits: list[Fit], h: int, tau: int) -> dict[str, np.ndarray]:
    """The arrays the store keeps of per-tensor fits: C (T, h, tau), the singular values of each X (T, h-1),
    and each fit's eigenvalues (T, h-1), complex, NaN past its rank."""
    eigenvalues = np.full((len(fits), h - 1), np.nan, dtype=complex)
    for row, fit in zip(eigenvalues, fits, strict=True):
        row[: fit.eigenvalues.size] = fit.eigenvalues
    return {"C": np.stack([f.coefficients for f in fits]) if fits else np.zeros((0, h, tau)),
            "singular_values": np.stack([f.singular_values for f in fits]) if fits else np.zeros((0, h - 1)),
            "eigenvalues": eigenvalues}


def traits(fit: Fit) -> tuple[int, float, int, float]:
    """What the summary of per-tensor fits needs of one: (rank, spectral radius max |λ| (0 at rank 0),
    growing modes, start offset)."""
    mags = np.abs(fit.eigenvalues)
    return fit.rank, float(mags.max(initial=0.0)), int(np.sum(mags > 1.0 + 1e-12)), float(fit.start_offset)


def each_summary(by_tensor: dict[str, tuple[int, float, int, float]]) -> dict:
    """The fit record of per-tensor fits (`traits` by tensor name): the largest rank and start offset, all
    growing modes, no singular values or eigenvalues of a whole-model fit, and `per_tensor`: how many fits,
    the range of their ranks and spectral radii, and how many have a growing mode."""
    ranks = [t[0] for t in by_tensor.values()] or [0]
    radii = [t[1] for t in by_tensor.values()] or [0.0]
    return {"rank": max(ranks), "singular_values": [], "eigenvalues": [], "eigenvalue_magnitudes": [],
            "growing_modes": sum(t[2] for t in by_tensor.values()),
            "start_offset": max((t[3] for t in by_tensor.values()), default=0.0),
            "per_tensor": {"tensors": len(by_tensor), "rank": [min(ranks), max(ranks)],
                           "spectral_radius": [min(radii), max(radii)],
                           "growing_tensors": sum(t[2] > 0 for t in by_tensor.values())}}
