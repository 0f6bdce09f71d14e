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
# # 06 · Block Q-Sparse (N:M structured sparsity)
#
# Q-Sparse's top-K (Eq. 2-3) keeps the K largest |x| of each token anywhere among its D
# channels. That is ideal for one token at a time, but a GPU multiplies a whole batch of
# tokens at once, and there every token wanting a different set of channels is a problem.
# Block Q-Sparse (paper Sec. 2.4; docs/qsparse.md, Sec. 4) cuts the channels into blocks of
# `block` consecutive values and takes top-K **inside every block**, so every block of every
# token keeps the same number of channels:
#
#     x: (N, D) -> (N, D/block, block) -> TopK(|.|, keep) in each block -> (N, D)
#
# In minisparse this is `minisparse/nm.py`: `nm_mask` (the mask, three lines on top of
# `topk.topk_mask`), `nm_forward` (x times the mask) and `check_nm` (the allowed values).
# The projection picks it in `minisparse/linear.py`, `sparsify`, when its `SparseSpec` has
# `nm=(keep, block)`; the backward is the same straight-through estimator as top-K.
#
# This lesson: the two patterns side by side on a batch of tokens, what a batched kernel
# can and cannot do with each, the naming trap, the errors, and what N:M costs in loss.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from minisparse import backend, model
from minisparse.data import get_batch, load_text, split_ids
from minisparse.errors import UsageError
from minisparse.flags import parse_nm
from minisparse.model import GPTConfig
from minisparse.nm import check_nm, nm_forward, nm_mask
from minisparse.topk import kept_count, topk_mask
from minisparse.train import TrainConfig, load_run, read_metrics, train
from _helpers import ema, final_val_loss        # lessons/_helpers.py: lesson 05's curves and final score

# %% [markdown]
# ## Two masks for the same 16 tokens
#
# A batch of 16 tokens with 64 channels each, both ways at 50% sparsity: unstructured
# top-K keeps 32 of the 64 channels of each token; N:M with keep 4, block 8 keeps 4 of every
# 8 consecutive channels. (Random normal activations here; real ones come at the end.)

# %%
rng = np.random.default_rng(0)
x = rng.standard_normal((16, 64)).astype(np.float32)       # (N, D) 16 tokens, 64 channels
KEEP, BLOCK = 4, 8

m_topk = topk_mask(x, kept_count(64, 0.5))                  # (N, D) 32 kept per token, anywhere
m_nm = nm_mask(x, KEEP, BLOCK)                              # (N, D) 4 kept in every block of 8

per_block_topk = m_topk.reshape(16, 64 // BLOCK, BLOCK).sum(-1)   # (N, D/block) kept per block
per_block_nm = m_nm.reshape(16, 64 // BLOCK, BLOCK).sum(-1)

fig, axes = plt.subplots(2, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [2.2, 1]})
for row, (mask, counts, title) in enumerate([(m_topk, per_block_topk, "top-K, 50% (32 of 64 per token)"),
                                            (m_nm, per_block_nm, f"N:M, keep {KEEP} of every {BLOCK}")]):
    ax = axes[row, 0]
    ax.imshow(mask, cmap="Greys", aspect="auto", interpolation="nearest")
    for b in range(1, 64 // BLOCK):
        ax.axvline(b * BLOCK - 0.5, color="tab:red", lw=1)
    ax.set(title=f"{title}: kept channels in black", xlabel="channel (red lines: blocks of 8)", ylabel="token")
    ax = axes[row, 1]
    ax.imshow(counts, cmap="viridis", vmin=0, vmax=BLOCK, aspect="auto")
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7, color="w")
    ax.set(title="kept per block", xlabel="block", ylabel="token")
plt.tight_layout()
plt.show()

print("kept per token   top-K:", m_topk.sum(1).min(), "..", m_topk.sum(1).max(),
      "   N:M:", m_nm.sum(1).min(), "..", m_nm.sum(1).max())
print("kept per block   top-K:", per_block_topk.min(), "..", per_block_topk.max(),
      "   N:M:", per_block_nm.min(), "..", per_block_nm.max())

# %% [markdown]
# Both keep exactly 32 channels per token. The difference is *where*: top-K's per-block
# counts wander from block to block and token to token, N:M's are the same number
# everywhere. Why that matters is a question of how a batch is multiplied.
#
# ## What a batched kernel can skip
#
# The projection is `Y = Xs · Wᵀ` with `W` of shape (outputs, D): channel d of a token
# multiplies column d of `W`. For **one** token, a zero in channel d means column d need not
# be read at all: that is Q-Sparse's saving at batch size 1 (decoding). For a **batch**,
# column d can only be skipped if *no* token in the batch kept channel d, i.e. if d is
# outside the union of the batch's kept sets. Below, the union's size as the batch grows,
# for both patterns (256 random tokens; for independent tokens at 50% the union misses a
# channel with probability 0.5ⁿ).

# %%
xs = rng.standard_normal((256, 64)).astype(np.float32)       # (N, D)
batch = np.arange(1, 65)
union_topk = [topk_mask(xs[:n], 32).any(0).mean() for n in batch]
union_nm = [nm_mask(xs[:n], KEEP, BLOCK).any(0).mean() for n in batch]

plt.figure(figsize=(7, 3.8))
plt.plot(batch, union_topk, ".-", label="top-K 50%")
plt.plot(batch, union_nm, ".-", label=f"N:M {KEEP}:{BLOCK}")
plt.plot(batch, 1 - 0.5 ** batch, "k:", label="1 - 0.5ⁿ (independent channels)")
plt.xscale("log")
plt.xlabel("tokens in the batch")
plt.ylabel("fraction of the 64 weight columns\nsome token needs")
plt.title("union of kept channels across a batch")
plt.grid(alpha=0.3)
plt.legend()
plt.show()
for n in (1, 4, 8, 16, 64):
    print(f"batch {n:2d}: top-K needs {union_topk[n - 1]:.0%} of the columns, N:M {union_nm[n - 1]:.0%}")

# %% [markdown]
# So the union argument cuts both ways: past a handful of tokens *neither* pattern lets a
# batched kernel skip weight columns. N:M does not shrink the union; what it buys is
# **regularity**. Every token's sparse row compresses to a dense array of D·keep/block
# values plus, for each, its position inside its block (log₂ block bits: 2 bits for 2:4),
# and every block of every token carries exactly the same amount of work. That is the
# format structured-sparse matrix hardware consumes (NVIDIA's sparse tensor cores take 2 of
# every 4 values, with 2-bit indices, and do half the multiplies), and it lets a kernel tile
# the channel axis in blocks with equal work per tile. With top-K a tile of 8 channels holds
# anywhere from 0 to 8 kept values depending on the token (the counts plotted above), so a
# tiled kernel either does uneven work per token or falls back to dense.
#
# The compressed form, concretely: values (N, D/block, keep) and in-block positions
# (N, D/block, keep), and the product computed from them alone, checked against the masked
# dense product.

# %%
W = rng.standard_normal((48, 64)).astype(np.float32)                  # (O, D) a projection
xs_nm, mask = nm_forward(x, KEEP, BLOCK)                               # (N, D) masked input
blocks = mask.reshape(16, 64 // BLOCK, BLOCK)                          # (N, D/block, block)
pos = np.nonzero(blocks)[2].reshape(16, 64 // BLOCK, KEEP)             # (N, D/block, keep) position in block
vals = np.take_along_axis(x.reshape(16, 64 // BLOCK, BLOCK), pos, -1)  # (N, D/block, keep) kept values
cols = pos + BLOCK * np.arange(64 // BLOCK)[None, :, None]             # (N, D/block, keep) channel index
y_compressed = np.einsum("nbk,nbko->no", vals, W.T[cols])              # (N, O) only kept products
print("dense values per token:", x.shape[1], "  compressed:", vals.shape[1] * vals.shape[2],
      "values +", pos.size // 16, f"{int(np.log2(BLOCK))}-bit positions")
np.testing.assert_allclose(y_compressed, xs_nm @ W.T, rtol=1e-5, atol=1e-5)
print("compressed N:M product equals the masked dense product (float32, tol 1e-5)")

# %% [markdown]
# ## The naming trap: which number is N?
#
# The paper calls the pattern N:M but does not pin down whether N counts the **kept** or the
# **zeroed** entries of every M: its only example, 16:32 at 50% sparsity, reads the same
# either way, so which the authors meant cannot be settled from the paper (docs/qsparse.md,
# Sec. 4). NVIDIA's "2:4" counts the kept ones (at most 2 of every 4 nonzero). At 50% the two
# readings agree; anywhere else they are opposite sparsities. minisparse makes a choice, and
# it is a choice, not the paper's definition: it names the kept count, `--nm KEEP:BLOCK`
# (parsed by `minisparse/flags.py`, `parse_nm`, into the model's `GPTConfig.nm = (keep, block)`),
# so `--nm 16:32` is keep=16, block=32. When you compare with a text that writes N:M, check
# which count it means; the last column is the name the same blocks would have if N counted
# the zeros.

# %%
print(f"{'minisparse nm':>14s} {'keep':>5s} {'block':>6s} {'sparsity':>9s} {'if N = zeros':>13s}")
for nm in ("2:4", "4:8", "16:32", "1:4", "24:32"):
    keep, block = parse_nm(nm)
    cfg = model.GPTConfig(n_embd=64, n_head=2, nm=(keep, block))
    print(f"{nm:>14s} {keep:5d} {block:6d} {cfg.overall_sparsity:9.0%} {f'{block - keep}:{block}':>13s}")

# %% [markdown]
# ## What is allowed: check_nm's errors
#
# `check_nm(keep, block, D)` (`minisparse/nm.py`) wants whole numbers with
# 0 ≤ keep ≤ block, block ≥ 1, and a block that divides D, the width of the input being
# sparsified. In the model that is both `n_embd` (the q/k/v, o and up/gate inputs) and
# `n_hidden` (the down projection's input); `GPTConfig` checks both. The FFN width defaults
# to 8/3 · n_embd rounded up to a multiple of 32, so with n_embd = 64 it is 192, and
# blocks of 2, 4, 8, 16, 32 and 64 all divide both. Every mistake ends in one sentence:

# %%
attempts = {
    "check_nm(5, 4)": lambda: check_nm(5, 4),
    "check_nm(2, 0)": lambda: check_nm(2, 0),
    "check_nm(2.0, 4)": lambda: check_nm(2.0, 4),
    "check_nm(16, 32, D=48)": lambda: check_nm(16, 32, D=48),
    "parse_nm('16/32')": lambda: parse_nm("16/32"),
    "GPTConfig(n_embd=48, n_head=2, nm=(16, 32))": lambda: model.GPTConfig(n_embd=48, n_head=2, nm=(16, 32)),
    "GPTConfig(n_embd=64, n_head=2, n_hidden=200, nm=(16, 32))":
        lambda: model.GPTConfig(n_embd=64, n_head=2, n_hidden=200, nm=(16, 32)),
}
for code, attempt in attempts.items():
    try:
        attempt()
    except UsageError as e:
        print(f"{code}\n    -> UsageError: {e}")
    else:
        raise AssertionError(f"{code} was accepted")
print("\nn_hidden for n_embd = 64:", model.GPTConfig(n_embd=64, n_head=2).n_hidden)

# %% [markdown]
# ## What N:M costs in loss
#
# The paper reports (300M and 700M models trained from scratch, 50% sparsity, blocks of 32)
# that Block Q-Sparse follows the same loss curve as unstructured top-K. A smaller block
# is a tighter constraint: 2:4 can only pick the best 2 of 4 neighbours, whatever the other
# blocks hold, while top-K picks the best 32 of all 64. Here we train the same tiny model
# at 50% sparsity four ways, at equal steps: unstructured top-K (twice, with two seeds, to
# see the noise) and N:M with blocks of 4, 8 and 32. The only field that changes is
# `nm` (or `seed`). Lesson 05 has the dense baseline for this configuration.

# %%
MODEL = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, sparsity=0.5)     # GPTConfig fields
BASE = dict(batch_size=8, max_iters=400, warmup_iters=30, eval_interval=50, eval_iters=4)
RUNS = {                                 # name -> (the model's nm, the run's seed)
    "topk":      (None, 1337),           # unstructured top-K at 50%
    "topk_seed": (None, 1),              # the same, other init and batches: the noise floor
    "nm2:4":     ((2, 4), 1337),         # nm overrides sparsity (SparseSpec)
    "nm4:8":     ((4, 8), 1337),
    "nm16:32":   ((16, 32), 1337),
}
summaries = {}
t_all = time.perf_counter()
for name, (nm, seed) in RUNS.items():
    tc = TrainConfig(model=GPTConfig(**MODEL, nm=nm), out_dir=f"runs/06_{name.replace(':', '-')}", seed=seed, **BASE)
    summaries[name] = train(tc, progress=False, log=lambda msg: None)
    print(f"{name:10s} {summaries[name]['seconds']:5.1f} s  N_a {summaries[name]['N_a']:,}  "
          f"measured sparsity {summaries[name]['sparsity']}")
print(f"all runs: {time.perf_counter() - t_all:.1f} s")


# %% [markdown]
# Every run logs to `runs/06_<name>/metrics.jsonl` (one JSON object a line; training lines
# carry `train_loss`, evaluation lines `"eval": true` and `val_loss`). Below: the training
# loss smoothed with an exponential moving average, and the validation loss at every
# evaluation line. Evaluation batches are drawn from a generator seeded by (seed, iter), so
# all runs with the default seed are scored on the same 4 batches at a given step and zigzag
# together; `topk_seed` is scored on other batches. Then a final score of every saved model
# on the same 50 validation batches (mean ± standard error), because 4 batches are too few
# to rank runs this close. The smoothing (`ema`) and the final score (`final_val_loss`) are
# lesson 05's, kept once in `lessons/_helpers.py`.

# %%
metrics = {name: read_metrics(f"runs/06_{name.replace(':', '-')}") for name in RUNS}
STYLE = {"topk": ("k", "-"), "topk_seed": ("gray", "--"), "nm2:4": ("tab:red", "-"),
         "nm4:8": ("tab:orange", "-"), "nm16:32": ("tab:blue", "-")}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
for name, (steps, evals) in metrics.items():
    color, ls = STYLE[name]
    ax1.plot([m["iter"] for m in steps], ema([m["train_loss"] for m in steps]), color=color, ls=ls, label=name)
    ax2.plot([m["iter"] for m in evals], [m["val_loss"] for m in evals], color=color, ls=ls, marker=".", label=name)
ax1.set(xlabel="step", ylabel="train loss (EMA, alpha 0.05)", title="training loss, 50% sparsity")
ax2.set(xlabel="step", ylabel="validation loss (4 batches)", title="validation loss at eval lines")
for ax in (ax1, ax2):
    ax.set_ylim(1.9, 3.5)
    ax.grid(alpha=0.3)
    ax.legend()
plt.tight_layout()
plt.show()

text = load_text("pydoc")
final, final_se = {}, {}
for name in RUNS:                                               # the same 50 batches for every run
    final[name], final_se[name] = final_val_loss(f"runs/06_{name.replace(':', '-')}", text,
                                                 eval_iters=50, batch_size=8)

noise = abs(final["topk"] - final["topk_seed"])
print(f"{'run':10s} {'val loss (50 batches)':>21s} {'- topk':>8s} {'N_a':>8s}")
for name in RUNS:
    print(f"{name:10s} {final[name]:12.4f} ± {final_se[name]:.4f} {final[name] - final['topk']:+8.4f} "
          f"{summaries[name]['N_a']:8,d}")
print(f"\nseed-to-seed spread of top-K (noise floor): {noise:.4f}")
for name in ("nm2:4", "nm4:8", "nm16:32"):
    gap = final[name] - final["topk"]
    print(f"{name:8s} minus topk: {gap:+.4f} = {gap / noise:+.1f} x the seed spread")

# %% [markdown]
# In this run every N:M gap, blocks of 4 included, is well inside the seed spread of the two
# top-K runs: no cost of the block constraint is visible at this scale.
#
# Reading it: all five models activate the same N_a (half of every projection's inputs),
# so any loss difference is the price of *where* the kept channels may sit. Compare each
# N:M gap with the seed spread of the two top-K runs; a gap inside it is not evidence of a
# cost (nor of a gain), and one run per setting gives no error bar on the gaps themselves.
# The paper's claim, at 300M-700M parameters and blocks of 32, is "no visible cost"; the
# tiny run can at most fail to contradict it. Smaller blocks (2:4) are the ones hardware
# accelerates, and the tighter constraint is where a cost would show first, if the model
# were big and trained long enough to tell it from noise.
#
# ## Real activations: is the union still everything?
#
# Random tokens are the worst case for the union. Trained activations are not independent:
# in large models some channels are large in most tokens. Below, the top-K masks of the
# trained top-K model at every site, for one batch of 8 × 32 = 256 real validation tokens
# (the mask is in each projection's cache, `minisparse/linear.py`,
# `sparse_linear_forward`). The tokens are taken in a random order, as a batch of decode
# requests from different sequences would be. (In the order of the text they would share
# more: at layer 0 the q/k/v input is RMSNorm of the token's embedding, so a run of 17
# spaces in indented code has one mask, 17 times.)

# %%
params, _, cfg, tok, _ = load_run("runs/06_topk")
_, val_ids = split_ids(tok.encode(text))
xb, yb = get_batch(val_ids, cfg.block_size, 8, np.random.default_rng(0))
_, _, caches = model.forward(params, cfg, backend.asarray(xb), backend.asarray(yb))
order = np.random.default_rng(1).permutation(xb.size)                  # shuffle the 256 tokens
sizes = (1, 2, 4, 8, 16, 256)
print(f"{'layer, site':14s}" + "".join(f"{f'n={n}':>7s}" for n in sizes) + "   most-kept channel")
for l in range(cfg.n_layer):
    for site in ("qkv", "o", "up_gate"):
        # the projection's cache is (xs, mask, weights, spec): the reference ops keep the mask
        real_mask = caches[l][site][1].reshape(xb.size, -1)[order]          # (N, C) top-K mask, 256 tokens
        unions = [real_mask[:n].any(0).mean() for n in sizes]
        print(f"{l}, {site:10s}" + "".join(f"{u:7.0%}" for u in unions) + f"   {real_mask.mean(0).max():.0%} of tokens")

# %% [markdown]
# In this run the real tokens' union grows about as fast as the random tokens' did: at
# every site a batch of 16 already needs (nearly) every weight column, even though the
# most-kept channel is kept by a large majority of the tokens.
#
# Compare the table with the random tokens' curve above. A model with outlier channels
# that nearly every token keeps (large models have them) would show a most-kept channel
# near 100% and a union that grows more slowly; a 2-layer model trained for 400 steps has
# had little time to grow them. Unless the union stays well below 100% at realistic batch
# sizes, the conclusion holds: a batch of tokens needs (nearly) all weight columns, and
# N:M's gain is the fixed count per block, not a smaller union.
#
# ## Check: the N:M mask by hand
#
# N:M is top-K applied to every block. Written independently: sort each block by |x|,
# largest first, breaking ties by the lower channel index (a stable sort on -|x|), and keep
# the first `keep`. It must equal `minisparse/nm.py`, `nm_mask`, exactly, including on rows
# full of ties, and every block must keep exactly `keep`. Also: the trained N:M models'
# logged sparsity at the top-K sites is exactly 1 - keep/block at every step.

# %%
def nm_mask_by_hand(x, keep, block):
    N, D = x.shape
    xb = np.abs(x).reshape(N, D // block, block)                           # (N, D/block, block)
    order = np.argsort(-xb, axis=-1, kind="stable")                        # largest first, lower index on ties
    mask = np.zeros(xb.shape, dtype=bool)
    np.put_along_axis(mask, order[..., :keep], True, axis=-1)              # the first `keep` of each block
    return mask.reshape(N, D)


tied = np.round(rng.standard_normal((64, 64)), 0).astype(np.float32)     # many exact ties in |x|
tied[:4] = 0.0                                                            # rows of exact zeros
tied[4:8] = 1.0                                                           # identical rows, all tied
cases = {"random": xs, "tied": tied, "x": x}
for keep, block in [(2, 4), (4, 8), (16, 32), (1, 4), (0, 8), (8, 8)]:
    for label, a in cases.items():
        mine, theirs = nm_mask_by_hand(a, keep, block), nm_mask(a, keep, block)
        np.testing.assert_array_equal(mine, theirs)                        # exact, boolean
        assert (theirs.reshape(len(a), -1, block).sum(-1) == keep).all()  # every block keeps exactly keep
print("nm_mask equals the hand-written per-block top-K on random, tied and zero rows; every block keeps keep")

for name in ("nm2:4", "nm4:8", "nm16:32"):
    keep, block = RUNS[name][0]
    for site in ("qkv", "o", "up_gate"):
        logged = np.array([m["sparsity"][site] for m in metrics[name][0]])
        np.testing.assert_allclose(logged, 1 - keep / block, rtol=0, atol=1e-12)
print("logged sparsity of the N:M runs is exactly 1 - keep/block at q/k/v, o and up/gate, every step")
