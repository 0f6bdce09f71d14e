"""The scaling law (minisparse/scaling.py): fitted back from its own data, S* against brute force."""

import csv
import os

import numpy as np
import pytest

from minisparse import scaling

GRID_N = np.repeat([1.0e5, 2.2e5, 6.0e5, 1.27e6], 7)
GRID_S = np.tile([0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8], 4)


@pytest.mark.parametrize("true", [
    dict(E=1.2, B=0.3, C=2.0, alpha=0.25, beta=0.4),
    dict(E=0.9, B=0.05, C=5.0, alpha=0.3, beta=0.2),
])
def test_fit_recovers_known_constants(true):
    L = scaling.law(GRID_N, GRID_S, **true)
    fit = scaling.fit_law(GRID_N, GRID_S, L)
    for k in scaling.NAMES:
        assert fit[k] == pytest.approx(true[k], rel=1e-4), (k, fit[k], true[k])
    assert scaling.optimal_sparsity(*(fit[k] for k in scaling.NAMES)) == pytest.approx(
        scaling.optimal_sparsity(**true), abs=1e-4)


def test_fit_is_robust_to_one_outlier():
    """Huber on log-loss: one run 5% off moves the constants far less than least squares would."""
    true = dict(E=1.2, B=0.3, C=2.0, alpha=0.25, beta=0.4)
    L = scaling.law(GRID_N, GRID_S, **true)
    L[3] *= 1.05
    fit = scaling.fit_law(GRID_N, GRID_S, L)
    pred = scaling.law(GRID_N, GRID_S, *(fit[k] for k in scaling.NAMES))
    others = np.arange(len(L)) != 3
    assert np.max(np.abs(pred[others] / L[others] - 1)) < 2e-3


@pytest.mark.parametrize("consts", [scaling.PAPER, dict(E=1.2, B=0.3, C=2.0, alpha=0.25, beta=0.4),
                                    dict(E=1.0, B=0.0, C=1.0, alpha=0.2, beta=0.1)])
def test_optimal_sparsity_matches_brute_force(consts):
    S = np.linspace(0.0, 0.98, 980_001)
    for N_a in (1e5, 1e9):                       # Eq. 23: the optimum does not depend on N_a
        brute = S[np.argmin(scaling.law_at_budget(N_a, S, **consts))]
        assert scaling.optimal_sparsity(**consts) == pytest.approx(brute, abs=2e-6)


def test_optimal_sparsity_paper_constants():
    """The paper's rounded constants give about 50%; B = 0 would give exactly 1 - beta/alpha."""
    s = scaling.optimal_sparsity(**scaling.PAPER)
    assert 0.50 < s < 0.505
    assert scaling.optimal_sparsity(**{**scaling.PAPER, "B": 0.0}) == pytest.approx(0.5, abs=1e-9)


def test_optimal_sparsity_is_dense_when_sparsity_is_expensive():
    assert scaling.optimal_sparsity(E=1.0, B=1.0, C=1.0, alpha=0.1, beta=2.0) == 0.0


def test_fit_needs_enough_runs():
    with pytest.raises(ValueError, match="at least 5 runs"):
        scaling.fit_law([1e5, 2e5], [0.0, 0.5], [2.0, 2.1])


def test_committed_sweep_csv_is_whole():
    """The committed CSV has every run of the grid, with equal tokens and N spanning >= 10x."""
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "scaling", "sweep.csv")
    if not os.path.exists(path):
        pytest.skip("experiments/scaling/sweep.csv is not committed yet")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 28 and len({r["run"] for r in rows}) == 28
    assert len({r["tokens"] for r in rows}) == 1
    Ns = sorted({int(r["N"]) for r in rows})
    assert len(Ns) >= 4 and Ns[-1] / Ns[0] >= 10
    assert sorted({float(r["S"]) for r in rows}) == [0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8]
    for r in rows:
        assert int(r["N_a"]) <= int(r["N"]) and np.isfinite(float(r["val_loss"]))
