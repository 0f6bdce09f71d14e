"""A whole decode step compiled with numba: decode.decode_forward for one new token.

    fast.step.decode_forward(params, cfg, idx, kv, spec, meter, fast, ops)
    equals decode.decode_forward(params, cfg, idx, kv, spec, meter, fast, ops) up to float32 rounding
    (tests/test_step.py: the logits and the cache over several tokens, dense, top-K and N:M, GQA,
    SwiGLU and ReLU2-GLU, tied and untied heads)

One compiled call per layer does everything decode_forward's block loop does for a single token:
RMSNorm, the top-K (or N:M) selection, the row-sparse product of each site (reading only the
selected rows of DecodeWeights' input-major copy; the threads split the selected rows, or with
Step.split("outputs") tiles of the outputs through fast/rowsparse.py's kernel), RoPE, the
key/value cache, attention over it, the activation and the residual additions; a last call
computes the final RMSNorm and the head's product, its rows split over the threads. A dense spec
reads every nonzero input's row through the same product.

The selection keeps what fast.topk.topk_nonzero keeps: per block (the whole row for top-K), the
K-th largest |x|, t, from a radix select on the bits of |x| (_kth_largest_bits); every |x| > t;
and the first K - #(|x| > t) entries equal to t, by position, when t > 0 (when t = 0 fewer than K
inputs are nonzero, and only those are read).

It runs where it applies: numba installed, NumPy arrays, one token (B = Tq = 1), 16-bit inputs
and weights in every spec, and a DecodeWeights that built the step (`fast.step`). Any
other call (a prefill, a batch, INT8 or 1.58-bit, the GPU) goes to decode.decode_forward as it is.

Why faster: the per-layer work between the products (a few small NumPy calls each) is compiled
into one call, so a token costs one Python call per layer instead of dozens, and the head runs
on every thread.

Start-up: everything here is in numba's on-disk cache except the threaded functions, which the
layer and the head receive as kernels (fast/jit.py), compiled per process and only where a
product or the head is large enough to share (Step.product, Step.head_split).
"""

import math

import numpy as np

from .. import decode
from ..backend import array_module
from ..linear import SparseSpec
from ..model import REFERENCE, SITES, head_weight, site_dims
from ..rope import rope_tables
from . import rowsparse as fast_rowsparse
from .jit import NO_KERNEL, call, kernel, njit

numba = fast_rowsparse.numba             # optional, as there: absent, nothing below is compiled


def supported(cfg, spec):
    """Whether the compiled step can run this model and spec (or plan): numba is installed, and
    every projection's inputs and weights are 16-bit (INT8 and ternary take decode.decode_forward)."""
    if fast_rowsparse.numba is None or cfg.a_bits != 16 or cfg.w_bits != 16:
        return False
    specs = [spec] if isinstance(spec, SparseSpec) else [spec.spec(l, s) for l in range(cfg.n_layer) for s in SITES]
    return all(s.a_bits == 16 and s.w_bits == 16 for s in specs)


def applies(cfg, spec, method, xp):
    """Whether DecodeWeights(method) of arrays of module xp builds the step, and the step runs
    `spec`: one of numba's methods (auto, numba), NumPy arrays, and supported(cfg, spec)."""
    return method in ("auto", "numba") and xp is np and supported(cfg, spec)


def kept_per_block(spec, D):
    """(k, block): a token keeps the k largest |x| of every block of `block` of its D inputs. N:M:
    (keep, block); top-K: (K, D), one block; dense: (D, D), every nonzero input."""
    return spec.nm if spec.nm is not None else (spec.kept(D), D)


def selection(cfg, spec):
    """(L, 4) int64 arrays k and block: site s of layer l keeps the k largest |x| of every block
    of `block` inputs (kept_per_block)."""
    spec_of = (lambda l, site: spec) if isinstance(spec, SparseSpec) else spec.spec
    dims = site_dims(cfg)
    k = np.empty((cfg.n_layer, len(SITES)), dtype=np.int64)
    block = np.empty_like(k)
    for l in range(cfg.n_layer):
        for j, site in enumerate(SITES):
            k[l, j], block[l, j] = kept_per_block(spec_of(l, site), dims[site][0])
    return k, block


if numba is not None:
    from numba import types
    from numba.extending import overload

    @njit()
    def _rmsnorm(x, g, eps, out):
        # out = x / sqrt(mean(x^2) + eps) * g  (norm.rmsnorm_forward), the sum of squares in float64
        s = 0.0
        for i in range(x.shape[0]):
            s += float(x[i]) * float(x[i])
        r = 1.0 / math.sqrt(s / x.shape[0] + eps)
        for i in range(x.shape[0]):
            out[i] = (x[i] * r) * g[i]

    def _abs_bits(x):
        """|x| as unsigned integers, read off x's bits: (x viewed as uint32 or uint64, the mask that
        clears the sign bit, the shift of the top digit). For floats that are not negative the
        integers ascend as the floats do (NaN above +inf, where NumPy sorts it too)."""

    @overload(_abs_bits, jit_options={"cache": True})
    def _abs_bits_impl(x):
        if x.dtype == types.float32:
            return lambda x: (x.view(np.uint32), np.uint32(0x7FFFFFFF), 20)
        if x.dtype == types.float64:
            return lambda x: (x.view(np.uint64), np.uint64(0x7FFFFFFFFFFFFFFF), 52)

    @njit()
    def _kth_largest_bits(u, mask, top, b0, block, k, hist, cand):
        """The k-th largest of u[b0:b0+block] & mask (1 <= k <= block): a radix select, 11 bits a
        digit from the top. Each digit's histogram finds the bucket that holds the k-th largest;
        its entries (few after the first digit) are moved into cand, and the next digit looks at
        those only, until one bucket holds exactly the entries still wanted (the answer is then
        their smallest) or the last digit is read."""
        need = k
        m = block
        shift = top
        first = True
        while True:
            hist[:] = 0
            hi = 0
            for i in range(m):
                d = ((u[b0 + i] & mask) if first else cand[i]) >> shift & 2047
                hist[d] += 1
                hi = max(hi, d)
            d = hi
            while hist[d] < need:                          # walk down from the largest bucket
                need -= hist[d]
                d -= 1
            n = 0
            for i in range(m):                             # the bucket's entries, in place
                key = (u[b0 + i] & mask) if first else cand[i]
                if key >> shift & 2047 == d:
                    cand[n] = key
                    n += 1
            first = False
            m = n
            if m == need or shift == 0:                    # all of them wanted, or all equal
                t = cand[0]
                for i in range(1, m):
                    t = min(t, cand[i])
                return t
            shift = max(shift - 11, 0)

    @njit()
    def _select(x, k, block, idx, vals):
        # the inputs read, ascending, into idx[:n] and their values into vals[:n]; returns n
        n = 0
        if 0 < k < block:
            u, mask, top = _abs_bits(x)
            hist = np.empty(2048, dtype=np.int64)
            cand = np.empty(block, dtype=u.dtype)
            tb = np.empty(1, dtype=u.dtype)
        # the loops write every entry at idx[n] and advance n only for those kept (n <= i, so in
        # bounds): no branch on the data, which for |x| against the median would mispredict half
        # the time
        for b0 in range(0, x.shape[0], block):
            if k >= block:                                   # dense: every nonzero input
                for i in range(b0, b0 + block):
                    idx[n], vals[n] = i, x[i]
                    n += x[i] != 0
                continue
            if k <= 0:
                continue
            tb[0] = _kth_largest_bits(u, mask, top, b0, block, k, hist, cand)
            t = tb.view(x.dtype)[0]                          # the k-th largest |x| of the block
            rest = k
            for i in range(b0, b0 + block):
                rest -= abs(x[i]) > t
            if not t > 0:                                    # fewer than k nonzeros: read those
                rest = 0
            for i in range(b0, b0 + block):                  # ties at t: the first `rest` of them
                a = abs(x[i])
                tie = (a == t) & (rest > 0)
                idx[n], vals[n] = i, x[i]
                n += (a > t) | tie
                rest -= tie
        return n

    @njit(fastmath=True, error_model="numpy")
    def _rows_into(vals, idx, Wt, acc, k, k1):
        # acc = vals[k:k1] @ Wt[idx[k:k1]], whole rows, 8 per pass: acc (O floats) stays in L1/L2.
        # The 8 rows of a pass come from 8 separate eighths of the range, each walked in order, so
        # memory sees 8 long ascending streams; 8 neighbouring rows would instead start 8 new short
        # streams every pass, which the hardware prefetchers follow less well (benchmarks/RESULTS.md)
        acc[:] = 0
        m = (k1 - k) // 8
        for a in range(k, k + m):
            v0, v1, v2, v3 = vals[a], vals[a + m], vals[a + 2 * m], vals[a + 3 * m]
            v4, v5, v6, v7 = vals[a + 4 * m], vals[a + 5 * m], vals[a + 6 * m], vals[a + 7 * m]
            r0, r1, r2, r3 = Wt[idx[a]], Wt[idx[a + m]], Wt[idx[a + 2 * m]], Wt[idx[a + 3 * m]]
            r4, r5, r6, r7 = Wt[idx[a + 4 * m]], Wt[idx[a + 5 * m]], Wt[idx[a + 6 * m]], Wt[idx[a + 7 * m]]
            for j in range(acc.shape[0]):
                acc[j] += (v0 * r0[j] + v1 * r1[j] + v2 * r2[j] + v3 * r3[j]) + \
                          (v4 * r4[j] + v5 * r5[j] + v6 * r6[j] + v7 * r7[j])
        for a in range(k + 8 * m, k1):                    # the last k1 - k mod 8 rows
            v, r = vals[a], Wt[idx[a]]
            for j in range(acc.shape[0]):
                acc[j] += v * r[j]

    @njit(parallel=True)
    def _rows_matvec_split(vals, idx, Wt, y, P):
        # y = vals @ Wt[idx] (rowsparse.rows_matvec) with the selected rows split in P parts between
        # the threads: each reads whole rows, one contiguous stream each, into its own partial sum
        # parts[p]; the partial sums are added at the end
        K = idx.shape[0]
        parts = np.empty((P, y.shape[0]), dtype=y.dtype)
        for p in numba.prange(P):
            _rows_into(vals, idx, Wt, parts[p], K * p // P, K * (p + 1) // P)
        y[:] = parts[0]
        for p in range(1, P):
            y += parts[p]

    @njit()
    def _project(x, k, block, Wt, y, tile, idx, vals, product):
        # y = (x sparsified) @ Wt, reading only the selected rows; returns the rows read. tile -1:
        # this thread alone (a product too small to share); else the threads share it through
        # `product`, Step.product's kernel, which is passed in rather than named so that this
        # function holds no threaded code and stays cached (fast/jit.py): -P, P threads split the
        # rows (_rows_matvec_split); tile > 0, tiles of the outputs (fast/rowsparse.py's kernel)
        n = _select(x, k, block, idx, vals)
        if tile == -1:
            _rows_into(vals, idx, Wt, y, 0, n)
        else:
            call(product, vals[:n], idx[:n], Wt, y, abs(tile))
        return n

    @njit()
    def _rope(x, n_heads, hs, cos, sin, pairs):
        # rope.rotate in place, head by head: pair i = (x1_i, x2_i) turned by its angle
        half = hs // 2
        for h in range(n_heads):
            o = h * hs
            for i in range(half):
                i1, i2 = (o + 2 * i, o + 2 * i + 1) if pairs else (o + i, o + half + i)
                x1, x2 = x[i1], x[i2]
                x[i1] = x1 * cos[i] - x2 * sin[i]
                x[i2] = x1 * sin[i] + x2 * cos[i]

    @njit(fastmath={"reassoc", "contract"}, error_model="numpy")
    def _attend(q, kc, vc, length, n_head, out):
        # attention.attention_forward for one query per head over the cache's first `length`
        # positions; query head h reads key/value head h // (n_head / n_kv_head) (model.repeat_kv).
        # The dot products sum in the cache's precision, as BLAS does, and reassociated, so that
        # LLVM vectorizes them (no assumption about infinities: the max starts at -inf)
        n_kv, hs = kc.shape[0], kc.shape[2]
        groups = n_head // n_kv
        scale = 1.0 / math.sqrt(hs)
        zero = np.zeros(1, dtype=kc.dtype)[0]
        p = np.empty(length, dtype=q.dtype)
        for h in range(n_head):
            g, o = h // groups, h * hs
            qh = q[o:o + hs]
            m = -np.inf
            for j in range(length):
                kj = kc[g, j]
                s = zero
                for c in range(hs):
                    s += qh[c] * kj[c]
                p[j] = s * scale
                m = max(m, p[j])
            total = 0.0
            for j in range(length):
                p[j] = math.exp(p[j] - m)
                total += p[j]
            oh = out[o:o + hs]
            oh[:] = 0
            for j in range(length):
                w = p[j] / total
                vj = vc[g, j]
                for c in range(hs):
                    oh[c] += w * vj[c]

    @njit()
    def _layer(x, pos, attn_norm, ffn_norm, eps, Wqkv, Wo, Wug, Wdown, kc, vc, cos, sin, pairs, n_head,
               swiglu, k, block, tiles, read, product):
        # one block of model.forward for one token at position pos; x (C,) is updated in place,
        # kc and vc (n_kv_head, block_size, hs) receive the token's key and value, read[s] the rows
        # read; product: the threaded product of the sites that share threads (_project)
        C, Hd = x.shape[0], Wdown.shape[0]
        n_kv, hs = kc.shape[0], kc.shape[2]
        Ckv = n_kv * hs
        dt = x.dtype
        idx = np.empty(max(C, Hd), dtype=np.int64)
        vals = np.empty(max(C, Hd), dtype=dt)
        h = np.empty(C, dtype=dt)
        # attention
        _rmsnorm(x, attn_norm, eps, h)
        qkv = np.empty(Wqkv.shape[1], dtype=dt)
        read[0] = _project(h, k[0], block[0], Wqkv, qkv, tiles[0], idx, vals, product)
        q, kn, vn = qkv[:C], qkv[C:C + Ckv], qkv[C + Ckv:]
        _rope(q, n_head, hs, cos, sin, pairs)
        _rope(kn, n_kv, hs, cos, sin, pairs)
        for g in range(n_kv):
            kc[g, pos, :] = kn[g * hs:(g + 1) * hs]
            vc[g, pos, :] = vn[g * hs:(g + 1) * hs]
        a = np.empty(C, dtype=dt)
        _attend(q, kc, vc, pos + 1, n_head, a)
        o = np.empty(C, dtype=dt)
        read[1] = _project(a, k[1], block[1], Wo, o, tiles[1], idx, vals, product)
        x += o
        # feed-forward
        _rmsnorm(x, ffn_norm, eps, h)
        ug = np.empty(2 * Hd, dtype=dt)
        read[2] = _project(h, k[2], block[2], Wug, ug, tiles[2], idx, vals, product)
        m = np.empty(Hd, dtype=dt)
        for i in range(Hd):
            u, g = ug[i], ug[Hd + i]
            if swiglu:                                       # u * silu(g)   (swiglu.py)
                m[i] = u * (g * (1.0 / (1.0 + math.exp(-g))))
            else:                                            # u * relu(g)^2 (relu2.py)
                r = max(g, 0)
                m[i] = u * (r * r)
        read[3] = _project(m, k[3], block[3], Wdown, o, tiles[3], idx, vals, product)
        x += o

    @njit(fastmath=True, error_model="numpy")
    def _head_rows(W, h, logits, r0, r1):
        # logits[r] = W[r] . h for the rows r0 .. r1-1 of W (V, C) as stored, summed in its precision
        zero = np.zeros(1, dtype=h.dtype)[0]
        for r in range(r0, r1):
            s = zero
            for c in range(W.shape[1]):
                s += W[r, c] * h[c]
            logits[r] = s

    @njit(parallel=True)
    def _head_split(W, h, logits, tile):
        V = W.shape[0]
        for t in numba.prange((V + tile - 1) // tile):             # threads take separate tiles of rows
            _head_rows(W, h, logits, t * tile, min(V, (t + 1) * tile))

    @njit()
    def _head(x, norm_f, eps, W, tile, logits, split):
        # logits = RMSNorm(x) @ W^T; tile >= V: on this thread alone (a head too small to share),
        # else tiles of rows on the threads through `split`, Step.head_split's kernel (passed in,
        # as in _project)
        h = np.empty_like(x)
        _rmsnorm(x, norm_f, eps, h)
        if tile >= W.shape[0]:
            _head_rows(W, h, logits, 0, W.shape[0])
        else:
            call(split, W, h, logits, tile)
        return logits


class Step:
    """The step's weights: per layer the four sites' input-major Wt (DecodeWeights' copies), and how
    the threads share each site's product: split="rows", each thread whole selected rows (tiles -P,
    for numba's P threads); "outputs", tiles of the outputs (fast/rowsparse.py's kernel). A product
    of fewer than fast.rowsparse.AUTO_MIN_WEIGHTS weights runs on one thread (tile -1).

    The threaded functions reach the compiled layer and head as kernels (fast/jit.py), compiled in
    this process when first asked for (product, head_split), for the types in use only; where
    nothing is shared (a tiny model) none is compiled, and start-up only loads the cache."""

    def __init__(self, wts, split="rows"):
        self.wts = wts                                       # [(Wqkv, Wo, Wug, Wdown)] per layer
        self.split(split)
        self._sel = (None, None)
        self._head_kernels = {}

    def split(self, how, min_weights=fast_rowsparse.AUTO_MIN_WEIGHTS):
        """How the threads share the products (see the class), and the fewest weights of a product,
        or of the head, that they share (0: every one)."""
        if how not in ("rows", "outputs"):
            raise ValueError(f"split {how!r} is not 'rows' or 'outputs'")
        self.how, self.min_weights = how, min_weights
        self.tiles = np.array([-1 if w.size < min_weights                           # too small to share
                               else fast_rowsparse._tiles(w.shape[1], 4096) if how == "outputs"
                               else -numba.get_num_threads() for w in self.wts[0]], dtype=np.int64)
        self._products = {}

    def product(self, dtype):
        """The kernel (fast/jit.py) that the sites sharing threads (tiles != -1) run on inputs of
        `dtype`, (vals, idx, Wt, y, P or tile): _rows_matvec_split for split "rows",
        fast/rowsparse.py's kernel for "outputs"; NO_KERNEL where no site shares."""
        if dtype not in self._products:
            shared = [w for w, tile in zip(self.wts[0], self.tiles) if tile != -1]
            f = _rows_matvec_split if self.how == "rows" else fast_rowsparse._numba_rows_matvec
            vec = types.Array(numba.from_dtype(dtype), 1, "C")      # as _layer allocates them
            self._products[dtype] = NO_KERNEL if not shared else kernel(
                f, vec, types.int64[::1], numba.typeof(shared[0]), vec, types.int64)
        return self._products[dtype]

    def head_split(self, dtype, W):
        """The kernel of the head's product on the threads, _head_split, for inputs of `dtype` and
        the head's weights W (V, C); NO_KERNEL where the head is too small to share."""
        key = (dtype, W.dtype, W.flags.c_contiguous, W.flags.f_contiguous, W.flags.writeable, W.flags.aligned,
               W.size < self.min_weights)                   # what numba's type of W depends on, cheaply
        if key not in self._head_kernels:
            vec = types.Array(numba.from_dtype(dtype), 1, "C")
            self._head_kernels[key] = NO_KERNEL if W.size < self.min_weights else kernel(
                _head_split, numba.typeof(W), vec, vec, types.int64)
        return self._head_kernels[key]

    def selection(self, cfg, spec):
        """selection(cfg, spec), or None where the step does not support the spec (supported);
        remembered for the last spec (the same for every token)."""
        if self._sel[0] is not spec:
            self._sel = (spec, selection(cfg, spec) if supported(cfg, spec) else None)
        return self._sel[1]


def decode_forward(params, cfg, idx, kv, spec=None, meter=None, fast=None, ops=REFERENCE, last_only=False):
    """decode.decode_forward, with one compiled call per layer when it applies (see the module's
    docstring); otherwise decode.decode_forward itself."""
    spec = cfg.spec if spec is None else spec
    step = getattr(fast, "step", None)
    sel = None
    if step is not None and idx.shape == (1, 1) and kv.k[0].shape[0] == 1 and kv.length < cfg.block_size \
            and array_module(params["wte"]) is np:
        sel = step.selection(cfg, spec)
    if sel is None:                          # not one token, or not supported; a full cache raises there
        return decode.decode_forward(params, cfg, idx, kv, spec, meter, fast, ops, last_only)
    k, block = sel
    x = params["wte"][idx[0, 0]].copy()                                             # (C,)
    read = np.zeros((cfg.n_layer, len(SITES)), dtype=np.int64)
    layers(params, cfg, step, x, kv, k, block, read)
    kv.length += 1
    logits = head(params, cfg, step, x)
    if meter is not None:
        D = np.array([site_dims(cfg)[site][0] for site in SITES])              # (4,) inputs per site
        zeros = 1.0 - read.sum(axis=0) / (cfg.n_layer * D)       # every layer counted as one token
        for j, site in enumerate(SITES):
            meter.add(site, cfg.n_layer, float(zeros[j]))
    return logits[None, None]


def layers(params, cfg, step, x, kv, k, block, read):
    """The blocks of one token at position kv.length, one compiled call each: x (C,) is updated in
    place, each layer's cache receives the token's key and value (kv.length is not moved), and
    read (L, 4) the rows each site read. k, block: selection(cfg, spec)."""
    pos = kv.length
    hs = cfg.n_embd // cfg.n_head
    cos, sin = rope_tables(np, 1, hs, cfg.rope_base, pos, params["wte"].dtype)      # (1, hs/2)
    product = step.product(x.dtype)
    for l in range(cfg.n_layer):
        p = f"h.{l}."
        Wqkv, Wo, Wug, Wdown = step.wts[l]
        _layer(x, pos, params[p + "attn_norm"], params[p + "ffn_norm"], cfg.norm_eps, Wqkv, Wo, Wug, Wdown,
               kv.k[l][0], kv.v[l][0], cos[0], sin[0], cfg.rope_layout == "pairs", cfg.n_head,
               cfg.activation == "swiglu", k[l], block[l], step.tiles, read[l], product)


def head(params, cfg, step, x):
    """The logits (V,) of the last block's output x (C,): the final RMSNorm and the head's product,
    its rows split over the threads (on one thread where the head is small)."""
    W = head_weight(params, cfg)
    tile = W.shape[0] if W.size < step.min_weights else fast_rowsparse._tiles(W.shape[0], 4096)
    return _head(x, params["norm_f"], cfg.norm_eps, W, tile, np.empty(W.shape[0], dtype=x.dtype),
                 step.head_split(x.dtype, W))
