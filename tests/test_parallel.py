"""Data parallelism (minisparse/fast/parallel.py): the batch split over threads gives the whole
batch's loss, gradients and measured sparsity, up to float rounding (float64 here)."""

import numpy as np
import pytest

from minisparse import model
from minisparse.fast import FAST, parallel


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


@pytest.mark.parametrize("ops", [model.REFERENCE, FAST], ids=lambda o: o.name)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("sparsity, nm, kw", [
    (0.0, None, {}),
    (0.5, None, {}),
    (0.0, (2, 4), dict(activation="swiglu", n_kv_head=2, tie_embeddings=True)),
])
def test_split_batch_equals_whole_batch(threads, sparsity, nm, kw, ops, monkeypatch):
    cfg, params, x, y = setup(sparsity, nm, **kw)
    _, ref_loss, caches = model.forward(params, cfg, x, y, ops)
    ref_zeros = model.measured_sparsity(cfg, caches)
    ref_grads = model.backward(params, cfg, caches)
    ran = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda p, c, xx, yy, *a: ran.append(xx.shape[0]) or forward(p, c, xx, yy, *a))
    loss, grads, zeros = parallel.forward_backward(params, cfg, x, y, ops, threads=threads)
    assert sorted(ran) == sorted(s.stop - s.start for s in parallel.split(5, threads))   # 5 = 2 + 3, 1 + 2 + 2
    if threads == 1:
        assert loss == float(ref_loss)                           # the plain path, exactly
    assert abs(loss - float(ref_loss)) <= 1e-14
    assert grads.keys() == params.keys()
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=0, atol=1e-14, err_msg=k)
    assert zeros.keys() == ref_zeros.keys()
    for l in ref_zeros:
        for site, frac in ref_zeros[l].items():
            assert zeros[l][site] == pytest.approx(frac, abs=1e-12)


def test_consuming_backward_gives_the_same_gradients_and_empties_the_layer_caches():
    cfg, params, x, y = setup(0.5)
    _, _, c1 = model.forward(params, cfg, x, y)
    _, _, c2 = model.forward(params, cfg, x, y)
    g1 = model.backward(params, cfg, c1)
    g2 = model.backward(params, cfg, c2, consume=True)
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)
    assert all(l in c1 for l in range(cfg.n_layer)) and not any(l in c2 for l in range(cfg.n_layer))


def test_split_batch_is_repeatable():
    cfg, params, x, y = setup(0.5, B=6)
    a = parallel.forward_backward(params, cfg, x, y, threads=2)
    b = parallel.forward_backward(params, cfg, x, y, threads=2)
    assert a[0] == b[0] and a[2] == b[2]
    assert all(np.array_equal(a[1][k], b[1][k]) for k in a[1])


def test_without_threadpoolctl_the_batch_is_not_split(monkeypatch):
    cfg, params, x, y = setup()
    monkeypatch.setattr(parallel, "blas_threads", lambda n: None)
    ran = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda p, c, xx, yy, *a: ran.append(xx.shape[0]) or forward(p, c, xx, yy, *a))
    parallel.forward_backward(params, cfg, x, y, threads=2)
    assert ran == [5]


@pytest.mark.parametrize("threads", [2, 3])
def test_split_batch_with_masked_targets_weights_parts_by_counted_tokens(threads):
    """Finetuning masks each row's prompt and padding (targets -1), so parts count different numbers
    of tokens: the split batch must still give the whole batch's loss and gradients. Weighting the
    parts by their sequences instead (the pretraining weights) would fail this."""
    cfg, params, x, y = setup(0.5)
    y = y.copy()
    y[0, :7] = -1                  # one counted token
    y[1, :] = -1                   # none: a row that is all prompt
    y[2, :2] = y[3, 5:] = -1
    _, ref_loss, caches = model.forward(params, cfg, x, y)
    ref_grads = model.backward(params, cfg, caches)
    loss, grads, _ = parallel.forward_backward(params, cfg, x, y, threads=threads)
    assert abs(loss - float(ref_loss)) <= 1e-14
    for k in grads:
        np.testing.assert_allclose(grads[k], ref_grads[k], rtol=0, atol=1e-14, err_msg=k)


def test_split_batch_with_nothing_counted_is_zero():
    cfg, params, x, y = setup()
    loss, grads, _ = parallel.forward_backward(params, cfg, x, np.full_like(y, -1), threads=2)
    assert loss == 0.0 and all(not g.any() for g in grads.values())


# ----------------------------------------------------------------------------------------
# evaluation: forward_loss, an inference forward split over threads


@pytest.mark.parametrize("ops", [model.REFERENCE, FAST], ids=lambda o: o.name)
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("sparsity, nm, kw", [
    (0.0, None, {}),
    (0.5, None, {}),
    (0.5, None, dict(a_bits=8, w_bits=1.58)),
    (0.0, (2, 4), dict(activation="swiglu", n_kv_head=2, tie_embeddings=True)),
])
def test_forward_loss_equals_the_readable_forward(threads, sparsity, nm, kw, ops):
    """The loss is computed over the whole batch's logits as the reference computes it, and the
    zeros are counted, not averaged: both equal the reference exactly."""
    cfg, params, x, y = setup(sparsity, nm, **kw)
    y = y.copy()
    y[1, :3] = -1                                                # masked targets, as finetuning has
    ref_loss, ref_zeros = model.forward_loss(params, cfg, x, y, ops)
    loss, zeros = parallel.forward_loss(params, cfg, x, y, ops, threads=threads)
    assert loss == ref_loss
    assert zeros == ref_zeros
    if sparsity:
        assert 0.45 < zeros[0]["qkv"] < 0.55                     # the counts are the sparsified inputs'


def test_forward_loss_keeps_no_layer_caches(monkeypatch):
    cfg, params, x, y = setup(0.5)
    kept = []
    forward = model.forward

    def spy(*a, **kw):
        out = forward(*a, **kw)
        kept.append(sorted(k for k in out[2] if isinstance(k, int)))
        return out
    monkeypatch.setattr(model, "forward", spy)
    parallel.forward_loss(params, cfg, x, y, FAST, threads=2)
    assert kept == [[], []]                                      # two parts, no layer's cache returned
    kept.clear()
    model.forward_loss(params, cfg, x, y)
    assert kept == [list(range(cfg.n_layer))]                   # the reference keeps them (it can backprop)


def test_forward_loss_without_threadpoolctl_runs_whole(monkeypatch):
    cfg, params, x, y = setup(0.5)
    monkeypatch.setattr(parallel, "blas_threads", lambda n: None)
    ran = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda p, c, xx, *a, **kw: ran.append(xx.shape[0]) or forward(p, c, xx, *a, **kw))
    assert parallel.forward_loss(params, cfg, x, y, FAST, threads=2) == model.forward_loss(params, cfg, x, y, FAST)
    assert ran == [5, 5]                                         # the split path's one forward, then the reference's


def test_estimate_loss_split_equals_the_readable_path():
    """batches.estimate_loss, as the programs run it (threads) and as --reference runs it (None)."""
    from minisparse.batches import estimate_loss
    from minisparse.run import TrainConfig
    cfg, params, _, _ = setup(0.5)
    ids = np.random.default_rng(3).integers(0, 11, 200)
    data = {"train": ids[:150], "val": ids[150:]}
    tc = TrainConfig(model=cfg, batch_size=5, eval_iters=3)
    ref = estimate_loss(params, cfg, data, tc, 250, FAST, None)
    assert estimate_loss(params, cfg, data, tc, 250, FAST, 2) == ref
    assert set(ref) == {"train", "val", "train_sparsity", "val_sparsity"} and ref["train"] > 0
