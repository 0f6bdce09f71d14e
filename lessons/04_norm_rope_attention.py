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
# # 04 · RMSNorm, rotary embeddings and causal attention, backward by hand
#
# Q-Sparse changes only the projections (lesson 03); the rest of a block is the plain
# LLaMA recipe, and minisparse writes its backward passes by hand too:
#
# | concept | file, functions |
# |---|---|
# | RMSNorm | `minisparse/norm.py`: `rmsnorm_forward`, `rmsnorm_backward` |
# | rotary position embedding (RoPE) | `minisparse/rope.py`: `rope_tables`, `rope_forward`, `rope_backward` |
# | causal scaled dot-product attention | `minisparse/attention.py`: `attention_forward`, `attention_backward` |
#
# For each one this lesson derives the backward pass, writes forward and backward again in
# plain NumPy (on purpose in a different form from the package: an explicit Jacobian,
# complex numbers, `einsum` with an index mask), and checks both ways: hand against package
# to rounding, and hand against centred finite differences in float64 with a **random**
# upstream gradient, printing the relative error
# $\max\lvert a-b\rvert / \max(\max\lvert a\rvert, \max\lvert b\rvert)$, which must be below 1e-6.
#
# One letter per dimension, as in the code: B batch, H heads, T time, C channels,
# hs = C / H head size.

# %%
import numpy as np
import matplotlib.pyplot as plt

from minisparse.norm import rmsnorm_forward, rmsnorm_backward
from minisparse.rope import rope_forward, rope_backward
from minisparse.attention import attention_forward, attention_backward
# the same centred finite differences and error measure as the tests use
from minisparse.gradcheck import numerical_grad, rel_error

rng = np.random.default_rng(0)
TOL_FD, TOL_ROUND = 1e-6, 1e-12


def fd_check(name, forward, grads, inputs, dout):
    """Finite differences of L = sum(forward(*inputs) * dout) against the given grads; prints, returns errors."""
    errs = []
    for i, (x, dx) in enumerate(zip(inputs, grads)):
        num = numerical_grad(lambda: float((forward(*inputs) * dout).sum()), x)
        errs.append(rel_error(dx, num))
        print(f"{name}: input {i}, hand vs finite differences, rel error {errs[-1]:.1e}")
    return errs


# %% [markdown]
# ## 1. RMSNorm
#
# Per token (one row of C channels), with a learned gain $g$ (C,):
#
# $$r = \Big(\tfrac1C\textstyle\sum_c x_c^2 + \epsilon\Big)^{-1/2}, \qquad \hat x = x\,r, \qquad y = \hat x\odot g.$$
#
# Shapes: $x, \hat x, y$ (B, T, C); $r$ (B, T, 1); $g$ (C,).
#
# **Gain.** $y_c = \hat x_c g_c$ for every token, so $dg = \sum_{B,T} dy\odot\hat x$.
#
# **Input.** Write $d\hat x = dy\odot g$. The only subtle part is that $r$ depends on every
# $x_j$ of the row:
#
# $$\frac{\partial r}{\partial x_j} = -\tfrac12\Big(\tfrac1C\textstyle\sum_c x_c^2+\epsilon\Big)^{-3/2}\,\frac{2x_j}{C} = -\frac{r^3 x_j}{C}.$$
#
# Then, with $\hat x_i = x_i r$,
#
# $$dx_j = \sum_i d\hat x_i\,\frac{\partial \hat x_i}{\partial x_j} = \sum_i d\hat x_i\Big(r\,\delta_{ij} - \frac{x_i r^3 x_j}{C}\Big) = r\Big(d\hat x_j - \hat x_j\,\tfrac1C\textstyle\sum_i d\hat x_i\hat x_i\Big),$$
#
# which is the line `dx = r * (dxhat - xhat * (dxhat * xhat).mean(...))` of `rmsnorm_backward`.
# As a matrix, the Jacobian of one token is
# $\partial y/\partial x = \mathrm{diag}(g)\; r\,(I - \hat x\hat x^\top/C)$, and $dx$ is its
# transpose times $dy$. Below, the hand version builds that Jacobian explicitly per token
# (C × C, fine at this size) instead of using the shortcut.

# %%
def hand_rmsnorm_forward(x, g, eps=1e-5):
    r = 1.0 / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps)   # (B, T, 1)
    return x * r * g


def hand_rmsnorm_backward(dy, x, g, eps=1e-5):
    C = x.shape[-1]
    r = 1.0 / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps)   # (B, T, 1)
    xhat = x * r                                                        # (B, T, C)
    dg = np.einsum("btc,btc->c", dy, xhat)                              # (C,)
    # Jacobian per token: J[b,t] = diag(g) r (I - xhat xhat^T / C), shape (B, T, C, C)
    J = g[:, None] * r[..., None] * (np.eye(C) - xhat[..., :, None] * xhat[..., None, :] / C)
    dx = np.einsum("btij,bti->btj", J, dy)                              # dx = J^T dy
    return dx, dg


Bn, Tn, Cn = 2, 3, 8
x_n = rng.standard_normal((Bn, Tn, Cn))
g_n = 1.0 + 0.3 * rng.standard_normal(Cn)          # not all ones, so dg and the gain path matter
dy_n = rng.standard_normal((Bn, Tn, Cn))           # random upstream gradient

y_pkg, cache_n = rmsnorm_forward(x_n, g_n)
dx_pkg, dg_pkg = rmsnorm_backward(dy_n, cache_n)
dx_h, dg_h = hand_rmsnorm_backward(dy_n, x_n, g_n)
err_norm_pkg = [rel_error(hand_rmsnorm_forward(x_n, g_n), y_pkg), rel_error(dx_h, dx_pkg), rel_error(dg_h, dg_pkg)]
print("RMSNorm hand vs package: rel error y, dx, dg =", ", ".join(f"{e:.1e}" for e in err_norm_pkg))
err_norm_fd = fd_check("RMSNorm", hand_rmsnorm_forward, (dx_h, dg_h), [x_n, g_n], dy_n)

# %% [markdown]
# The factor $(I - \hat x\hat x^\top/C)$ is almost the projection that removes the
# component along $x$ ($\hat x^\top\hat x/C = \mathrm{ms}/(\mathrm{ms}+\epsilon)$, just under 1).
# That is the backward's view of a forward fact: scaling a token's $x$ by any factor leaves
# $y$ unchanged (up to $\epsilon$), so the gradient has (almost) no component along $x$. The
# cosine between $x$ and $dx$ of each token shows it:

# %%
cos_x_dx = np.einsum("btc,btc->bt", x_n, dx_h) / (np.linalg.norm(x_n, axis=-1) * np.linalg.norm(dx_h, axis=-1))
print("cos(x, dx) per token:", np.array2string(cos_x_dx.ravel(), precision=1))
print("scale invariance: max |y(3x) - y(x)| =", np.abs(hand_rmsnorm_forward(3 * x_n, g_n) - hand_rmsnorm_forward(x_n, g_n)).max())

# %% [markdown]
# ## 2. Rotary position embeddings (RoPE)
#
# Each head vector $x$ (hs,) at position $p$ is cut into halves $x^{(1)}, x^{(2)}$ (hs/2 each,
# the "rotate half" layout of Hugging Face LLaMA), and pair $i$ is rotated by the angle
# $p\,\theta_i$:
#
# $$\theta_i = \text{base}^{-2i/hs},\qquad
# \begin{pmatrix}y^{(1)}_i\\ y^{(2)}_i\end{pmatrix} =
# \begin{pmatrix}\cos p\theta_i & -\sin p\theta_i\\ \sin p\theta_i & \cos p\theta_i\end{pmatrix}
# \begin{pmatrix}x^{(1)}_i\\ x^{(2)}_i\end{pmatrix} = R_{p,i}\,\begin{pmatrix}x^{(1)}_i\\ x^{(2)}_i\end{pmatrix}.$$
#
# Shapes: $x, y$ (B, H, T, hs); the tables $\cos, \sin$ (T, hs/2) (`rope_tables`).
#
# **Backward.** $y$ is linear in $x$ with matrix $R$, so $dx = R^\top dy$, and the transpose
# of a rotation is the rotation by the opposite angle:
#
# $$dx^{(1)} = dy^{(1)}\cos + dy^{(2)}\sin,\qquad dx^{(2)} = -dy^{(1)}\sin + dy^{(2)}\cos.$$
#
# **The same in complex numbers.** With $z_i = x^{(1)}_i + \mathrm{i}\,x^{(2)}_i$ the rotation
# is a multiplication, $z_i \mapsto z_i e^{\mathrm{i}p\theta_i}$, and the backward is
# $dz_i \mapsto dz_i e^{-\mathrm{i}p\theta_i}$. The hand version uses this form, an independent
# implementation of the same equations.

# %%
def hand_rope_forward(x, base=10000.0, offset=0):
    T, hs = x.shape[-2], x.shape[-1]
    theta = base ** (-2.0 * np.arange(hs // 2) / hs)                   # (hs/2,)
    phase = np.exp(1j * np.arange(offset, offset + T)[:, None] * theta)  # (T, hs/2), e^{i p theta}
    z = (x[..., :hs // 2] + 1j * x[..., hs // 2:]) * phase             # (B, H, T, hs/2) complex
    return np.concatenate([z.real, z.imag], axis=-1)


def hand_rope_backward(dy, base=10000.0, offset=0):
    T, hs = dy.shape[-2], dy.shape[-1]
    theta = base ** (-2.0 * np.arange(hs // 2) / hs)
    phase = np.exp(1j * np.arange(offset, offset + T)[:, None] * theta)
    dz = (dy[..., :hs // 2] + 1j * dy[..., hs // 2:]) * np.conj(phase)  # rotate back
    return np.concatenate([dz.real, dz.imag], axis=-1)


Br, Hr, Tr, hsr = 2, 2, 5, 8
x_r = rng.standard_normal((Br, Hr, Tr, hsr))
dy_r = rng.standard_normal((Br, Hr, Tr, hsr))
y_pkg_r, cache_r = rope_forward(x_r)
dx_pkg_r = rope_backward(dy_r, cache_r)
dx_h_r = hand_rope_backward(dy_r)
err_rope_pkg = [rel_error(hand_rope_forward(x_r), y_pkg_r), rel_error(dx_h_r, dx_pkg_r)]
print("RoPE hand vs package: rel error y, dx =", ", ".join(f"{e:.1e}" for e in err_rope_pkg))
err_rope_fd = fd_check("RoPE", hand_rope_forward, (dx_h_r,), [x_r], dy_r)

# with an offset (decoding position 7 onwards) and another base
y_off_pkg, cache_off = rope_forward(x_r, base=500.0, offset=7)
err_rope_off = [rel_error(hand_rope_forward(x_r, 500.0, 7), y_off_pkg),
                rel_error(hand_rope_backward(dy_r, 500.0, 7), rope_backward(dy_r, cache_off))]
print("RoPE, base 500, offset 7, hand vs package: rel error y, dx =", ", ".join(f"{e:.1e}" for e in err_rope_off))

# %% [markdown]
# **A rotation preserves norms**: every pair keeps its length, so the whole head vector does.
# RoPE adds position without changing how large q and k are.

# %%
pair_norm = lambda t: np.hypot(t[..., :hsr // 2], t[..., hsr // 2:])   # (B, H, T, hs/2) length of each pair
err_norm_vec = np.abs(np.linalg.norm(y_pkg_r, axis=-1) - np.linalg.norm(x_r, axis=-1)).max()
err_norm_pair = np.abs(pair_norm(y_pkg_r) - pair_norm(x_r)).max()
print(f"max | |RoPE(x)| - |x| | over head vectors: {err_norm_vec:.1e};  over pairs: {err_norm_pair:.1e}")

# %% [markdown]
# **The score depends only on the relative position.** Put a query vector $q$ at position $m$
# and a key vector $k$ at position $n$. In complex form
#
# $$\langle R_m q, R_n k\rangle = \mathrm{Re}\sum_i q_i e^{\mathrm{i}m\theta_i}\,\overline{k_i e^{\mathrm{i}n\theta_i}}
# = \mathrm{Re}\sum_i q_i\bar k_i\, e^{\mathrm{i}(m-n)\theta_i},$$
#
# a function of $m-n$ alone. Below: one fixed $q$ and one fixed $k$ (hs = 32), placed at
# every position 0..63 with the package's `rope_forward`, and the 64 × 64 matrix of scores.
# It is constant along every diagonal, and the curves of score against distance $m-n$
# for queries at different absolute positions lie on top of each other.

# %%
T_rel, hs_rel = 64, 32
q_vec, k_vec = rng.standard_normal(hs_rel), rng.standard_normal(hs_rel)
Q_rel, _ = rope_forward(np.tile(q_vec, (1, 1, T_rel, 1)))      # (1, 1, T, hs): q at positions 0..T-1
K_rel, _ = rope_forward(np.tile(k_vec, (1, 1, T_rel, 1)))
score = Q_rel[0, 0] @ K_rel[0, 0].T                             # (T, T): score[m, n] = <R_m q, R_n k>
diag_spread = max(np.ptp(np.diagonal(score, offset=-d)) for d in range(-(T_rel - 1), T_rel))
print(f"largest spread of the scores along one diagonal (same m - n): {diag_spread:.1e}")
print(f"spread of all scores: {np.ptp(score):.2f}  (so position does matter, through m - n)")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
im = axes[0].imshow(score, cmap="RdBu", vmin=-np.abs(score).max(), vmax=np.abs(score).max())
axes[0].set_xlabel("key position n"); axes[0].set_ylabel("query position m")
axes[0].set_title("q·k after RoPE: constant along diagonals")
plt.colorbar(im, ax=axes[0])
for m, style in ((63, dict(lw=4, alpha=0.35)), (40, dict(marker="o", mfc="none", lw=0)), (20, dict(marker="x", lw=0))):
    n = np.arange(m + 1)                                        # the keys query m may see
    axes[1].plot(m - n, score[m, n], label=f"query at m = {m}", **style)
axes[1].set_xlabel("relative position m - n"); axes[1].set_ylabel("score q·k")
axes[1].set_title("same curve, whatever the absolute position")
axes[1].legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# ## 3. Causal attention
#
# Per batch and head, with $T_q$ queries and $T_k$ keys (training: $T_q = T_k = T$):
#
# $$S = \frac{q k^\top}{\sqrt{hs}},\quad S_{ij} = -\infty \text{ where key } j \text{ is in the future of query } i,\quad
# P = \mathrm{softmax}_j(S),\quad y = P v.$$
#
# Shapes: $q$ (B, H, Tq, hs); $k, v$ (B, H, Tk, hs); $S, P$ (B, H, Tq, Tk); $y$ (B, H, Tq, hs).
# The queries are the *last* $T_q$ of the $T_k$ positions, so query $i$ may see key $j$ when
# $j \le i + T_k - T_q$ (for $T_q = T_k$: $j \le i$).
#
# ### The softmax Jacobian-vector product
#
# For one row, $P_j = e^{S_j}/\sum_l e^{S_l}$, and
#
# $$\frac{\partial P_j}{\partial S_l} = P_j(\delta_{jl} - P_l), \qquad J = \mathrm{diag}(P) - PP^\top \quad (T_k \times T_k,\ \text{symmetric}).$$
#
# Backward needs $dS = J^\top dP$; it never builds $J$:
#
# $$dS_l = \sum_j dP_j\,P_j(\delta_{jl} - P_l) = P_l\Big(dP_l - \sum_j dP_j P_j\Big),$$
#
# $O(T_k)$ per row instead of $O(T_k^2)$. A masked key has $P_l = 0$, hence $dS_l = 0$: no
# gradient reaches the future, and the $-\infty$ needs no special case in backward.
#
# ### The rest
#
# $y = Pv$ gives $dv = P^\top dy$ and $dP = dy\,v^\top$; $S = qk^\top/\sqrt{hs}$ gives
# $dq = dS\,k/\sqrt{hs}$ and $dk = dS^\top q/\sqrt{hs}$. These are the five lines of
# `attention_backward`. First the Jacobian-vector product alone, on one row with one masked key:

# %%
s_row = rng.standard_normal(6); s_row[-1] = -np.inf             # the last key is in the future
p_row = np.exp(s_row - s_row.max()); p_row /= p_row.sum()
dP_row = rng.standard_normal(6)
J_row = np.diag(p_row) - np.outer(p_row, p_row)                 # the full Jacobian (6, 6)
dS_full = J_row.T @ dP_row
dS_jvp = p_row * (dP_row - (dP_row * p_row).sum())               # the O(Tk) formula
# finite differences of sum(softmax(s) * dP) w.r.t. the 5 visible scores
s_vis = s_row[:5].copy()
softmax_vis = lambda: float((np.exp(s_vis - s_vis.max()) / np.exp(s_vis - s_vis.max()).sum() * dP_row[:5]).sum())
dS_fd = numerical_grad(softmax_vis, s_vis)
err_jvp = rel_error(dS_jvp, dS_full)
err_jvp_fd = rel_error(dS_jvp[:5], dS_fd)
print(f"softmax: JVP formula vs explicit Jacobian, rel error {err_jvp:.1e}")
print(f"softmax: JVP formula vs finite differences (visible keys), rel error {err_jvp_fd:.1e}")
print(f"gradient at the masked key: {dS_jvp[-1]}")

# %% [markdown]
# Now the whole attention by hand: the mask from an explicit index comparison, sums with
# `einsum`.

# %%
def causal_allowed(Tq, Tk):
    """(Tq, Tk) bool: query i (the last Tq of Tk positions) may see key j iff j <= i + Tk - Tq."""
    i, j = np.arange(Tq)[:, None], np.arange(Tk)[None, :]
    return j <= i + (Tk - Tq)


def hand_attention_forward(q, k, v):
    Tq, Tk, hs = q.shape[-2], k.shape[-2], q.shape[-1]
    S = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(hs)                # (B, H, Tq, Tk)
    S = np.where(causal_allowed(Tq, Tk), S, -np.inf)
    P = np.exp(S - S.max(axis=-1, keepdims=True))
    P = P / P.sum(axis=-1, keepdims=True)                               # (B, H, Tq, Tk)
    return np.einsum("bhij,bhjd->bhid", P, v), P                        # y: (B, H, Tq, hs)


def hand_attention_backward(dy, q, k, v):
    hs = q.shape[-1]
    _, P = hand_attention_forward(q, k, v)
    dv = np.einsum("bhij,bhid->bhjd", P, dy)                            # dv = P^T dy
    dP = np.einsum("bhid,bhjd->bhij", dy, v)                            # dP = dy v^T
    dS = P * (dP - np.einsum("bhij,bhij->bhi", dP, P)[..., None])       # softmax JVP, row by row
    dq = np.einsum("bhij,bhjd->bhid", dS, k) / np.sqrt(hs)              # dq = dS k / sqrt(hs)
    dk = np.einsum("bhij,bhid->bhjd", dS, q) / np.sqrt(hs)              # dk = dS^T q / sqrt(hs)
    return dq, dk, dv


def check_attention(Tq, Tk, B=2, H=2, hs=4):
    q = rng.standard_normal((B, H, Tq, hs))
    k, v = rng.standard_normal((B, H, Tk, hs)), rng.standard_normal((B, H, Tk, hs))
    dy = rng.standard_normal((B, H, Tq, hs))
    y_pkg, cache = attention_forward(q, k, v)
    grads_pkg = attention_backward(dy, cache)
    grads_h = hand_attention_backward(dy, q, k, v)
    errs_pkg = [rel_error(hand_attention_forward(q, k, v)[0], y_pkg)] + [rel_error(a, b) for a, b in zip(grads_h, grads_pkg)]
    print(f"attention Tq={Tq} Tk={Tk}, hand vs package: rel error y, dq, dk, dv =", ", ".join(f"{e:.1e}" for e in errs_pkg))
    errs_fd = fd_check(f"attention Tq={Tq} Tk={Tk}", lambda q, k, v: hand_attention_forward(q, k, v)[0], grads_h, [q, k, v], dy)
    return errs_pkg, errs_fd


err_attn_pkg, err_attn_fd = check_attention(6, 6)

# %% [markdown]
# ### The causal pattern
#
# One random example (T = 12, hs = 16): the scores with the future masked, and the
# attention weights $P$. Every row sums to 1 over the keys it may see; everything above the
# diagonal is exactly 0. The first query can only attend to itself.

# %%
T_p, hs_p = 12, 16
q_p, k_p, v_p = (rng.standard_normal((1, 1, T_p, hs_p)) for _ in range(3))
y_p, (_, _, _, P_p, _) = attention_forward(q_p, k_p, v_p)
S_p = np.where(causal_allowed(T_p, T_p), (q_p @ k_p.swapaxes(-1, -2))[0, 0] / np.sqrt(hs_p), np.nan)

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
im0 = axes[0].imshow(S_p, cmap="RdBu")
axes[0].set_title("scores S = q k^T / sqrt(hs), future masked (blank)")
im1 = axes[1].imshow(P_p[0, 0], cmap="viridis", vmin=0, vmax=1)
axes[1].set_title("attention weights P = softmax(S)")
for ax, im in zip(axes, (im0, im1)):
    ax.set_xlabel("key position j"); ax.set_ylabel("query position i"); plt.colorbar(im, ax=ax)
plt.tight_layout(); plt.show()

future_weight = np.abs(P_p[0, 0][~causal_allowed(T_p, T_p)]).max()
row_sums = P_p.sum(axis=-1)
print(f"largest weight on a future key: {future_weight}; row sums within {np.abs(row_sums - 1).max():.1e} of 1")

# causality, seen from the outputs: change the last key and value, earlier outputs do not move
k_c, v_c = k_p.copy(), v_p.copy()
k_c[..., -1, :] += 5.0; v_c[..., -1, :] -= 5.0
y_c, _ = attention_forward(q_p, k_c, v_c)
causal_ok = np.array_equal(y_c[..., :-1, :], y_p[..., :-1, :])
print("changing the last key/value leaves outputs 0..T-2 bit-for-bit unchanged:", causal_ok)

# %% [markdown]
# ### Decoding: one query against Tk cached keys
#
# When generating (`minisparse/decode.py`, `decode_forward`) the new token's query is the
# only one computed; its keys and values join those of the cache, and attention runs with
# $T_q = 1$, $T_k$ = the cache length. The rule $j \le i + T_k - T_q$ with $i = 0$ lets it see
# every cached key, so `attention_forward` builds no mask at all for $T_q = 1$. Its output
# must equal the last row of the full causal attention, and its backward must again match
# finite differences (the tests' `test_attention` checks Tq = 1 too; training never uses it).
# RoPE enters through `offset`: the new query rotated at position $T_k - 1$ is the last row
# of the full rotation. The general case, a chunk of $T_q$ new tokens after $T_k - T_q$
# cached ones, is checked too.

# %%
Tk_d = 7
q_full, k_full, v_full = (rng.standard_normal((2, 2, Tk_d, 4)) for _ in range(3))
y_full, _ = attention_forward(q_full, k_full, v_full)
y_dec, _ = attention_forward(q_full[..., -1:, :], k_full, v_full)       # (B, H, 1, hs)
err_dec_vs_full = rel_error(y_dec, y_full[..., -1:, :])
print(f"decode (Tq=1) vs last row of the full attention: rel error {err_dec_vs_full:.1e}")

rope_last, _ = rope_forward(q_full[..., -1:, :], offset=Tk_d - 1)
err_rope_dec = rel_error(rope_last, rope_forward(q_full)[0][..., -1:, :])
print(f"RoPE of the new query at offset Tk-1 vs last row of the full RoPE: rel error {err_rope_dec:.1e}")

err_dec_pkg, err_dec_fd = check_attention(1, Tk_d)

# and a chunk of 3 new queries after 4 cached positions: query i sees keys j <= i + 4
print("allowed keys for Tq=3, Tk=7:\n", causal_allowed(3, Tk_d).astype(int))
err_chunk_pkg, err_chunk_fd = check_attention(3, Tk_d)

# %% [markdown]
# ## 4. The hand derivations equal the package
#
# Hand against package to rounding (1e-12 relative), hand against centred finite differences
# to 1e-6 (random upstream gradients, float64), and the properties shown above.

# %%
print("worst finite-difference error of this lesson:",
      f"{max(err_norm_fd + err_rope_fd + err_attn_fd + err_dec_fd + err_chunk_fd + [err_jvp_fd]):.1e}")

# RMSNorm: y, dx, dg
np.testing.assert_allclose(hand_rmsnorm_forward(x_n, g_n), y_pkg, rtol=TOL_ROUND, atol=TOL_ROUND)
np.testing.assert_allclose(dx_h, dx_pkg, rtol=TOL_ROUND, atol=TOL_ROUND)
np.testing.assert_allclose(dg_h, dg_pkg, rtol=TOL_ROUND, atol=TOL_ROUND)
assert max(err_norm_fd) < TOL_FD

# RoPE: y and dx, with and without offset; norms; relative position
np.testing.assert_allclose(hand_rope_forward(x_r), y_pkg_r, rtol=TOL_ROUND, atol=TOL_ROUND)
np.testing.assert_allclose(dx_h_r, dx_pkg_r, rtol=TOL_ROUND, atol=TOL_ROUND)
assert max(err_rope_off) < TOL_ROUND and max(err_rope_fd) < TOL_FD
assert err_norm_vec < 1e-12 and err_norm_pair < 1e-12
assert diag_spread < 1e-10 * np.abs(score).max()

# attention: softmax JVP, training and decode cases, the mask
assert err_jvp < TOL_ROUND and err_jvp_fd < TOL_FD and dS_jvp[-1] == 0.0
assert max(err_attn_pkg) < TOL_ROUND and max(err_attn_fd) < TOL_FD
assert max(err_dec_pkg) < TOL_ROUND and max(err_dec_fd) < TOL_FD
assert max(err_chunk_pkg) < TOL_ROUND and max(err_chunk_fd) < TOL_FD
assert err_dec_vs_full < TOL_ROUND and err_rope_dec < TOL_ROUND
assert future_weight == 0.0 and np.allclose(row_sums, 1.0, atol=1e-12) and causal_ok
print("all checks passed: the hand derivations equal minisparse/norm.py, rope.py and attention.py")
