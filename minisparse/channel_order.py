"""Channel order: the same model with its channels stored in another order, so that the rows a
token's top-K selects lie next to each other more often.

A row-sparse product reads, for each kept input channel i, the row Wt[i] of the input-major
weights (rowsparse.py). Kept channels with neighbouring indices are one run of memory; every run
starts a new stream and costs about one memory latency (docs/speed.md). Store a projection
input's channels in another order P (a permutation matrix), and move every weight that reads or
writes them with it:

    y = W x = (W P^T)(P x)           W's columns follow x's channels; y is unchanged
    TopK(|P x|) = P TopK(|x|)        the same channels are kept, at their new positions

Three kinds of channel can move without changing what the model computes:

    the residual stream, order r (C,), one for all layers (every block reads and adds to the same
    stream):
        wte[:, r], lm_head[:, r]                       the embedding writes it, the head reads it
        attn_norm[r], ffn_norm[r], norm_f[r]           RMSNorm: a mean over all channels, then per channel
        wq, wk, wv, w_up, w_gate [:, r]                read it: the qkv and up_gate sites
        wo[r, :], w_down[r, :]                         add to it
    attention's value channels, order a (Hkv, hs) per layer, one per key/value head g:
        wv[g*hs + a[g], :]                             the rows of head g's values
        wo[:, h*hs + a[g]]  for every query head h reading g (h // (H / Hkv) == g): the o site
        (q and k stay: RoPE pairs their channels, and the scores q.k do not see v's order)
    the FFN's hidden units, order f (Hd,) per layer:
        w_up[f, :], w_gate[f, :], w_down[:, f]         the down site

Shapes: params as model.param_shapes(cfg); an order is a dict
    {"resid": (C,), "attn": (L, Hkv, hs), "ffn": (L, Hd)} of int64 permutations.

What stays exactly the same: RMSNorm, the absmax INT8 scale (a max over the channels), the
ternary weights' absmean (a mean over the whole matrix), attention, RoPE, the loss. Two things do
not:
  - ties: top-K keeps the lower index among inputs of equal |x| at the K-th place (topk.py), so
    under a new order another of the tied channels may be kept. A tie of two nonzero |x| has to be
    exact, which floating point makes rare; zeros tied at the K-th place (ReLU²'s natural zeros,
    where fewer than K inputs are nonzero) change nothing, since a kept zero adds nothing;
  - rounding: the products sum in another order, so float32 results move by rounding, and a
    K-th place within rounding of the (K+1)-th can flip, as in any kernel
    (tests/test_float32_near_ties.py). In float64 the two orders agree to about 1e-13.
N:M (Block Q-Sparse) keeps N of every M *consecutive* channels: a new order makes new blocks and
another model, so it is refused.

Choosing the order (calibrate): run the model on calibration text, record which channels each
site keeps (selections), and chain the channels greedily so that a kept channel is followed by
one that is kept with it: C[i, j] = P(j kept and i not), the chance that a run starts at j when
it follows i, summed over the sites that share the order (path). The runs per token before and
after are what reorder.py prints, on text the order was not chosen on.
"""

import json
import os
import zipfile

import numpy as np

from . import model
from .backend import array_module, to_numpy
from .errors import UsageError
from .linear import sparse_linear_forward
from .model import SITE_WEIGHTS
from .topk import kept_count, topk_mask

RESID_READERS = ("attn.wq", "attn.wk", "attn.wv", "ffn.w_up", "ffn.w_gate")
RESID_WRITERS = ("attn.wo", "ffn.w_down")


def shapes(cfg):
    hs = cfg.n_embd // cfg.n_head
    return {"resid": (cfg.n_embd,), "attn": (cfg.n_layer, cfg.n_kv_head, hs), "ffn": (cfg.n_layer, cfg.n_hidden)}


def identity(cfg):
    """The stored order: every channel where it is."""
    return {name: np.broadcast_to(np.arange(shape[-1]), shape).copy() for name, shape in shapes(cfg).items()}


def inverse(order):
    """The order that undoes `order`: apply(apply(p, cfg, o), cfg, inverse(o)) == p."""
    return {name: np.argsort(o, axis=-1, kind="stable") for name, o in order.items()}


def value_columns(order, cfg, l):
    """(C,) the new order of the o site's inputs in layer l: each query head's hs channels in
    the order of the key/value head it reads."""
    hs, groups = cfg.n_embd // cfg.n_head, cfg.n_head // cfg.n_kv_head
    return np.concatenate([h * hs + order["attn"][l, h // groups] for h in range(cfg.n_head)])


def apply(params, cfg, order, in_place=False):
    """The same model with its channels stored in `order` (the table above). in_place replaces
    params' entries one at a time, so that memory holds one extra tensor, not a second model."""
    check_allowed(cfg)
    xp = array_module(params["wte"])
    out = params if in_place else dict(params)
    idx = lambda a: xp.asarray(a)                               # noqa: E731  (indices on the weights' device)
    r = idx(order["resid"])
    # a[:, r] can come back column-major (NumPy's advanced indexing): stored row-major again, as
    # every product expects, or a matrix-vector product would read it with a stride
    def take(a, rows=None, cols=None):
        a = a if rows is None else a[rows]
        return xp.ascontiguousarray(a if cols is None else a[:, cols])
    hs = cfg.n_embd // cfg.n_head
    for name in ("wte", "lm_head"):
        if name in out:
            out[name] = take(out[name], cols=r)
    out["norm_f"] = take(out["norm_f"], rows=r)
    for l in range(cfg.n_layer):
        p = f"h.{l}."
        f = idx(order["ffn"][l])
        v_rows = idx(np.concatenate([g * hs + order["attn"][l, g] for g in range(cfg.n_kv_head)]))
        o_cols = idx(value_columns(order, cfg, l))
        for name in ("attn_norm", "ffn_norm"):
            out[p + name] = take(out[p + name], rows=r)
        out[p + "attn.wq"] = take(out[p + "attn.wq"], cols=r)
        out[p + "attn.wk"] = take(out[p + "attn.wk"], cols=r)
        out[p + "attn.wv"] = take(out[p + "attn.wv"], v_rows, r)
        out[p + "attn.wo"] = take(out[p + "attn.wo"], r, o_cols)
        out[p + "ffn.w_up"] = take(out[p + "ffn.w_up"], f, r)
        out[p + "ffn.w_gate"] = take(out[p + "ffn.w_gate"], f, r)
        out[p + "ffn.w_down"] = take(out[p + "ffn.w_down"], r, f)
    return out


def check_allowed(cfg, plan=None):
    """A new order keeps top-K's model, not N:M's."""
    nm = [cfg.nm] if plan is None else [s.nm for s in plan.specs.values()]
    if any(n is not None for n in nm):
        raise UsageError("--channel_order is not allowed with N:M sparsity: N:M keeps N of every M consecutive "
                         "channels, so a new order would make other blocks and another model; use top-K.")


def reordered(params, cfg, path, plan=None):
    """params with the channels in the order of the file at `path` (--channel_order), in place.
    cfg (and plan, if given) are the ones the program will run, after any --sparsity."""
    check_allowed(cfg, plan)
    order, _ = load(path, cfg)
    return apply(params, cfg, order, in_place=True)


# ----------------------------------------------------------------------------------------------
# choosing an order


def runs(mask):
    """Mean number of runs of kept channels (maximal stretches of consecutive True) per row of
    a (N, D) mask: the streams a row-sparse product starts for each token."""
    m = np.asarray(mask, dtype=bool)
    return float((m[:, 0].sum() + (m[:, 1:] & ~m[:, :-1]).sum()) / len(m))


def selections(params, cfg, idx, spec, progress=None):
    """{(l, site): (B*T, D) bool}: which inputs top-K kept at every site, running the reference
    model (sparsified as `spec`) on the token windows idx (B, T)."""
    kept = {}

    def project(l, site, x):
        ys, _ = sparse_linear_forward(x, [params[f"h.{l}.{w}"] for w in SITE_WEIGHTS[site]], spec)
        x2 = x.reshape(-1, x.shape[-1])
        kept.setdefault((l, site), []).append(to_numpy(topk_mask(x2, kept_count(x2.shape[-1], spec.sparsity))))
        return ys

    for b in range(len(idx)):
        model.forward(params, cfg, array_module(params["wte"]).asarray(idx[b:b + 1]), project=project)
        if progress is not None:
            progress.update(1)
    return {k: np.concatenate(v) for k, v in kept.items()}


def start_cost(masks):
    """C (D, D): C[i, j] = P(j kept and i not), summed over the (N, D) masks that share an order.
    Placing j right after i starts a new run with this probability."""
    D = masks[0].shape[1]
    C = np.zeros((D, D))
    for m in masks:
        f = m.astype(np.float64)
        C += (1.0 - f).T @ f / len(f)
    return C


def path(C, kept_often):
    """A greedy order: start at the most often kept channel, then always go to the channel that
    is least likely to start a new run after the current one (ties: the lower index)."""
    D = len(C)
    left = np.ones(D, dtype=bool)
    cur = int(np.argmax(kept_often))
    out = [cur]
    left[cur] = False
    for _ in range(D - 1):
        cur = int(np.argmin(np.where(left, C[cur], np.inf)))
        out.append(cur)
        left[cur] = False
    return np.array(out, dtype=np.int64)


def calibrate(kept, cfg):
    """The order chosen from `selections` (the module docstring): one residual order from every
    layer's qkv and up_gate masks, one value order per layer and key/value head from the o site's
    masks of the query heads that read it, one hidden order per layer from the down site's."""
    L, hs, groups = cfg.n_layer, cfg.n_embd // cfg.n_head, cfg.n_head // cfg.n_kv_head
    often = lambda ms: sum(m.mean(axis=0) for m in ms)          # noqa: E731
    resid = [kept[l, s] for l in range(L) for s in ("qkv", "up_gate")]
    order = {"resid": path(start_cost(resid), often(resid)),
             "attn": np.zeros((L, cfg.n_kv_head, hs), dtype=np.int64),
             "ffn": np.zeros((L, cfg.n_hidden), dtype=np.int64)}
    for l in range(L):
        for g in range(cfg.n_kv_head):
            heads = [kept[l, "o"][:, h * hs:(h + 1) * hs] for h in range(cfg.n_head) if h // groups == g]
            order["attn"][l, g] = path(start_cost(heads), often(heads))
        order["ffn"][l] = path(start_cost([kept[l, "down"]]), kept[l, "down"].mean(axis=0))
    return order


def site_orders(order, cfg, l):
    """Each site's input order in layer l, (D,): how `order` moves the masks of `selections`."""
    return {"qkv": order["resid"], "up_gate": order["resid"], "o": value_columns(order, cfg, l),
            "down": order["ffn"][l]}


def runs_per_token(kept, cfg, order=None):
    """{site: runs a token starts, summed over the layers} under `order` (None: as stored)."""
    order = order or identity(cfg)
    total = dict.fromkeys(model.SITES, 0.0)
    for l in range(cfg.n_layer):
        for site, o in site_orders(order, cfg, l).items():
            total[site] += runs(kept[l, site][:, o])
    return total


# ----------------------------------------------------------------------------------------------
# the order file


def save(path, order, cfg, info):
    """Write an order file (.npz): the three permutations and a json of what they were chosen
    for (the model's shape, the sparsity, the calibration text) and what they measured. Written
    whole or not at all."""
    meta = {"model": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "n_hidden")}, **info}
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v, dtype=np.int64) for k, v in order.items()},
                 **{"meta.json": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path, cfg):
    """The order in an order file, checked against the model it is applied to."""
    if not os.path.isfile(path):
        raise UsageError(f"--channel_order {path!r}: no such file (reorder.py writes one).")
    try:
        with np.load(path) as z:
            order = {k: z[k] for k in shapes(cfg)}
            meta = json.loads(bytes(z["meta.json"]).decode("utf-8"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"--channel_order {path!r} is not an order file reorder.py wrote, or is corrupt ({e}).") from None
    for name, shape in shapes(cfg).items():
        o = order[name]
        if o.shape != shape:
            raise UsageError(f"--channel_order {path!r} was chosen for another model: its {name!r} order has shape "
                             f"{o.shape}, this model needs {shape} (the file's model: {meta.get('model')}).")
        if not (np.sort(o, axis=-1) == np.arange(shape[-1])).all():
            raise UsageError(f"--channel_order {path!r} is corrupt: its {name!r} order is not a permutation "
                             f"of 0..{shape[-1] - 1}.")
    return order, meta
