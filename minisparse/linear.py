"""The Q-Sparse projection: sparsify the input, then a dense matrix product (Eq. 2-3, 12-13).

    xs = x * Mask,  Mask = TopK(|x|) per token (or N:M blocks)        x, xs: (B, T, C)
    y_i = xs @ W_i^T                   for each weight W_i: (O_i, C),  y_i: (B, T, O_i)

One input can feed several weights (q, k and v share theirs; so do up and gate): it is
sparsified once and every weight sees the same xs. Backward:

    dW_i = dy_i^T @ xs                                                  (O_i, C)
    dxs  = sum_i dy_i @ W_i                                             (B, T, C)
    dx   = dxs            straight-through estimator (Eq. 13)
    dx   = dxs * Mask     with ste=False, the masked-gradient ablation (Eq. 12)

1.58-bit Q-Sparse (Eq. 4-10, quant.py) runs the same lines on quantized operands: with a_bits=8
the kept inputs are quantized to INT8 per token, xs <- Q(xs), after the selection (the largest
|x| is always kept, so gamma is the same as for Q(x) * Mask, and the selection sees no ties
made by rounding); with w_bits=1.58 every weight is ternarized, W_i <- Q_w(W_i), and the
product and the backward use Q_w(W_i). Rounding passes the gradient straight through, so
the backward above is unchanged: dW_i is the latent weight's gradient, and dx flows through
Q(xs) to xs as if it were the identity.

Sparsity 0 and no N:M means dense: no mask is made and x is used as it is.
The forward does not measure sparsity; the spec only says what is asked for (kept() gives the
nominal count). What the paper's Table 2 measures, the fraction of zeros that actually reached
the projection (top-K zeros plus any zeros already in x, e.g. ReLU2's), is computed only when
asked, by zero_fraction(cache), from the xs the forward cached (model.measured_sparsity calls it).
"""

from dataclasses import dataclass

from .backend import array_module
from .errors import UsageError
from .nm import nm_forward
from .quant import BITS, activation_quant_forward, weight_quant_forward
from .topk import kept_count, topk_backward, topk_forward


@dataclass(frozen=True)
class SparseSpec:
    """How a projection computes: its input sparsified by top-K at `sparsity` or N:M with
    nm=(keep, block), and the precision of its input (a_bits) and weights (w_bits)."""
    sparsity: float = 0.0      # fraction of the C inputs zeroed per token; 0 = dense
    nm: tuple = None           # (keep, block) for Block Q-Sparse; overrides sparsity
    ste: bool = True           # straight-through gradient (True) or masked gradient (False)
    a_bits: int = 16           # 16: full precision; 8: INT8 absmax per token (quant.py)
    w_bits: float = 16         # 16: full precision; 1.58: ternary absmean per tensor (quant.py)

    @property
    def dense(self):
        return self.nm is None and self.sparsity == 0.0

    def kept(self, D):
        """The inputs of D a token keeps, nominally: K = topk.kept_count for top-K, D * keep // block
        for N:M (every block keeps `keep`); D when dense."""
        if self.nm is not None:
            return D * self.nm[0] // self.nm[1]
        return kept_count(D, self.sparsity)


def sparsify(x, spec):
    """xs, mask = the sparsified input and its mask (None when dense: x is used as it is)."""
    if spec.nm is not None:
        return nm_forward(x, spec.nm[0], spec.nm[1])
    if spec.sparsity == 0.0:
        return x, None
    return topk_forward(x, kept_count(x.shape[-1], spec.sparsity))


def check_bits(a_bits, w_bits):
    """Raise UsageError unless the precisions are ones a projection can run in (quant.BITS)."""
    for name, value in (("a_bits", a_bits), ("w_bits", w_bits)):
        if value not in BITS[name]:
            raise UsageError(f"{name}={value!r} is not allowed: use {' or '.join(map(str, BITS[name]))}.")


def quantized_input(x, spec, sparsify=sparsify):
    """xs, mask: x sparsified, then quantized to INT8 per token if spec.a_bits == 8."""
    xs, mask = sparsify(x, spec)
    if spec.a_bits == 8:
        xs = activation_quant_forward(xs)[0]                    # after the selection (see above)
    return xs, mask


def quantized_weights(weights, spec):
    """[W_i], each ternarized (per tensor) if spec.w_bits == 1.58; the latent W_i are not changed."""
    if spec.w_bits == 1.58:
        return [weight_quant_forward(W)[0] for W in weights]
    return list(weights)


def sparse_linear_forward(x, weights, spec=SparseSpec(), sparsify=sparsify):
    """x (B, T, C), weights [W_i (O_i, C)] -> ([y_i (B, T, O_i)], cache).

    sparsify: this module's `sparsify`, or a faster function equal to it (model.Ops)."""
    B, T, C = x.shape
    xs, mask = quantized_input(x, spec, sparsify)               # (B, T, C)
    weights = quantized_weights(weights, spec)                  # what the product multiplies
    xs2 = xs.reshape(B * T, C)                                  # (N, C): one BLAS call per weight
    ys = [(xs2 @ W.T).reshape(B, T, W.shape[0]) for W in weights]
    cache = (xs2, mask, weights, spec)
    return ys, cache


def zero_fraction(cache):
    """The measured sparsity of a forward: the fraction of zeros in the xs it cached, a Python float.
    Counted only when asked (a pass over xs that the step itself does not need)."""
    xs2 = cache[0]
    # NumPy counts the nonzeros of a bool array several times faster than those of a float one
    return 1.0 - int(array_module(xs2).count_nonzero(xs2 != 0)) / xs2.size


def sparse_linear_backward(dys, cache):
    """[dy_i (B, T, O_i)] -> (dx (B, T, C), [dW_i (O_i, C)])."""
    xs2, mask, weights, spec = cache
    N, C = xs2.shape
    dW = []
    dxs2 = None
    for dy, W in zip(dys, weights):
        dy2 = dy.reshape(N, W.shape[0])                         # (N, O_i)
        dW.append(dy2.T @ xs2)                                  # y = xs W^T  ->  dW = dy^T xs
        d = dy2 @ W                                             #             ->  dxs = dy W
        dxs2 = d if dxs2 is None else dxs2 + d
    dxs = dxs2.reshape(dys[0].shape[:-1] + (C,))                # (B, T, C); through Q(xs) by the STE
    return topk_backward(dxs, mask, spec.ste), dW               # dW: Q_w(W)'s gradient is W's (STE)
