"""The compiled decode step (minisparse/fast/step.py) against the reference decode (decode.decode_forward):
the logits, the key/value cache and the measured sparsity over several tokens, and the calls it
leaves to the reference. Needs numba (the CI's numba phase runs this file)."""

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from minisparse import decode, model  # noqa: E402
from minisparse.errors import UsageError  # noqa: E402
from minisparse.evaluate import Plan  # noqa: E402
from minisparse.fast import rowsparse as fast_rowsparse, step as fast_step  # noqa: E402
from minisparse.fast.decode import DecodeWeights, decode_weights  # noqa: E402
from minisparse.fast.topk import topk_nonzero  # noqa: E402
from minisparse.linear import SparseSpec  # noqa: E402
from minisparse.sampling import generate  # noqa: E402

SMOLLM2_SHAPED = dict(n_head=6, n_kv_head=2, n_embd=96, n_hidden=256, activation="swiglu", tie_embeddings=True,
                      rope_layout="pairs", rope_base=100000.0)                # GQA, SiLU, tied head, GGUF layout
TINY = dict(n_head=4, n_embd=64, activation="relu2")                          # ReLU2-GLU, untied, "half"


def build(extra, seed=0):
    cfg = model.GPTConfig(**{**dict(vocab_size=97, block_size=24, n_layer=3, sparsity=0.0), **extra})
    params = model.init_params(cfg, seed=seed)                                  # float32, as decoded
    for name in params:                                                         # norm gains away from 1
        if model.is_norm(name):
            params[name] = params[name] + np.random.default_rng(seed).normal(0, 0.2, params[name].shape
                                                                             ).astype(np.float32)
    ref = {k: v.copy() for k, v in params.items()}
    return cfg, ref, params, DecodeWeights(params, cfg)


def decode_both(cfg, ref, params, fast, spec, tokens=8, prompt=5, B=1):
    """Prefill `prompt` tokens, then `tokens` one at a time, by the reference and by the step."""
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, prompt + tokens))
    kv_r, kv_f = decode.new_cache(ref, cfg, B), decode.new_cache(params, cfg, B)
    m_r, m_f = decode.SparsityMeter(), decode.SparsityMeter()
    got, want = [], []
    for t0, t1 in [(0, prompt)] + [(t, t + 1) for t in range(prompt, prompt + tokens)]:
        want.append(decode.decode_forward(ref, cfg, idx[:, t0:t1], kv_r, spec, m_r))
        got.append(fast.decode_forward(params, cfg, idx[:, t0:t1], kv_f, spec, m_f, fast))
    return np.concatenate(got, axis=1), np.concatenate(want, axis=1), (kv_f, kv_r), (m_f, m_r)


@pytest.mark.parametrize("extra", [SMOLLM2_SHAPED, TINY], ids=["smollm2-shaped", "tiny"])
@pytest.mark.parametrize("spec", [SparseSpec(0.0), SparseSpec(0.5), SparseSpec(0.75), SparseSpec(0.0, (2, 4)),
                                  SparseSpec(0.0, (16, 32))], ids=["dense", "topk50", "topk75", "nm2:4", "nm16:32"])
def test_step_equals_reference_decode(extra, spec):
    cfg, ref, params, fast = build(extra)
    assert fast.step is not None
    got, want, (kv_f, kv_r), (m_f, m_r) = decode_both(cfg, ref, params, fast, spec)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    for l in range(cfg.n_layer):
        np.testing.assert_allclose(kv_f.k[l], kv_r.k[l], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(kv_f.v[l], kv_r.v[l], rtol=2e-4, atol=2e-5)
    assert kv_f.length == kv_r.length
    for site, z in m_r.mean().items():
        assert m_f.mean()[site] == pytest.approx(z, abs=1e-12)
        assert m_f.tokens[site] == m_r.tokens[site]


@pytest.mark.parametrize("split", ["rows", "outputs"])
def test_step_splits_the_products_between_threads_either_way(split):
    cfg, ref, params, fast = build(SMOLLM2_SHAPED)
    fast.step.split(split, min_weights=0)                           # every product and the head shared
    shared = (fast.step.tiles > 0) if split == "outputs" else (fast.step.tiles == -numba.get_num_threads())
    assert shared.all()
    for spec in (SparseSpec(0.0), SparseSpec(0.5), SparseSpec(0.0, (2, 4))):
        got, want, _, _ = decode_both(cfg, ref, params, fast, spec, tokens=4)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    with pytest.raises(ValueError, match="not 'rows' or 'outputs'"):
        fast.step.split("columns")


def test_step_takes_a_plan_per_layer_and_site():
    cfg, ref, params, fast = build(SMOLLM2_SHAPED)
    specs = {(l, s): SparseSpec([0.0, 0.5, 0.8][l]) if s != "down" else SparseSpec(0.0, (1, 4))
             for l in range(cfg.n_layer) for s in model.SITES}
    got, want, _, (m_f, m_r) = decode_both(cfg, ref, params, fast, Plan(specs, "test plan"))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    assert m_f.mean() == pytest.approx(m_r.mean(), abs=1e-12)


def test_step_runs_for_one_token_and_leaves_the_rest_to_the_reference(monkeypatch):
    """The prefill, a batch of 2 and INT8 inputs go to decode.decode_forward; one token runs the step."""
    cfg, ref, params, fast = build(TINY)
    calls = []
    layer = fast_step._layer
    monkeypatch.setattr(fast_step, "_layer", lambda *a: calls.append(1) or layer(*a))
    got, want, _, _ = decode_both(cfg, ref, params, fast, SparseSpec(0.5), tokens=3, B=2)    # a batch
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    assert calls == []
    got, want, _, _ = decode_both(cfg, ref, params, fast, SparseSpec(0.5, a_bits=8), tokens=3)     # INT8
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    assert calls == []
    decode_both(cfg, ref, params, fast, SparseSpec(0.5), tokens=3, prompt=4)                       # the step
    assert len(calls) == 3 * cfg.n_layer


@pytest.mark.parametrize("extra", [dict(TINY, a_bits=8), dict(TINY, a_bits=8, w_bits=1.58)], ids=["int8", "b1.58"])
def test_step_declines_quantized_models(extra):
    cfg, ref, params, fast = build(extra)
    assert fast.step is None
    got, want, _, _ = decode_both(cfg, ref, params, fast, cfg.spec_at(0.5), tokens=3)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_without_numba_there_is_no_step(monkeypatch):
    monkeypatch.setattr("minisparse.fast.rowsparse.numba", None)
    cfg, ref, params, fast = build(TINY)
    assert fast.step is None
    got, want, _, _ = decode_both(cfg, ref, params, fast, SparseSpec(0.5), tokens=3)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_kernels_other_than_numba_have_no_step():
    cfg = model.GPTConfig(vocab_size=97, block_size=24, n_layer=1, **TINY)
    for method in ("gather", "chunked"):
        assert DecodeWeights(model.init_params(cfg), cfg, method).step is None


@pytest.mark.parametrize("k,block", [(5, 32), (16, 32), (31, 32), (1, 32), (8, 16), (2, 4), (3, 8)])
def test_step_selection_keeps_what_topk_nonzero_keeps(k, block):
    """Ties at the threshold (first by position), zeros never read, fewer nonzeros than k, N:M blocks."""
    rng = np.random.default_rng(k * 100 + block)
    for trial in range(50):
        x = rng.choice(np.float32([0, 0, 1, -1, 2, -2, 0.5, 3]), size=32)                # many ties and zeros
        if trial % 2:
            x = rng.normal(size=32).astype(np.float32) * (rng.random(32) < 0.6)
        idx, vals = np.empty(32, np.int64), np.empty(32, np.float32)
        n = fast_step._select(x, k, block, idx, vals)
        want = topk_nonzero(x, k, None if block == 32 else block)
        np.testing.assert_array_equal(idx[:n], want)
        np.testing.assert_array_equal(vals[:n], x[want])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_selection_at_model_widths(dtype):
    """The radix select (fast.step._kth_largest_bits) over every digit: wide and narrow ranges of
    |x|, subnormals, infinities, exact ties everywhere, ReLU2's zeros; whole rows and N:M blocks."""
    rng = np.random.default_rng(11)
    for trial in range(120):
        D = int(rng.choice([96, 576, 2048]))
        with np.errstate(over="ignore"):                                         # float32: 1e40 -> inf
            x = [rng.standard_normal(D),                                            # one exponent or two hold most
                 rng.standard_normal(D) * 10.0 ** rng.integers(-40, 40, D),       # float32 subnormals and huge
                 np.where(rng.random(D) < 0.05, np.inf, 1.0) * rng.standard_normal(D),
                 np.sign(rng.standard_normal(D)) * 1.5,                          # every |x| ties
                 np.maximum(rng.standard_normal(D), 0) ** 2,                     # zeros
                 1.0 + rng.integers(0, 4, D) * np.finfo(dtype).eps][trial % 6].astype(dtype)  # last-bit ties
        block = int(rng.choice([8, 32, D]))
        k = int(rng.integers(1, block))
        idx, vals = np.empty(D, np.int64), np.empty(D, dtype)
        n = fast_step._select(x, k, block, idx, vals)
        want = topk_nonzero(x, k, None if block == D else block)
        np.testing.assert_array_equal(idx[:n], want)
        np.testing.assert_array_equal(vals[:n], x[want])


def test_generate_with_the_step_equals_the_reference():
    """generate() through DecodeWeights (the step) gives the reference's greedy tokens."""
    cfg, ref, params, fast = build(SMOLLM2_SHAPED, seed=4)
    prompt = np.array([[3, 1, 4, 1, 5]])
    for spec in (SparseSpec(0.0), SparseSpec(0.5)):
        want = generate(ref, cfg, prompt, 10, 0.0, spec=spec)
        got = generate(params, cfg, prompt, 10, 0.0, spec=spec, fast=fast)
        np.testing.assert_array_equal(got, want)


def test_decode_weights_serve_dense_only_through_the_step():
    """decode_weights (what generate.py and evaluate.py decode with): a sparse spec gets them;
    a dense one only where the compiled step decodes it, one token a call on the CPU; none for calls
    of more tokens than the row-sparse products take; else None, and the plain product runs with
    BLAS on its threads. DecodeWeights.serves says the same."""
    cfg = model.GPTConfig(vocab_size=97, block_size=24, n_layer=1, **TINY)
    dense, sparse = SparseSpec(0.0), SparseSpec(0.5)
    fast = decode_weights(model.init_params(cfg), cfg, dense)
    assert fast is not None and fast.step is not None and fast.serves(dense) and fast.serves(sparse)
    assert decode_weights(model.init_params(cfg), cfg, dense, rows=2) is None        # a batch: no step
    assert decode_weights(model.init_params(cfg), cfg, dense, kernel="gather") is None
    assert decode_weights(model.init_params(cfg), cfg, sparse, kernel="masked") is None
    assert decode_weights(model.init_params(cfg), cfg, sparse, rows=2) is not None
    plan = Plan({(0, site): dense for site in ("qkv", "o", "up_gate", "down")}, "dense plan")
    assert decode_weights(model.init_params(cfg), cfg, plan, rows=2) is not None      # a plan: always
    many = fast_rowsparse.auto_max_rows(np) + 1                 # every call masked: nothing reads them
    for s in (sparse, plan):
        assert decode_weights(model.init_params(cfg), cfg, s, rows=many - 1) is not None
        assert decode_weights(model.init_params(cfg), cfg, s, rows=many) is None
    q = model.GPTConfig(vocab_size=97, block_size=24, n_layer=1, a_bits=8, w_bits=1.58, **TINY)
    assert decode_weights(model.init_params(q), q, q.spec_at(0.0)) is None             # no step for 1.58 bits
    fast_q = decode_weights(model.init_params(q), q, q.spec_at(0.5))
    assert fast_q.step is None and not fast_q.serves(q.spec_at(0.0)) and fast_q.serves(q.spec_at(0.5))


def test_the_dense_fallback_keeps_the_step():
    """generate()'s on_prefill switching to dense: the refill and the tokens after it still go through
    the compiled step (DecodeWeights.serves), with the same greedy tokens as decoding dense from the
    start."""
    cfg, ref, params, fast = build(SMOLLM2_SHAPED, seed=5)
    prompt = np.array([[2, 7, 1, 8, 2, 8]])
    want = generate(ref, cfg, prompt, 8, 0.0, spec=SparseSpec(0.0))
    calls = []
    step_forward = fast.decode_forward
    fast.decode_forward = lambda *a, **kw: calls.append(a[2].shape) or step_forward(*a, **kw)   # (B, Tq) of each call
    got = generate(params, cfg, prompt, 8, 0.0, spec=SparseSpec(0.5), fast=fast,
                   on_prefill=lambda logits, ids: SparseSpec(0.0))
    np.testing.assert_array_equal(got, want)
    assert calls == [(1, 6), (1, 6)] + [(1, 1)] * 7          # prefill, the dense refill, then one token each


def test_step_on_a_full_cache_raises_the_reference_error():
    cfg, ref, params, fast = build(TINY)
    kv = decode.new_cache(params, cfg, 1)
    fast.decode_forward(params, cfg, np.zeros((1, cfg.block_size), dtype=np.int64), kv, None, None, fast)
    with pytest.raises(UsageError, match="longer than block_size"):
        fast.decode_forward(params, cfg, np.zeros((1, 1), dtype=np.int64), kv, None, None, fast)


def test_decoding_with_the_step_keeps_blas_on_one_thread():
    """BLAS's idle threads would spin beside the step's (DecodeWeights.quiet), also for a model whose
    products are all too small for the row-sparse kernel (self.wt empty)."""
    pytest.importorskip("threadpoolctl")
    cfg = model.GPTConfig(vocab_size=97, block_size=24, n_layer=1, **TINY)
    fast = DecodeWeights(model.init_params(cfg), cfg)
    assert fast.wt == {} and fast.step is not None
    with fast.quiet():
        assert blas_thread_counts() == {1}


def blas_thread_counts():
    """{threads} of the BLAS libraries that runtime.blas_threads controls."""
    from minisparse.fast import runtime
    return {i["num_threads"] for i in runtime._controller().info() if i["user_api"] == "blas"}


@pytest.mark.parametrize("timeout, short", [("4", True), ("10", True), ("11", False), ("28", False),
                                            (None, False), ("soon", False)])
def test_short_blas_idle_reads_openblas_thread_timeout(monkeypatch, timeout, short):
    from minisparse.fast import runtime
    if timeout is None:
        monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", timeout)
    assert runtime.short_blas_idle() is short


def test_prefill_takes_back_blas_threads_only_where_idle_threads_sleep_at_once(monkeypatch):
    """DecodeWeights.prefill inside quiet(): BLAS back on the threads it had when the weights were built,
    when the step decodes the tokens after it and OpenBLAS's idle threads sleep at once; one thread
    again after it; else nothing changes."""
    pytest.importorskip("threadpoolctl")
    cfg, ref, params, fast = build(TINY)
    assert fast.step is not None
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")
    before = blas_thread_counts()                              # BLAS's own count, outside quiet()
    assert fast.prefill_threads == max(before)
    with fast.quiet():
        assert blas_thread_counts() == {1}
        with fast.prefill():
            assert blas_thread_counts() == {max(before)}
        assert blas_thread_counts() == {1}
    from minisparse.fast import runtime
    with runtime.blas_threads(1):                              # the user held BLAS to one thread
        held = DecodeWeights(model.init_params(cfg, seed=2), cfg)
    assert held.prefill_threads == 1
    with held.quiet(), held.prefill():
        assert blas_thread_counts() == {1}
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "28")            # idle threads would spin: stay at one
    with fast.quiet(), fast.prefill():
        assert blas_thread_counts() == {1}
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")
    chunked = DecodeWeights(model.init_params(cfg, seed=1), cfg, "chunked")     # no step: BLAS decodes too
    assert chunked.step is None
    with chunked.quiet():
        before = blas_thread_counts()
        with chunked.prefill():
            assert blas_thread_counts() == before


def test_generate_prefills_on_blas_threads_and_decodes_on_one(monkeypatch):
    """The loop runs the prefill (and a refill) inside DecodeWeights.prefill, each token outside it."""
    pytest.importorskip("threadpoolctl")
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "4")
    cfg, ref, params, fast = build(TINY)
    seen = []
    step_forward = fast.decode_forward
    fast.decode_forward = lambda *a, **kw: seen.append((a[2].shape[1], blas_thread_counts())) or step_forward(*a, **kw)
    generate(params, cfg, np.array([[1, 2, 3, 4, 5]]), cfg.block_size, 0.0, fast=fast)
    many = {n for n, _ in seen if n > 1}
    assert 5 in many and cfg.block_size // 2 in many              # the prompt, then the refill at block_size
    for n, threads in seen:
        assert threads == ({fast.prefill_threads} if n > 1 else {1}), (n, threads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_product_reads_every_selected_row_once_for_any_count(dtype):
    """_rows_into walks 8 eighths of the rows k..k1 at a time, then the k1 - k mod 8 rows left; the
    split over threads gives each thread its own range. Every count of rows, 0 to 41, against
    vals @ Wt[idx], for one thread and for a split in 2 and 3 parts."""
    rng = np.random.default_rng(0)
    Wt = rng.standard_normal((50, 37)).astype(dtype)
    for n in range(42):
        idx = np.sort(rng.choice(50, n, replace=False)).astype(np.int64)
        vals = rng.standard_normal(n).astype(dtype)
        want = vals.astype(np.float64) @ Wt[idx].astype(np.float64)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
        acc = np.full(37, np.nan, dtype=dtype)                 # every entry must be written
        fast_step._rows_into(vals, idx, Wt, acc, 0, n)
        np.testing.assert_allclose(acc, want, **tol)
        if n >= 3:                                             # a range inside, as a thread gets it
            fast_step._rows_into(vals, idx, Wt, acc, 1, n - 1)
            np.testing.assert_allclose(acc, vals[1:n - 1].astype(np.float64) @ Wt[idx[1:n - 1]], **tol)
        for P in (2, 3):
            y = np.empty(37, dtype=dtype)
            fast_step._rows_matvec_split(vals, idx, Wt, y, P)
            np.testing.assert_allclose(y, want, **tol)
