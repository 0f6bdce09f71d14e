"""Shared test set-up: make the package importable from a checkout, and print at the end of the
run the worst relative error each gradient check measured (so CI logs carry the numbers)."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORST = {}   # check name -> worst relative error seen


def has_gpu():
    """True where CuPy imports and sees a CUDA device (the CuPy tests skip otherwise)."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def row_kinds(rng, N=12, D=24):
    """(kind, rows (N, D)) that stress a top-K: rows that differ; rows of heavy ties; ReLU2 outputs
    with many exact zeros; all zeros; identical rows; rows of one value each (every entry ties)."""
    yield "distinct", rng.standard_normal((N, D))
    yield "ties", rng.integers(-2, 3, size=(N, D)).astype(np.float64)
    g = rng.standard_normal((N, D))
    yield "relu2_zeros", rng.standard_normal((N, D)) * np.maximum(g, 0) ** 2
    yield "all_zero", np.zeros((N, D))
    row = rng.standard_normal(D)
    yield "identical", np.tile(row, (N, 1))
    yield "constant", np.repeat(rng.standard_normal((N, 1)), D, axis=1)


def write_corpus(tmp_path_factory, words, n_lines, seed=0):
    """A small text file for a tiny training run: n_lines lines of six words drawn from `words`
    and a digit, so its char vocabulary is those words' letters, the digits, ' ', '.' and '\n'."""
    rng = np.random.default_rng(seed)
    words = words.split()
    lines = [" ".join(words[i] for i in rng.integers(0, len(words), 6)) + f" {n % 10}." for n in range(n_lines)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def torch_required():
    """True in CI (CI set to anything but '', '0' or 'false') or where MINISPARSE_REQUIRE_TORCH=1."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false")
    return ci or os.environ.get("MINISPARSE_REQUIRE_TORCH", "").strip() == "1"


def import_torch(module):
    """torch, for the top of the test module named `module` (its __name__). Without torch: in CI
    (torch_required()) the run fails with one sentence, since a skipped reference would let CI pass
    without checking anything; elsewhere the module is skipped with a reason that says so."""
    try:
        import torch
        return torch
    except ImportError:
        pass
    if torch_required():
        pytest.fail("torch is required in CI (CI or MINISPARSE_REQUIRE_TORCH=1 is set) as the independent "
                    "float64 reference: pip install torch==2.13.0", pytrace=False)
    pytest.skip(f"{module} skipped: torch is not installed, so the independent float64 reference is not "
                "checked here (CI requires it): pip install torch==2.13.0", allow_module_level=True)


def record(name, err):
    WORST[name] = max(err, WORST.get(name, 0.0))
    return err


def pytest_terminal_summary(terminalreporter):
    if WORST:
        terminalreporter.section("worst relative error per gradient check")
        for name in sorted(WORST):
            terminalreporter.write_line(f"{name:45s} {WORST[name]:.2e}")
