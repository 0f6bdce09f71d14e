"""The Q-Sparse GPT: a LLaMA-style decoder whose every projection input is sparsified.

    x = wte[idx]                                                  (B, T, C)
    for each of the L blocks:
        h = RMSNorm(x)
        q, k, v = sparsify(h) @ Wq^T, Wk^T, Wv^T                  site "qkv"      (B, T, C) each
        q, k = RoPE(q), RoPE(k)                                   per head        (B, H, T, hs)
        a = Attention(q, k, v)                                                    (B, T, C)
        x = x + sparsify(a) @ Wo^T                                site "o"
        h = RMSNorm(x)
        u, g = sparsify(h) @ Wup^T, Wgate^T                       site "up_gate"  (B, T, Hd) each
        m = u * ReLU2(g)            (or u * SiLU(g))              Eq. 11          (B, T, Hd)
        x = x + sparsify(m) @ Wdown^T                             site "down"
    logits = RMSNorm(x) @ lm_head^T                               dense head      (B, T, V)
    loss = cross_entropy(logits, targets)

LLaMA-family options, for pretrained models (docs/qsparse.md, Sec. 9): with n_kv_head < n_head,
grouped-query attention gives k and v only n_kv_head heads (Wk, Wv: (n_kv_head * hs, C)),
each shared by n_head / n_kv_head query heads (repeat_kv; its backward sums over the group);
tie_embeddings uses wte as the LM head, so wte's gradient is the sum of both uses;
rope_layout "pairs" rotates adjacent channels, the layout of GGUF files' q and k.

The architecture and sparsity are a GPTConfig (config.py), also reachable as model.GPTConfig.
Only the four projection inputs are sparsified (docs/qsparse.md, Sec. 1); the embedding, the
residual stream and the LM head stay dense. With a_bits=8 and w_bits=1.58 those projections run
1.58-bit Q-Sparse: INT8 inputs and ternary weights (linear.py, quant.py; Sec. 5). Parameters live in a dict with readable
names; `forward` returns the loss and the caches, `backward` returns a dict of
gradients with the same keys. The residual stream is the one place a tensor feeds two
paths, and its gradients are summed with a visible `+=`.

N counts the projection weights (embedding, head and norm gains left out, as in the
paper); N_a counts the weights a token actually multiplies: for each projection, the
kept inputs times its outputs.

`forward` is also the decoder's: given a key/value cache (decode.py), the new tokens take the
next positions, their keys and values are appended to the cache, and attention reads all of it.

Every op is the readable function of its concept file by default (REFERENCE). `ops=fast.FAST`
runs the faster functions of minisparse/fast/, each tested equal to its reference: one visible
argument, remembered in the caches so that backward uses the same.
"""

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import backend
from .backend import array_module
from .attention import attention_backward, attention_forward
from .config import GATES, GPTConfig  # noqa: F401  (model.GPTConfig: the name lessons and programs use)
from .embedding import embedding_backward, embedding_forward
from .errors import UsageError
from .linear import sparse_linear_backward, sparse_linear_forward, sparsify, zero_fraction
from .loss import cross_entropy_backward, cross_entropy_forward
from .norm import rmsnorm_backward, rmsnorm_forward
from .relu2 import relu2glu_backward, relu2glu_forward
from .rope import rope_backward, rope_forward, rotate
from .swiglu import swiglu_backward, swiglu_forward

SITES = ("qkv", "o", "up_gate", "down")
# the weights of each site's projection, in the order their outputs are used
SITE_WEIGHTS = {"qkv": ("attn.wq", "attn.wk", "attn.wv"), "o": ("attn.wo",),
                "up_gate": ("ffn.w_up", "ffn.w_gate"), "down": ("ffn.w_down",)}
ACTIVATIONS = {"relu2": (relu2glu_forward, relu2glu_backward),
               "swiglu": (swiglu_forward, swiglu_backward)}
assert tuple(ACTIVATIONS) == GATES                  # the gates GPTConfig (config.py) accepts


# ----------------------------------------------------------------------------------------
# parameters


def param_shapes(cfg):
    """Every parameter's name and shape, in a fixed order."""
    C, Hd, V = cfg.n_embd, cfg.n_hidden, cfg.vocab_size
    Ckv = cfg.n_kv_head * (C // cfg.n_head)                  # key/value width: fewer heads with GQA
    shapes = {"wte": (V, C)}
    for l in range(cfg.n_layer):
        p = f"h.{l}."
        shapes.update({p + "attn_norm": (C,), p + "attn.wq": (C, C), p + "attn.wk": (Ckv, C),
                       p + "attn.wv": (Ckv, C), p + "attn.wo": (C, C), p + "ffn_norm": (C,),
                       p + "ffn.w_up": (Hd, C), p + "ffn.w_gate": (Hd, C), p + "ffn.w_down": (C, Hd)})
    shapes["norm_f"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (V, C)
    return shapes


def init_params(cfg, seed=0, dtype=np.float32):
    """Normal(0, 0.02) weights, the residual outputs (wo, w_down) scaled by 1/sqrt(2L) as in GPT-2,
    norm gains 1. Made with NumPy from `seed`, then put on the chosen device."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm") or name == "norm_f":
            w = np.ones(shape)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("wo", "w_down")) else 0.02
            w = rng.normal(0.0, std, size=shape)
        params[name] = backend.asarray(w, dtype=dtype)
    return params


def is_norm(name):
    """Norm gains get no weight decay."""
    return name.endswith("norm") or name == "norm_f"


def count_params(cfg):
    """N: the projection weights of the blocks (embedding, head and norms left out, as the paper does)."""
    C, Hd, Ckv = cfg.n_embd, cfg.n_hidden, cfg.n_kv_head * (cfg.n_embd // cfg.n_head)
    return cfg.n_layer * (2 * C * C + 2 * C * Ckv + 3 * C * Hd)


def site_dims(cfg):
    """Each site's (D inputs, O outputs summed over the weights that share its input)."""
    C, Hd, Ckv = cfg.n_embd, cfg.n_hidden, cfg.n_kv_head * (cfg.n_embd // cfg.n_head)
    return {"qkv": (C, C + 2 * Ckv), "o": (C, C), "up_gate": (C, 2 * Hd), "down": (Hd, C)}


def activated_params(cfg, measured=None):
    """N_a per token: for every projection, (inputs that reach it) x (its outputs).

    Without `measured`, the nominal count from K (top-K) or keep/block (N:M). With
    `measured` (from `measured_sparsity`), the measured nonzero fraction at each site,
    which also counts ReLU2's natural zeros at the down projection."""
    total = 0.0
    for l in range(cfg.n_layer):
        for site, (D, O) in site_dims(cfg).items():
            kept = (1.0 - measured[l][site]) * D if measured is not None else cfg.spec.kept(D)
            total += kept * O
    return int(round(total))


# ----------------------------------------------------------------------------------------
# forward and backward


def head_weight(params, cfg):
    """The LM head's weight (V, C): its own, or the token embedding when tied."""
    return params["wte"] if cfg.tie_embeddings else params["lm_head"]


def repeat_kv(k, groups):
    """Grouped-query attention: (B, Hkv, T, hs) -> (B, Hkv * groups, T, hs); query head h reads
    key/value head h // groups (LLaMA's repeat_kv)."""
    if groups == 1:
        return k
    return array_module(k).repeat(k, groups, axis=1)


def repeat_kv_backward(dk, groups):
    """(B, H, T, hs) -> (B, H / groups, T, hs): each key/value head sums the gradients of its queries."""
    if groups == 1:
        return dk
    B, H, T, hs = dk.shape
    return dk.reshape(B, H // groups, groups, T, hs).sum(axis=2)


@dataclass(frozen=True)
class Ops:
    """Which function computes each op: REFERENCE, the readable functions of the concept files,
    or fast.FAST, faster functions equal to them (minisparse/fast/, tests/test_fast.py)."""
    name: str
    sparsify: Callable = sparsify                       # linear.sparsify: (x, spec) -> (xs, mask)
    rotate: Callable = rotate                           # rope.rotate: (x, cos, sin, layout) -> y
    rmsnorm_forward: Callable = rmsnorm_forward         # norm.py: (x, g, eps) -> (y, cache)
    rmsnorm_backward: Callable = rmsnorm_backward       # norm.py: (dy, cache) -> (dx, dg)
    embedding_backward: Callable = embedding_backward   # embedding.py: (dx, cache) -> dwte


REFERENCE = Ops("reference")


def forward(params, cfg, idx, targets=None, ops=REFERENCE, kv=None, project=None, keep_caches=True,
            last_only=False):
    """idx (B, T) ints -> (logits (B, T, V), loss or None, caches for backward).

    ops: REFERENCE or fast.FAST (see Ops).
    kv: a decode.KVCache, to decode: the T new tokens take the positions kv.length .. kv.length+T-1,
        their keys and values are appended to the cache, attention reads all of it, and no layer
        caches are kept (backward cannot be run).
    project: (l, site, x) -> [y_i], the projections of site `site` in layer l, for a decoder that
        computes them another way (decode.py); default: sparse_linear_forward with cfg.spec.
    keep_caches=False: an inference forward; each layer's caches are dropped when the next layer
        starts (backward cannot be run), so only one layer's activations are alive at a time.
    last_only=True: the logits of the last position only, (B, 1, V), for a decoder that samples the
        next token: the head's product (V x C multiply-adds a position) is skipped at the others."""
    B, T = idx.shape
    if last_only and targets is not None:
        raise ValueError("last_only=True gives no logits for the loss's other positions")
    pos = 0 if kv is None else kv.length
    if pos + T > cfg.block_size:
        raise UsageError(f"sequence length {pos + T} is longer than block_size={cfg.block_size}"
                         + (f" (the cache holds {pos} positions, {T} more do not fit)." if pos else "."))
    C, H, Hkv = cfg.n_embd, cfg.n_head, cfg.n_kv_head
    hs = C // H
    spec = cfg.spec
    act_forward = ACTIVATIONS[cfg.activation][0]
    caches = {"ops": ops}

    def linear(l, site, x):                                               # -> [y_i], cache
        if project is not None:
            return project(l, site, x), None
        return sparse_linear_forward(x, [params[f"h.{l}.{n}"] for n in SITE_WEIGHTS[site]], spec, ops.sparsify)

    x, caches["wte"] = embedding_forward(idx, params["wte"])            # (B, T, C)
    for l in range(cfg.n_layer):
        p = f"h.{l}."
        c = {}
        if kv is None and keep_caches:
            caches[l] = c
        # attention
        h, c["attn_norm"] = ops.rmsnorm_forward(x, params[p + "attn_norm"], cfg.norm_eps)
        (q, k, v), c["qkv"] = linear(l, "qkv", h)
        q = q.reshape(B, T, H, hs).transpose(0, 2, 1, 3)                 # (B, H, T, hs)
        k = k.reshape(B, T, Hkv, hs).transpose(0, 2, 1, 3)               # (B, Hkv, T, hs)
        v = v.reshape(B, T, Hkv, hs).transpose(0, 2, 1, 3)
        q, c["rope_q"] = rope_forward(q, cfg.rope_base, pos, cfg.rope_layout, ops.rotate)
        k, c["rope_k"] = rope_forward(k, cfg.rope_base, pos, cfg.rope_layout, ops.rotate)
        if kv is not None:                       # decoding: append to the cache, attend to all of it
            kv.k[l][:, :, pos:pos + T] = k
            kv.v[l][:, :, pos:pos + T] = v
            k, v = kv.k[l][:, :, :pos + T], kv.v[l][:, :, :pos + T]       # (B, Hkv, pos + T, hs)
        a, c["attn"] = attention_forward(q, repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv))  # (B, H, T, hs)
        a = a.transpose(0, 2, 1, 3).reshape(B, T, C)                     # (B, T, C)
        (o,), c["o"] = linear(l, "o", a)
        x = x + o
        # feed-forward
        h, c["ffn_norm"] = ops.rmsnorm_forward(x, params[p + "ffn_norm"], cfg.norm_eps)
        (u, g), c["up_gate"] = linear(l, "up_gate", h)                  # (B, T, Hd) each
        m, c["act"] = act_forward(u, g)                                    # (B, T, Hd)
        (f,), c["down"] = linear(l, "down", m)
        x = x + f
    if kv is not None:
        kv.length = pos + T
    if last_only:
        x = x[:, -1:]                                                    # (B, 1, C)
    h, caches["norm_f"] = ops.rmsnorm_forward(x, params["norm_f"], cfg.norm_eps)
    logits = h @ head_weight(params, cfg).T                              # (B, T, V)
    caches["head_in"] = h
    caches["shape"] = (B, T)
    loss = None
    if targets is not None:
        loss, caches["loss"] = cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1))
    return logits, loss, caches


def backward(params, cfg, caches, dloss=1.0, consume=False):
    """Gradients of the loss for every parameter, a dict with the keys of `params`.

    consume=True drops each layer's cache as soon as its gradients are made, so the
    activations shrink while the gradients grow and both are never whole at once (the
    training loop's choice: for SmolLM2 at 512 tokens each is about 0.5-1 GB). The caches
    cannot be used again afterwards."""
    B, T = caches["shape"]
    C, H, Hkv = cfg.n_embd, cfg.n_head, cfg.n_kv_head
    hs = C // H
    act_backward = ACTIVATIONS[cfg.activation][1]
    ops = caches["ops"]                                           # the ops the forward ran
    grads = {}

    dlogits = cross_entropy_backward(dloss, caches["loss"]).reshape(B, T, -1)    # (B, T, V)
    h = caches["head_in"]
    dhead = dlogits.reshape(B * T, -1).T @ h.reshape(B * T, C)                   # logits = h W^T
    dh = dlogits @ head_weight(params, cfg)                                       # (B, T, C)
    dx, grads["norm_f"] = ops.rmsnorm_backward(dh, caches["norm_f"])
    for l in reversed(range(cfg.n_layer)):
        p = f"h.{l}."
        c = caches.pop(l) if consume else caches[l]
        # feed-forward: x = x + sparsify(m) Wdown^T
        dm, (grads[p + "ffn.w_down"],) = sparse_linear_backward([dx], c["down"])
        du, dg = act_backward(dm, c["act"])
        dh, (grads[p + "ffn.w_up"], grads[p + "ffn.w_gate"]) = sparse_linear_backward([du, dg], c["up_gate"])
        dh, grads[p + "ffn_norm"] = ops.rmsnorm_backward(dh, c["ffn_norm"])
        dx += dh                                                  # the residual: x feeds both paths
        # attention: x = x + sparsify(a) Wo^T
        da, (grads[p + "attn.wo"],) = sparse_linear_backward([dx], c["o"])
        da = da.reshape(B, T, H, hs).transpose(0, 2, 1, 3)                       # (B, H, T, hs)
        dq, dk, dv = attention_backward(da, c["attn"])
        dk, dv = repeat_kv_backward(dk, H // Hkv), repeat_kv_backward(dv, H // Hkv)   # (B, Hkv, T, hs)
        dq = rope_backward(dq, c["rope_q"])
        dk = rope_backward(dk, c["rope_k"])
        dq = dq.transpose(0, 2, 1, 3).reshape(B, T, C)
        dk, dv = (d.transpose(0, 2, 1, 3).reshape(B, T, Hkv * hs) for d in (dk, dv))
        dh, (grads[p + "attn.wq"], grads[p + "attn.wk"], grads[p + "attn.wv"]) = \
            sparse_linear_backward([dq, dk, dv], c["qkv"])
        dh, grads[p + "attn_norm"] = ops.rmsnorm_backward(dh, c["attn_norm"])
        dx += dh                                                  # the residual again
    grads["wte"] = ops.embedding_backward(dx, caches["wte"])
    if cfg.tie_embeddings:
        grads["wte"] += dhead          # wte is used twice, as embedding and as head: gradients add
    else:
        grads["lm_head"] = dhead
    return grads


def forward_backward(params, cfg, idx, targets, ops=REFERENCE, dloss=1.0):
    """One training step's forward and backward on the batch (idx, targets): (B, T) token ids.
    Returns the loss (a float), the gradients of dloss * loss (a dict like params) and the measured
    sparsity {layer: {site: fraction of zeros}}, taken before the backward frees each layer's cache."""
    _, loss, caches = forward(params, cfg, idx, targets, ops)
    zeros = measured_sparsity(cfg, caches)
    return float(loss), backward(params, cfg, caches, dloss, consume=True), zeros


def forward_loss(params, cfg, idx, targets, ops=REFERENCE):
    """Evaluation: the loss of a forward on (idx, targets), a float, and the measured sparsity
    {layer: {site: fraction of zeros}}. fast/parallel.py's forward_loss gives the same numbers
    from a forward that keeps no caches, the batch split over CPU threads."""
    _, loss, caches = forward(params, cfg, idx, targets, ops)
    return float(loss), measured_sparsity(cfg, caches)


def measured_sparsity(cfg, caches):
    """{layer: {site: fraction of zeros that reached that projection}} from a forward's caches."""
    return {l: {site: zero_fraction(caches[l][site]) for site in SITES} for l in range(cfg.n_layer)}


def mean_sparsity(cfg, caches):
    """{site: fraction of zeros averaged over layers}: the paper's Table 2 row."""
    return average_over_layers(measured_sparsity(cfg, caches))


def average_over_layers(per_layer):
    """{layer: {site: x}} -> {site: x averaged over the layers}."""
    return {site: sum(sites[site] for sites in per_layer.values()) / len(per_layer) for site in SITES}
