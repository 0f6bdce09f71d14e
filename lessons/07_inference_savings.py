# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Where the inference savings come from
#
# Q-Sparse replaces every projection of a Transformer block, `Y = X · Wᵀ`, by
#
#     Y = (X ⊙ Mask) · Wᵀ,   Mask = TopK(|X|)                         (Eq. 2, 3)
#
# keeping K of the C inputs of each token. The paper counts the savings as *activated
# parameters* N_a, the weights a token actually multiplies, and reports no wall-clock
# speedup (docs/qsparse.md, Sec. 7): turning a smaller N_a into less time is left to
# implementations. This lesson does both halves:
#
# 1. **Counting.** Multiply-adds and bytes of weight read per token, projection by
#    projection, summed over a model's sites, checked against `model.activated_params`.
# 2. **Measuring.** At batch 1 (one token, as in decoding), a dense matrix-vector product
#    against one that gathers only the K weight rows it needs; then minisparse's own
#    decode path, dense and sparse (the readable masked product, and the row-sparse
#    kernels of `minisparse/fast/`).

# %%
import contextlib
import dataclasses
import time
import numpy as np
import matplotlib.pyplot as plt

from minisparse import model
from minisparse.model import GPTConfig, SITES, init_params
from minisparse.linear import SparseSpec, sparse_linear_forward
from minisparse.topk import kept_count, topk_mask
from minisparse.decode import SparsityMeter
from minisparse.sampling import generate
from minisparse.fast import rowsparse as fast_rowsparse
from minisparse.fast.decode import DecodeWeights
from minisparse.fast.runtime import blas_threads
from _helpers import last_level_cache_mb, machine   # lessons/_helpers.py, from benchmarks/machine.py

try:
    import numba                    # optional (requirements-fast.txt, in requirements-lessons.txt)
except ImportError:                 # without it the NumPy paths run, and Section 3b says what that costs
    numba = None

print("machine:", machine())        # the timings below are this machine's

# %% [markdown]
# ## 1. Counting: what one token costs at one projection
#
# A projection with C inputs and O outputs stores `W` of shape (O, C) (minisparse keeps
# weights output-major, `minisparse/model.py`, `param_shapes`). For one token `x` (C,):
#
# | | multiply-adds | weights read (float32) |
# |---|---|---|
# | dense `x · Wᵀ` | C·O | 4·C·O bytes |
# | top-K, K of C kept | K·O | 4·K·O bytes, *if* the weight is stored input-major |
#
# The zeros of `x ⊙ Mask` multiply whole *columns* of `W`, that is whole *rows* of
# `Wᵀ` (shape (C, O)). Stored input-major, the K rows a token needs are K contiguous
# runs of O floats: reading them is reading K·O weights and nothing else. Stored
# output-major, the K needed values sit scattered in every one of the O rows, and a
# memory system that reads cache lines of 16 floats ends up reading nearly all of `W`.
#
# At batch 1 every weight is read once per token and used for one multiply-add: about
# 2 FLOPs per 4 bytes. A CPU or GPU does far more FLOPs per byte it can fetch, so decoding
# is limited by memory traffic, and bytes read are the cost that matters. That is why the
# paper counts activated parameters.
#
# The sites of a block (`minisparse/model.py`, `SITES` and `activated_params`):
# q, k, v share one sparsified input; so do up and gate.

# %%
def site_shapes(cfg):
    """[(site, C_in, O)] for one block: the inputs a site's top-K sees and the outputs it feeds."""
    C, Hd = cfg.n_embd, cfg.n_hidden
    return [("qkv", C, 3 * C), ("o", C, C), ("up_gate", C, 2 * Hd), ("down", Hd, C)]


def per_token_cost(cfg, sparsity):
    """{site: (multiply-adds, bytes of float32 weight read)} per token, summed over the layers."""
    out = {}
    for site, C_in, O in site_shapes(cfg):
        K = kept_count(C_in, sparsity)          # the K of minisparse/topk.py
        out[site] = (cfg.n_layer * K * O, cfg.n_layer * K * O * 4)
    return out


configs = {
    "tiny default": GPTConfig(),                                  # 4 layers, 128 channels
    "2048-channel": GPTConfig(vocab_size=32000, block_size=2048, n_layer=24, n_head=16, n_embd=2048),
}
for name, cfg in configs.items():
    print(f"{name}: n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, n_hidden {cfg.n_hidden}; per block "
          + ", ".join(f"{site} {C_in}->{O}" for site, C_in, O in site_shapes(cfg)))
    for S in (0.0, 0.5, 0.75):
        macs = sum(v[0] for v in per_token_cost(cfg, S).values())
        N_a = model.activated_params(dataclasses.replace(cfg, sparsity=S))
        print(f"  S = {S:4.2f}: {macs:14,d} multiply-adds/token   model.activated_params = {N_a:14,d}"
              f"   weights read {macs * 4 / 1e6:8.2f} MB/token")
    head = cfg.vocab_size * cfg.n_embd
    print(f"  the dense LM head adds {head:,} multiply-adds/token "
          f"({head / model.count_params(cfg):.1%} of N; never sparsified)\n")

# %% [markdown]
# Top-K's saving is exactly proportional: at sparsity S each site does (1 − S) of its
# dense work (up to K's rounding, `kept_count`). What stays dense: the embedding lookup
# (a row read, cheap), the LM head (printed above), RMSNorm, and attention's scores and
# weighted sum, which grow with the context length rather than with N. With ReLU²-GLU the
# down projection gets extra natural zeros on top of top-K's;
# `model.activated_params(cfg, measured)` counts those too when given the measured
# sparsity (lesson 02).

# %%
cfg = configs["2048-channel"]
S_grid = np.linspace(0, 0.9, 10)
per_site = {site: [per_token_cost(cfg, S)[site][1] / 1e9 for S in S_grid] for site in SITES}
head_gb = [cfg.vocab_size * cfg.n_embd * 4 / 1e9] * len(S_grid)
plt.figure(figsize=(6, 3.6))
plt.stackplot(S_grid, [head_gb] + [per_site[s] for s in SITES],
              labels=["LM head (dense)"] + [f"{s} (top-K)" for s in SITES], alpha=0.8)
plt.xlabel("sparsity S (fraction of each projection input zeroed)")
plt.ylabel("GB of weights read per token")
plt.title("2048-channel, 24-layer shape, batch 1, float32")
plt.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## 2. Measuring: a dense and a gathered matrix-vector product
#
# Batch 1, a square projection of size D (C = O = D). Three ways to compute one token:
#
# - **dense**: `x @ W.T` with `W` (O, C) as minisparse stores it. Reads all D·D weights.
# - **gathered**: choose the K largest |x| with `np.argpartition`, an O(D) partial
#   selection (introselect), then `x[idx] @ W_T[idx]` with `W_T = Wᵀ` stored input-major
#   (C, O). `topk_mask` (`minisparse/topk.py`) chooses the same K where no |x| ties, but
#   differently: a full O(D log D) sort of each row gives the threshold, and ties go to the
#   lower channel index, which argpartition does not promise (Section 4 checks that the two
#   sets agree on tie-free rows).
#   NumPy's fancy indexing `W_T[idx]` *copies* the K selected rows into a new array before
#   the product reads them again: K·O floats read, written and read back.
# - **slice (reference, not a real top-K)**: `x[:K] @ W_T[:K]`, the first K rows. A slice
#   is a view, so nothing is copied: this is what reading K rows costs when the gather is
#   fused into the product, as a real sparse kernel would do it.
#
# Each timing is the median of repeats, the methods interleaved so that a background job
# slows them alike, and with BLAS on one thread (`minisparse/fast/runtime.py`,
# `blas_threads(1)`, a threadpoolctl limit), numba's kernels too where numba is installed
# (`one_thread` below): the timings then compare algorithms, not the thread scheduler. On a
# shared 2-core machine a two-thread call can wait for a busy core, which makes products of
# the same size jump by milliseconds.

# %%
def topk_idx(x, K):
    """Indices of the K largest |x| (order unimportant): the selection a sparse kernel needs."""
    C = x.shape[-1]
    return np.argpartition(np.abs(x), C - K)[C - K:]


def gathered_matvec(x, W_T, K):
    idx = topk_idx(x, K)
    return x[idx] @ W_T[idx]          # (K,) @ (K, O): W_T[idx] copies K rows


@contextlib.contextmanager
def one_thread():
    """BLAS (threadpoolctl, requirements.txt) and numba's kernels, where installed, on one thread each."""
    before = numba.get_num_threads() if numba is not None else None
    if numba is not None:
        numba.set_num_threads(1)
    try:
        with blas_threads(1):
            yield
    finally:
        if numba is not None:
            numba.set_num_threads(before)


def median_times(fns, repeats):
    """Median seconds of each function, the functions interleaved within every repeat, on one thread."""
    t = np.zeros((repeats, len(fns)))
    with one_thread():
        for r in range(repeats):
            for j, f in enumerate(fns):
                t0 = time.perf_counter()
                f()
                t[r, j] = time.perf_counter() - t0
    return np.median(t, axis=0)


rng = np.random.default_rng(0)
Ds, Ss = (512, 1024, 2048), (0.0, 0.5, 0.75, 0.9)
rows = []
for D in Ds:
    W = rng.standard_normal((D, D)).astype(np.float32)          # (O, C) as in minisparse
    W_T = np.ascontiguousarray(W.T)                              # (C, O) input-major
    x = rng.standard_normal(D).astype(np.float32)                # (C,) one token
    repeats = {512: 1500, 1024: 500, 2048: 150}[D]
    for S in Ss:
        K = kept_count(D, S)
        t_dense, t_gath, t_slice, t_sel = median_times(
            [lambda: x @ W.T, lambda: gathered_matvec(x, W_T, K),
             lambda: x[:K] @ W_T[:K], lambda: topk_idx(x, K)], repeats)
        rows.append(dict(D=D, S=S, K=K, dense=t_dense, gathered=t_gath, slice=t_slice, select=t_sel))

for D in Ds:
    t = [r for r in rows if r["D"] == D and r["S"] == 0.0][0]["dense"]
    print(f"dense D={D}: {t * 1e6:.1f} us per product, {D * D * 4 / t / 1e9:.1f} GB/s of weights, "
          f"{2 * D * D / t / 1e9:.1f} GFLOP/s")

# %% [markdown]
# The dense product's rate, printed as bytes and FLOPs per second: the bytes are what bound
# it. The plot below has the rest of the measurements: the speedup of the gathered product
# and of the no-copy slice over the dense one (dense time / their time, selection
# included), against the ideal 1/(1 − S), the ratio of weights read; and the share of the
# gathered product's time that goes to selecting the K indices.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
axes[1].sharey(axes[0])                                     # the two speedups on one scale
S_line = np.linspace(0, 0.9, 50)
for ax, key, title in ((axes[0], "gathered", "gathered: W_T[idx] copies rows"),
                       (axes[1], "slice", "reference: contiguous slice, no copy")):
    ax.plot(S_line, 1 / (1 - S_line), "k--", label="ideal 1/(1-S)")
    for D in Ds:
        sel = [r for r in rows if r["D"] == D]
        ax.plot([r["S"] for r in sel], [r["dense"] / r[key] for r in sel], "o-", label=f"D = {D}")
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xlabel("sparsity S")
    ax.set_ylabel("speedup over dense x @ W.T")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
for D in Ds:
    sel = [r for r in rows if r["D"] == D]
    axes[2].plot([r["S"] for r in sel], [r["select"] / r["gathered"] for r in sel], "o-", label=f"D = {D}")
axes[2].set(xlabel="sparsity S", ylabel="selection time / gathered time", ylim=(0, 1.05),
            title="what the selection (argpartition) costs")
axes[2].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What to read in these numbers (they are from this machine and this run):
#
# - The gathered product pays for selecting (an O(D) partition of |x|, a few µs, a large
#   share at D = 512) and for the copy that fancy indexing makes: a fresh (K, O) array is
#   allocated and written every call (megabytes at D = 2048, where the operating system
#   may also have to map new pages), then read again by the product. Where its speedup (left
#   panel) is below 1, plain NumPy loses to the dense product even though it reads fewer weights.
# - At S = 0 the slice is the whole of `W_T`: the same product in the other memory layout.
#   Any difference from 1 there is BLAS choosing another kernel for that layout (or noise),
#   not sparsity.
# - The slice (middle panel) reads K rows without copying. It comes much closer to the
#   ideal (printed below), because it does what a real kernel for Q-Sparse would do: read
#   only the K rows it multiplies. Cache
#   effects also show: a weight that fits in the CPU's caches is not bound by main memory,
#   so small D can miss or even beat the ideal.
# - None of this changes the count of Section 1. It says that the count becomes time only
#   in a kernel that reads the selected rows in place.

# %%
effic = {(r["D"], r["S"]): (r["dense"] / r["gathered"]) * (1 - r["S"]) for r in rows}
best = max((k for k in effic if k[1] > 0), key=effic.get)
print(f"in this run the gathered product reached {effic[best]:.0%} of the ideal at best "
      f"(D = {best[0]}, S = {best[1]}); at S = 0.5 it reached "
      + ", ".join(f"{effic[(D, 0.5)]:.0%} (D={D})" for D in Ds))
slice_effic = {(r["D"], r["S"]): (r["dense"] / r["slice"]) * (1 - r["S"]) for r in rows}
print("the no-copy slice at S = 0.5 reached "
      + ", ".join(f"{slice_effic[(D, 0.5)]:.0%} (D={D})" for D in Ds))

# %% [markdown]
# So reading fewer rows does turn into less time, but only without the copy: compare the two
# printed lines, the no-copy slice's share of the ideal with the gathered product's. Where the
# gathered product's speedup in the left panel is below 1, it loses to the dense product
# outright, fewer weights read and all.

# %% [markdown]
# ## 3. minisparse's decode path, dense and sparse
#
# `minisparse/decode.py`, `decode_forward`, runs one new token through the blocks with a
# key/value cache, and `minisparse/sampling.py`, `generate`, calls it once per token. Every
# projection goes through `minisparse/linear.py`, `sparse_linear_forward`:
#
#     xs, mask = sparsify(x, spec)          # top-K: the mask, then x * mask
#     ys = [(xs2 @ W.T) ...]                # the FULL dense weight, zeros and all
#
# so the sparse path *adds* the top-K selection and reads the whole weight anyway. It is a
# correct model of Q-Sparse's arithmetic, written for training (batches, where the mask
# differs per token), not a faster decoder. We time it on a small random-weight model:
# `spec=SparseSpec(0.0)` is the dense path, `spec=None` uses the model's own sparsity.

# %%
dcfg = GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_embd=512, sparsity=0.5)
dparams = init_params(dcfg, seed=0)
prompt = np.zeros((1, 4), dtype=np.int64)
n_new = 48
meters = {"dense": SparsityMeter(), "sparse": SparsityMeter()}
specs = {"dense": SparseSpec(0.0), "sparse": None}

def run(name):
    generate(dparams, dcfg, prompt, n_new, temperature=0, spec=specs[name], meter=meters[name])

t_dense, t_sparse = median_times([lambda: run("dense"), lambda: run("sparse")], repeats=5)
print(f"model: {dcfg.n_layer} layers, n_embd {dcfg.n_embd}, n_hidden {dcfg.n_hidden}, sparsity {dcfg.sparsity}")
print(f"decode, batch 1: dense {t_dense / n_new * 1e3:.2f} ms/token, sparse {t_sparse / n_new * 1e3:.2f} ms/token "
      f"(sparse / dense = {t_sparse / t_dense:.2f})")
print("measured zeros reaching each site, sparse:", {s: round(v, 3) for s, v in meters["sparse"].mean().items()})
print("measured zeros reaching each site, dense: ", {s: round(v, 3) for s, v in meters["dense"].mean().items()})
print(f"activated params per token: dense {model.count_params(dcfg):,}, sparse {model.activated_params(dcfg):,}")

# %% [markdown]
# The sparse decode path does all the work of the dense one (it multiplies the masked input
# with the full weight, so it reads every weight, the same bytes as dense) *plus* the top-K
# selection and the masking: it cannot be faster except by timing noise, and the printed
# ratio is what that extra work costs on this machine. The measured zeros confirm the
# arithmetic is Q-Sparse's all the same. Note the down projection of the *dense* run: the
# ReLU²-GLU's own zeros (lesson 02) reach it even with top-K off. Where they are close to
# half the inputs, as they are in this random-weight model (compare the two printed `down`
# values), 50% top-K at the down site removes few nonzeros beyond them.
# How much *could* a gathered decode path save? Time this model's projections for one
# token, dense and gathered, site by site, and compare with the whole decode step.

# %%
proj = []
for site, C_in, O in site_shapes(dcfg):
    W = rng.standard_normal((O, C_in)).astype(np.float32)
    W_T = np.ascontiguousarray(W.T)
    x = rng.standard_normal(C_in).astype(np.float32)
    K = kept_count(C_in, dcfg.sparsity)
    proj.append(median_times([lambda: x @ W.T, lambda: gathered_matvec(x, W_T, K),
                              lambda: x[:K] @ W_T[:K]], 200))
proj = np.array(proj).sum(axis=0) * dcfg.n_layer           # (dense, gathered, slice) per token
step = t_dense / n_new
print(f"per token: the projections take {proj[0] * 1e3:.3f} ms dense, {proj[1] * 1e3:.3f} ms gathered, "
      f"{proj[2] * 1e3:.3f} ms with no-copy slices")
print(f"the projections are {proj[0] / step:.0%} of a dense decode step ({step * 1e3:.2f} ms); the rest is "
      "attention, norms, the LM head and Python")

# %% [markdown]
# At this size a good part of a decode step is not the projections (the printed share):
# Python calls, attention, norms, the LM head. And where the NumPy gather is slower than the
# dense product it replaces (compare the first two printed times), swapping it into
# `decode_forward` would not help. What does help is a kernel that reads the selected rows in
# place, with no copy: Section 3b. At the scale
# of Section 1's 2048-channel shape the projections dominate the bytes per token, which is
# where the paper's counting applies.
#
# ## 3b. The row-sparse decode path
#
# `minisparse/rowsparse.py` is the readable reference of the product that reads only what it
# needs: `input_major` stores each projection's weights input-major (Wt = W^T, one row per
# input channel), and `topk_rows_matvec(x, k, Wt)` computes `xs[idx] @ Wt[idx]` for the nonzero
# inputs `idx` only, so ReLU²'s own zeros at the down projection are skipped too. Its fast
# variants live in `minisparse/fast/rowsparse.py`, tested equal to it: `chunked` (NumPy, a
# cache-sized buffer reused) and `numba` (a compiled loop that reads each selected row once,
# when numba is installed). On CuPy arrays two CUDA kernels in `minisparse/fast/rowsparse.cu`
# do it on the GPU: one block finds the top-K (a radix select on the bits of |x|;
# `fast.rowsparse.radix_select` is the same algorithm in NumPy, to read and test without a GPU)
# and writes `idx`, and a second kernel reads only those rows, with no trip to the host in
# between. On the CPU the selection is `fast.topk.topk_nonzero(x, k)`, and a Block Q-Sparse
# model (lesson 06) decodes the same way: `topk_nonzero(x, keep, block)` takes the top `keep`
# of every block of inputs, and `nm_rows_matvec` reads those rows.
#
# `minisparse/fast/decode.py`, `DecodeWeights`, holds the input-major copies and
# `decode_forward(..., fast=...)` uses them for single tokens; `generate.py` does this by
# default (`--kernel`). Its default, 'auto', takes a kernel only where it was measured to pay
# (`fast.rowsparse.auto_method`): numba's for projections of at least 2^17 weights (all of
# this model's), and the masked product elsewhere, and everywhere without numba (NumPy's row
# gathers lose to it on the CPU). With numba, `DecodeWeights` also compiles the whole step of
# a single token (`minisparse/fast/step.py`), dense or sparse: a layer's norms, attention and
# row-sparse products in one compiled call, without Python between them.
#
# The cell prints what 'auto' chooses on this machine, then times the fastest kernel
# installed (`best_method`: numba's, else `chunked`) on every projection of the same model
# against two dense decodes: Section 3's readable NumPy one, and dense through the same
# `DecodeWeights` (the compiled step where numba built one, else the plain product again).
# The second is the fair baseline for what sparsity saves; the first shows what compiling
# adds on top.

# %%
auto = DecodeWeights(dparams, dcfg)                  # 'auto': a kernel only where it pays
print(f"'auto' decodes {len(auto.wt)} of {dcfg.n_layer * 4} projections row-sparse"
      + (f" with {auto.method}" if auto.wt else " (numba is not installed: all take the masked product)"))
method = fast_rowsparse.best_method()
fast = DecodeWeights(dparams, dcfg, method=method)   # every projection row-sparse, with that kernel
meters["rowsparse"] = SparsityMeter()

def run_fast():
    generate(dparams, dcfg, prompt, n_new, temperature=0, meter=meters["rowsparse"], fast=fast)

def run_fast_dense():                                # dense, through the same DecodeWeights
    generate(dparams, dcfg, prompt, n_new, temperature=0, spec=SparseSpec(0.0), fast=fast)


t_dense2, t_dense_fast, t_fast = median_times([lambda: run("dense"), run_fast_dense, run_fast], repeats=15)
same_path = "the compiled step" if fast.step is not None else "the plain product (no compiled step)"
speedup = t_dense_fast / t_fast                      # > 1: sparsity made the same decode path faster
overall = t_dense2 / t_fast                          # against the readable NumPy dense decode
weights_mb = 4 * model.count_params(dcfg) / 2**20     # float32 projection weights a dense token reads
print(f"row-sparse method: {fast.method}, on {len(fast.wt)} of {dcfg.n_layer * 4} projections; "
      f"single tokens through {same_path}")
print(f"decode, batch 1, ms/token: dense NumPy {t_dense2 / n_new * 1e3:.2f}, dense through {same_path} "
      f"{t_dense_fast / n_new * 1e3:.2f}, row-sparse 50% {t_fast / n_new * 1e3:.2f}")
print(f"in this run, 50% top-K decoded {speedup:.2f}x as fast as dense through the same path, "
      + ("faster" if speedup > 1.05 else "slower" if speedup < 0.95 else "about as fast")
      + f" (the projections' ideal is 1/(1 - S) = {1 / (1 - dcfg.sparsity):.1f}x), "
      f"and {overall:.2f}x as fast as the NumPy dense decode")
print(f"on: {machine()}; timed on one thread; projection weights {weights_mb:.0f} MB (float32), "
      f"largest CPU cache {last_level_cache_mb():.0f} MB")
print("measured zeros reaching each site, row-sparse:", {s: round(v, 3) for s, v in meters["rowsparse"].mean().items()})
greedy_fast = generate(dparams, dcfg, prompt, n_new, temperature=0, fast=fast)
greedy_masked = generate(dparams, dcfg, prompt, n_new, temperature=0)
print("greedy tokens equal to the masked path's:", bool(np.array_equal(greedy_fast, greedy_masked)))

# %% [markdown]
# The printed ratios are this run's, on the printed machine, not constants of the method. What
# moves them from machine to machine:
#
# - **numba.** With it (`requirements-lessons.txt` installs it) the kernel is numba's compiled
#   loop, which reads each selected row once, in place, and the whole single-token step is
#   compiled, so the ratio against the NumPy dense decode also counts the Python that compiling
#   removes; the ratio against dense through the same path counts sparsity alone. Without numba
#   `best_method` falls back to NumPy's `chunked` gathers, which copy the rows and lose to the
#   dense product (Section 2's left panel shows what a copy costs).
# - **Memory against cache.** The saving is in bytes read. Where the weights (printed) stream
#   from main memory, reading half of them saves up to half the time; where a large share of
#   them sits in the CPU's caches, the dense product is fast too and the gain shrinks.
# - **What does not shrink.** At this lesson's 512 channels a decode step is largely Python,
#   attention, norms and the LM head (Section 3's printed share), none of which top-K touches,
#   so the whole step gains less than the projections' ideal 1/(1 − S).
# - **The dense side.** The BLAS library and its kernels for the dense product, and, on a
#   shared machine, other jobs on the same cores (the timings take medians, interleaved).
# - **Threads.** The cell runs BLAS and numba on one thread each. With more threads on idle
#   cores both compiled steps get faster, by different amounts; on busy cores a second thread
#   mostly waits, and numba's threaded kernels can then lose several times over.
#
# `benchmarks/decode_speed.py` measures the same comparison for D from 512 to 4096 and a
# 2048-channel model, where the weights' bytes dominate; `benchmarks/RESULTS.md` has its tables
# and machines. What holds on any machine, and Section 4 asserts: the row-sparse path reads only
# the selected rows and still produces the masked path's tokens.
#
# ## 4. Check: the derivations equal the package
#
# - The gathered product equals the masked dense product of
#   `minisparse/linear.py`, `sparse_linear_forward`, and the indices chosen by
#   `argpartition` are exactly `minisparse/topk.py`, `topk_mask` (random floats, no ties).
# - The count of Section 1 at K = C equals `model.count_params` (N), and at sparsity S
#   equals `model.activated_params` (N_a), for both configurations.

# %%
for D in Ds:
    W = rng.standard_normal((D, D)).astype(np.float32)
    W_T = np.ascontiguousarray(W.T)
    x = rng.standard_normal(D).astype(np.float32)
    for S in Ss:
        K = kept_count(D, S)
        mine = gathered_matvec(x, W_T, K)                                     # (O,)
        (pkg,), _ = sparse_linear_forward(x[None, None, :], [W], SparseSpec(S))  # (1, 1, O)
        np.testing.assert_allclose(mine, pkg[0, 0], rtol=1e-5, atol=1e-5 * np.abs(pkg).max())
        my_mask = np.zeros(D, dtype=bool)
        my_mask[topk_idx(x, K)] = True
        np.testing.assert_array_equal(my_mask, topk_mask(x[None, :], K)[0])
for name, c in configs.items():
    assert sum(v[0] for v in per_token_cost(c, 0.0).values()) == model.count_params(c), name
    for S in (0.25, 0.5, 0.75, 0.9):
        sc = dataclasses.replace(c, sparsity=S)
        assert sum(v[0] for v in per_token_cost(sc, S).values()) == model.activated_params(sc), (name, S)
assert np.array_equal(greedy_fast, greedy_masked)
print("ok: gathered rows == masked dense product (rtol 1e-5, atol 1e-5·max|y|), "
      "argpartition's indices == topk_mask, and the counts equal count_params / activated_params")

# %% [markdown]
# ## 5. Longer runs: the same model with its channels in another order
#
# The row-sparse product reads, for every kept input channel i, the row `Wt[i]`. Kept channels
# with neighbouring indices are one stretch of memory, a *run*; each new run starts a new stream,
# and costs about one memory latency before the bytes flow (`benchmarks/RESULTS.md`, Sec. 16.3).
# At 50% top-K with channels kept independently, a row's neighbour is kept half the time, so a
# token's kept rows form about D/4 runs a site. Fewer, longer runs would bring the sparse product's
# rate closer to the dense one's.
#
# The runs can be made longer without changing the model, by storing the channels in another
# order (`minisparse/channel_order.py`). For a permutation P, `y = W x = (W Pᵀ)(P x)`: move W's
# columns with x's channels and y does not change; and top-K ranks |x|, so it keeps the same
# channels at their new positions. Done for every weight that reads or writes a channel (the
# residual stream: one order for every layer; attention's value channels within each head; the
# FFN's hidden units), the model computes exactly what it did, except where two inputs tie
# exactly at the K-th place (top-K keeps the lower index) and for the rounding of sums taken in
# another order. N:M is the exception: its blocks are *consecutive* channels, so a new order
# makes other blocks and another model.
#
# First the idea on made-up selections where it works: 64 channels in 8 hidden groups, scattered,
# and every token keeps 4 whole groups. `channel_order.path` chains channels greedily so that a
# kept channel is followed by one kept with it (C[i, j] = P(j kept and i not), the chance a run
# starts at j after i).

# %%
from minisparse import channel_order as co

rng = np.random.default_rng(0)
where = rng.permutation(64).reshape(8, 8)                 # where group g's 8 channels are stored
kept_toy = np.zeros((400, 64), dtype=bool)
for t in range(400):
    kept_toy[t, where[rng.choice(8, 4, replace=False)].ravel()] = True
toy_order = co.path(co.start_cost([kept_toy[:200]]), kept_toy[:200].mean(axis=0))   # chosen on 200 tokens
held_toy = kept_toy[200:]                                 # measured on 200 others
print(f"made-up selections: {co.runs(held_toy):.1f} runs a token as stored, "
      f"{co.runs(held_toy[:, toy_order]):.1f} in the chosen order (4 groups kept: at most 4 runs, "
      "fewer where two kept groups sit side by side)")

# %% [markdown]
# Now SmolLM2-135M (lesson 10) at 50% top-K: record which channels each site keeps on 256 tokens
# of text, choose the order from them (`channel_order.calibrate`, what `reorder.py` runs), and
# count the runs on 128 other tokens. Then check that the reordered model is the same model, in
# float64, where rounding cannot hide a difference.

# %%
from minisparse import pretrained
from minisparse.data import load_text

sparams, scfg, stok, _ = pretrained.load_gguf("smollm2", block_size=128)
text_ids = np.array(stok.encode(load_text("pydoc")[:200_000]))
calib_ids, held_ids = text_ids[:256].reshape(2, 128), text_ids[20_000:20_128].reshape(1, 128)
sspec = scfg.spec_at(0.5)
t0 = time.perf_counter()
order = co.calibrate(co.selections(sparams, scfg, calib_ids, sspec), scfg)
kept_held = co.selections(sparams, scfg, held_ids, sspec)
before, after = co.runs_per_token(kept_held, scfg), co.runs_per_token(kept_held, scfg, order)
print(f"SmolLM2, 50% top-K, runs a token starts over its 30 layers ({time.perf_counter() - t0:.0f} s to choose and count):")
for site in SITES:
    print(f"  {site:8s} as stored {before[site]:7,.0f}   reordered {after[site]:7,.0f}   ({after[site] / before[site]:.2f}x)")
print(f"  all      as stored {sum(before.values()):7,.0f}   reordered {sum(after.values()):7,.0f}   "
      f"({sum(after.values()) / sum(before.values()):.2f}x)")

m = kept_held[29, "down"][:48, :192]                       # 48 tokens, the first 192 hidden units of the top layer
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
for ax, (title, mm) in zip(axes, [("as stored", m), ("reordered", kept_held[29, "down"][:48, order["ffn"][29]][:, :192])]):
    ax.imshow(mm, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_title(f"layer 29 down, {title}: {co.runs(mm):.0f} runs a token in these 192")
    ax.set_xlabel("channel as stored" if title == "as stored" else "position in the new order")
axes[0].set_ylabel("token")
plt.tight_layout()
plt.show()

p64 = {k: v.astype(np.float64) for k, v in sparams.items()}
q64 = co.apply(p64, scfg, order)
ids_check = held_ids[:, :16]
l_stored = model.forward(p64, dataclasses.replace(scfg, sparsity=0.5), ids_check)[0]
l_reordered = model.forward(q64, dataclasses.replace(scfg, sparsity=0.5), ids_check)[0]
rel = float(np.abs(l_stored - l_reordered).max() / np.abs(l_stored).max())
print(f"float64, 16 tokens at 50% top-K: the reordered logits are {rel:.1e} from the stored order's, relative")
assert rel < 1e-10
del p64, q64

# %% [markdown]
# On real text the picture is the left one with its columns shuffled, not sorted into blocks.
# The chosen order starts somewhat fewer runs (the printed ratios), and the reason there are not
# far fewer is in the selections themselves: almost every channel of SmolLM2 is kept close to
# half the time, and two channels' selections are nearly independent (mean |correlation| about
# 0.03 at the qkv, up_gate and down sites). With no channel kept nearly always or nearly never,
# and nothing kept together, no order can put the kept channels of most tokens side by side;
# attention's value channels, whose frequencies spread wider, gain the most.
# `benchmarks/channel_order.py` prints these statistics layer by layer, and
# `benchmarks/RESULTS.md` what the order buys in GB/s and tokens/s.
#
# To use an order: `python reorder.py --init_from smollm2 --sparsity 0.5 --to smollm2.order.npz`,
# then `generate.py ... --channel_order smollm2.order.npz`; `export.py --channel_order` writes the
# reordered weights (without it, the order they are stored in). `tests/test_channel_order.py`
# holds every generate.py path of the reordered model to the stored model's reference text in
# float64, and its float32 paths to the near-tie rule.
