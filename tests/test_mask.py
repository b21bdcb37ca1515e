"""The mask on hand-built elements where each criterion decides, and the audit settings."""

from __future__ import annotations

import json

import numpy as np
import torch
from reference import mask as reference_mask

from pdtcli.mask import CRITERIA, MaskOptions, evaluate, finite_guaranteed, random_accept, step_matrix

# tau = 3; previous, current, then w_pred(1..3); each element is one case.
CASES = {
    "accepted": (0.0, 1.0, [2.0, 3.0, 4.0]),  # moves 3 >= 1, <= 3, always upward
    "lower": (0.0, 1.0, [1.2, 1.4, 1.5]),  # moves 0.5 < |delta| = 1
    "upper": (0.0, 1.0, [3.0, 5.0, 7.0]),  # moves 6 > 3 |delta|
    "sign": (0.0, 1.0, [3.0, 2.5, 3.5]),  # moves 2.5 but steps down at k = 2
    "sign_at_first_step": (0.0, 1.0, [0.5, 2.0, 3.0]),  # k = 1 compares with w_pred(0) = w_h
    "equal_to_tau_delta": (0.0, 1.0, [2.0, 3.0, 4.0 - 1e-12]),  # upper bound is inclusive
    "no_step": (1.0, 1.0, [1.0, 1.0, 1.0]),  # delta = 0: no acceleration possible
    "negative": (1.0, 0.0, [-1.0, -2.0, -2.5]),  # downward trend, accepted
    "nan": (0.0, 1.0, [2.0, float("nan"), 4.0]),
    "inf": (0.0, 1.0, [2.0, 3.0, float("inf")]),
}


def rows_from(prev: torch.Tensor, cur: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """The rows evaluate() takes, built the plain way from absolute predictions (tau, b)."""
    increments = torch.diff(pred, dim=0, prepend=cur.unsqueeze(0))
    return torch.cat([increments, (pred[-1] - cur).unsqueeze(0), (cur - prev).unsqueeze(0)])


def verdict(criteria=CRITERIA):
    prev = torch.tensor([c[0] for c in CASES.values()], dtype=torch.float64)
    cur = torch.tensor([c[1] for c in CASES.values()], dtype=torch.float64)
    pred = torch.tensor([c[2] for c in CASES.values()], dtype=torch.float64).T
    return evaluate(rows_from(prev, cur, pred), criteria), dict(zip(CASES, range(len(CASES)), strict=False))


def test_each_criterion_decides_its_case():
    v, at = verdict()
    expect = {
        "accepted": (True, False, False, False, False),
        "lower": (False, True, False, False, False),
        "upper": (False, False, True, False, False),
        "sign": (False, False, False, True, False),
        "sign_at_first_step": (False, False, False, True, False),
        "equal_to_tau_delta": (True, False, False, False, False),
        "no_step": (False, True, False, False, False),  # 0 <= tau * 0 and sign(0) == sign(0)
        "negative": (True, False, False, False, False),
        "nan": (False, False, False, False, True),
        "inf": (False, False, False, False, True),
    }
    for case, flags in expect.items():
        i = at[case]
        got = (bool(v.accepted[i]), bool(v.fail_lower[i]), bool(v.fail_upper[i]), bool(v.fail_sign[i]),
               bool(v.nonfinite[i]))
        assert got == flags, case
    counts = v.counts()
    assert counts.tolist() == [10, 3, 2, 1, 2, 2]


def test_criteria_subsets_are_the_paper_ablations():
    _, at = verdict()
    only_lower, _ = verdict(("lower",))
    assert bool(only_lower.accepted[at["upper"]]) and bool(only_lower.accepted[at["sign"]])
    assert not bool(only_lower.accepted[at["lower"]])
    bounds, _ = verdict(("lower", "upper"))
    assert bool(bounds.accepted[at["sign"]]) and not bool(bounds.accepted[at["upper"]])
    none, _ = verdict(())
    assert none.accepted.tolist() == [not c.startswith(("nan", "inf")) for c in CASES]


def test_agrees_with_reference_on_random_blocks():
    rng = np.random.default_rng(0)
    prev, cur = rng.standard_normal(5000), rng.standard_normal(5000)
    delta = cur - prev
    pred = cur[:, None] + delta[:, None] * np.cumsum(rng.uniform(-0.5, 2.0, (5000, 5)), axis=1)
    rows = rows_from(torch.from_numpy(prev), torch.from_numpy(cur), torch.from_numpy(pred.T.copy()))
    v = evaluate(rows, CRITERIA)
    expected = reference_mask(prev, cur, pred)
    assert 0.05 < expected.mean() < 0.95
    assert np.array_equal(v.accepted.numpy(), expected)


def test_random_mask_is_seeded_blocking_invariant_and_at_ratio():
    whole = random_accept(0, 100_000, 0.3, seed=7)
    pieces = np.concatenate([random_accept(a, min(a + 4096, 100_000), 0.3, seed=7) for a in range(0, 100_000, 4096)])
    assert np.array_equal(whole, pieces)
    assert abs(whole.mean() - 0.3) < 0.01
    assert not np.array_equal(whole, random_accept(0, 100_000, 0.3, seed=8))


def test_options_reject_unknown_criteria_and_label():
    assert MaskOptions(("sign", "lower")).criteria == ("lower", "sign")
    assert MaskOptions(()).label == "none"
    assert MaskOptions(CRITERIA, random=True, seed=3).label == "random@lower+upper+sign(seed=3)"
    assert MaskOptions().label == "upper+sign"  # the default drops eq. 6's lower bound
    try:
        MaskOptions(("lowr",))
    except ValueError as exc:
        assert "lowr" in str(exc)
    else:
        raise AssertionError("unknown criterion accepted")


def test_step_matrix_gives_increments_move_and_delta():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1000, 5))
    c = rng.standard_normal((5, 4))
    pred = w @ c
    got = (step_matrix(c).T @ w.T).T
    expected = rows_from(torch.from_numpy(w[:, -2]), torch.from_numpy(w[:, -1]), torch.from_numpy(pred.T.copy()))
    assert np.allclose(got, expected.numpy().T, atol=1e-12)


def test_skipping_the_finite_test_changes_no_verdict_on_a_real_trajectory(sgd_run):
    """Where the bound from R's column norms says no prediction can overflow, the second pass skips
    the per-element finite test; on real training windows the verdicts are the same bit for bit."""
    import training

    from pdtcli.dmd import FitOptions, accumulate_r, solve
    from pdtcli.mask import finite_guaranteed

    names = [k for k, v in torch.load(sgd_run / "epoch_1.pt", weights_only=True)["model"].items()
             if v.is_floating_point() and "running" not in k]
    window = training.flat_weights([sgd_run / f"epoch_{e}.pt" for e in range(4, 9)], names).T.contiguous()
    r = accumulate_r([window], window.shape[0])
    for tau in (1, 3, 5, 12):
        steps = step_matrix(solve(r, FitOptions(tau=tau)).coefficients)
        assert finite_guaranteed(steps, np.linalg.norm(r, axis=0))
        rows = torch.from_numpy(steps.T) @ window
        for criteria in (CRITERIA, ("lower",), ()):
            checked, skipped = evaluate(rows, criteria), evaluate(rows, criteria, all_finite=True)
            for field in ("accepted", "fail_lower", "fail_upper", "fail_sign"):
                assert torch.equal(getattr(checked, field), getattr(skipped, field)), (tau, criteria, field)
            assert np.array_equal(checked.counts(), skipped.counts())


def test_the_finite_bound_refuses_coefficients_that_could_overflow():
    norms = np.array([1.0, 2.0, 3.0])
    assert finite_guaranteed(np.eye(3), norms)
    assert not finite_guaranteed(np.full((3, 2), 1e300), norms)  # |E^T W| could reach 6e300
    assert not finite_guaranteed(np.array([[np.inf], [0.0], [0.0]]), norms)
    assert not finite_guaranteed(np.eye(3), np.array([1.0, np.nan, 1.0]))


def test_a_prediction_the_tensors_dtype_cannot_hold_is_rejected_as_non_finite(tmp_path):
    """fp16 weights rising towards 65504: predictions past it would be written as inf. They are
    rejected and counted as non-finite, the output and the next window stay finite."""
    from typer.testing import CliRunner

    from pdtcli.cli import app

    gen = torch.Generator().manual_seed(0)
    limit = torch.rand(64, generator=gen, dtype=torch.float64) * 30000 + 1000
    limit[:4] = 80000.0  # these four head past fp16's largest value
    gap = limit * (0.3 + 0.4 * torch.rand(64, generator=gen, dtype=torch.float64))
    gap[:4] = 48000.0
    run = tmp_path / "run"
    run.mkdir()
    for epoch in range(6):
        weights = limit - gap * 0.8 ** epoch
        torch.save({"w": weights.reshape(8, 8).to(torch.float16)}, run / f"epoch_{epoch:02d}.pt")
    (run / "epoch_05.pt").rename(tmp_path / "later.pt")
    result = CliRunner().invoke(app, ["predict", str(run), "--json", "--tau", "3"])
    totals = json.loads(result.output)["mask"]["totals"]
    assert result.exit_code == 0 and totals["nonfinite"] >= 1 and totals["accepted"] > 0
    fused = torch.load(run / "epoch_04.pdt.pt", weights_only=True)["w"]
    assert fused.dtype == torch.float16 and torch.isfinite(fused).all()
    (tmp_path / "later.pt").rename(run / "epoch_05.pt")
    result = CliRunner().invoke(app, ["predict", str(run), "--json", "--tau", "3"])
    assert result.exit_code == 0, result.output  # the fused state in the window is finite too


def test_official_preset_agrees_with_the_official_codes_mask_on_a_real_trajectory(sgd_run):
    """`--criteria official` on a real SGD window, against the official code's mask written densely: the
    same verdict on every element, and not the paper's (the bounds and the sign test differ)."""
    import training
    from reference import official_mask

    from pdtcli.dmd import FitOptions, accumulate_r, solve
    from pdtcli.options import mask_options

    names = [k for k, v in torch.load(sgd_run / "epoch_1.pt", weights_only=True)["model"].items()
             if v.is_floating_point() and "running" not in k]
    window = training.flat_weights([sgd_run / f"epoch_{e}.pt" for e in range(4, 9)], names).T.contiguous()
    options = mask_options("official", False, 0)
    assert options.label == "official" and MaskOptions.from_dict(options.as_dict()) == options
    for tau in (1, 3, 5):
        coefficients = solve(accumulate_r([window], window.shape[0]), FitOptions(tau=tau)).coefficients
        rows = torch.from_numpy(step_matrix(coefficients).T) @ window
        got = evaluate(rows, options.criteria, rule=options.rule).accepted.numpy()
        w = window.numpy()
        expected = official_mask(w[-2], w[-1], (w.T @ coefficients))
        assert 0.02 < expected.mean() < 0.98, tau
        assert np.array_equal(got, expected), tau
        assert not np.array_equal(got, evaluate(rows, CRITERIA).accepted.numpy()), tau


def test_official_preset_on_the_command_line(sgd_run):
    """`pdt predict --criteria official` applies it and names it; a made-up preset is refused with exit 2."""
    from typer.testing import CliRunner

    from pdtcli.cli import app

    done = CliRunner().invoke(app, ["predict", str(sgd_run), "--criteria", "official", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["mask"]["label"] == "official"
    refused = CliRunner().invoke(app, ["predict", str(sgd_run), "--criteria", "officious"])
    assert refused.exit_code == 2 and "use all, official, none" in refused.output
