"""Every smooth backward against centred finite differences in float64, with a random upstream
gradient (never all ones): the loss is sum(out * G) for a fixed random G. Relative error
max|a - b| / max(|a|, |b|) must be <= 1e-7 per layer and <= 1e-6 for the whole model."""

import numpy as np
import pytest

from conftest import record
from minisparse.gradcheck import numerical_grad, rel_error
from minisparse import model
from minisparse.errors import UsageError
from minisparse.attention import attention_backward, attention_forward
from minisparse.embedding import embedding_backward, embedding_forward
from minisparse.linear import SparseSpec, sparse_linear_backward, sparse_linear_forward
from minisparse.loss import cross_entropy_backward, cross_entropy_forward
from minisparse.norm import rmsnorm_backward, rmsnorm_forward
from minisparse.relu2 import relu2glu_backward, relu2glu_forward
from minisparse.rope import rope_backward, rope_forward
from minisparse.swiglu import swiglu_backward, swiglu_forward

# Why these values: centred differences with h = 1e-6 in float64 measure relative errors of 2e-11 to
# 3.4e-9 on the layer checks below, and 2.5e-9 to 1.0e-7 on the whole model (90 runs with all the
# seeds shifted; the fixed seeds here give at most 2.1e-9 and 3.4e-8). TOL is 10x the worst layer
# error rounded up to a power of ten (29x margin). In the whole model every tensor gets the same
# absolute rounding noise, about eps * |loss| / h ~ 4e-10, and the worst are those of small gradients
# (the query and key weights, max |grad| ~ 0.02 against ~1 for the embedding): TOL_MODEL leaves 10x.
TOL = 1e-7
TOL_MODEL = 1e-6


def check(name, forward, backward, inputs, seed=0, recorded=True):
    """forward(*inputs) -> (out or tuple of outs, cache); backward(douts, cache) -> grads of inputs.
    recorded=False keeps the errors out of the end-of-run summary (for a backward made wrong on purpose)."""
    rng = np.random.default_rng(seed)
    outs, cache = forward(*inputs)
    single = not isinstance(outs, (tuple, list))
    outs = [outs] if single else list(outs)
    G = [rng.standard_normal(o.shape) for o in outs]           # random upstream gradients

    def f():
        o, _ = forward(*inputs)
        o = [o] if single else list(o)
        return sum(float((a * g).sum()) for a, g in zip(o, G))

    grads = backward(G[0] if single else G, cache)
    grads = grads if isinstance(grads, (tuple, list)) else (grads,)
    again = backward(G[0] if single else G, cache)                # backward twice: same answer
    again = again if isinstance(again, (tuple, list)) else (again,)
    for a, b in zip(grads, again):
        assert np.array_equal(a, b)
    for i, (x, dx) in enumerate(zip(inputs, grads)):
        err = rel_error(dx, numerical_grad(f, x))
        if recorded:
            record(f"{name} input {i}", err)
        assert err <= TOL, f"{name}: input {i} relative error {err:.2e}"


def test_rmsnorm():
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((2, 3, 8)), rng.standard_normal(8)
    check("rmsnorm", lambda x, g: rmsnorm_forward(x, g, 1e-5), rmsnorm_backward, [x, g])


def test_check_rejects_a_gradient_off_by_3e_7():
    """TOL must catch errors far below the old 1e-6: a backward 3e-7 off (relative) fails the check."""
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((2, 3, 8)), rng.standard_normal(8)

    def off_backward(d, cache):
        dx, dg = rmsnorm_backward(d, cache)
        return dx * (1 + 3e-7), dg
    with pytest.raises(AssertionError, match="input 0 relative error 3.0"):
        check("rmsnorm 3e-7 off", lambda x, g: rmsnorm_forward(x, g, 1e-5), off_backward, [x, g], recorded=False)


def test_rope():
    x = np.random.default_rng(2).standard_normal((2, 2, 5, 8))
    check("rope", lambda x: rope_forward(x, 10000.0), lambda d, c: rope_backward(d, c), [x])
    check("rope offset", lambda x: rope_forward(x, 500.0, offset=7), lambda d, c: rope_backward(d, c), [x])
    check("rope pairs", lambda x: rope_forward(x, 500.0, offset=3, layout="pairs"), rope_backward, [x])


def test_rope_pairs_is_half_with_channels_reordered():
    """Adjacent pairs (GGUF) = rotate-half (HF) after moving channels 0,2,4.. first and 1,3,5.. second."""
    x = np.random.default_rng(3).standard_normal((1, 2, 5, 8))
    perm = np.r_[0:8:2, 1:8:2]                                   # pairs layout -> half layout
    want, _ = rope_forward(x[..., perm], 10000.0, offset=2)
    got, _ = rope_forward(x, 10000.0, offset=2, layout="pairs")
    np.testing.assert_allclose(got[..., perm], want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("Tq,Tk", [(6, 6), (1, 6), (3, 6)])
def test_attention(Tq, Tk):
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 2, Tq, 4)), rng.standard_normal((2, 2, Tk, 4)), rng.standard_normal((2, 2, Tk, 4))
    check(f"attention Tq={Tq} Tk={Tk}", attention_forward, attention_backward, [q, k, v])


def test_relu2glu():
    rng = np.random.default_rng(4)
    u = rng.standard_normal((2, 3, 10))
    g = rng.standard_normal((2, 3, 10))
    g[np.abs(g) < 1e-3] = 0.5                                    # keep away from the kink at 0
    check("relu2glu", relu2glu_forward, relu2glu_backward, [u, g])


def test_swiglu():
    rng = np.random.default_rng(5)
    check("swiglu", swiglu_forward, swiglu_backward, [rng.standard_normal((2, 3, 10)), rng.standard_normal((2, 3, 10))])


def test_projection_at_sparsity_0():
    rng = np.random.default_rng(6)
    x, W1, W2 = rng.standard_normal((2, 3, 6)), rng.standard_normal((5, 6)), rng.standard_normal((4, 6))

    def fwd(x, W1, W2):
        return sparse_linear_forward(x, [W1, W2], SparseSpec(0.0))

    def bwd(dys, cache):
        dx, (dW1, dW2) = sparse_linear_backward(dys, cache)
        return dx, dW1, dW2
    check("projection S=0", fwd, bwd, [x, W1, W2])


def test_embedding():
    rng = np.random.default_rng(7)
    idx = np.array([[1, 3, 1], [0, 3, 3]])                       # repeated tokens must sum
    wte = rng.standard_normal((5, 4))
    check("embedding", lambda w: embedding_forward(idx, w), embedding_backward, [wte])


def test_cross_entropy():
    rng = np.random.default_rng(8)
    logits, targets = rng.standard_normal((7, 5)), rng.integers(0, 5, 7)
    check("cross_entropy", lambda z: cross_entropy_forward(z, targets), cross_entropy_backward, [logits])


def test_cross_entropy_with_ignored_targets():
    """Targets of -1 are not counted: the loss is the mean over the others, and the ignored rows
    get no gradient at all."""
    rng = np.random.default_rng(18)
    logits, targets = rng.standard_normal((9, 5)), rng.integers(0, 5, 9)
    targets[[0, 3, 4, 8]] = -1
    check("cross_entropy ignored", lambda z: cross_entropy_forward(z, targets), cross_entropy_backward, [logits])
    loss, cache = cross_entropy_forward(logits.copy(), targets)
    kept = targets != -1
    ref, _ = cross_entropy_forward(logits[kept].copy(), targets[kept])
    assert float(loss) == pytest.approx(float(ref), rel=1e-15)   # the mean over the 5 counted tokens
    dlogits = cross_entropy_backward(1.0, cache)
    assert np.all(dlogits[~kept] == 0)


def test_cross_entropy_with_every_target_ignored_is_zero_not_nan():
    logits, targets = np.random.default_rng(19).standard_normal((4, 5)), np.full(4, -1)
    loss, cache = cross_entropy_forward(logits, targets)
    assert float(loss) == 0.0
    assert np.all(cross_entropy_backward(1.0, cache) == 0)


@pytest.mark.parametrize("activation,extra", [
    ("relu2", {}), ("swiglu", {}),
    # the LLaMA-family options (grouped-query attention, tied head, GGUF rotary layout)
    ("swiglu", dict(n_head=4, n_kv_head=2, tie_embeddings=True, rope_layout="pairs")),
], ids=["relu2", "swiglu", "swiglu-gqa-tied-pairs"])
def test_whole_model_at_sparsity_0(activation, extra):
    shape = dict(vocab_size=7, block_size=6, n_layer=2, n_head=2, n_embd=8, n_hidden=12)
    cfg = model.GPTConfig(**{**shape, **extra}, activation=activation, sparsity=0.0)
    params = model.init_params(cfg, seed=1, dtype=np.float64)
    rng = np.random.default_rng(9)
    for k in params:                                             # larger than 0.02 so every path matters
        params[k] = params[k] + 0.3 * rng.standard_normal(params[k].shape)
    idx, targets = rng.integers(0, 7, (2, 6)), rng.integers(0, 7, (2, 6))
    dloss = 0.7                                                  # a random-ish upstream, not 1

    def f():
        return dloss * float(model.forward(params, cfg, idx, targets)[1])

    _, _, caches = model.forward(params, cfg, idx, targets)
    grads = model.backward(params, cfg, caches, dloss)
    assert set(grads) == set(params)
    for name in params:
        err = rel_error(grads[name], numerical_grad(f, params[name]))
        record(f"model {activation}{' gqa/tied/pairs' if extra else ''} S=0", err)
        assert err <= TOL_MODEL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("extra, needle", [(dict(n_kv_head=3), "n_kv_head=3"), (dict(n_kv_head=-1), "n_kv_head=-1"),
                                           (dict(rope_layout="gptj"), "'gptj'")])
def test_llama_options_bad_values_are_one_sentence(extra, needle):
    with pytest.raises(UsageError, match=needle):
        model.GPTConfig(vocab_size=7, block_size=6, n_layer=1, n_head=4, n_embd=16, **extra)


def test_gqa_and_tied_shapes_and_counts():
    cfg = model.GPTConfig(vocab_size=7, block_size=6, n_layer=2, n_head=4, n_kv_head=1, n_embd=16,
                          n_hidden=32, tie_embeddings=True, sparsity=0.5)
    shapes = model.param_shapes(cfg)
    assert shapes["h.0.attn.wk"] == (4, 16) and shapes["h.0.attn.wv"] == (4, 16) and "lm_head" not in shapes
    assert model.count_params(cfg) == 2 * (16 * 16 * 2 + 2 * 16 * 4 + 3 * 16 * 32)
    assert model.activated_params(cfg) == 2 * (8 * (16 + 8) + 8 * 16 + 8 * 64 + 16 * 16)


# ----------------------------------------------------------------------------------------
# RoPE against the textbook formula (the fast paths are held to these functions in test_fast.py)


def test_rope_half_is_the_half_split_formula_exactly():
    """rope_forward gives exactly the textbook y1 = x1 cos - x2 sin, y2 = x1 sin + x2 cos, and its
    backward the inverse rotation, on the transposed (non-contiguous) layout the model passes it."""
    from minisparse.rope import rope_tables
    x = np.random.default_rng(3).standard_normal((2, 6, 3, 8)).transpose(0, 2, 1, 3)   # (B, H, T, hs)
    y, cache = rope_forward(x, 500.0, offset=2)
    cos, sin = rope_tables(np, 6, 8, 500.0, 2, x.dtype)
    x1, x2 = x[..., :4], x[..., 4:]
    assert np.array_equal(y, np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1))
    d1, d2 = y[..., :4], y[..., 4:]
    assert np.array_equal(rope_backward(y, cache), np.concatenate([d1 * cos + d2 * sin, -d1 * sin + d2 * cos], axis=-1))
    np.testing.assert_allclose(rope_backward(y, cache), x, atol=1e-13)       # the inverse rotation
