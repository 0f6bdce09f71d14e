"""The whole model against an independent PyTorch reference, in float64.

The reference below is written from the equations (model.py's docstring, QSPARSE.md), not by
calling minisparse: embedding, per block RMSNorm -> sparsify -> Wq, Wk, Wv -> RoPE ("rotate
half") -> causal softmax attention -> sparsify -> Wo -> residual, RMSNorm -> sparsify -> up,
gate -> ReLU2-GLU or SwiGLU -> sparsify -> W_down -> residual; final RMSNorm, dense LM head,
mean cross-entropy. Its gradients come from torch.autograd, with the straight-through
estimator written the usual PyTorch way, `x + (x * mask - x).detach()`.

Both start from the same `init_params(cfg, seed, dtype=float64)` dict. Checked: loss, logits
and every parameter gradient (relative error <= 1e-13) for top-K, N:M, SwiGLU, dense and the
masked-gradient ablation; and ten AdamW steps against torch.optim.AdamW (losses to 1e-13,
parameters to 1e-10).
Relative error is max|a - b| / max(max|b|, tiny), b the torch reference.
Without torch the module is skipped, but in CI (CI or MINISPARSE_REQUIRE_TORCH=1 set) that is an error.
"""

import math

import numpy as np
import pytest

from conftest import import_torch, record

torch = import_torch(__name__)   # in CI a missing torch fails the run (conftest.torch_required), elsewhere a skip

from minisparse import model  # noqa: E402
from minisparse.optimizer import AdamW  # noqa: E402

DT = torch.float64
# Why these values: the two float64 implementations differ only in rounding (summation order). Measured
# over 24 runs with all the seeds shifted: loss and logits at most 8.1e-16, gradients 1.7e-15, AdamW
# losses after ten steps 1.1e-15 and parameters 2.6e-12 (Adam divides each entry by its own size,
# sqrt(v), which enlarges the rounding of the tiny gradient entries). Each tolerance is 10x the worst,
# rounded up to a power of ten.
TOL = 1e-13
TOL_ADAMW_LOSS = 1e-13
TOL_ADAMW_PARAMS = 1e-10
B, T = 3, 16
SMALL = dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32)


def rel_err(a, b):
    """max|a - b| / max(max|b|, tiny); b is the torch reference."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(np.float64).tiny))


# ----------------------------------------------------------------------------------------
# the PyTorch reference, from the equations


def t_sparsify(x, cfg):
    """Top-K of |x| per token (or per block of N:M), lower index first on ties; STE or masked."""
    D = x.shape[-1]
    if cfg.nm is not None:
        keep, block = cfg.nm
        xb = x.reshape(x.shape[:-1] + (D // block, block))       # (B, T, D/block, block)
        K = keep
    elif cfg.sparsity == 0.0:
        return x                                                 # dense: nothing to do
    else:
        xb = x
        K = D - math.floor(cfg.sparsity * D + 0.5)
    # a stable sort of -|x| puts equal |x| in index order, so ties keep the lower index
    order = torch.sort(-xb.detach().abs(), dim=-1, stable=True).indices[..., :K]
    mask = torch.zeros(xb.shape, dtype=x.dtype).scatter(-1, order, 1.0).reshape(x.shape)
    if cfg.ste:
        return x + (x * mask - x).detach()                       # forward x*mask, backward identity
    return x * mask                                              # backward dx = dxs * mask


def t_input(x, cfg):
    """The projection input: sparsified, then (a_bits = 8) absmax INT8 per token, as BitNet's
    activation_quant: s = 127 / (max|x| + eps), round(x s) clamped to [-128, 127], divided by s;
    the rounding passes its gradient straight through."""
    xs = t_sparsify(x, cfg)
    if cfg.a_bits == 16:
        return xs
    s = 127.0 / (xs.detach().abs().amax(dim=-1, keepdim=True) + 1e-5)
    return xs + ((xs * s).round().clamp(-128, 127) / s - xs).detach()


def t_weight(W, cfg):
    """The weight a projection multiplies: (w_bits = 1.58) BitNet's weight_quant, s = 1 / (mean|W| + eps),
    round(W s) clamped to [-1, 1], divided by s; straight through."""
    if cfg.w_bits == 16:
        return W
    s = 1.0 / (W.detach().abs().mean() + 1e-5)
    return W + ((W * s).round().clamp(-1, 1) / s - W).detach()


def t_rmsnorm(x, g, eps):
    return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + eps) * g


def t_rope(x, base, layout="half"):
    """Rotate-half RoPE on (B, H, T, hs); layout "pairs" rotates (x[2i], x[2i+1]) instead."""
    Tn, hs = x.shape[-2], x.shape[-1]
    i = torch.arange(hs // 2, dtype=DT)
    theta = base ** (-2.0 * i / hs)                              # (hs/2,)
    ang = torch.arange(Tn, dtype=DT)[:, None] * theta[None, :]   # (T, hs/2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    if layout == "pairs":
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def t_attention(q, k, v):
    hs = q.shape[-1]
    Tn = q.shape[-2]
    S = q @ k.transpose(-1, -2) / math.sqrt(hs)                  # (B, H, T, T)
    causal = torch.ones(Tn, Tn, dtype=torch.bool).tril()
    S = S.masked_fill(~causal, float("-inf"))
    return torch.softmax(S, dim=-1) @ v                          # (B, H, T, hs)


def t_forward(P, cfg, idx, targets):
    """P: dict of torch tensors with minisparse's names. Returns (logits, loss)."""
    Bn, Tn = idx.shape
    C, H = cfg.n_embd, cfg.n_head
    hs = C // H

    Hkv = cfg.n_kv_head

    def heads(z, n=H):                                           # (B, T, n*hs) -> (B, n, T, hs)
        return z.reshape(Bn, Tn, n, hs).transpose(1, 2)

    x = P["wte"][idx]                                            # (B, T, C)
    for l in range(cfg.n_layer):
        p = f"h.{l}."
        W = {n: t_weight(P[p + n], cfg) for n in ("attn.wq", "attn.wk", "attn.wv", "attn.wo",
                                                  "ffn.w_up", "ffn.w_gate", "ffn.w_down")}
        h = t_input(t_rmsnorm(x, P[p + "attn_norm"], cfg.norm_eps), cfg)
        q = heads(h @ W["attn.wq"].T)
        k = heads(h @ W["attn.wk"].T, Hkv)
        v = heads(h @ W["attn.wv"].T, Hkv)
        q, k = t_rope(q, cfg.rope_base, cfg.rope_layout), t_rope(k, cfg.rope_base, cfg.rope_layout)
        # grouped-query attention: query head i uses key/value head i // (H / Hkv)
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        a = t_attention(q, k, v).transpose(1, 2).reshape(Bn, Tn, C)
        x = x + t_input(a, cfg) @ W["attn.wo"].T
        h = t_input(t_rmsnorm(x, P[p + "ffn_norm"], cfg.norm_eps), cfg)
        up, gate = h @ W["ffn.w_up"].T, h @ W["ffn.w_gate"].T
        if cfg.activation == "relu2":
            m = up * torch.relu(gate) ** 2
        else:
            m = up * torch.nn.functional.silu(gate)
        x = x + t_input(m, cfg) @ W["ffn.w_down"].T
    head = P["wte"] if cfg.tie_embeddings else P["lm_head"]
    logits = t_rmsnorm(x, P["norm_f"], cfg.norm_eps) @ head.T   # (B, T, V)
    # targets of -1 are not counted (finetuning's masked prompt and padding): torch's own ignore_index
    loss = torch.nn.functional.cross_entropy(logits.reshape(Bn * Tn, -1), targets.reshape(-1), ignore_index=-1)
    return logits, loss


def to_torch(params):
    return {k: torch.tensor(np.asarray(v), dtype=DT, requires_grad=True) for k, v in params.items()}


def batch(rng, cfg):
    idx = rng.integers(0, cfg.vocab_size, size=(B, T))
    targets = rng.integers(0, cfg.vocab_size, size=(B, T))
    return idx, targets


# ----------------------------------------------------------------------------------------
# loss, logits and every gradient


def compare_model(name, cfg, seed=0, ties=False, masked=False):
    params = model.init_params(cfg, seed=seed, dtype=np.float64)
    if ties:
        # embeddings from four magnitudes {1, 2, 3, 4} * 0.01 with random signs: every row of the
        # first qkv input has many exactly equal |x| (RMSNorm scales a row by one number, gains are
        # 1), so which of the tied entries are kept, the lower index, shows in loss and gradients
        rng = np.random.default_rng(seed + 200)
        V, C = params["wte"].shape
        params["wte"] = 0.01 * rng.integers(1, 5, size=(V, C)) * rng.choice([-1.0, 1.0], size=(V, C))
    idx, targets = batch(np.random.default_rng(seed + 100), cfg)
    if masked:
        # as finetuning's batches: each row's prompt (a different length per row) and padding not counted
        targets[0, :5] = targets[1, :11] = targets[2, :2] = targets[2, 12:] = -1

    logits, loss, caches = model.forward(params, cfg, idx, targets)
    grads = model.backward(params, cfg, caches)

    P = to_torch(params)
    t_logits, t_loss = t_forward(P, cfg, torch.from_numpy(idx), torch.from_numpy(targets))
    t_loss.backward()

    assert set(grads) == set(P) == set(model.param_shapes(cfg))
    errs = {"loss": rel_err(loss, t_loss.item()), "logits": rel_err(logits, t_logits.detach().numpy())}
    for k in P:
        assert grads[k].shape == tuple(P[k].shape), k
        errs[k] = rel_err(grads[k], P[k].grad.numpy())
    worst = max(errs, key=errs.get)
    record(f"torch ref {name} loss/logits", max(errs["loss"], errs["logits"]))
    record(f"torch ref {name} grads", max(v for k, v in errs.items() if k not in ("loss", "logits")))
    bad = {k: f"{v:.2e}" for k, v in errs.items() if v > TOL}
    assert not bad, f"{name}: relative errors above {TOL:g}: {bad}"
    return errs[worst]


def test_topk_relu2():
    compare_model("topk 0.5 relu2", model.GPTConfig(**SMALL, sparsity=0.5, activation="relu2"))


def test_nm_relu2():
    compare_model("nm 2:4 relu2", model.GPTConfig(**SMALL, sparsity=0.0, nm=(2, 4), activation="relu2"))


@pytest.mark.parametrize("sparsity,nm,a_bits", [(0.5, None, 8), (0.0, None, 8), (0.0, (2, 4), 8), (0.5, None, 16)])
def test_bitnet_158_qsparse(sparsity, nm, a_bits):
    """1.58-bit Q-Sparse: ternary weights (absmean per tensor), INT8 inputs (absmax per token) after
    top-K or N:M, the straight-through estimator through both roundings."""
    cfg = model.GPTConfig(**SMALL, sparsity=sparsity, nm=nm, w_bits=1.58, a_bits=a_bits)
    compare_model(f"1.58-bit a{a_bits} {sparsity} {nm}", cfg)


def test_topk_swiglu():
    compare_model("topk 0.5 swiglu", model.GPTConfig(**SMALL, sparsity=0.5, activation="swiglu"))


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4))])
def test_llama_options_gqa_tied_pairs(sparsity, nm):
    cfg = model.GPTConfig(**{**SMALL, "n_head": 4}, n_kv_head=2, tie_embeddings=True, rope_layout="pairs",
                          sparsity=sparsity, nm=nm, activation="swiglu", rope_base=100000.0)
    compare_model(f"gqa/tied/pairs {sparsity} {nm}", cfg)


@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4)), (0.0, None)])
def test_masked_targets_against_torch_ignore_index(sparsity, nm):
    """Finetuning's loss: targets of -1 (prompt, padding) are left out of the mean, as torch's
    cross_entropy(ignore_index=-1) does; the gradients of every parameter agree."""
    cfg = model.GPTConfig(**SMALL, sparsity=sparsity, nm=nm, activation="swiglu")
    compare_model(f"masked targets {sparsity} {nm}", cfg, masked=True)


def test_dense_relu2():
    compare_model("dense relu2", model.GPTConfig(**SMALL, sparsity=0.0, activation="relu2"))


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_masked_gradient_no_ste(nm):
    """ste=False: dx = dxs * mask (Eq. 12), against torch's plain x * mask."""
    cfg = model.GPTConfig(**SMALL, sparsity=0.5, nm=nm, activation="relu2", ste=False)
    compare_model(f"no-ste {'nm 2:4' if nm else 'topk 0.5'} relu2", cfg)


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("ste", [True, False])
def test_exact_ties_keep_lower_index(nm, ste):
    """Exact ties in |x| (a quantized embedding table): both sides keep the lower channel index.
    ReLU2's own zeros cannot test this: a kept or dropped zero of up * relu(gate)^2 has gate <= 0,
    so relu2's backward sends it no gradient either way."""
    cfg = model.GPTConfig(**SMALL, sparsity=0.5, nm=nm, activation="relu2", ste=ste)
    compare_model(f"ties {'nm 2:4' if nm else 'topk 0.5'} {'ste' if ste else 'no-ste'}", cfg, ties=True)


# ----------------------------------------------------------------------------------------
# ten AdamW steps


def test_adamw_ten_steps():
    """minisparse's AdamW (no decay on norm gains) against torch.optim.AdamW with two groups.
    Torch decays first, p *= 1 - lr*wd, then p -= lr/c1 * m / (sqrt(v)/sqrt(c2) + eps): the same
    update as minisparse's, up to rounding (sqrt(v/c2) there)."""
    cfg = model.GPTConfig(**SMALL, sparsity=0.5, activation="relu2")
    lr, betas, eps, wd = 1e-2, (0.9, 0.95), 1e-8, 0.1
    params = model.init_params(cfg, seed=1, dtype=np.float64)
    P = to_torch(params)
    opt = AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    t_opt = torch.optim.AdamW(
        [{"params": [P[k] for k in P if not model.is_norm(k)], "weight_decay": wd},
         {"params": [P[k] for k in P if model.is_norm(k)], "weight_decay": 0.0}],
        lr=lr, betas=betas, eps=eps, foreach=False)

    idx, targets = batch(np.random.default_rng(7), cfg)         # one batch, fitted ten times
    losses, t_losses = [], []
    for _ in range(10):
        _, loss, caches = model.forward(params, cfg, idx, targets)
        opt.step(params, model.backward(params, cfg, caches))
        losses.append(float(loss))

        t_opt.zero_grad()
        _, t_loss = t_forward(P, cfg, torch.from_numpy(idx), torch.from_numpy(targets))
        t_loss.backward()
        t_opt.step()
        t_losses.append(t_loss.item())

    losses, t_losses = np.array(losses), np.array(t_losses)
    err = float(np.max(np.abs(losses - t_losses) / np.abs(t_losses)))
    perr = max(rel_err(params[k], P[k].detach().numpy()) for k in P)
    record("torch ref adamw 10 steps losses", err)
    record("torch ref adamw 10 steps params", perr)
    assert losses[-1] < 0.9 * losses[0], f"ten AdamW steps on one batch did not lower the loss: {losses}"
    assert err <= TOL_ADAMW_LOSS, f"AdamW losses differ: relative error {err:.2e}\n{losses}\n{t_losses}"
    assert perr <= TOL_ADAMW_PARAMS, f"AdamW parameters differ after ten steps: relative error {perr:.2e}"
