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
# # 01 · Top-K sparsification and the straight-through estimator
#
# Q-Sparse replaces every projection inside a Transformer block, `Y = X · Wᵀ`, by
#
#     Y = (X ⊙ Mask) · Wᵀ,   Mask = TopK(|X|)                         (Eq. 2, 3)
#
# For each token (each row of X, shape (N, D)) the mask is 1 at the K entries of largest
# absolute value and 0 elsewhere. The mask is a step function of X: its derivative is zero
# almost everywhere, so training needs a rule for the backward pass. Two candidates:
#
#     dX = dXs ⊙ Mask        plain backprop through the mask                (Eq. 12)
#     dX = dXs               straight-through estimator (STE)               (Eq. 13)
#
# where `dXs` is the gradient that reaches the sparsified input `Xs = X ⊙ Mask`. The paper
# (Fig. 2) shows that with Eq. 12 the gradient norms shrink in the lower layers of a 300M
# model, and uses Eq. 13.
#
# This lesson:
# 1. builds the mask on a small matrix and looks at it (`minisparse/topk.py`, `topk_mask`);
# 2. derives K from the sparsity S (`kept_count`);
# 3. handles ties and rows of exact zeros, and checks the mask against an independent
#    top-K by sorting;
# 4. applies both backward rules by hand (`topk_backward`, and the projection's
#    `sparse_linear_backward` in `minisparse/linear.py`; lesson 03 derives the projection's
#    own backward);
# 5. measures per-layer gradient norms with STE, without STE and dense: the paper's
#    Fig. 2 at tiny scale, at initialisation and after a short training run;
# 6. ends by asserting that every hand derivation equals the package's result.

# %%
import dataclasses
import time
import numpy as np
import matplotlib.pyplot as plt

from minisparse import model
from minisparse.model import GPTConfig, init_params
from minisparse.topk import kept_count, topk_mask, topk_forward, topk_backward
from minisparse.linear import SparseSpec, sparse_linear_forward, sparse_linear_backward
from minisparse.data import load_text, train_tokenizer, split_ids, get_batch
from minisparse.train import TrainConfig, train, load_run

print("numpy", np.__version__)

# %% [markdown]
# ## 1. The mask on a small matrix
#
# Six tokens of D = 16 channels, sparsity S = 0.5. `topk_forward(x, k)` returns the
# sparsified `xs = x * mask` and the boolean `mask` (what the backward needs). The
# selection is per row: every token chooses its own K channels, by magnitude, so a large
# negative value is kept just like a large positive one.

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((6, 16))                      # (N, D)
S = 0.5
K = kept_count(x.shape[-1], S)
xs, mask = topk_forward(x, K)                         # (N, D), (N, D) bool
print(f"D = {x.shape[-1]}, S = {S}: K = {K} kept per row")
print("kept per row:", mask.sum(axis=-1))
print("row 0:      x =", np.round(x[0], 2))
print("row 0: mask   =", mask[0].astype(int))

fig, axes = plt.subplots(1, 3, figsize=(12, 2.8))
for ax, img, title, cmap in ((axes[0], x, "x", "RdBu_r"), (axes[1], mask, f"mask = TopK(|x|), K = {K}", "Greys"),
                             (axes[2], xs, "xs = x * mask", "RdBu_r")):
    lim = np.abs(x).max()
    im = ax.imshow(img, cmap=cmap, vmin=(-lim if cmap == "RdBu_r" else 0), vmax=(lim if cmap == "RdBu_r" else 1))
    ax.set_title(title)
    ax.set_xlabel("channel (D)")
    ax.set_ylabel("token (N)")
    fig.colorbar(im, ax=ax, fraction=0.03)
plt.tight_layout()
plt.show()

# %% [markdown]
# Each row of the mask has exactly K ones, in different places: the union of the rows'
# choices covers nearly every channel, which is why a batch kernel cannot simply skip
# columns. Block Q-Sparse (lesson 06) does not change that: there a batch of 8 random tokens
# needs 100% of the columns under top-K and under N:M alike, and a trained model's real
# activations come close behind. What N:M gives a batched kernel instead is regular work,
# the same number of kept channels in every block of every token.
#
# How `topk_mask` (`minisparse/topk.py`) finds them: `np.sort(|x|)` puts the K-th largest
# |x| of each row at position D − K; entries strictly above that threshold are kept, and
# entries *equal* to it are kept only as far as places remain (section 3). A partition
# would be O(D) instead of O(D log D), but NumPy's vectorized sort measured faster at these
# widths, so the fast path sorts too (`kth_largest` in `minisparse/fast/topk.py`;
# benchmarks/RESULTS.md).
#
# ## 2. K from the sparsity
#
# S is the fraction of a row that is zeroed. minisparse rounds the *zeroed* count to the
# nearest integer (halves up) and keeps the rest (`minisparse/topk.py`, `kept_count`):
#
#     K = D − floor(S · D + 1/2)
#
# The authors' released code keeps `int((1 − S) · D)`, which truncates the *kept* count.
# The two agree whenever S·D is a whole number (the usual case, e.g. S = 0.5 with even D),
# and differ by one when the fractional part of S·D is below one half:

# %%
def K_by_hand(D, S):
    zeroed = int(np.floor(S * D + 0.5))             # round the zeroed count, halves up
    return D - zeroed


Ds_tab = (16, 48, 64, 128, 192)
S_fine = np.linspace(0, 0.95, 96)                   # S in steps of 0.01
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for D in (16, 48):
    k_ours = [kept_count(D, float(S_)) for S_ in S_fine]
    k_auth = [int((1 - S_) * D) for S_ in S_fine]
    line, = axes[0].step(S_fine, k_ours, where="post", label=f"D = {D}: kept_count")
    axes[0].step(S_fine, k_auth, where="post", ls=":", color=line.get_color(), label=f"D = {D}: int((1 - S) D)")
axes[0].set(xlabel="sparsity S", ylabel="K, channels kept", title="K against S")
axes[0].legend(fontsize=8)
extra = np.array([[kept_count(D, float(S_)) - int((1 - S_) * D) for S_ in S_fine] for D in Ds_tab])
axes[1].imshow(extra, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
               extent=(S_fine[0] - 0.005, S_fine[-1] + 0.005, len(Ds_tab) - 0.5, -0.5))
axes[1].set(yticks=range(len(Ds_tab)), yticklabels=Ds_tab, xlabel="sparsity S", ylabel="D",
            title="black: kept_count keeps one more than int((1 - S) D)")
plt.tight_layout()
plt.show()
assert set(np.unique(extra)) <= {0, 1}              # the same K, or one channel more
print("S = 0 keeps all D:", all(kept_count(D, 0.0) == D for D in Ds_tab))
print(f"S = 0.5 with D = 128 keeps {kept_count(128, 0.5)}; S = 0.45 with D = 1536 keeps {kept_count(1536, 0.45)}"
      f" (the authors' rule: {int((1 - 0.45) * 1536)})")
try:
    kept_count(64, 1.0)
except Exception as e:          # a UsageError: the sentence a user would see
    print("S = 1 is refused:", e)

# %% [markdown]
# On this grid (S in steps of 0.01) the rules differ in about half the cells, the black ones:
# there minisparse keeps exactly one channel more, never fewer and never two more (asserted
# above). K falls one channel at a time under both rules; minisparse's steps come half a step
# later in S, at S·D = n + 1/2 rather than just past n.

# %% [markdown]
# ## 3. Ties and rows of exact zeros
#
# With real-valued activations ties are rare, but they do happen: quantized inputs, and
# above all **exact zeros**. A ReLU²-GLU (lesson 02) hands the down projection rows in
# which about half the entries are exactly 0. If such a row has fewer than K nonzeros,
# the K-th largest |x| is 0 and every zero ties with it.
#
# A threshold mask `|x| >= t` would keep all tied entries, so a row could keep *more*
# than K (docs/qsparse.md, Sec. 8 lists this among the pitfalls).
# minisparse keeps the entries above the threshold and then the *first* tied ones, by
# channel index, until K are kept (`topk_mask`, the `cumsum(eq) <= need` line).

# %%
x_ties = np.array([
    [1.0, -1.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0],    # four tied at |x| = 1
    [0.0, 0.0, 3.0, 0.0, -2.0, 0.0, 0.0, 0.0],    # only two nonzeros: zeros fill the rest
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],     # a row of exact zeros
])
k = 3
m = topk_mask(x_ties, k)
t = np.sort(np.abs(x_ties), axis=-1)[:, -k:-k + 1]       # the k-th largest |x| of each row
ge = np.abs(x_ties) >= t                                  # the tempting threshold mask
for r in range(len(x_ties)):
    print(f"x = {x_ties[r]}\n  topk_mask keeps {m[r].astype(int)} ({m[r].sum()})"
          f"   |x| >= t keeps {ge[r].astype(int)} ({ge[r].sum()})")

# %% [markdown]
# Row 0: four entries tie at |x| = 1 for three places; the lower channel indices 0, 1, 2
# win. Row 1: the two nonzeros are kept, and the remaining place goes to the first zero.
# A kept zero changes nothing in the forward (`xs` is 0 there either way), so the
# *measured* sparsity of that row is higher than S: lesson 02 measures exactly this at
# the down projection. Row 2: all zero; the mask still has K ones, `xs` is all zero.
#
# ### An independent top-K
#
# The package's mask uses a threshold and a cumulative count. A different algorithm, easy
# to trust: sort each row by −|x| with a **stable** sort (equal keys keep their order, so
# the lower index comes first) and keep the first k positions. We compare the two on
# rows with distinct values, heavy ties, ReLU²-like zeros, all zeros and identical rows
# (the last one catches a mask built from the union of all rows' indices), for every k.

# %%
def topk_mask_by_sort(x, k):
    """Independent top-K: stable argsort of -|x| per row, keep the first k (lower index wins ties)."""
    x2 = x.reshape(-1, x.shape[-1])                        # (N, D)
    order = np.argsort(-np.abs(x2), axis=-1, kind="stable")
    mask = np.zeros(x2.shape, dtype=bool)
    np.put_along_axis(mask, order[:, :k], True, axis=-1)
    return mask.reshape(x.shape)


def test_rows(rng, N=10, D=24):
    g = rng.standard_normal((N, D))
    return {
        "distinct": rng.standard_normal((N, D)),
        "ties": rng.integers(-2, 3, size=(N, D)).astype(np.float64),
        "relu2 zeros": rng.standard_normal((N, D)) * np.maximum(g, 0) ** 2,
        "all zero": np.zeros((N, D)),
        "identical": np.tile(rng.standard_normal(D), (N, 1)),
        "3-d input": rng.standard_normal((2, 5, D)),
    }


rows = test_rows(np.random.default_rng(1))
n_checked, n_differ = 0, 0
for name, xr in rows.items():
    for k in range(0, xr.shape[-1] + 1):
        n_checked += 1
        n_differ += not np.array_equal(topk_mask(xr, k), topk_mask_by_sort(xr, k))
print(f"compared {n_checked} (rows, k) cases: {n_differ} differ")
xr = rows["ties"]
print("'ties' rows, k = 7: entries kept per row", topk_mask(xr, 7).sum(axis=-1),
      "| |x| >= threshold would keep", (np.abs(xr) >= np.sort(np.abs(xr), -1)[:, -7:-6]).sum(-1))

# %% [markdown]
# ## 4. The backward pass: masked (Eq. 12) and straight-through (Eq. 13)
#
# Take one projection `y = xs · Wᵀ` with `xs = x ⊙ mask` and upstream gradient `dy` (N, O).
# The projection's own backward, `dxs = dy · W` (N, D) and `dW = dyᵀ · xs`, is derived in
# lesson 03 (section 2), checked there against finite differences, and left there as an
# exercise; this lesson takes `dxs` from it. What concerns top-K is the last step, from `xs`
# back to `x`, and there the two rules differ:
#
# - Eq. 12, the true derivative of `x ⊙ mask` for a fixed mask: `dx = dxs ⊙ mask`. The
#   D − K dropped channels of every token get **no** gradient, so the layer below never
#   learns that making a dropped channel larger would have helped.
# - Eq. 13, STE: `dx = dxs`, the gradient of the identity. It is not the derivative of
#   anything in the forward pass, so finite differences cannot check it; we check it by
#   its definition.
#
# `minisparse/topk.py`, `topk_backward(dxs, mask, ste)` is these two lines;
# `minisparse/linear.py`, `sparse_linear_backward` calls it after computing `dxs`. Below
# we apply both rules by hand, compare with the package, and look at which entries of `dx`
# survive.

# %%
rng = np.random.default_rng(2)
N_, D_, O_ = 6, 16, 10
x4 = rng.standard_normal((1, N_, D_))                      # (B, T, C) as the projection wants
W4 = rng.standard_normal((O_, D_)) / np.sqrt(D_)           # (O, C)
dy4 = rng.standard_normal((1, N_, O_))                     # a random upstream gradient
K4 = kept_count(D_, 0.5)

# by hand
mask_hand = topk_mask_by_sort(x4, K4)                      # (1, N, D)
dxs_hand = dy4 @ W4                                        # the projection's backward (lesson 03)
dx_ste_hand = dxs_hand                                     # Eq. 13
dx_masked_hand = dxs_hand * mask_hand                      # Eq. 12

# the package
outs = {}
for ste in (True, False):
    (y_pkg,), cache = sparse_linear_forward(x4, [W4], SparseSpec(0.5, ste=ste))
    dx_pkg, (dW_pkg,) = sparse_linear_backward([dy4], cache)
    outs[ste] = (y_pkg, dx_pkg, dW_pkg)
print("max |dx_ste_hand - dx_pkg(STE)|   :", np.abs(dx_ste_hand - outs[True][1]).max())
print("max |dx_masked_hand - dx_pkg(Eq12)|:", np.abs(dx_masked_hand - outs[False][1]).max())
print("fraction of dx entries that are exactly zero: STE",
      (outs[True][1] == 0).mean(), "| masked", (outs[False][1] == 0).mean())

fig, axes = plt.subplots(1, 3, figsize=(12, 2.8))
lim = np.abs(dxs_hand).max()
for ax, img, title in ((axes[0], mask_hand[0], "mask (forward)"),
                       (axes[1], outs[True][1][0], "dx, STE (Eq. 13) = dxs"),
                       (axes[2], outs[False][1][0], "dx, masked (Eq. 12) = dxs * mask")):
    im = ax.imshow(img, cmap="Greys" if img.dtype == bool else "RdBu_r",
                   vmin=0 if img.dtype == bool else -lim, vmax=1 if img.dtype == bool else lim)
    ax.set_title(title)
    ax.set_xlabel("channel (D)")
    ax.set_ylabel("token (N)")
    fig.colorbar(im, ax=ax, fraction=0.03)
plt.tight_layout()
plt.show()

# %% [markdown]
# The weight gradient `dW = dyᵀ · xs` is the same under both rules: the rule only
# changes what flows *down* to `x`, and from there to the layers below. In a model that
# gradient then passes an RMSNorm and joins the residual stream (`minisparse/model.py`,
# `backward`, the `dx += dh` lines), which carries it to every lower block.
#
# ## 5. Why the masked gradient starves the lower layers (paper Fig. 2, tiny scale)
#
# In a pre-norm Transformer the residual stream carries the gradient down unchanged, and
# every block *adds* its branches' input gradients to it on the way:
#
#     dx_below = dx_above + (gradient through the attention branch) + (through the FFN branch)
#
# With Eq. 12 each branch's contribution is masked at its projection inputs (q/k/v share
# one mask; up/gate one; o and down one each), so only K of the C channels of every token
# pass. The lower a block, the more masked contributions its gradient is the sum of.
#
# **What we measure.** For each block l and each projection (wq, wo, w_up, w_down) the
# Frobenius norm of that weight's gradient, `||dW||`, averaged over 4 fixed batches of
# validation text: the paper's Fig. 2 plots each projection's gradient magnitude per
# layer. Reading them:
#
# - `w_down` of block l gets `dW = dxᵀ · m_s` where `dx` is the residual-stream gradient
#   arriving at block l's output: its norm tracks the gradient that reaches the block
#   from above. In the top block that `dx` comes straight from the LM head, untouched by
#   any mask, so STE and no-STE must give the *same* top-block `w_down` gradient.
# - `wq` (and wk, wv) get their gradient through the attention output, which Eq. 12 masks
#   at the `o` projection's input; `w_up`/`w_gate` through the masked input of `down`.
#   These feel the mask inside their own block, at every layer.
#
# **Same weights.** STE and no-STE models at the same weights have the *same* forward
# pass (same loss, same activations): the rule only changes the backward. Dense
# (sparsity 0) has a different forward, with larger projection inputs, so its gradients
# differ for that reason too. The clean comparison is therefore STE against no-STE; dense
# is the reference the paper plots alongside.
#
# The model: 8 layers, 48 channels, 4 heads, context 32, character-level text of the
# built-in corpus (Python's documentation). S = 0.5 as in the paper, and S = 0.8 where
# the masks drop more.

# %%
text = load_text("pydoc")
tok = train_tokenizer(text, "char")
train_ids, val_ids = split_ids(tok.encode(text))
B, T = 8, 32
base = GPTConfig(vocab_size=tok.vocab_size, block_size=T, n_layer=8, n_head=4, n_embd=48, sparsity=0.0)
PROJ = ("attn.wq", "attn.wo", "ffn.w_up", "ffn.w_down")
rng_b = np.random.default_rng(123)
batches = [get_batch(val_ids, T, B, rng_b) for _ in range(4)]     # fixed: every model sees the same ones


def variants(S):
    """The three models of Fig. 2 at sparsity S: dense, STE (Eq. 13), masked gradient (Eq. 12)."""
    return {"dense": dataclasses.replace(base, sparsity=0.0),
            "STE": dataclasses.replace(base, sparsity=S, ste=True),
            "no STE": dataclasses.replace(base, sparsity=S, ste=False)}


def layer_grad_norms(params, cfg):
    """(projection, layer) array of ||dW||, averaged over the fixed batches; and the mean loss."""
    out = np.zeros((len(PROJ), cfg.n_layer))
    loss_sum = 0.0
    for xb, yb in batches:
        _, loss, caches = model.forward(params, cfg, xb, yb)
        grads = model.backward(params, cfg, caches)
        loss_sum += float(loss)
        for l in range(cfg.n_layer):
            for j, name in enumerate(PROJ):
                out[j, l] += np.linalg.norm(grads[f"h.{l}.{name}"]) / len(batches)
    return out, loss_sum / len(batches)


COLORS = {"dense": "black", "STE": "tab:blue", "no STE": "tab:red"}


def plot_norms(norms, title):
    fig, axes = plt.subplots(1, len(PROJ), figsize=(13, 2.9))
    layers = np.arange(base.n_layer)
    for j, ax in enumerate(axes):
        for name, arr in norms.items():
            ax.plot(layers, arr[j], "o-", color=COLORS[name], label=name, ms=3)
        ax.set_yscale("log")
        ax.set_title(PROJ[j])
        ax.set_xlabel("layer (0 = lowest)")
    axes[0].set_ylabel("||dW||, mean of 4 batches")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, y=1.02)
    plt.tight_layout()
    plt.show()


params0 = init_params(base, seed=0)           # one set of weights for every variant
init_norms, init_loss = {}, {}
for S_ in (0.5, 0.8):
    for name, cfg in variants(S_).items():
        init_norms[S_, name], init_loss[S_, name] = layer_grad_norms(params0, cfg)
    print(f"S = {S_}: loss at init  dense {init_loss[S_, 'dense']:.4f}  STE {init_loss[S_, 'STE']:.4f}"
          f"  no STE {init_loss[S_, 'no STE']:.4f}")
    plot_norms({n: init_norms[S_, n] for n in COLORS}, f"at initialisation, same weights, S = {S_}")

# %% [markdown]
# The STE and no-STE losses printed above are identical, as they must be. To see how the
# gap depends on depth, divide: the ratio STE / no-STE per layer. A ratio of 1 means the
# masked gradient lost nothing at that layer; a ratio growing toward layer 0 is the
# paper's "vanishing in the lower layers".

# %%
def plot_ratios(ratio, when):
    """ratio[S]: (projection, layer) array of ||dW|| STE / ||dW|| no STE, one panel per S."""
    fig, axes = plt.subplots(1, len(ratio), figsize=(10, 3.2), sharey=True)
    for ax, (S_, r) in zip(axes, ratio.items()):
        for j, name in enumerate(PROJ):
            ax.plot(np.arange(base.n_layer), r[j], "o-", label=name, ms=3)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xlabel("layer (0 = lowest)")
        ax.set_title(f"{when}, S = {S_}")
    axes[0].set_ylabel("||dW|| STE / ||dW|| no STE")
    axes[0].legend(fontsize=8)
    plt.tight_layout()
    plt.show()


init_ratio = {S_: init_norms[S_, "STE"] / init_norms[S_, "no STE"] for S_ in (0.5, 0.8)}   # (projection, layer)
plot_ratios(init_ratio, "at init")

# %%
for S_ in (0.5, 0.8):
    r = init_ratio[S_]
    print(f"S = {S_}, at init: w_down ratio top block {r[3, -1]:.4f}, bottom block {r[3, 0]:.3f};"
          f" wo top {r[1, -1]:.3f}, bottom {r[1, 0]:.3f}; wq smallest over layers {r[0].min():.2f}")
    assert (r[0] > 1).all()                        # wq: less gradient without STE at every layer
    assert 1 < r[3, 0] < 1.5 and 1 < r[1, 0] < 1.5  # the depth effect at init: present but small

# %% [markdown]
# What the printed numbers say about this tiny model *at initialisation*:
#
# - The top block's `w_down` ratio is 1 (up to float32 rounding): nothing masked lies
#   between it and the loss.
# - `wq` gets a smaller gradient without STE at *every* layer (the cell asserts it): its
#   own block's mask at the o-site input cuts it, more so at S = 0.8. `w_up`, cut by the
#   down-site mask, loses less: compare its ratios with those of `wq`.
# - The depth effect, seen in `w_down` and `wo` (the residual-stream gradient), is the
#   ratio climbing from 1 at the top block toward the bottom. With 8 layers of random
#   weights it stays close to 1 (the cell asserts below 1.5): each block's branches add
#   little to the residual-stream gradient at initialisation, where the residual
#   outputs `wo` and `w_down` are initialised small (`minisparse/model.py`, `init_params`).
#
# Gradients at initialisation are not what the paper plots: its Fig. 2 is a trained
# model. So next we train the three variants for a few steps from the same weights (the
# same seed gives the same `init_params` and the same batches, `minisparse/train.py`,
# `train`), and measure again on the same validation batches.

# %%
TRAIN_ITERS = 100
trained_norms, trained_loss, val_loss = {}, {}, {}
t0 = time.perf_counter()
for S_ in (0.5, 0.8):
    for name, cfg in variants(S_).items():
        if name == "dense" and ("dense" in trained_norms):
            continue                                           # dense does not depend on S: train it once
        key = "dense" if name == "dense" else (S_, name)
        tc = TrainConfig(model=cfg, out_dir=f"runs/01_{name.replace(' ', '_')}_{cfg.sparsity}", batch_size=B,
                         max_iters=TRAIN_ITERS, warmup_iters=10, eval_interval=TRAIN_ITERS, eval_iters=2)
        summary = train(tc, progress=False, log=lambda *a: None)
        params_t, _, cfg_t, _, _ = load_run(tc.out_dir)
        assert cfg_t == cfg, (cfg_t, cfg)                      # the run built the model we meant
        trained_norms[key], trained_loss[key] = layer_grad_norms(params_t, cfg_t)
        val_loss[key] = summary["val_loss"]
print(f"trained {len(trained_norms)} models for {TRAIN_ITERS} steps each in {time.perf_counter() - t0:.1f} s")
for key, v in val_loss.items():
    print(f"  {str(key):18s} val loss {v:.3f}")
for S_ in (0.5, 0.8):
    d = val_loss[S_, "no STE"] - val_loss[S_, "STE"]
    print(f"S = {S_}: no STE minus STE = {d:+.3f} ({'the STE' if d > 0 else 'the masked gradient'} lower"
          f" in this one run of {TRAIN_ITERS} steps, one seed, 2 evaluation batches)")

for S_ in (0.5, 0.8):
    plot_norms({"dense": trained_norms["dense"], "STE": trained_norms[S_, "STE"],
                "no STE": trained_norms[S_, "no STE"]}, f"after {TRAIN_ITERS} training steps, S = {S_}")

# %%
trained_ratio = {S_: trained_norms[S_, "STE"] / trained_norms[S_, "no STE"] for S_ in (0.5, 0.8)}
plot_ratios(trained_ratio, f"after {TRAIN_ITERS} steps")
for S_ in (0.5, 0.8):
    ste, msk, dense = trained_norms[S_, "STE"], trained_norms[S_, "no STE"], trained_norms["dense"]
    for j in (1, 3):                                           # wo and w_down: the residual-stream gradient
        print(f"S = {S_}, {PROJ[j]:10s}: bottom/top block gradient  dense {dense[j, 0] / dense[j, -1]:6.2f}"
              f"   STE {ste[j, 0] / ste[j, -1]:6.2f}   no STE {msk[j, 0] / msk[j, -1]:6.2f}")

# %% [markdown]
# Unlike at initialisation, each variant is now measured at *its own* trained weights
# (the three runs started from the same weights and saw the same batches, but their
# updates differed), so the forward passes differ too. Read the trained numbers above as
# *this run's*: 100 steps of an 8-layer, 48-channel
# model on a few thousand characters are far from the paper's 300M model and 50B
# tokens, and gradient norms of a model this young move a lot from batch to batch.
# Things to look for:
#
# - **bottom/top**: how much larger a projection's gradient is in the lowest block than in
#   the highest, for each variant. The paper's Fig. 2 shows the no-STE curve far below the
#   others in the lower layers. Here compare the no-STE column with the STE one.
# - **STE / no STE per layer**: whether the ratio grows toward layer 0 (the depth effect)
#   and by how much at S = 0.5 against S = 0.8.
# - **against dense**: STE is not "dense gradients": it passes every channel's gradient
#   down even though only K channels took part in the forward pass. Where the STE curve
#   lies above dense in the lower layers, the model's lower blocks are being pushed by
#   gradients for channels the forward pass dropped; whether that costs or buys validation
#   loss is a question for the loss, not for this plot.
#
# The printed validation losses after 100 steps are no verdict on the STE either: one seed,
# 100 steps and 2 evaluation batches, and runs this short are dominated by how fast each
# variant gets going. The cell prints which rule ended lower here; it is not evidence either
# way. Lesson 05 tells the answer over seeds and depths (2, 6 and 16 layers, S = 0.5 to 0.9, 1000
# steps, `experiments/ste_sweep.py`): the validation loss paired by seed, with intervals, and
# the per-layer gradient norms of those runs.
#
# The next cell sums the ratio plot up in numbers: at how many of the (projection, layer)
# cells the masked gradient is the smaller one, and the ratio averaged over the four
# projections in the lowest two blocks against the highest two. A bottom mean above the top
# mean is the paper's Fig. 2 in miniature: under the masked rule the lower layers get a
# shrinking share of the gradient.

# %%
for S_ in (0.5, 0.8):
    r = trained_ratio[S_]                                      # (projection, layer)
    bottom, top = r[:, :2].mean(), r[:, -2:].mean()
    trend = "grows toward the bottom" if bottom > top else "does not grow toward the bottom"
    print(f"S = {S_}, after {TRAIN_ITERS} steps: STE / no STE above 1 at {(r > 1).sum()} of {r.size} cells;"
          f" mean over the projections, blocks 0-1 {bottom:.2f}, blocks {base.n_layer - 2}-{base.n_layer - 1}"
          f" {top:.2f}: the ratio {trend}")

# %% [markdown]
# **What this run shows.** Read the printed lines: they are this run's.
#
# Do not expect the paper's clean picture from a model this small: 8 layers give at most
# 8 masked contributions to accumulate, and the paper's Fig. 2 is measured on a trained
# 300M-parameter model. The mechanism, though, is exact and checked below: the masked
# rule leaves the gradient above every mask untouched and removes part of it below.
#
# ## 6. Checks: the hand derivations equal the package
#
# - the mask equals the independent sort-based top-K on every test row and every k, and
#   keeps exactly K per row;
# - `kept_count` equals `K_by_hand`;
# - STE backward equals the upstream gradient exactly (`topk_backward`, and the
#   projection's `dx` equals `dy · W`); the masked backward equals upstream × mask;
# - `dW` is the same under both rules (lesson 03 checks the projection's forward and `dW`
#   themselves);
# - in the model at the same weights, STE and no-STE have the same loss and the same
#   top-block `w_down` and LM-head gradients (nothing masked lies above them).

# %%
# the mask: exact equality with the independent top-K, and exactly K per row
for name, xr in test_rows(np.random.default_rng(7)).items():
    for k in range(0, xr.shape[-1] + 1):
        np.testing.assert_array_equal(topk_mask(xr, k), topk_mask_by_sort(xr, k), err_msg=f"{name}, k={k}")
        assert (topk_mask(xr, k).sum(axis=-1) == k).all(), (name, k)
np.testing.assert_array_equal(mask, topk_mask_by_sort(x, K))
np.testing.assert_array_equal(m, topk_mask_by_sort(x_ties, 3))
np.testing.assert_array_equal(topk_mask(np.array([[1.0, -1.0, 1.0, 1.0]]), 2), [[True, True, False, False]])

# K: the formula, on a grid of D and S
for D in range(1, 200):
    for S_ in np.linspace(0, 0.99, 34):
        assert kept_count(D, float(S_)) == K_by_hand(D, float(S_)), (D, S_)

# the backward rules, by definition (exact: no arithmetic is involved)
dxs_rand = np.random.default_rng(3).standard_normal(x.shape)
np.testing.assert_array_equal(topk_backward(dxs_rand, mask, ste=True), dxs_rand)            # Eq. 13
np.testing.assert_array_equal(topk_backward(dxs_rand, mask, ste=False), dxs_rand * mask)    # Eq. 12

# the projection's dx under each rule, against the rules applied by hand (float64: 1e-12)
np.testing.assert_allclose(outs[True][1], dx_ste_hand, rtol=0, atol=1e-12)
np.testing.assert_allclose(outs[False][1], dx_masked_hand, rtol=0, atol=1e-12)
np.testing.assert_array_equal(outs[True][2], outs[False][2])                # dW: the rule does not touch it

# the model at the same weights: same forward, same gradients above every mask
cfg_ste, cfg_msk = variants(0.5)["STE"], variants(0.5)["no STE"]
xb, yb = batches[0]
_, loss_ste, c_ste = model.forward(params0, cfg_ste, xb, yb)
_, loss_msk, c_msk = model.forward(params0, cfg_msk, xb, yb)
g_ste, g_msk = model.backward(params0, cfg_ste, c_ste), model.backward(params0, cfg_msk, c_msk)
assert float(loss_ste) == float(loss_msk)
top = f"h.{base.n_layer - 1}.ffn.w_down"
for name in ("lm_head", "norm_f", top):
    np.testing.assert_array_equal(g_ste[name], g_msk[name], err_msg=name)
assert not np.array_equal(g_ste["h.0.attn.wq"], g_msk["h.0.attn.wq"])        # below a mask they differ
for S_ in (0.5, 0.8):
    np.testing.assert_allclose(init_ratio[S_][3, -1], 1.0, rtol=1e-6)         # the plotted top-block ratio
print("all checks passed")
