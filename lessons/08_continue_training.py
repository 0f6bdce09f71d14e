# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 08 · Continue-training a dense model into Q-Sparse, and the dense fallback
#
# Q-Sparse need not start from scratch. The paper takes a pretrained dense model
# (Mistral 7B), switches on top-K at every projection input, and keeps training
# (Sec. 4.3; docs/qsparse.md, Sec. 7: 40B more tokens, 3.8B activated parameters, 63.7 average
# against 64.6 dense). What changes when the start is a dense model (docs/qsparse.md, Sec. 3):
#
# - the model keeps **its own activation** (SiLU in a SwiGLU), with top-K applied after it
#   at the down projection's input, instead of the squared ReLU of Eq. 11 used from scratch;
# - the weights come from the dense run; only the forward changes, to
#   `Y = (X ⊙ TopK(|X|)) · Wᵀ` (Eq. 2, 3), with the straight-through gradient (Eq. 13).
#
# This lesson does it at tiny scale:
#
# 1. train a small dense SwiGLU model;
# 2. switch top-K on *without training* and measure how much the loss jumps;
# 3. continue-train with top-K at 50% and watch the loss recover, next to the fair baseline,
#    the same extra steps trained dense;
# 4. run the sparse model with top-K switched *off* at inference (the "dense fallback",
#    `SparseSpec(0.0)` in `minisparse/decode.py`) on held-out text of its corpus and on text
#    unlike it, and see whether falling back to dense helps.
#
# In minisparse, continue-training is `TrainConfig(init_from=...)`: `minisparse/train.py`,
# `train`, loads the weights with `load_run` and takes the architecture (layers, widths,
# activation) from them; only the sparsity and the optimisation settings are new.

# %%
import contextlib
import codecs
import dataclasses
import inspect
import io
import textwrap
import time

import numpy as np
import matplotlib.pyplot as plt

from minisparse import model
from minisparse.data import load_text, split_ids
from minisparse.model import GPTConfig
from minisparse.train import TrainConfig, load_run, read_metrics, train

quiet = lambda *a, **k: None      # train() logs one line per evaluation; the curves are plotted instead

# %% [markdown]
# ## 1. A dense SwiGLU model
#
# `activation="swiglu"`, `sparsity=0`: the stand-in for a pretrained dense model. Tiny, so
# that the whole lesson runs in about a minute on two CPU cores.

# %%
TINY = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, activation="swiglu", sparsity=0.0)
t0 = time.perf_counter()
dense_run = train(TrainConfig(model=TINY, out_dir="runs/08_dense", batch_size=8, eval_iters=20, max_iters=800,
                              eval_interval=100, learning_rate=3e-3, min_lr=3e-4, warmup_iters=30),
                  progress=False, log=quiet)
print(f"dense: {dense_run['iters']} steps in {time.perf_counter() - t0:.1f} s, val loss {dense_run['val_loss']:.4f}, "
      f"N = {dense_run['N']:,} projection weights")

# %% [markdown]
# ## 2. Top-K switched on without training
#
# Load the run and evaluate the *same weights* under configurations that differ only in
# `sparsity`: `model.forward` reads `cfg.spec` and sparsifies every projection input
# (`minisparse/linear.py`, `sparsify`). The loss is measured on fixed windows of the
# validation split (the last 10% of the pydoc corpus, `minisparse/data.py`, `split_ids`), the
# same windows for every setting, so the differences are paired.
#
# The per-token loss is written out here rather than taken from `model.forward`: it is
# the cross-entropy of `minisparse/loss.py`,
#
#     loss_t = logsumexp(logits_t) − logits_t[target_t]
#
# computed in float64; Section 5 checks that it equals the package's loss.

# %%
params0, _, cfg0, tok, _ = load_run("runs/08_dense")
_, val_ids = split_ids(tok.encode(load_text("pydoc")))


def windows(ids, T, max_windows=600):
    """Non-overlapping (x, y) windows of T tokens, at most max_windows of them, evenly spread."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = np.arange(0, len(ids) - T, T)                         # every window has T + 1 tokens
    if len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).astype(int)]
    offsets = starts[:, None] + np.arange(T)[None, :]               # (W, T)
    return ids[offsets], ids[offsets + 1]


def token_losses(params, cfg, x, y):
    """Cross-entropy of every token, (W, T), from the logits of model.forward."""
    logits, _, _ = model.forward(params, cfg, x)                    # (W, T, V)
    z = logits.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))            # (W, T) logsumexp
    return lse - np.take_along_axis(z, y[..., None], axis=-1)[..., 0]


def at(cfg, sparsity):
    """The same architecture at another sparsity (GPTConfig validates it again)."""
    return dataclasses.replace(cfg, sparsity=sparsity)


xv, yv = windows(val_ids, cfg0.block_size)
print(f"validation: {len(xv)} windows of {cfg0.block_size} tokens")
sweep = (0.0, 0.25, 0.5, 0.75, 0.9)
jump = {S: token_losses(params0, at(cfg0, S), xv, yv).mean() for S in sweep}
for S, L in jump.items():
    print(f"  dense weights, top-K at S = {S:4.2f}: val loss {L:.4f}  ({L - jump[0.0]:+.4f})")
assert all(np.diff(list(jump.values())) > 0), "expected the loss to grow with the sparsity switched on"

plt.figure(figsize=(5, 3.2))
plt.plot(list(jump), list(jump.values()), "o-")
plt.xlabel("sparsity S switched on at inference (no training)")
plt.ylabel("validation loss (nats/token)")
plt.title("a dense SwiGLU model under top-K")
plt.grid(alpha=0.3)
plt.show()

# %% [markdown]
# Zeroing the smallest-|x| inputs removes the least of each product `x · Wᵀ`, so a small S
# costs little; the cost grows quickly as top-K starts removing inputs that matter (the
# cell asserts that the loss grows with S). In this run, 50% top-K without training costs
# the printed amount at S = 0.5.
#
# ## 3. Continue-training with top-K at 50%
#
# Two continuations from the same dense weights, with the same steps, learning rate and
# batches (same seed): one at `sparsity=0.5`, one still dense. Each is
# `TrainConfig(model=GPTConfig(sparsity=S), init_from="runs/08_dense")`: the architecture
# fields of that `GPTConfig` are replaced by those of the weights, its sparsity is kept.
# The dense one is the fair baseline: the dense model above is undertrained, so *any* extra
# steps lower its loss, and only the gap between the two continuations is the price of
# sparsity.

# %%
CONT = dict(batch_size=8, eval_iters=20, max_iters=300, eval_interval=25,
            learning_rate=1e-3, min_lr=1e-4, warmup_iters=10)
t0 = time.perf_counter()
sparse_run = train(TrainConfig(model=GPTConfig(sparsity=0.5), out_dir="runs/08_sparse", init_from="runs/08_dense",
                               **CONT), progress=False, log=quiet)
more_run = train(TrainConfig(model=GPTConfig(sparsity=0.0), out_dir="runs/08_dense_more", init_from="runs/08_dense",
                             **CONT), progress=False, log=quiet)
print(f"two continuations of {CONT['max_iters']} steps in {time.perf_counter() - t0:.1f} s")
print(f"sparse: N_a = {sparse_run['N_a']:,} of N = {sparse_run['N']:,} per token; measured zeros per site "
      + ", ".join(f"{s} {v:.2f}" for s, v in sparse_run["sparsity"].items()))


def eval_curve(out_dir, offset=0):
    """(iters, val losses) from the evaluation lines of a run's metrics.jsonl."""
    _, ev = read_metrics(out_dir)
    return np.array([m["iter"] for m in ev]) + offset, np.array([m["val_loss"] for m in ev])


n0 = dense_run["iters"]
it_s, val_s = eval_curve("runs/08_sparse", n0)
it_d, val_d = eval_curve("runs/08_dense_more", n0)
assert np.array_equal(it_s, it_d)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
ax = axes[0]
ax.plot(*eval_curve("runs/08_dense"), "k.-", label="dense pretraining")
ax.plot(it_d, val_d, "o-", ms=3, label="continued dense (baseline)")
ax.plot(it_s, val_s, "o-", ms=3, label="continued at 50% top-K")
ax.axvline(n0, color="grey", lw=0.8)
ax.set_xlabel("training step (dense steps, then continuation)")
ax.set_ylabel("validation loss (metrics.jsonl)")
ax.set_ylim(None, 2.6)
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
ax = axes[1]
ax.plot(it_s - n0, val_s - val_d, "o-", ms=3, color="C1")
ax.axhline(0, color="grey", lw=0.8)
ax.set_xlabel("continuation step")
ax.set_ylabel("val loss: 50% top-K minus dense")
ax.set_title("the price of sparsity, same batches")
ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()
print(f"gap at step 0 (no training yet): {val_s[0] - val_d[0]:+.4f}; mean gap over the last 4 evaluations: "
      f"{(val_s[-4:] - val_d[-4:]).mean():+.4f}")

# %% [markdown]
# The curves are train.py's own estimates (`estimate_loss`: `eval_iters` random batches,
# seeded by the iteration). Both continuations are scored on the same batches at the same
# step, so their step-0 points are the dense weights at S = 0.5 and at S = 0, and the
# right panel's difference is far steadier than either curve. If both continuations first
# rise a little (the left panel shows whether they do in this run), the likely reason is
# the learning rate: it warms up to a value above the one the dense run ended with. The
# fixed windows below give the final comparison.

# %%
params_s, _, cfg_s, _, _ = load_run("runs/08_sparse")
params_d, _, cfg_d, _, _ = load_run("runs/08_dense_more")
recov = {
    "dense, S=0 (before)": token_losses(params0, at(cfg0, 0.0), xv, yv).mean(),
    "dense, S=0.5 no training": token_losses(params0, at(cfg0, 0.5), xv, yv).mean(),
    "continued at 50% top-K": token_losses(params_s, cfg_s, xv, yv).mean(),
    "continued dense": token_losses(params_d, cfg_d, xv, yv).mean(),
}
for k, v in recov.items():
    print(f"  {k:26s} val loss {v:.4f}")
print(f"in this run: top-K cost {recov['dense, S=0.5 no training'] - recov['dense, S=0 (before)']:+.4f} before "
      f"continue-training; after it the sparse model differs by {recov['continued at 50% top-K'] - recov['dense, S=0 (before)']:+.4f} "
      f"from the dense starting point and by {recov['continued at 50% top-K'] - recov['continued dense']:+.4f} "
      "from the dense model trained the same extra steps")

# %% [markdown]
# Continue-training with top-K recovers most of the jump: the sparse model ends near (here
# even below) the dense model it started from, and what sparsity still costs, the gap to the
# dense model trained the same extra steps, is smaller than the jump it started from.
#
# ## 4. The dense fallback, on the training distribution and off it
#
# A model continue-trained with top-K can still be run dense: the weights are the same
# shape, and `SparseSpec(0.0)` (or `sparsity=0` in the config) skips the mask. The idea of
# a *dense fallback* is to pay full cost where sparsity might hurt, for instance on inputs
# unlike the training data, whose activations may be spread differently over the channels.
# Does it help this model?
#
# Three texts, all restricted to the characters the char tokenizer knows:
#
# - **pydoc val**: held-out text of the training corpus (as above);
# - **textwrap.py**: the source code of a standard-library module, `inspect.getsource`:
#   Python code with its indentation and comments, where the corpus is mostly prose about
#   Python;
# - **Zen of Python**: `this` module's ROT13-encoded aphorisms, decoded: short English lines
#   in a style the docs do not use.
#
# The dense-continued model's loss on each text says how far each is from the corpus.

# %%
def known(text):
    return "".join(c for c in text if c in tok.stoi)


with contextlib.redirect_stdout(io.StringIO()):      # `import this` prints the Zen
    import this
zen = codecs.decode(this.s, "rot13")
src = inspect.getsource(textwrap)
texts = {"pydoc val": (xv, yv)}
for name, raw in (("textwrap.py", src), ("Zen of Python", zen)):
    kept = known(raw)
    texts[name] = windows(tok.encode(kept), cfg_s.block_size)
    print(f"{name}: {len(raw):,} characters, {len(raw) - len(kept)} dropped as unknown to the tokenizer, "
          f"{len(texts[name][0])} windows")
print(repr(zen[:80]), "...")

# %%
cols = {
    "sparse (S=0.5)": (params_s, cfg_s),
    "dense fallback (S=0)": (params_s, at(cfg_s, 0.0)),
    "continued dense": (params_d, cfg_d),
    "orig. dense @ S=0.5": (params0, at(cfg0, 0.5)),
}
table = {name: {c: token_losses(p, c_cfg, x, y) for c, (p, c_cfg) in cols.items()}
         for name, (x, y) in texts.items()}

print(f"{'mean loss (nats/token)':24s}" + "".join(f"{c:>22s}" for c in cols) + f"{'fallback - sparse':>24s}")
for name, row in table.items():
    diff = (row["dense fallback (S=0)"] - row["sparse (S=0.5)"]).mean(axis=1)      # per window, (W,)
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    print(f"{name:24s}" + "".join(f"{row[c].mean():22.4f}" for c in cols)
          + f"{diff.mean():+14.4f} ± {2 * se:.4f}")

# %%
names = list(table)
w = 0.2
plt.figure(figsize=(7.5, 3.6))
for j, c in enumerate(cols):
    plt.bar(np.arange(len(names)) + (j - 1.5) * w, [table[n][c].mean() for n in names], w, label=c)
plt.xticks(range(len(names)), names)
plt.ylabel("mean cross-entropy (nats/token)")
lo = min(table[n][c].mean() for n in names for c in cols)
plt.ylim(lo - 0.3, None)
plt.legend(fontsize=8)
plt.title("the continue-trained model, sparse and dense fallback")
plt.show()

# %% [markdown]
# How to read the table (the ± is twice the standard error of the per-window difference,
# a rough 95% interval; all columns are scored on the same windows):
#
# - The "continued dense" column measures the distribution shift: the higher its loss on a
#   text, the less that text looks like the corpus.
# - "fallback − sparse" is what switching top-K off at inference does to the continue-trained
#   model. A negative value means the fallback helps.
# - The last column is the training-free alternative: the original dense weights run at
#   50% top-K, never trained sparse.
#
# The cell below states what this run shows, from the numbers. At this scale (106k
# projection weights, a few hundred steps) it cannot say what happens in a 7B model. One
# reason a fallback need not help: after continue-training with top-K, the weights have
# been trained only on the largest inputs of every projection, so removing the mask hands
# them small inputs they were no longer trained on. A dense fallback is a *different*
# model from the one that was trained, not automatically a better one, and it should be
# measured, as here, on the texts it is meant to rescue.

# %%
for name, row in table.items():
    diff = (row["dense fallback (S=0)"] - row["sparse (S=0.5)"]).mean(axis=1)      # per window, (W,)
    d, two_se = diff.mean(), 2 * diff.std(ddof=1) / np.sqrt(len(diff))
    shift = row["continued dense"].mean() - table["pydoc val"]["continued dense"].mean()
    verdict = ("is within noise of the sparse model:" if abs(d) < two_se else
               "helps by" if d < 0 else "hurts by")
    print(f"{name:14s}: shift from the corpus {shift:+.3f} nats/token (continued dense); "
          f"the dense fallback {verdict} {d:+.4f} ± {two_se:.4f} nats/token")

# %% [markdown]
# In this run the dense fallback rescues nothing: on the held-out corpus and on the texts
# unlike it, switching top-K off makes the continue-trained model worse or leaves it within
# noise, never clearly better. Its weights were tuned to the sparse forward pass, and that is
# the model to run.

# %% [markdown]
# ## 5. Check: the hand-written loss equals the package's
#
# Every number above came from `token_losses`, written in this lesson. Its mean over a
# batch must equal the loss that `model.forward` computes with `minisparse/loss.py`,
# `cross_entropy_forward` (float32 there, float64 here: rtol 1e-5), for the sparse and
# the dense-fallback configuration alike.

# %%
for name, (x, y) in texts.items():
    for c, (p, c_cfg) in cols.items():
        _, pkg_loss, _ = model.forward(p, c_cfg, x[:64], y[:64])
        mine = token_losses(p, c_cfg, x[:64], y[:64]).mean()
        np.testing.assert_allclose(mine, float(pkg_loss), rtol=1e-5)
print("ok: token_losses(...).mean() == model.forward's loss (rtol 1e-5) for every text and configuration")
