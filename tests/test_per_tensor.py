"""DMD fitted per tensor (`--dmd-scope tensor`, issue 24): each tensor predicted by the DMD of its own rows.

Checked against the independent dense float64 DMD of `reference` run on each tensor's rows alone, on a real
training trajectory; the option is kept in the store like `--tau` and `pdt report` shows the fits' ranges.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import training
from reference import dmd_predictions, mask
from typer.testing import CliRunner

from pdtcli.cli import app
from pdtcli.dmd import FitOptions, accumulate_r, combine_each, solve, solve_each
from pdtcli.mask import DEFAULT_CRITERIA

NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
runner = CliRunner()


def pdt(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def window_of(run, name: str) -> np.ndarray:
    """The tensor's rows of W (numel x h) over the window pdt fits on a 9-epoch run: epochs 4..8."""
    return training.flat_weights([run / f"epoch_{e}.pt" for e in range(4, 9)], [name]).numpy()


@pytest.mark.parametrize("modes", ["exact", "projected"])
def test_each_tensor_is_predicted_by_the_dmd_of_its_own_rows(sgd_run, modes):
    code, output = pdt("predict", sgd_run, "--dmd-scope", "tensor", "--modes", modes, "--criteria", "none")
    assert code == 0, output
    fused = torch.load(sgd_run / "epoch_8.pdt.pt", weights_only=True)["model"]
    whole = training.flat_weights([sgd_run / f"epoch_{e}.pt" for e in range(4, 9)], NAMES).numpy()
    global_preds, _ = dmd_predictions(whole, 5, modes)
    start = 0
    apart = 0.0  # how far the per-tensor predictions are from the one fit of the whole model
    for name in NAMES:
        w = window_of(sgd_run, name)
        preds, _ = dmd_predictions(w, 5, modes)
        got = fused[name].reshape(-1).double().numpy()
        np.testing.assert_allclose(got, preds[:, -1], rtol=1e-5, atol=1e-6, err_msg=name)
        apart = max(apart, np.abs(preds[:, -1] - global_preds[start:start + len(w), -1]).max())
        start += len(w)
    assert apart > 1e-3  # the test tells the two scopes apart


def test_the_mask_applies_to_each_tensors_own_prediction(adamw_run):
    assert pdt("predict", adamw_run, "--dmd-scope", "tensor")[0] == 0
    fused = torch.load(adamw_run / "epoch_8.pdt.pt", weights_only=True)["model"]
    for name in NAMES:
        w = window_of(adamw_run, name)
        preds, _ = dmd_predictions(w, 5, "exact")
        expected = mask(w[:, -2], w[:, -1], preds, DEFAULT_CRITERIA)
        got = fused[name].reshape(-1).double().numpy()
        moved = got != w[:, -1].astype(np.float32)
        assert np.mean(moved != expected) < 1e-2, name  # float32 ties at the bounds
        both = moved & expected
        np.testing.assert_allclose(got[both], preds[both, -1], rtol=1e-5, atol=1e-6, err_msg=name)


def test_the_scope_is_kept_in_the_store_and_shown_in_the_report(sgd_run, tmp_path):
    first = json.loads(runner.invoke(app, ["predict", str(sgd_run), "--dmd-scope", "tensor", "--json"]).stdout)
    assert first["fit"]["options"]["scope"] == "tensor"
    assert first["fit"]["per_tensor"]["tensors"] == len(NAMES)
    code, text = pdt("report", sgd_run)
    assert code == 0, text
    line = " ".join(text.split())
    assert "--dmd-scope tensor" in line  # the kept settings
    assert "DMD fit per tensor on" in line and f"{len(NAMES)} fits, rank" in line and "spectral radius" in line
    code, text = pdt("report", sgd_run, "--plot", tmp_path / "fit.png")  # the spectrum panel: the fits' ranges
    assert code == 0 and (tmp_path / "fit.png").stat().st_size > 0, text
    # a later run without the flag keeps fitting per tensor; with another scope it says what changed
    (sgd_run / "epoch_8.pdt.pt").unlink()
    again = json.loads(runner.invoke(app, ["predict", str(sgd_run), "--dry-run", "--json"]).stdout)
    assert again["fit"]["options"]["scope"] == "tensor"
    changed = json.loads(runner.invoke(app, ["predict", str(sgd_run), "--dmd-scope", "model", "--json"]).stdout)
    assert "scope" not in changed["fit"]["options"] and changed["fit"]["per_tensor"] is None
    assert any("--dmd-scope model (was tensor)" in w for w in changed["warnings"])


def test_an_unknown_scope_is_a_usage_error(sgd_run):
    code, output = pdt("predict", sgd_run, "--dmd-scope", "layer")
    assert code == 2 and "--dmd-scope" in output


def test_factors_of_a_tensors_pieces_combine_into_the_tensors_own():
    """Under torchrun the ranks hold pieces of a tensor: their factors combine into that of all its rows."""
    rng = np.random.default_rng(0)
    w = np.cumsum(rng.normal(size=(300, 5)), axis=1)
    pieces = [w[:120], w[120:250], w[250:]]

    def r(rows: np.ndarray) -> np.ndarray:
        return accumulate_r([torch.from_numpy(rows.T.copy())], 5)

    shares = [(["a", "b"], np.stack([r(pieces[0]), r(w[:7])])), (["a"], np.stack([r(pieces[1])])),
              (["a"], np.stack([r(pieces[2])]))]
    whole = combine_each(shares)
    options = FitOptions(tau=3, rtol=1e-12)
    np.testing.assert_allclose(w @ solve(whole["a"], options).coefficients, w @ solve(r(w), options).coefficients,
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.abs(whole["b"]), np.abs(r(w[:7])))


def test_each_tensors_fit_is_the_fit_of_its_factor_alone():
    """`solve_each` on a stack is `solve` on each factor (3000 of them: 0.46 s on this project's CPU, unloaded)."""
    rng = np.random.default_rng(1)
    factors = np.stack([np.linalg.qr(np.cumsum(rng.normal(size=(64, 5)), axis=1), mode="r") for _ in range(300)])
    fits = solve_each(factors, FitOptions())
    assert len(fits) == 300
    for r, fit in zip(factors, fits, strict=True):
        np.testing.assert_array_equal(fit.coefficients, solve(r, FitOptions()).coefficients)
