"""The blocked DMD against an independent dense float64 DMD and PyDMD, on real trajectories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import training
from pydmd import DMD
from reference import dmd_predictions

from pdtcli.dmd import FitOptions, accumulate_r, solve

NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]


def window(folder, h=5):
    paths = sorted(folder.glob("epoch_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[-h:]
    return training.flat_weights(paths, NAMES).numpy()


def blocked_r(w: np.ndarray, block: int) -> np.ndarray:
    blocks = (torch.from_numpy(w[a: a + block].T.copy()) for a in range(0, w.shape[0], block))
    return accumulate_r(blocks, w.shape[1])


@pytest.mark.parametrize("run", ["sgd_run", "adamw_run"])
@pytest.mark.parametrize("modes", ["projected", "exact"])
def test_matches_dense_reference_on_training_trajectory(run, modes, request):
    w = window(request.getfixturevalue(run))
    fit = solve(blocked_r(w, 257), FitOptions(tau=5, modes=modes, rtol=1e-10))
    ours = w @ fit.coefficients
    ref, lam = dmd_predictions(w, 5, modes, rtol=1e-10)
    assert fit.rank == 4
    scale = np.abs(ref - w[:, -1:]).max()  # compare on the scale of the predicted motion
    assert np.abs(ours - ref).max() < 1e-6 * scale
    assert np.allclose(np.sort_complex(fit.eigenvalues), np.sort_complex(lam), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("modes", ["projected", "exact"])
def test_matches_pydmd(sgd_run, modes):
    w = window(sgd_run)
    fit = solve(blocked_r(w, 1000), FitOptions(tau=4, modes=modes, rtol=0.0))
    dmd = DMD(svd_rank=-1, exact=modes == "exact", opt=-1)
    with np.errstate(all="ignore"):
        dmd.fit(w)
    dmd.dmd_time["tend"] = w.shape[1] - 1 + 4
    theirs = dmd.reconstructed_data.real[:, w.shape[1]:]
    ours = w @ fit.coefficients
    scale = np.abs(theirs - w[:, -1:]).max()
    assert np.abs(ours - theirs).max() < 1e-6 * scale


def test_block_size_does_not_change_the_fit(sgd_run):
    w = window(sgd_run)
    one = solve(blocked_r(w, w.shape[0]), FitOptions())
    tiny = solve(blocked_r(w, 8), FitOptions())
    assert np.allclose(one.coefficients, tiny.coefficients, rtol=1e-9, atol=1e-12)
    r = blocked_r(w, 8)
    assert np.allclose(r.T @ r, w.T @ w, rtol=1e-12)


def test_exact_modes_at_full_rank_start_at_current_weights(sgd_run):
    w = window(sgd_run)
    exact = solve(blocked_r(w, 512), FitOptions(modes="exact", rtol=0.0))
    projected = solve(blocked_r(w, 512), FitOptions(modes="projected", rtol=0.0))
    assert exact.start_offset < 1e-8
    assert projected.start_offset > 1e-6  # projected modes drop w_h's part outside span(X)


def test_ill_conditioned_window_stays_accurate():
    """Nearly collinear snapshots (condition number ~1e8), where a Gram matrix would lose it.

    Projected modes only: this window's A-tilde is nearly defective (three eigenvalues within
    1e-5 of 1), where exact modes' amplitudes are ill-posed in any implementation."""
    modes = "projected"
    rng = np.random.default_rng(3)
    base, direction = rng.standard_normal(20_000), rng.standard_normal((20_000, 3))
    steps = np.array([[0, 0, 0], [1, 0.1, 0], [1.9, 0.3, 0.01], [2.7, 0.6, 0.03], [3.4, 1.0, 0.06]])
    w = base[:, None] + 1e-6 * direction @ steps.T
    assert np.linalg.cond(w[:, :-1]) > 1e7
    fit = solve(blocked_r(w, 999), FitOptions(modes=modes, rtol=1e-12))
    ref, _ = dmd_predictions(w, 5, modes, rtol=1e-12)
    motion = np.abs(ref - w[:, -1:]).max()
    assert np.abs(w @ fit.coefficients - ref).max() < 1e-4 * motion


@pytest.mark.parametrize("modes", ["projected", "exact"])
def test_rank_override_and_threshold(sgd_run, modes):
    w = window(sgd_run)
    r = blocked_r(w, 4096)
    assert solve(r, FitOptions(rank=2)).rank == 2
    assert solve(r, FitOptions(rtol=0.5)).rank == 1
    ours = w @ solve(r, FitOptions(rank=2, modes=modes)).coefficients
    ref, _ = dmd_predictions(w, 5, modes, rank=2)
    assert np.abs(ours - ref).max() < 1e-6 * np.abs(ref - w[:, -1:]).max()
