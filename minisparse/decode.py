"""Inference with a key/value cache: each new token costs one position, not the whole prefix.

The same equations as model.forward, for the Tq new tokens at positions pos .. pos+Tq-1:

    q, k, v = sparsify(RMSNorm(x)) @ Wq^T, Wk^T, Wv^T          (B, H, Tq, hs) each
    q, k = RoPE(q, offset=pos), RoPE(k, offset=pos)
    K[:, :, pos:pos+Tq], V[:, :, pos:pos+Tq] = k, v             the cache: (B, H, block_size, hs)
    a = Attention(q, K[:, :, :pos+Tq], V[:, :, :pos+Tq])        query i sees keys <= pos + i

The first call (the prompt, "prefill") passes many tokens; every later call passes one.
`spec` overrides the trained sparsity: SparseSpec(0.0) is the dense fallback, for
inputs unlike the training data: it is the plain product x @ W^T. The zeros that reached
each projection are counted, so a caller can report the measured sparsity per site.

Where the saving is real (rowsparse.py): with `fast = DecodeWeights(params, cfg)`, each
sparsified projection of a call with at most `fast.max_rows` tokens reads only the rows of
its input-major weight Wt = [W_1^T ... W_n^T] that its input selected:

    xs = sparsify(x)            one token: (D,)
    idx = nonzero(xs)           the top-K (or N:M) indices, less any that were already 0 (ReLU2's)
    y = xs[idx] @ Wt[idx]       (sum O_i,), then split into y_1 .. y_n

Prefill batches (more tokens than max_rows) take the masked dense product, as training does.
"""

import numpy as np

from .attention import attention_forward
from .backend import array_module
from .linear import sparse_linear_forward, zero_fraction
from .model import ACTIVATIONS, SITES, head_weight, repeat_kv
from .norm import rmsnorm_forward
from .rope import rope_forward
from .rowsparse import best_method, input_major, nm_rows_matvec, topk_rows_matvec
from .topk import kept_count

# the weights of each site's projection, in the order their outputs are used
SITE_WEIGHTS = {"qkv": ("attn.wq", "attn.wk", "attn.wv"), "o": ("attn.wo",),
                "up_gate": ("ffn.w_up", "ffn.w_gate"), "down": ("ffn.w_down",)}


class KVCache:
    """Keys and values of every layer for positions 0 .. length-1, preallocated to block_size."""

    def __init__(self, cfg, B, xp, dtype):
        hs = cfg.n_embd // cfg.n_head
        shape = (B, cfg.n_kv_head, cfg.block_size, hs)          # (B, Hkv, T_max, hs)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0


class SparsityMeter:
    """Counts the zeros that reached each site's projections, weighted by tokens: a prefill of
    many tokens counts as many tokens, not as one call."""

    def __init__(self):
        self.zeros = {s: 0.0 for s in SITES}
        self.tokens = {s: 0 for s in SITES}

    def add(self, site, n, zero_frac):
        """n tokens reached `site` with this fraction of zeros in their inputs. On the GPU zero_frac
        may be a device scalar: it is summed there, and read (a sync) only by mean()."""
        self.zeros[site] = self.zeros[site] + zero_frac * n
        self.tokens[site] += n

    def mean(self):
        return {s: float(self.zeros[s]) / max(1, self.tokens[s]) for s in SITES}


AUTO_MIN_WEIGHTS = 2 ** 17       # 'auto' on the CPU: the fewest weights (D x sum O_i) where numba pays


class DecodeWeights:
    """Sparsified projections' weights stored input-major, Wt (D, sum O_i), for rowsparse.

    A copy: it doubles those weights' memory while decoding. `method` picks the row-sparse kernel
    (rowsparse.METHODS). 'auto' takes it only where it was measured to pay (2-core Xeon):
      - on the CPU, numba's kernel for projections of at least AUTO_MIN_WEIGHTS weights; smaller
        ones, and every one without numba, keep the masked product (self.wt leaves them out).
        Below 2^17 weights numba's call costs about what it saves (D = 128, O = 384: 24 us against
        23 for the masked product), and generate.py then runs BLAS on one thread throughout
        (rowsparse.quiet_blas): the trained tiny model (n_embd 128) decoded 600 tokens/s
        row-sparse against 800 masked, taking turns in one process. NumPy's row gathers were
        slower than the masked product at every size: 'chunked' at 0.20-0.35x of dense at
        S = 0.5 and 0.41-0.69x at 0.75, D = 1024-4096;
      - on the GPU, the CUDA kernels for every projection (the tiny model: 91 tokens/s against 55).
    A named method takes every projection, as the tests and benchmarks need."""

    def __init__(self, params, cfg, method="auto", max_rows=4):
        xp = array_module(params["wte"])
        auto_cpu = method == "auto" and xp is np
        self.max_rows = max_rows
        self.method = best_method() if auto_cpu else method
        self.wt = {}                           # (layer, site) -> (Wt, [O_i]); absent: the masked product
        for l in range(cfg.n_layer):
            for site, names in SITE_WEIGHTS.items():
                Ws = [params[f"h.{l}.{n}"] for n in names]
                n_weights = Ws[0].shape[1] * sum(W.shape[0] for W in Ws)          # D x sum O_i
                if auto_cpu and (self.method != "numba" or n_weights < AUTO_MIN_WEIGHTS):
                    continue                   # the masked product is as fast or faster here (above)
                self.wt[l, site] = (input_major(Ws), [W.shape[0] for W in Ws])
        # compile the kernels now, not in the first token, so that a decode's time is the decode's:
        # CUDA once per input width D (NVRTC takes about a second each); numba once (its first call
        # loads the compiled kernel from its cache and starts its threads: 0.4 s, where the trained
        # tiny model decodes 200 tokens in 0.2 s)
        warm = list({wt.shape[0]: wt for wt, _ in self.wt.values()}.values())   # one Wt per input width
        if xp is np:
            warm = warm[:1] if self.method == "numba" else []
        for wt in warm:
            topk_rows_matvec(xp.zeros(wt.shape[0], dtype=wt.dtype), 1, wt, self.method)


def _rowsparse_projection(x, wt, sizes, spec, method):
    """x (B, T, D) -> [y_i (B, T, O_i)], rows read: each token reads only its selected rows of wt.
    The count of rows read is an int, or on the GPU a device scalar (reading it would sync)."""
    B, T, D = x.shape
    xp = array_module(x)
    xs = x.reshape(B * T, D)                                            # (N, D)
    k = kept_count(D, spec.sparsity)

    def select(row):                           # (D,) -> y (O,), rows read
        if spec.nm is None:                    # top-K: the kept positions straight from |x| (topk.py)
            return topk_rows_matvec(row, k, wt, method)
        return nm_rows_matvec(row, spec.nm[0], spec.nm[1], wt, method)   # N:M: per block (nm.py)
    if B * T == 1:                             # one token, the usual decode step: no copy, no sum
        y, nonzero = select(xs[0])
        y = y[None]
    else:                                      # each token its own rows (GPU: no sync for top-K)
        y = xp.empty((B * T, wt.shape[1]), dtype=x.dtype)
        nonzero = 0
        for n in range(B * T):
            y[n], read = select(xs[n])
            nonzero = nonzero + read
    ys, start = [], 0
    for O in sizes:
        ys.append(y[:, start:start + O].reshape(B, T, O))
        start += O
    return ys, nonzero


def decode_forward(params, cfg, idx, kv, spec=None, meter=None, fast=None):
    """idx (B, Tq) new tokens after kv.length cached ones -> logits (B, Tq, V); kv grows by Tq.

    fast: a DecodeWeights of these params, to read only the selected weight rows (see above)."""
    B, Tq = idx.shape
    C, H, Hkv = cfg.n_embd, cfg.n_head, cfg.n_kv_head
    hs = C // H
    pos = kv.length
    if pos + Tq > cfg.block_size:
        raise ValueError(f"the cache holds {cfg.block_size} positions; {pos} + {Tq} do not fit")
    spec = cfg.spec if spec is None else spec
    act_forward = ACTIVATIONS[cfg.activation][0]
    rowsparse = fast is not None and not spec.dense and B * Tq <= fast.max_rows

    def project(l, site, x):
        if rowsparse and (l, site) in fast.wt:
            ys, read = _rowsparse_projection(x, *fast.wt[l, site], spec, fast.method)
            zero_frac = 1.0 - read / (B * Tq * x.shape[-1]) if meter is not None else None
        else:
            ys, c = sparse_linear_forward(x, [params[f"h.{l}.{n}"] for n in SITE_WEIGHTS[site]], spec)
            zero_frac = zero_fraction(c) if meter is not None else None    # counted only if asked
        if meter is not None:
            meter.add(site, B * Tq, zero_frac)
        return ys

    x = params["wte"][idx]                                                  # (B, Tq, C)
    for l in range(cfg.n_layer):
        p = f"h.{l}."
        h, _ = rmsnorm_forward(x, params[p + "attn_norm"], cfg.norm_eps)
        q, k, v = project(l, "qkv", h)
        q = q.reshape(B, Tq, H, hs).transpose(0, 2, 1, 3)                  # (B, H, Tq, hs)
        k, v = (t.reshape(B, Tq, Hkv, hs).transpose(0, 2, 1, 3) for t in (k, v))   # (B, Hkv, Tq, hs)
        q, _ = rope_forward(q, cfg.rope_base, offset=pos, layout=cfg.rope_layout)
        k, _ = rope_forward(k, cfg.rope_base, offset=pos, layout=cfg.rope_layout)
        kv.k[l][:, :, pos:pos + Tq] = k
        kv.v[l][:, :, pos:pos + Tq] = v
        a, _ = attention_forward(q, repeat_kv(kv.k[l][:, :, :pos + Tq], H // Hkv),
                                 repeat_kv(kv.v[l][:, :, :pos + Tq], H // Hkv))
        a = a.transpose(0, 2, 1, 3).reshape(B, Tq, C)                       # (B, Tq, C)
        (o,) = project(l, "o", a)
        x = x + o
        h, _ = rmsnorm_forward(x, params[p + "ffn_norm"], cfg.norm_eps)
        u, g = project(l, "up_gate", h)
        m, _ = act_forward(u, g)
        (f,) = project(l, "down", m)
        x = x + f
    kv.length = pos + Tq
    h, _ = rmsnorm_forward(x, params["norm_f"], cfg.norm_eps)
    return h @ head_weight(params, cfg).T                                   # (B, Tq, V)


def new_cache(params, cfg, B):
    w = params["wte"]
    return KVCache(cfg, B, array_module(w), w.dtype)
