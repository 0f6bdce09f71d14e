"""Inference with a key/value cache: each new token costs one position, not the whole prefix.

The same equations as model.forward, for the Tq new tokens at positions pos .. pos+Tq-1:

    q, k, v = sparsify(RMSNorm(x)) @ Wq^T, Wk^T, Wv^T          (B, H, Tq, hs) each
    q, k = RoPE(q, offset=pos), RoPE(k, offset=pos)
    K[:, :, pos:pos+Tq], V[:, :, pos:pos+Tq] = k, v             the cache: (B, H, block_size, hs)
    a = Attention(q, K[:, :, :pos+Tq], V[:, :, :pos+Tq])        query i sees keys <= pos + i

The first call (the prompt, "prefill") passes many tokens; every later call passes one.
`spec` overrides the trained sparsity: SparseSpec(0.0) is the dense fallback, for
inputs unlike the training data. The zeros that reached each projection are counted,
so a caller can report the measured sparsity per site.
"""

from .attention import attention_forward
from .backend import array_module
from .linear import sparse_linear_forward, zero_fraction
from .model import ACTIVATIONS, SITES
from .norm import rmsnorm_forward
from .rope import rope_forward


class KVCache:
    """Keys and values of every layer for positions 0 .. length-1, preallocated to block_size."""

    def __init__(self, cfg, B, xp, dtype):
        hs = cfg.n_embd // cfg.n_head
        shape = (B, cfg.n_head, cfg.block_size, hs)             # (B, H, T_max, hs)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0


class SparsityMeter:
    """Counts the zeros that reached each site's projections, weighted by tokens: a prefill of
    many tokens counts as many tokens, not as one call."""

    def __init__(self):
        self.zeros = {s: 0.0 for s in SITES}
        self.tokens = {s: 0 for s in SITES}

    def add(self, site, cache):
        n = cache[0].shape[0]                                  # tokens in this call (rows of xs)
        self.zeros[site] += zero_fraction(cache) * n
        self.tokens[site] += n

    def mean(self):
        return {s: self.zeros[s] / max(1, self.tokens[s]) for s in SITES}


def decode_forward(params, cfg, idx, kv, spec=None, meter=None):
    """idx (B, Tq) new tokens after kv.length cached ones -> logits (B, Tq, V); kv grows by Tq."""
    B, Tq = idx.shape
    C, H = cfg.n_embd, cfg.n_head
    hs = C // H
    pos = kv.length
    if pos + Tq > cfg.block_size:
        raise ValueError(f"the cache holds {cfg.block_size} positions; {pos} + {Tq} do not fit")
    spec = cfg.spec if spec is None else spec
    act_forward = ACTIVATIONS[cfg.activation][0]
    record = meter.add if meter is not None else (lambda site, cache: None)

    x = params["wte"][idx]                                                  # (B, Tq, C)
    for l in range(cfg.n_layer):
        p = f"h.{l}."
        h, _ = rmsnorm_forward(x, params[p + "attn_norm"], cfg.norm_eps)
        (q, k, v), c = sparse_linear_forward(
            h, [params[p + "attn.wq"], params[p + "attn.wk"], params[p + "attn.wv"]], spec)
        record("qkv", c)
        q, k, v = (t.reshape(B, Tq, H, hs).transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, Tq, hs)
        q, _ = rope_forward(q, cfg.rope_base, offset=pos)
        k, _ = rope_forward(k, cfg.rope_base, offset=pos)
        kv.k[l][:, :, pos:pos + Tq] = k
        kv.v[l][:, :, pos:pos + Tq] = v
        a, _ = attention_forward(q, kv.k[l][:, :, :pos + Tq], kv.v[l][:, :, :pos + Tq])
        a = a.transpose(0, 2, 1, 3).reshape(B, Tq, C)                       # (B, Tq, C)
        (o,), c = sparse_linear_forward(a, [params[p + "attn.wo"]], spec)
        record("o", c)
        x = x + o
        h, _ = rmsnorm_forward(x, params[p + "ffn_norm"], cfg.norm_eps)
        (u, g), c = sparse_linear_forward(h, [params[p + "ffn.w_up"], params[p + "ffn.w_gate"]], spec)
        record("up_gate", c)
        m, _ = act_forward(u, g)
        (f,), c = sparse_linear_forward(m, [params[p + "ffn.w_down"]], spec)
        record("down", c)
        x = x + f
    kv.length = pos + Tq
    h, _ = rmsnorm_forward(x, params["norm_f"], cfg.norm_eps)
    return h @ params["lm_head"].T                                          # (B, Tq, V)


def new_cache(params, cfg, B):
    w = params["wte"]
    return KVCache(cfg, B, array_module(w), w.dtype)
