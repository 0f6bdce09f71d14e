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
# # 03 · The sparse projection, forward and backward by hand
#
# Q-Sparse changes one thing in a Transformer: before every projection inside a block, the
# input is sparsified per token, and the projection multiplies only what is left
# (paper Eq. 2-3):
#
# $$Y = (X \odot \mathrm{Mask})\,W^\top, \qquad \mathrm{Mask} = \mathrm{TopK}(|X|).$$
#
# In minisparse this is **`minisparse/linear.py`**: `sparsify` makes the mask,
# `sparse_linear_forward` does the product, `sparse_linear_backward` the gradients. The model
# calls it at four sites per block (`minisparse/model.py`, `SITES`): `qkv`, `o`, `up_gate`,
# `down`.
#
# This lesson derives the backward pass by hand, asks you to write it in plain NumPy (an
# exercise with a checker; the answer is in `lessons/solutions/sparse_projection.py`), and
# checks it three ways: against the package (float64, to rounding), against centred finite
# differences where the function is smooth (sparsity 0), and, for the straight-through
# estimator (STE), by its definition, because finite differences *cannot* check an STE.
# Then it shows what the package reports as measured sparsity and counts the
# multiply-adds that the zeros save.

# %%
import numpy as np
import matplotlib.pyplot as plt

from minisparse.linear import SparseSpec, sparsify, sparse_linear_forward, sparse_linear_backward, zero_fraction
from minisparse.topk import kept_count, topk_backward, topk_mask
from minisparse import model
from minisparse.fast import topk as fast_topk
# the same centred finite differences and error measure as the tests use
from minisparse.gradcheck import numerical_grad, rel_error

rng = np.random.default_rng(0)


# %% [markdown]
# ## 1. The forward pass and its shapes
#
# | array | shape | meaning |
# |---|---|---|
# | $X$ | (B, T, C) | projection input: B sequences, T positions, C channels |
# | $\mathrm{Mask}$ | (B, T, C) | 1 at the K largest $\lvert X\rvert$ of each token (each (b, t) row), 0 elsewhere |
# | $X_s = X\odot \mathrm{Mask}$ | (B, T, C) | the sparsified input |
# | $W$ | (O, C) | weight, one row per output feature |
# | $Y = X_s W^\top$ | (B, T, O) | output |
#
# In index form, with $N = B\cdot T$ tokens flattened into one axis $n$:
#
# $$Y_{n o} = \sum_{c=1}^{C} X_{s,nc}\, W_{oc}, \qquad X_{s,nc} = X_{nc}\,\mathrm{Mask}_{nc}.$$
#
# K comes from the sparsity S as `K = C - floor(S·C + 1/2)` (`minisparse/topk.py`,
# `kept_count`). The mask itself is `topk_mask` (`minisparse/topk.py`): lesson 01
# (section 3) writes an independent stable-sort top-K and checks `topk_mask` against it on
# ties, zeros and identical rows, so this lesson takes the mask as given and writes the
# projection around it by hand.

# %%
B, T, C, O = 2, 3, 8, 5
S = 0.5
K = kept_count(C, S)
print(f"C = {C}, sparsity S = {S}  ->  K = {K} channels kept per token")

X = rng.standard_normal((B, T, C))            # (B, T, C)
W = rng.standard_normal((O, C))               # (O, C)


def hand_forward(X, W, K):
    Mask = topk_mask(X, K)                    # (B, T, C), checked in lesson 01
    Xs = X * Mask                             # (B, T, C)
    Y = np.einsum("btc,oc->bto", Xs, W)       # (B, T, O): Y[n, o] = sum_c Xs[n, c] W[o, c]
    return Y, Xs, Mask


Y_hand, Xs_hand, Mask_hand = hand_forward(X, W, K)
(Y_pkg,), cache = sparse_linear_forward(X, [W], SparseSpec(S))
print("forward: hand vs minisparse, max |diff| =", np.abs(Y_hand - Y_pkg).max())
# the cache keeps the sparsified input xs (cache[0]) and the mask (cache[1]); only the masked-gradient
# ablation reads the mask, so the fast ops' sparsify (fast/topk.py) skips it under the STE
print("sparsified inputs identical:", np.array_equal(Xs_hand.reshape(-1, C), cache[0]))
print("masks identical:", np.array_equal(Mask_hand, cache[1]))

# %% [markdown]
# Every token picks its own K channels. Looking at the mask of the six tokens makes that
# plain: no column is kept by every row. (That per-token pattern is what Block Q-Sparse,
# lesson 06, regularises for batched kernels.)

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 2.6))
axes[0].imshow(X.reshape(B * T, C), cmap="RdBu", vmin=-2.5, vmax=2.5)
axes[0].set_title("X (tokens x channels)")
axes[1].imshow(Mask_hand.reshape(B * T, C), cmap="Greys", vmin=0, vmax=1)
axes[1].set_title(f"Mask = TopK(|X|), K = {K} of {C} (black = kept)")
for ax in axes:
    ax.set_xlabel("channel c"); ax.set_ylabel("token n = (b, t)")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 2. The backward pass, derived
#
# A scalar loss $L$ sits somewhere downstream; backward receives
# $dY = \partial L/\partial Y$, shape (B, T, O), and must return $dW$ (O, C) and $dX$ (B, T, C).
#
# **Weight.** $W_{oc}$ appears in $Y_{no}$ for every token $n$, multiplied by $X_{s,nc}$:
#
# $$dW_{oc} = \sum_{n} dY_{no}\, X_{s,nc} \quad\Longrightarrow\quad dW = dY^\top X_s \qquad (O, N)\,(N, C) = (O, C).$$
#
# The sum over $n$ runs over both B and T: every token's gradient lands on the same weight.
#
# **Sparsified input.** $X_{s,nc}$ appears in $Y_{no}$ for every output $o$, multiplied by $W_{oc}$:
#
# $$dX_{s,nc} = \sum_{o} dY_{no}\, W_{oc} \quad\Longrightarrow\quad dX_s = dY\, W \qquad (B, T, O)\,(O, C) = (B, T, C).$$
#
# **Input, through the mask.** $X_{s,nc} = X_{nc}\,\mathrm{Mask}_{nc}$, and the mask is a
# step function of $X$: it is constant in a neighbourhood of any $X$ whose row has no tie at
# the K-th place, so there
#
# $$\frac{\partial X_{s,nc}}{\partial X_{nc'}} = \mathrm{Mask}_{nc}\,\delta_{cc'} \quad\Longrightarrow\quad dX = dX_s \odot \mathrm{Mask} \qquad \text{(Eq. 12, the true derivative)}.$$
#
# Q-Sparse does **not** use it. The paper (Sec. 2.2, Fig. 2) shows that the masked gradient
# leaves the dropped channels with nothing, and gradient norms vanish in the lower layers.
# It uses the straight-through estimator instead, which treats sparsification as the
# identity on the way back:
#
# $$dX = dX_s \qquad \text{(Eq. 13, STE)}.$$
#
# `minisparse/linear.py`, `sparse_linear_backward` computes $dW$ and $dX_s$;
# `minisparse/topk.py`, `topk_backward` turns $dX_s$ into $dX$ (`ste=True`: Eq. 13;
# `ste=False`: Eq. 12).
#
# ### Exercise: write the backward yourself
#
# Fill in `my_projection_backward` below: given the upstream gradient `dout` (B, T, O), the
# input `x` and its top-K `mask` (B, T, C), and the weight `W` (O, C) of `y = (x * mask) @ W.T`,
# return `dx` (B, T, C) with the straight-through estimator, and `dW` (O, C). It takes two or
# three lines of NumPy (`np.einsum` spells out each sum; `@` works too). Then run the checker
# cell after it. The checker
#
# - compares your `dW` with centred finite differences of $L = \sum Y \odot dout$ with respect
#   to $W$, in float64 (the mask depends on $x$ only, so $L$ is a smooth, in fact linear,
#   function of $W$, and finite differences measure its true gradient);
# - compares your `dx` with the STE's definition, `dout @ W` at **every** channel, dropped ones
#   included. Finite differences would measure the masked gradient here instead (section 4
#   shows why), so they cannot check an STE.
#
# It prints both relative errors and PASS or FAIL, with a hint for the usual mistakes. While
# the function still raises `NotImplementedError`, the checker says so and the notebook runs
# on. The answer is in `lessons/solutions/sparse_projection.py`; the rest of this lesson uses it.

# %%
def my_projection_backward(dout, x, W, mask):
    """Backward of y = (x * mask) @ W.T with the straight-through estimator (Eq. 13).
    dout (B, T, O), x and mask (B, T, C), W (O, C)  ->  (dx (B, T, C), dW (O, C))."""
    raise NotImplementedError          # your code here: replace this line


# %%
def check_projection_backward(fn, seed=0):
    """Check fn(dout, x, W, mask) -> (dx, dW). Returns True (PASS), False (FAIL) or None (not written)."""
    r = np.random.default_rng(seed)
    x = r.standard_normal((2, 3, 8))                          # (B, T, C)
    W = r.standard_normal((5, 8))                             # (O, C)
    dout = r.standard_normal((2, 3, 5))                       # (B, T, O), not all ones
    mask = topk_mask(x, kept_count(8, 0.5))                   # (B, T, C), 4 of 8 kept per token
    try:
        dx, dW = fn(dout, x.copy(), W.copy(), mask.copy())
    except NotImplementedError:
        print("not written yet: fill in the function, then run this cell again")
        return None
    dx, dW = np.asarray(dx, dtype=np.float64), np.asarray(dW, dtype=np.float64)
    if dx.shape != x.shape or dW.shape != W.shape:
        print(f"FAIL: dx has shape {dx.shape} (want {x.shape}), dW {dW.shape} (want {W.shape})")
        return False
    Wf = W.copy()                                             # finite differences move Wf in place
    num_dW = numerical_grad(lambda: float((dout * ((x * mask) @ Wf.T)).sum()), Wf)
    ste_dx = dout @ W                                         # the STE's dx, by definition
    err_dW, err_dx = rel_error(dW, num_dW), rel_error(dx, ste_dx)
    ok = err_dW < 1e-6 and err_dx < 1e-10
    print(f"dW against finite differences (float64): rel error {err_dW:.1e}   (pass below 1e-6)")
    print(f"dx against the STE's dout @ W:           rel error {err_dx:.1e}   (pass below 1e-10)")
    print("PASS" if ok else "FAIL")
    if err_dx >= 1e-10 and rel_error(dx, ste_dx * mask) < 1e-10:
        print("hint: your dx is the masked gradient dxs * mask (Eq. 12); the STE passes dxs to every channel")
    if err_dW >= 1e-6 and rel_error(dW, np.einsum("bto,btc->oc", dout, x)) < 1e-10:
        print("hint: your dW uses x; it must use the sparsified xs = x * mask, which the forward multiplied")
    return ok


check_projection_backward(my_projection_backward)

# %% [markdown]
# The answer, `projection_backward` in `lessons/solutions/sparse_projection.py`, is those
# formulas in two `einsum` lines. The rest of the lesson uses it as the hand derivation and
# compares it with the package, under both rules: for the masked gradient (Eq. 12) the hand
# version multiplies its `dx` by the mask.

# %%
from solutions.sparse_projection import projection_backward      # lessons/solutions/

dY = rng.standard_normal((B, T, O))           # a random upstream gradient, never all ones

for ste in (True, False):
    (_,), cache = sparse_linear_forward(X, [W], SparseSpec(S, ste=ste))
    dX_pkg, (dW_pkg,) = sparse_linear_backward([dY], cache)
    dX_h, dW_h = projection_backward(dY, X, W, Mask_hand)
    dX_h = dX_h if ste else dX_h * Mask_hand  # Eq. 13 (STE) or Eq. 12 (masked)
    print(f"ste={ste!s:5}  rel error dX = {rel_error(dX_h, dX_pkg):.1e}   dW = {rel_error(dW_h, dW_pkg):.1e}")

# %% [markdown]
# Note what $dW$ inherits from the mask without any extra code: $dW = dY^\top X_s$ uses the
# *sparsified* input, so a weight column gets gradient only from the tokens that kept that
# channel. Only $dX$ has a choice to make.

# %% [markdown]
# ## 3. Finite differences at sparsity 0
#
# At S = 0 the mask is all ones, the projection is the smooth function $Y = XW^\top$, and
# the derivation can be checked against centred finite differences
# $\partial L/\partial\theta \approx (L(\theta+h)-L(\theta-h))/2h$ of the scalar
# $L = \sum Y\odot dY$ (so $\partial L/\partial Y = dY$, the random upstream gradient).
# Float64, h = 1e-6.

# %%
def loss_of(X, W, spec):
    (Y,), _ = sparse_linear_forward(X, [W], spec)
    return float((Y * dY).sum())


X0, W0 = X.copy(), W.copy()
dX_h0, dW_h0 = projection_backward(dY, X0, W0, np.ones_like(X0, dtype=bool))
num_dX0 = numerical_grad(lambda: loss_of(X0, W0, SparseSpec(0.0)), X0)
num_dW0 = numerical_grad(lambda: loss_of(X0, W0, SparseSpec(0.0)), W0)
err_fd_dX0, err_fd_dW0 = rel_error(dX_h0, num_dX0), rel_error(dW_h0, num_dW0)
print(f"S = 0: hand vs finite differences, rel error dX = {err_fd_dX0:.1e}, dW = {err_fd_dW0:.1e}")

# %% [markdown]
# ## 4. Why finite differences cannot check the STE
#
# Finite differences measure the derivative of the forward function. The STE is, by
# design, **not** that derivative: it returns $dX_s$ at every channel, including the ones
# the forward threw away, where the loss does not depend on $X$ at all (locally).
# So at S = 0.5:
#
# * finite differences should agree with the **masked** gradient $dX_s\odot\mathrm{Mask}$
#   (Eq. 12), as long as the step $h$ cannot reorder $\lvert X\rvert$ around the K-th
#   place (no ties within $h$), and
# * they should disagree with the STE at every dropped channel.
#
# The STE is then checked by its definition instead: the package's $dX$ equals the upstream
# $dX_s = dY\,W$ (to rounding, since our `einsum` and the package's BLAS call add in a
# different order), and `topk_backward` with `ste=True` hands back its input untouched, bit
# for bit.

# %%
absX = np.sort(np.abs(X), axis=-1)[..., ::-1]            # (B, T, C) each row, descending
margin = (absX[..., K - 1] - absX[..., K]).min()          # smallest gap at the K-th place
h = 1e-6
print(f"smallest gap between the K-th and (K+1)-th |x| of a row: {margin:.3g}  (step h = {h:g})")
assert margin > 1e3 * h, "a near-tie: finite differences would flip the mask"

Xf = X.copy()
num_dX = numerical_grad(lambda: loss_of(Xf, W, SparseSpec(S)), Xf, h)
dXs, _ = projection_backward(dY, X, W, Mask_hand)        # the STE's dX is dXs = dY W
err_fd_masked = rel_error(num_dX, dXs * Mask_hand)
err_fd_ste = rel_error(num_dX, dXs)
print(f"S = {S}: finite differences vs masked dXs*Mask (Eq. 12): rel error {err_fd_masked:.1e}")
print(f"S = {S}: finite differences vs STE dXs        (Eq. 13): rel error {err_fd_ste:.1e}")
print("finite-difference gradient at dropped channels: max |.| =", np.abs(num_dX[~Mask_hand]).max())

(_,), cache_ste = sparse_linear_forward(X, [W], SparseSpec(S, ste=True))
dX_ste_pkg, _ = sparse_linear_backward([dY], cache_ste)
err_ste_def = rel_error(dX_ste_pkg, dXs)
G = rng.standard_normal(X.shape)                         # any upstream gradient
ste_identity = np.array_equal(topk_backward(G, Mask_hand, ste=True), G)
masked_is_masked = np.array_equal(topk_backward(G, Mask_hand, ste=False), G * Mask_hand)
print(f"STE by definition: package dX vs dXs = dY W, rel error {err_ste_def:.1e}")
print("topk_backward(G, mask, ste=True) is G, bit for bit:", ste_identity)
print("topk_backward(G, mask, ste=False) is G * mask, bit for bit:", masked_is_masked)

# %% [markdown]
# So the masked gradient is the true derivative, and the STE is a deliberate choice to use
# something else. What the STE returns at a dropped channel is the slope the loss *would*
# have if that channel were kept: the derivative of the dense function $X W^\top$.
#
# The plot makes it concrete. Take one dropped entry $X_{nc}$ and move it by $t$. While it
# stays outside the top-K the loss is flat (true derivative 0); once $\lvert X_{nc}+t\rvert$
# passes the K-th largest of the other entries, it enters the mask, evicts another channel,
# and the loss jumps. The STE's line (slope $dX_{s,nc}$) ignores the flat part and the jump.

# %%
n_flat = np.flatnonzero(~Mask_hand.reshape(-1, C).all(axis=-1))[0]        # a token
c_drop = np.flatnonzero(~Mask_hand.reshape(-1, C)[n_flat])[0]             # one of its dropped channels
b_, t_ = divmod(n_flat, T)
ts = np.linspace(-3, 3, 601)
L_t = []
for t in ts:
    Xt = X.copy(); Xt[b_, t_, c_drop] += t
    L_t.append(loss_of(Xt, W, SparseSpec(S)))
L0 = loss_of(X, W, SparseSpec(S))
slope_ste = dXs[b_, t_, c_drop]

plt.figure(figsize=(6.5, 3.6))
plt.plot(X[b_, t_, c_drop] + ts, L_t, label="L(x) with top-K (the true function)")
plt.plot(X[b_, t_, c_drop] + ts, L0 + slope_ste * ts, "--", label=f"STE's line, slope dXs = {slope_ste:.2f}")
plt.axvline(X[b_, t_, c_drop], color="grey", lw=0.8, label="current value (dropped)")
plt.xlabel(f"value of X[{b_}, {t_}, {c_drop}]"); plt.ylabel("loss L = sum(Y * dY)")
plt.title("a dropped entry: flat loss, jump on entering the top-K")
plt.legend(fontsize=8); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5. One sparsified input, several weights: q, k, v
#
# In attention the three projections q, k, v read the same normalised input $X$. Q-Sparse
# sparsifies it **once**, and all three weights see the same $X_s$
# (`sparse_linear_forward(h, [Wq, Wk, Wv], spec)` in `minisparse/model.py`). $X_s$ then
# feeds three outputs, so by the multivariable chain rule its gradient is the sum of three
# contributions:
#
# $$dX_s = dY_q W_q + dY_k W_k + dY_v W_v, \qquad dW_i = dY_i^\top X_s,$$
#
# which is the loop with `dxs2 = dxs2 + d` in `sparse_linear_backward`. The same holds for
# the FFN's up and gate projections. Equivalently, it is one projection with the stacked
# weight $[W_q; W_k; W_v]$ of shape (3·O, C).

# %%
Wq, Wk, Wv = (rng.standard_normal((O, C)) for _ in range(3))       # (O, C) each
dYq, dYk, dYv = (rng.standard_normal((B, T, O)) for _ in range(3))  # (B, T, O) each

(yq, yk, yv), cache_qkv = sparse_linear_forward(X, [Wq, Wk, Wv], SparseSpec(S))
dX_qkv, (dWq, dWk, dWv) = sparse_linear_backward([dYq, dYk, dYv], cache_qkv)

# by hand: each weight on its own, then the sum
parts = [projection_backward(dYi, X, Wi, Mask_hand) for dYi, Wi in ((dYq, Wq), (dYk, Wk), (dYv, Wv))]
dX_sum = parts[0][0] + parts[1][0] + parts[2][0]
err_shared_dX = rel_error(dX_qkv, dX_sum)
err_shared_dW = max(rel_error(a, p[1]) for a, p in zip((dWq, dWk, dWv), parts))
print(f"shared input: package dX vs sum of three hand dX: rel error {err_shared_dX:.1e}; dW: {err_shared_dW:.1e}")

# the same as one projection with the stacked weight (3*O, C)
(y_stack,), cache_stack = sparse_linear_forward(X, [np.concatenate([Wq, Wk, Wv])], SparseSpec(S))
dX_stack, _ = sparse_linear_backward([np.concatenate([dYq, dYk, dYv], axis=-1)], cache_stack)
print("stacked weight gives the same dX: rel error", f"{rel_error(dX_stack, dX_qkv):.1e}")
print("each separate dX alone differs from the sum: rel error",
      f"{rel_error(parts[0][0], dX_qkv):.2f} (only dY_q's part)")

# %% [markdown]
# ## 6. Measured sparsity: the zeros that actually reached the projection
#
# `zero_fraction(cache)` counts, in the `xs2` that `sparse_linear_forward` cached, the
# fraction of the input entries that are zero *after* sparsification (counted only when
# asked: the step itself does not need it). This is what the paper's Table 2 reports, and
# what `model.measured_sparsity` reads. It counts top-K's zeros **and** any zeros the input already had. On a Gaussian input
# it equals the nominal $1 - K/C$; on an input with its own zeros (like the ReLU²-GLU output
# that feeds the `down` projection) it can be higher.

# %%
Cbig = 128
Xg = rng.standard_normal((4, 16, Cbig))                        # no zeros of its own
Xr = np.maximum(rng.standard_normal((4, 16, Cbig)), 0) ** 2    # ReLU^2: about half exact zeros
rows = []
for name, Xin in (("Gaussian", Xg), ("ReLU^2 output", Xr)):
    own = float((Xin == 0).mean())
    for s in (0.0, 0.3, 0.5, 0.7):
        _, c = sparse_linear_forward(Xin, [rng.standard_normal((8, Cbig))], SparseSpec(s))
        nominal = 1 - kept_count(Cbig, s) / Cbig
        rows.append((name, own, s, nominal, zero_fraction(c)))
        print(f"{name:14s} own zeros {own:.3f}   S = {s:.1f}  nominal 1-K/C = {nominal:.3f}   measured zero_frac = {zero_fraction(c):.3f}")
gauss_rows = [r for r in rows if r[0] == "Gaussian"]
relu_rows = [r for r in rows if r[0] != "Gaussian"]

# %% [markdown]
# On the ReLU² input, each token ends with max(its own zeros, C - K) zeros: top-K keeps K
# entries by $\lvert x\rvert$, and if fewer than K are nonzero, some of the "kept" ones are
# already zero. Averaged over tokens, the measured fraction is therefore at least the larger
# of the two averages, and a little above it where tokens differ. In a model the same happens
# at the `down` site, whose input is the ReLU²-GLU output. The cell prints what one forward
# pass of a randomly initialised model measures (random weights, not a trained model):

# %%
cfg = model.GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, sparsity=0.5)
params = model.init_params(cfg, seed=0)
idx = rng.integers(0, cfg.vocab_size, (4, 32))
_, _, caches = model.forward(params, cfg, idx)
mean_sp = model.mean_sparsity(cfg, caches)
for site, v in mean_sp.items():
    print(f"site {site:8s} measured zero fraction {v:.3f}   (nominal {cfg.sparsity})")

# %% [markdown]
# The three sites fed by an RMSNorm or by attention read exactly the nominal sparsity: their
# inputs have no zeros of their own. Only `down`, fed by the ReLU²-GLU, reads more: the tokens
# whose natural zeros already exceed C − K keep all of them.

# %% [markdown]
# ## 7. What the zeros save: multiply-adds
#
# A dense projection of N = B·T tokens costs $N\cdot C\cdot O$ multiply-adds. With K of the
# C inputs kept per token, a kernel that skips zeros needs only $N\cdot K\cdot O$: for each
# token, gather the K kept channels and multiply by those K columns of $W$,
# $Y_n = W_{:,\,\mathrm{idx}_n}\, X_{n,\,\mathrm{idx}_n}$. The cell below does exactly that
# for every token and checks it against the package's output.
#
# Be honest about what minisparse does: `sparse_linear_forward` multiplies the zeros too
# (`xs2 @ W.T`, one dense BLAS call per weight). Skipping zeros pays only with a kernel built
# for it. The count below is what such a kernel *could* save; lesson 07 measures times.

# %%
Bm, Tm, Cm, Om, Sm = 12, 64, 128, 3 * 128, 0.5      # the qkv site of the default model, batch 12 x 64
Km = kept_count(Cm, Sm)
Xm = rng.standard_normal((Bm, Tm, Cm))
Wm = rng.standard_normal((Om, Cm)) * 0.02
(Ym,), cache_m = sparse_linear_forward(Xm, [Wm], SparseSpec(Sm))

# the gathered product: K * O multiply-adds per token
Xs_m = cache_m[0]                                            # (N, C), the sparsified input
idx_kept = np.argsort(Xs_m == 0, axis=-1, kind="stable")[:, :Km]   # (N, K) kept channels of each token
Y_gather = np.empty((Bm * Tm, Om))
for n in range(Bm * Tm):                                     # one token: (O, K) @ (K,)
    Y_gather[n] = Wm[:, idx_kept[n]] @ Xs_m[n, idx_kept[n]]
err_gather = rel_error(Y_gather, Ym.reshape(-1, Om))
print(f"gathered product vs package output: rel error {err_gather:.1e}")

N = Bm * Tm
macs_dense = N * Cm * Om
macs_sparse = N * Km * Om
macs_measured = int((Xs_m != 0).sum()) * Om                  # nonzeros that reached it, times O
print(f"N = {N} tokens, C = {Cm}, O = {Om}, K = {Km}")
print(f"dense   N*C*O = {macs_dense:,} multiply-adds")
print(f"sparse  N*K*O = {macs_sparse:,} multiply-adds  ({macs_sparse / macs_dense:.0%} of dense)")
print(f"counted from the nonzeros of Xs: {macs_measured:,}")

# %% [markdown]
# In training, the backward has two more products. $dW = dY^\top X_s$ reads the same sparse
# $X_s$, so it saves the same fraction. $dX_s = dY\,W$ does **not** with the STE: Eq. 13
# passes $dX_s$ to all C channels, dropped ones included, so all of it must be computed.
# With the masked gradient (Eq. 12) only the K kept channels of $dX_s$ would be needed; the
# STE's better gradients cost that saving.

# %%
sparsities = np.array([0.0, 0.25, 0.5, 0.625, 0.75])
fwd = [N * kept_count(Cm, s) * Om / macs_dense for s in sparsities]
train_ste = [(2 * N * kept_count(Cm, s) * Om + N * Cm * Om) / (3 * macs_dense) for s in sparsities]
train_masked = [3 * N * kept_count(Cm, s) * Om / (3 * macs_dense) for s in sparsities]
w = 0.27
xpos = np.arange(len(sparsities))
plt.figure(figsize=(6.5, 3.6))
plt.bar(xpos - w, fwd, w, label="forward: N*K*O")
plt.bar(xpos, train_ste, w, label="forward + backward, STE")
plt.bar(xpos + w, train_masked, w, label="forward + backward, masked")
plt.xticks(xpos, [f"{s:g}" for s in sparsities])
plt.xlabel("sparsity S"); plt.ylabel("multiply-adds / dense")
plt.title(f"one projection, C = {Cm}, O = {Om}")
plt.legend(fontsize=8); plt.tight_layout(); plt.show()
for s, a, b_ in zip(sparsities, fwd, train_ste):
    print(f"S = {s:<5g} forward {a:.3f} of dense, one training step with the STE {b_:.3f} of dense")

# %% [markdown]
# ## 8. The hand derivation equals the package
#
# Every claim of this lesson, as an assert (float64; "to rounding" means 1e-12 relative):
#
# * `sparsify` makes `topk_mask`'s mask, the hand forward equals `sparse_linear_forward`,
#   and the fast ops' STE shortcut (`minisparse/fast/topk.py`, `sparsify`) returns the same `xs`;
# * the exercise's checker passes the answer (`lessons/solutions/sparse_projection.py`),
#   fails two planted wrong answers (the masked $dX$ of Eq. 12, and a $dW$ from the
#   unsparsified $X$), and calls a stub that raises `NotImplementedError` not written;
# * the answer's $dW = dY^\top X_s$ and $dX$ (STE and masked) equal `sparse_linear_backward`;
# * at S = 0 both agree with finite differences to 1e-6;
# * at S = 0.5 finite differences equal the masked gradient (1e-6) and not the STE, and the
#   package's STE gradient equals $dX_s = dY\,W$ (its definition), `topk_backward` passes
#   the upstream through bit for bit;
# * the shared input's gradient is the sum of the three;
# * the measured zero fraction is the nominal one on a Gaussian input and at least it otherwise;
# * the gathered product (N·K·O multiply-adds) equals the package's output.

# %%
TOL_ROUND, TOL_FD = 1e-12, 1e-6


def masked_dx(dout, x, W, mask):          # planted wrong answer: Eq. 12's dx, not the STE's
    dx, dW = projection_backward(dout, x, W, mask)
    return dx * mask, dW


def dense_dW(dout, x, W, mask):           # planted wrong answer: dW from x instead of x * mask
    dx, _ = projection_backward(dout, x, W, mask)
    return dx, np.einsum("bto,btc->oc", dout, x)


def stub(dout, x, W, mask):
    raise NotImplementedError


print("the checker on the answer, then on two wrong ones and a stub:")
assert check_projection_backward(projection_backward) is True
assert check_projection_backward(masked_dx) is False
assert check_projection_backward(dense_dW) is False
assert check_projection_backward(stub) is None
Xs_pkg, Mask_pkg = sparsify(X, SparseSpec(S, ste=False))      # the masked-gradient spec
np.testing.assert_array_equal(Mask_hand, Mask_pkg)
np.testing.assert_array_equal(Xs_hand, Xs_pkg)
np.testing.assert_array_equal(Xs_hand, sparsify(X, SparseSpec(S))[0])   # the STE spec: the same xs
np.testing.assert_array_equal(Mask_hand, sparsify(X, SparseSpec(S))[1])  # ... and the same mask
xs_fast, mask_fast = fast_topk.sparsify(X, SparseSpec(S))                 # the STE shortcut: xs alone
np.testing.assert_array_equal(Xs_hand, xs_fast)
assert mask_fast is None
np.testing.assert_allclose(Y_hand, Y_pkg, rtol=TOL_ROUND, atol=TOL_ROUND)

for ste in (True, False):
    (_,), cache = sparse_linear_forward(X, [W], SparseSpec(S, ste=ste))
    dX_pkg, (dW_pkg,) = sparse_linear_backward([dY], cache)
    dX_h, dW_h = projection_backward(dY, X, W, Mask_hand)
    dX_h = dX_h if ste else dX_h * Mask_hand
    np.testing.assert_allclose(dW_h, dW_pkg, rtol=TOL_ROUND, atol=TOL_ROUND)
    np.testing.assert_allclose(dX_h, dX_pkg, rtol=TOL_ROUND, atol=TOL_ROUND)

(_,), cache0 = sparse_linear_forward(X, [W], SparseSpec(0.0))
dX_pkg0, (dW_pkg0,) = sparse_linear_backward([dY], cache0)
np.testing.assert_allclose(dX_h0, dX_pkg0, rtol=TOL_ROUND, atol=TOL_ROUND)
np.testing.assert_allclose(dW_h0, dW_pkg0, rtol=TOL_ROUND, atol=TOL_ROUND)
assert err_fd_dX0 < TOL_FD and err_fd_dW0 < TOL_FD

assert err_fd_masked < TOL_FD          # finite differences = masked gradient (Eq. 12)
assert err_fd_ste > 0.1                # ... and not the STE (Eq. 13)
assert err_ste_def < TOL_ROUND         # the STE by its definition: dX is dXs = dY W
assert ste_identity and masked_is_masked

assert err_shared_dX < TOL_ROUND and err_shared_dW < TOL_ROUND
assert rel_error(dX_stack, dX_qkv) < TOL_ROUND

for _, own, s, nominal, measured in gauss_rows:
    assert own == 0 and abs(measured - nominal) < 1e-12
for _, own, s, nominal, measured in relu_rows:
    assert measured >= max(own, nominal) - 1e-12
assert mean_sp["down"] >= cfg.sparsity - 1e-12

assert err_gather < TOL_ROUND
assert macs_measured == macs_sparse == N * Km * Om
print("all checks passed: the hand derivation equals minisparse/linear.py")
