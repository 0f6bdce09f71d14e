"""Inference with a key/value cache: each new token costs one position, not the whole prefix.

The same equations and the same block loop as training (model.forward), for the Tq new tokens
at positions pos .. pos+Tq-1:

    q, k, v = sparsify(RMSNorm(x)) @ Wq^T, Wk^T, Wv^T          (B, H, Tq, hs) each
    q, k = RoPE(q, offset=pos), RoPE(k, offset=pos)
    K[:, :, pos:pos+Tq], V[:, :, pos:pos+Tq] = k, v             the cache: (B, Hkv, block_size, hs)
    a = Attention(q, K[:, :, :pos+Tq], V[:, :, :pos+Tq])        query i sees keys <= pos + i

The first call (the prompt, "prefill") passes many tokens; every later call passes one.
`spec` overrides the trained sparsity: SparseSpec(0.0) is the dense fallback, for inputs unlike
the training data: the plain product x @ W^T. The zeros that reached each projection are
counted, so a caller can report the measured sparsity per site.

Each projection is the masked product of training (linear.py) unless `fast`, a
fast.decode.DecodeWeights, takes it: then a token reads only the weight rows its input
selected (rowsparse.py), the product where sparsity saves time.
"""

from . import model
from .backend import array_module
from .linear import SparseSpec, sparse_linear_forward, zero_fraction
from .model import REFERENCE, SITE_WEIGHTS, SITES


class KVCache:
    """Keys and values of every layer for positions 0 .. length-1, preallocated to block_size."""

    def __init__(self, cfg, B, xp, dtype):
        hs = cfg.n_embd // cfg.n_head
        shape = (B, cfg.n_kv_head, cfg.block_size, hs)          # (B, Hkv, T_max, hs)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0


def new_cache(params, cfg, B):
    w = params["wte"]
    return KVCache(cfg, B, array_module(w), w.dtype)


class SparsityMeter:
    """Counts the zeros that reached each site's projections, weighted by tokens: a prefill of
    many tokens counts as many tokens, not as one call."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.zeros = {s: 0.0 for s in SITES}
        self.tokens = {s: 0 for s in SITES}

    def add(self, site, n, zero_frac):
        """n tokens reached `site` with this fraction of zeros in their inputs. On the GPU zero_frac
        may be a device scalar: it is summed there, and read (a sync) only by mean()."""
        self.zeros[site] = self.zeros[site] + zero_frac * n
        self.tokens[site] += n

    def mean(self):
        return {s: float(self.zeros[s]) / max(1, self.tokens[s]) for s in SITES}


def decode_forward(params, cfg, idx, kv, spec=None, meter=None, fast=None, ops=REFERENCE, last_only=False):
    """idx (B, Tq) new tokens after kv.length cached ones -> logits (B, Tq, V); kv grows by Tq.
    last_only=True: the last position's logits only, (B, 1, V) (model.forward), all a sampler reads.

    spec: a SparseSpec for every site, or a plan with one per site, plan.spec(l, site) (evaluate.Plan);
    fast: a fast.decode.DecodeWeights of these params, for the row-sparse products; ops: as in
    model.forward."""
    B, Tq = idx.shape
    spec = cfg.spec if spec is None else spec
    spec_of = (lambda l, site: spec) if isinstance(spec, SparseSpec) else spec.spec
    few_rows = fast is not None and B * Tq <= fast.max_rows

    def project(l, site, x):                                            # x (B, Tq, D) -> [y_i]
        spec = spec_of(l, site)
        if few_rows and not spec.dense and (l, site) in fast.wt:
            ys, read = fast.project(l, site, x, spec)
            zero_frac = 1.0 - read / (B * Tq * x.shape[-1]) if meter is not None else None
        else:
            ys, c = sparse_linear_forward(x, [params[f"h.{l}.{n}"] for n in SITE_WEIGHTS[site]], spec, ops.sparsify)
            zero_frac = zero_fraction(c) if meter is not None else None    # counted only if asked
        if meter is not None:
            meter.add(site, B * Tq, zero_frac)
        return ys

    return model.forward(params, cfg, idx, ops=ops, kv=kv, project=project, last_only=last_only)[0]
