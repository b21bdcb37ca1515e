"""An independent dense float64 DMD and mask, written straight from the paper's equations.

No blocking, no QR trick, no coefficient matrix: SVD of the full X (eq. 8), A-tilde
(eq. 9), its eigendecomposition (eq. 10), modes (eq. 11, or exact), and
w_pred(k) = Re(Phi Lambda^k Phi^+ w_h) (eq. 12) with the Moore-Penrose pseudoinverse.
"""

from __future__ import annotations

import numpy as np


def dmd_predictions(w: np.ndarray, tau: int, modes: str = "projected", rank: int | None = None,
                    rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(predictions for k = 1..tau as an N x tau array, eigenvalues)."""
    x, y = w[:, :-1], w[:, 1:]
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    r = rank if rank is not None else int(np.sum(s > rtol * s[0]))
    u, s, v = u[:, :r], s[:r], vt[:r].T
    a_tilde = u.T @ y @ v @ np.diag(1 / s)
    lam, psi = np.linalg.eig(a_tilde)
    phi = u @ psi if modes == "projected" else y @ v @ np.diag(1 / s) @ psi
    amplitudes = np.linalg.pinv(phi) @ w[:, -1]
    preds = np.stack([np.real(phi @ np.diag(lam**k) @ amplitudes) for k in range(1, tau + 1)], axis=1)
    return preds, lam


def mask(previous: np.ndarray, current: np.ndarray, preds: np.ndarray,
         criteria: tuple[str, ...] = ("lower", "upper", "sign")) -> np.ndarray:
    """Paper eqs. 6 and 7 (or the named ones of their three tests), element by element with plain
    loops' semantics."""
    tau = preds.shape[1]
    delta = current - previous
    move = np.abs(preds[:, -1] - current)
    ok = np.ones(len(current), dtype=bool)
    if "lower" in criteria:
        ok &= np.abs(delta) < move
    if "upper" in criteria:
        ok &= move <= tau * np.abs(delta)
    prev = current
    for k in range(tau):
        if "sign" in criteria:
            ok &= np.sign(preds[:, k] - prev) == np.sign(delta)
        prev = preds[:, k]
    return ok & np.isfinite(preds).all(axis=1)


def official_mask(previous: np.ndarray, current: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """The official code's mask (aicip/PDT, kcl/lib/trainers/pdt_trainer.py, `compute_mask`, mask_mode "both"),
    written as it is there: the move to w_pred(tau) against the last step, lower bound inclusive, upper
    (tau + 1) x the step, the sign of the final move only; (N,) bool for preds (N, tau)."""
    tau = preds.shape[1]
    weight_diff, epoch_gradient = preds[:, -1] - current, current - previous
    same_direction = np.sign(weight_diff) == np.sign(epoch_gradient)
    lower = np.abs(weight_diff) >= np.abs(epoch_gradient)
    upper = np.abs(weight_diff) <= (tau + 1) * np.abs(epoch_gradient)
    return same_direction & lower & upper & np.isfinite(preds).all(axis=1)
