"""The fast paths (minisparse/fast/) against the readable reference they replace: each op alone,
on the inputs that stress it, then the whole model's loss and gradients with ops=FAST against
ops=REFERENCE. The reference is what tests/test_grad.py and tests/test_torch_reference.py check
against finite differences and PyTorch; here every fast op must equal it."""

import numpy as np
import pytest

from conftest import row_kinds
from minisparse import embedding, linear, model, norm, rope
from minisparse.fast import FAST
from minisparse.fast import embedding as fast_embedding
from minisparse.fast import norm as fast_norm
from minisparse.fast import rope as fast_rope
from minisparse.fast import topk as fast_topk
from minisparse.linear import SparseSpec
from minisparse.rope import rope_tables

SPECS = [SparseSpec(0.0), SparseSpec(0.5), SparseSpec(0.25, ste=False), SparseSpec(0.9),
         SparseSpec(0.0, nm=(2, 4)), SparseSpec(0.0, nm=(1, 8), ste=False)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_sparsify_equals_reference(spec):
    """fast.topk.sparsify: the same xs, bit for bit as values, on every row kind; the mask, where
    the reference's backward needs it (ste=False), is the reference's."""
    rng = np.random.default_rng(1)
    for kind, x in row_kinds(rng, N=12, D=24):
        want, want_mask = linear.sparsify(x, spec)
        got, got_mask = fast_topk.sparsify(x, spec)
        np.testing.assert_array_equal(got, want, err_msg=kind)
        if not spec.ste:
            np.testing.assert_array_equal(got_mask, want_mask, err_msg=kind)


@pytest.mark.parametrize("layout", ["half", "pairs"])
def test_rope_rotate_equals_reference_exactly(layout):
    """Whole-vector products make the same two products and one sum per entry: bitwise equal,
    forward and backward, on the transposed (non-contiguous) layout the model passes."""
    x = np.random.default_rng(3).standard_normal((2, 6, 3, 8)).transpose(0, 2, 1, 3)   # (B, H, T, hs)
    cos, sin = rope_tables(np, 6, 8, 500.0, 2, x.dtype)
    assert np.array_equal(fast_rope.rotate(x, cos, sin, layout), rope.rotate(x, cos, sin, layout))
    assert np.array_equal(fast_rope.rotate(x, cos, -sin, layout), rope.rotate(x, cos, -sin, layout))
    y, cache = rope.rope_forward(x, 500.0, offset=2, layout=layout, rotate=fast_rope.rotate)
    np.testing.assert_allclose(rope.rope_backward(y, cache), x, atol=1e-13)          # the inverse rotation


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rmsnorm_equals_reference(dtype):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 16)).astype(dtype) * 3
    g = rng.standard_normal(16).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-13)
    y_ref, c_ref = norm.rmsnorm_forward(x, g)
    y, c = fast_norm.rmsnorm_forward(x, g)
    np.testing.assert_allclose(y, y_ref, **tol)
    for got, want in zip(fast_norm.rmsnorm_backward(dy, c), norm.rmsnorm_backward(dy, c_ref)):
        np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_embedding_backward_equals_reference(dtype):
    """The sort-and-reduceat scatter equals the reference's add.at, with heavy repeats and unused rows."""
    rng = np.random.default_rng(11)
    for V, shape in [(96, (12, 64)), (5, (10, 4)), (1000, (1, 7)), (3, (1, 1))]:
        idx = rng.integers(0, V, shape)
        dx = rng.standard_normal(shape + (16,)).astype(dtype)
        ref = embedding.embedding_backward(dx, (idx, (V, 16)))
        got = fast_embedding.embedding_backward(dx, (idx, (V, 16)))
        assert got.dtype == dtype
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)
        assert np.array_equal(got == 0, ref == 0)                 # unused tokens get exact zeros


@pytest.mark.parametrize("sparsity, nm, kw", [
    (0.0, None, {}),
    (0.5, None, {}),
    (0.5, None, dict(ste=False)),
    (0.0, (2, 4), dict(activation="swiglu", n_kv_head=2, tie_embeddings=True, rope_layout="pairs")),
])
def test_model_with_fast_ops_equals_reference(sparsity, nm, kw):
    """The whole model, float64: loss, logits and every gradient with ops=FAST equal ops=REFERENCE."""
    cfg = model.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=16, n_hidden=32,
                          sparsity=sparsity, nm=nm, **kw)
    params = model.init_params(cfg, seed=1, dtype=np.float64)
    idx = np.random.default_rng(2).integers(0, 11, (3, 9))
    out = {}
    for ops in (model.REFERENCE, FAST):
        logits, loss, caches = model.forward(params, cfg, idx[:, :-1], idx[:, 1:], ops)
        assert caches["ops"] is ops
        out[ops.name] = logits, float(loss), model.backward(params, cfg, caches)
    (la, a, ga), (lb, b, gb) = out["reference"], out["fast"]
    np.testing.assert_allclose(lb, la, rtol=1e-12, atol=1e-12)
    assert b == pytest.approx(a, rel=1e-13)
    for k in ga:
        np.testing.assert_allclose(gb[k], ga[k], rtol=1e-10, atol=1e-12, err_msg=k)


def test_blas_thread_count_reads_the_count_without_changing_it():
    """runtime.blas_thread_count is what DecodeWeights.prefill gives back to BLAS: the count in force,
    read without limiting it (a threadpoolctl limit applies as soon as it is made)."""
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info
    from minisparse.fast import runtime

    def counts():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    before = counts()
    assert runtime.blas_thread_count() == max(before)
    assert counts() == before                                   # reading changed nothing
    with runtime.blas_threads(1):
        assert runtime.blas_thread_count() == 1
    assert counts() == before and runtime.blas_thread_count() == max(before)
