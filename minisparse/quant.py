"""Quantization for 1.58-bit Q-Sparse: INT8 activations and ternary weights (Q-Sparse Sec. 2.3,
Eq. 4-10; BitNet b1.58). docs/qsparse.md, Sec. 5.

    RoundClip(x, a, b) = min(max(round(x), a), b)                          (Eq. 7)

Activations, absmax INT8 per token (8 bits), along the channel axis:

    gamma = max_c |x|                                       x: (N, C),  gamma: (N, 1)
    q  = RoundClip(127 / (gamma + eps) * x, -128, 127)      (Eq. 5-6)   integers in [-127, 127]
    xq = q * (gamma + eps) / 127                            (N, C): what the product multiplies

Weights, absmean ternary per tensor (1.58 bits: log2 3):

    alpha = mean |W|                                        W: (O, C),  alpha: scalar
    w  = RoundClip(W / (alpha + eps), -1, 1)                (Eq. 8-10)  in {-1, 0, 1}
    Wq = w * (alpha + eps)                                  (O, C)

`round` rounds halves to even, as NumPy and PyTorch do (2.5 -> 2, 3.5 -> 4). Dequantizing by the
same scale that quantized (gamma + eps, not gamma) maps the largest |x| back to itself; the paper
writes the rescale as gamma / 127 and alpha, which differs from this by eps only. An all-zero row
(or tensor) gives gamma = 0 (alpha = 0) and quantizes to zeros, not NaN. The largest |x| maps to
round(127 gamma / (gamma + eps)): that is 127 exactly only when 127 gamma / (gamma + eps) > 126.5,
i.e. gamma > 253 eps = 2.53e-3; a row with a smaller gamma uses fewer codes (gamma = 1e-4: 115).
Either way activations never clip and -128 is never reached; weights clip wherever
|W| > 1.5 alpha.

Backward: rounding has zero derivative almost everywhere, so training passes the gradient
straight through it (the STE, as for top-K): dx = dxq, dW = dWq. The latent W stays in full
precision for AdamW; only the forward sees Wq.
"""

from .backend import array_module

EPS = 1e-5                 # keeps the scale finite for an all-zero row or tensor
BITS = {"a_bits": (16, 8), "w_bits": (16, 1.58)}      # the precisions a projection can run in


def round_clip(x, a, b):
    """min(max(round(x), a), b), rounding halves to even (Eq. 7)."""
    xp = array_module(x)
    return xp.clip(xp.round(x), a, b)


def quantize_activations(x):
    """x (..., C) -> (q, scale): q the INT8 codes as floats, scale (..., 1) = 127 / (gamma + eps);
    xq = q / scale."""
    xp = array_module(x)
    gamma = xp.abs(x).max(axis=-1, keepdims=True)              # (N, 1)
    scale = 127.0 / (gamma + EPS)                              # (N, 1)
    return round_clip(x * scale, -128, 127), scale


def activation_quant_forward(x):
    """xq = Q(x) dequantized (..., C). Returns (xq, None): the STE backward needs nothing."""
    q, scale = quantize_activations(x)
    return q / scale, None


def quantize_weights(W):
    """W (O, C) -> (w, scale): w the ternary codes {-1, 0, 1} as floats, scale = 1 / (alpha + eps);
    Wq = w / scale."""
    xp = array_module(W)
    scale = 1.0 / (xp.abs(W).mean() + EPS)                     # 0-d
    return round_clip(W * scale, -1, 1), scale


def weight_quant_forward(W):
    """Wq = Q_w(W) dequantized (O, C). Returns (Wq, None): the STE backward needs nothing."""
    w, scale = quantize_weights(W)
    return w / scale, None


def quant_backward(dq, cache=None):
    """Straight through the rounding: dx = dxq (and dW = dWq)."""
    return dq
