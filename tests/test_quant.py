"""The quantizers of 1.58-bit Q-Sparse (minisparse/quant.py) against their definitions, entry by
entry: rounding halves to even, clipping, all-zero rows and tensors, eps; the straight-through
estimator through them by its definition; and the quantized projection and decode against the
masked forward. (The whole 1.58-bit model against PyTorch is in test_torch_reference.py.)"""

import math

import numpy as np
import pytest

from minisparse import model, quant
from minisparse.decode import SparsityMeter, decode_forward, new_cache
from minisparse.errors import UsageError
from minisparse.fast import ternary as fast_ternary
from minisparse.fast.decode import DecodeWeights
from minisparse.ternary import TernaryWeights
from minisparse.linear import SparseSpec, sparse_linear_backward, sparse_linear_forward


def py_round_half_even(v):
    """Python's round() rounds halves to even, independently of NumPy."""
    return float(round(v))


def test_round_clip_rounds_halves_to_even_and_clips():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 200.0, -128.5, -300.0, 0.49999])
    got = quant.round_clip(x, -128, 127)
    want = [min(max(py_round_half_even(v), -128), 127) for v in x]
    assert got.tolist() == want == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0, 127.0, 127.0, -128.0, -128.0, 0.0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_activation_quantizer_is_its_definition(dtype):
    """q = RoundClip(127 / (gamma + eps) x, -128, 127), gamma = max|x| per row, computed here one
    entry at a time in Python floats: every code equal; the largest |x| maps to +-127."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((4, 12)) * 3, np.zeros((1, 12)),        # an all-zero row
                        np.full((1, 12), 1e-7), rng.standard_normal((1, 12)) * 1e-6]).astype(dtype)
    q, scale = quant.quantize_activations(x)
    for r, row in enumerate(x.astype(np.float64)):
        gamma = max(abs(v) for v in row)
        s = 127.0 / (gamma + quant.EPS)
        assert scale[r, 0] == pytest.approx(s, rel=1e-6)
        want = [min(max(py_round_half_even(float(np.asarray(v * scale[r, 0], dtype))), -128), 127) for v in x[r]]
        assert q[r].tolist() == want, r
    assert np.abs(q[:4]).max(axis=-1).tolist() == [127.0] * 4         # the largest |x| is 127: no clipping
    assert not q[4].any() and not np.isnan(q).any()                      # all zero: zeros, not NaN
    # eps: gamma = 1e-7 is far below eps, so the scale is ~127 / 1e-5 and the codes stay small
    assert q[5].tolist() == [round(1e-7 * 127 / (1e-7 + 1e-5))] * 12 == [1.0] * 12
    xq, cache = quant.activation_quant_forward(x)
    np.testing.assert_allclose(xq, q / scale, rtol=0, atol=0)
    assert cache is None


def test_activation_quantizer_ties_at_half_round_to_even():
    """127 / (gamma + eps) x lands exactly on .5 for these entries (gamma chosen so the scale is a
    power of two): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2."""
    scale = 2.0
    gamma = 127.0 / scale - quant.EPS                       # so that 127 / (gamma + eps) == 2 exactly
    assert 127.0 / (gamma + quant.EPS) == scale
    x = np.array([[gamma, 0.25, 0.75, 1.25, -0.25, -0.75]])
    q, s = quant.quantize_activations(x)
    assert s[0, 0] == scale
    assert q.tolist() == [[127.0, 0.0, 2.0, 2.0, -0.0, -2.0]]


def test_largest_activation_maps_to_127_only_above_the_documented_gamma():
    """The docstring's threshold is the code's: the largest |x| of a row is code 127 just above
    gamma = 253 eps = 2.53e-3 and 126 just below it (the eps in the scale); far below, fewer codes."""
    import re
    m = re.search(r"gamma > 253 eps = ([0-9.e-]+)", quant.__doc__)
    assert m, "quant.py's docstring must say when the largest |x| maps to 127"
    g = float(m.group(1))
    assert g == pytest.approx(253 * quant.EPS, rel=1e-12)
    for gamma, code in ((g * (1 + 1e-6), 127), (g * (1 - 1e-6), 126), (1e-4, 115), (1.0, 127)):
        q, _ = quant.quantize_activations(np.array([[gamma, -gamma / 3, 0.0]]))
        assert q[0, 0] == code and np.abs(q).max() <= 127, (gamma, q)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_weight_quantizer_is_its_definition(dtype):
    """w = RoundClip(W / (alpha + eps), -1, 1), alpha = mean|W| over the whole tensor: ternary,
    clipped beyond 1.5 alpha, halves (|W| = alpha / 2) to 0, an all-zero tensor to zeros."""
    rng = np.random.default_rng(1)
    W = (rng.standard_normal((6, 10)) * 0.02).astype(dtype)
    w, scale = quant.quantize_weights(W)
    alpha = float(np.abs(W.astype(np.float64)).mean())
    assert float(scale) == pytest.approx(1.0 / (alpha + quant.EPS), rel=1e-6)
    want = [[min(max(py_round_half_even(float(np.asarray(v * scale, dtype))), -1), 1) for v in row] for row in W]
    assert w.tolist() == want
    assert set(np.unique(w).tolist()) <= {-1.0, 0.0, 1.0} and (w != 0).any() and (w == 0).any()
    # exact halves: W / (alpha + eps) = +-0.5 -> 0, +-1.5 -> +-2 -> clipped to +-1
    W2 = np.array([[1.0, -1.0, 3.0, -3.0]])                 # alpha = 2, scale = 1 / (2 + eps)
    w2, s2 = quant.quantize_weights(W2)
    assert w2.tolist() == [[0.0, -0.0, 1.0, -1.0]]          # 0.49999.. rounds to 0, 1.4999.. to 1
    Z = np.zeros((3, 4), dtype=dtype)
    wz, sz = quant.quantize_weights(Z)
    assert not wz.any() and math.isfinite(float(sz))
    Wq, cache = quant.weight_quant_forward(W)
    np.testing.assert_array_equal(Wq, w / scale)
    assert cache is None


@pytest.mark.parametrize("spec", [SparseSpec(0.5, a_bits=8, w_bits=1.58), SparseSpec(0.0, a_bits=8, w_bits=1.58),
                                  SparseSpec(0.0, nm=(2, 4), a_bits=8, w_bits=16),
                                  SparseSpec(0.25, ste=False, a_bits=8, w_bits=1.58)], ids=str)
def test_quantized_projection_and_its_straight_through_backward(spec):
    """Forward: y = Q(x * Mask) @ Q_w(W)^T with the quantizers above. Backward by the STE's
    definition: dW = dy^T @ Q(x * Mask) (the latent W's gradient is Q_w(W)'s), and
    dx = dy @ Q_w(W), times the mask only for the masked-gradient ablation."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 16))
    W = rng.standard_normal((6, 16)) * 0.1
    (y,), cache = sparse_linear_forward(x, [W], spec)
    from minisparse.linear import sparsify
    xs, mask = sparsify(x, spec)
    xq = quant.activation_quant_forward(xs)[0]
    Wq = quant.weight_quant_forward(W)[0] if spec.w_bits == 1.58 else W
    np.testing.assert_array_equal(y, (xq.reshape(10, 16) @ Wq.T).reshape(2, 5, 6))
    dy = rng.standard_normal(y.shape)
    dx, (dW,) = sparse_linear_backward([dy], cache)
    np.testing.assert_allclose(dW, dy.reshape(10, 6).T @ xq.reshape(10, 16), rtol=1e-13, atol=1e-14)
    want = dy @ Wq
    np.testing.assert_allclose(dx, want if spec.ste else want * mask, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("a_bits,w_bits", [(8, 3), (4, 1.58), ("8", 16)])
def test_impossible_bits_are_one_sentence(a_bits, w_bits):
    with pytest.raises(UsageError, match="bits"):
        model.GPTConfig(a_bits=a_bits, w_bits=w_bits)


@pytest.mark.parametrize("method", ["gather", "chunked"] + (["numba"] if fast_ternary.numba else []))
@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4)), (0.0, None)])
def test_158_bit_decode_equals_the_full_forward(method, sparsity, nm):
    """Decoding a 1.58-bit model with the key/value cache, masked or from its packed 2-bit weights
    (row-sparse), gives the full forward's logits, and counts the same zeros."""
    cfg = model.GPTConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=32, sparsity=sparsity, nm=nm,
                          a_bits=8, w_bits=1.58)
    params = model.init_params(cfg, seed=4, dtype=np.float64)
    idx = np.random.default_rng(5).integers(0, 13, (1, 10))
    full = model.forward(params, cfg, idx)[0]
    fast = None if sparsity == 0.0 and nm is None else DecodeWeights(params, cfg, method)
    if fast is not None:                                      # 2 bits a weight: D x O / 4 bytes
        tw, sizes = fast.wt[0, "qkv"]
        assert isinstance(tw, TernaryWeights) and tw.packed.dtype == np.uint8 and tw.packed.shape == (32, 96 // 4)
    kv, meter = new_cache(params, cfg, 1), SparsityMeter()
    pieces = [decode_forward(params, cfg, idx[:, :4], kv, meter=meter, fast=fast)]
    for t in range(4, 10):
        pieces.append(decode_forward(params, cfg, idx[:, t:t + 1], kv, meter=meter, fast=fast))
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, rtol=1e-10, atol=1e-10)
    caches = model.forward(params, cfg, idx)[2]
    want = model.mean_sparsity(cfg, caches)
    for site, frac in meter.mean().items():
        assert frac == pytest.approx(want[site], abs=1e-12), site
