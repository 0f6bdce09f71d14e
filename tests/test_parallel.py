"""Data parallelism (minisparse/parallel.py): the batch split over threads gives the whole
batch's loss, gradients and measured sparsity, up to float rounding (float64 here)."""

import numpy as np
import pytest

from minisparse import model, parallel


def setup(sparsity=0.0, nm=None, B=5, **kw):
    cfg = model.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=16, n_hidden=32,
                          sparsity=sparsity, nm=nm, **kw)
    params = model.init_params(cfg, seed=1, dtype=np.float64)
    idx = np.random.default_rng(2).integers(0, 11, (B, 9))
    return cfg, params, idx[:, :-1], idx[:, 1:]


def test_split_sizes():
    assert parallel.split(12, 2) == [slice(0, 6), slice(6, 12)]
    assert [s.stop - s.start for s in parallel.split(5, 3)] == [1, 2, 2]
    assert parallel.split(1, 4) == [slice(0, 1)]                 # never more parts than sequences
    assert parallel.split(7, 0) == [slice(0, 7)]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("sparsity, nm, kw", [
    (0.0, None, {}),
    (0.5, None, {}),
    (0.0, (2, 4), dict(activation="swiglu", n_kv_head=2, tie_embeddings=True)),
])
def test_split_batch_equals_whole_batch(threads, sparsity, nm, kw):
    cfg, params, x, y = setup(sparsity, nm, **kw)
    loss1, g1, parts1 = parallel.forward_backward(params, cfg, x, y, threads=1)
    lossN, gN, partsN = parallel.forward_backward(params, cfg, x, y, threads=threads)
    assert len(parts1) == 1 and len(partsN) == threads              # 5 sequences: 2 + 3, or 1 + 2 + 2
    assert [n for n, _ in partsN] == [(s.stop - s.start) * 8 for s in parallel.split(5, threads)]
    _, ref_loss, caches = model.forward(params, cfg, x, y)
    assert loss1 == float(ref_loss)                                  # threads=1 is the plain path
    assert abs(lossN - loss1) <= 1e-14
    assert g1.keys() == gN.keys() == params.keys()
    for k in g1:
        np.testing.assert_allclose(gN[k], g1[k], rtol=0, atol=1e-14, err_msg=k)
    ref = model.mean_sparsity(cfg, caches)
    got = parallel.mean_sparsity(cfg, partsN)
    assert got.keys() == ref.keys()
    for site in ref:
        assert got[site] == pytest.approx(ref[site], abs=1e-12)
    per_layer = parallel.measured_sparsity(cfg, partsN)
    for l, sites in model.measured_sparsity(cfg, caches).items():
        for site, frac in sites.items():
            assert per_layer[l][site] == pytest.approx(frac, abs=1e-12)


def test_split_batch_is_repeatable():
    cfg, params, x, y = setup(0.5, B=6)
    a = parallel.forward_backward(params, cfg, x, y, threads=2)
    b = parallel.forward_backward(params, cfg, x, y, threads=2)
    assert a[0] == b[0]
    assert all(np.array_equal(a[1][k], b[1][k]) for k in a[1])


def test_without_threadpoolctl_the_batch_is_not_split(monkeypatch):
    cfg, params, x, y = setup()
    monkeypatch.setattr(parallel, "_blas_at_one_thread", lambda: None)
    _, _, parts = parallel.forward_backward(params, cfg, x, y, threads=2)
    assert len(parts) == 1
