"""Sparse decoding (minisparse/rowsparse.py, fast/rowsparse.py, fast/decode.py): every faster path equals the reference.

The reference is `vals @ Wt[idx]`; it equals the masked dense product xs @ W^T. The chunked
NumPy path, the numba kernel (where numba is installed) and the CuPy kernel (where a GPU is)
must agree with it to float32 rounding, and a decode with DecodeWeights must give the logits
of the ordinary decode path."""

import numpy as np
import pytest

from conftest import has_gpu, row_kinds
from minisparse import model, rowsparse
from minisparse.decode import SparsityMeter, decode_forward, new_cache
from minisparse.fast import rowsparse as frs
from minisparse.fast.decode import DecodeWeights
from minisparse.fast.topk import topk_nonzero
from minisparse.linear import SparseSpec
from minisparse.nm import nm_mask
from minisparse.sampling import generate

CPU_METHODS = ["gather", "chunked"] + (["numba"] if frs.numba is not None else [])



def case(D, O, K, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    W = [rng.standard_normal((o, D)).astype(dtype) for o in O]
    x = rng.standard_normal(D).astype(dtype)
    idx = np.sort(rng.choice(D, size=K, replace=False)).astype(np.int64)
    return W, x, idx


def test_input_major_layout():
    W, _, _ = case(5, (3, 4), 2)
    Wt = rowsparse.input_major(W)
    assert Wt.shape == (5, 7) and Wt.flags.c_contiguous
    np.testing.assert_array_equal(Wt, np.concatenate([W[0].T, W[1].T], axis=1))


def test_gather_reference_equals_masked_dense_product():
    W, x, idx = case(64, (48, 16), 20, dtype=np.float64)
    xs = np.zeros_like(x)
    xs[idx] = x[idx]
    dense = np.concatenate([xs @ w.T for w in W])
    np.testing.assert_allclose(rowsparse.rows_matvec(x[idx], idx, rowsparse.input_major(W)), dense,
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("D,O,K", [(64, (96,), 0), (64, (96,), 1), (64, (96,), 3), (64, (96,), 64),
                                   (256, (333, 77), 129), (512, (1536,), 256), (100, (4097,), 37)])
def test_cpu_methods_equal_reference(method, D, O, K):
    W, x, idx = case(D, O, K, seed=K)
    Wt = rowsparse.input_major(W)
    ref = rowsparse.rows_matvec(x[idx], idx, Wt)
    got = frs.rows_matvec(x[idx], idx, Wt, method)
    assert got.shape == (sum(O),) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.sqrt(K)))


def test_chunked_with_chunk_not_dividing_k():
    W, x, idx = case(128, (200,), 70, seed=5)
    Wt = rowsparse.input_major(W)
    np.testing.assert_allclose(frs.rows_matvec_chunked(x[idx], idx, Wt, chunk=16),
                               rowsparse.rows_matvec(x[idx], idx, Wt), rtol=1e-5, atol=1e-4)


def test_unknown_method():
    W, x, idx = case(8, (4,), 2)
    with pytest.raises(ValueError, match="not one of"):
        frs.rows_matvec(x[idx], idx, rowsparse.input_major(W), "fast")


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("sparsity,nm,activation", [(0.5, None, "relu2"), (0.75, None, "swiglu"),
                                                    (0.0, (2, 4), "relu2")])
def test_decode_with_rowsparse_equals_masked_decode(method, sparsity, nm, activation):
    cfg = model.GPTConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=32,
                          activation=activation, sparsity=sparsity, nm=nm)
    params = model.init_params(cfg, seed=4)                                   # float32
    fast = DecodeWeights(params, cfg, method)
    idx = np.random.default_rng(2).integers(0, 13, (1, 12))
    kv_a, kv_b = new_cache(params, cfg, 1), new_cache(params, cfg, 1)
    meter_a, meter_b = SparsityMeter(), SparsityMeter()
    a = [decode_forward(params, cfg, idx[:, :5], kv_a, meter=meter_a)]          # prefill: masked path
    b = [decode_forward(params, cfg, idx[:, :5], kv_b, meter=meter_b, fast=fast)]
    for t in range(5, 12):
        a.append(decode_forward(params, cfg, idx[:, t:t + 1], kv_a, meter=meter_a))
        b.append(decode_forward(params, cfg, idx[:, t:t + 1], kv_b, meter=meter_b, fast=fast))
    np.testing.assert_allclose(np.concatenate(b, 1), np.concatenate(a, 1), rtol=1e-4, atol=1e-5)
    for site in meter_a.mean():                   # the same zeros were counted, ReLU2's included
        assert meter_b.mean()[site] == pytest.approx(meter_a.mean()[site], abs=1e-12)


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4))])
@pytest.mark.parametrize("B,Tq", [(1, 3), (2, 1), (2, 2)])
def test_multi_token_rowsparse_decode_equals_masked_decode(method, sparsity, nm, B, Tq):
    """Calls of 2..max_rows tokens at once (a short prefill, a batch of samples) take the row-sparse
    branch that loops over tokens: the same logits and counted zeros as the masked product."""
    cfg = model.GPTConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=32, sparsity=sparsity, nm=nm)
    params = model.init_params(cfg, seed=5)
    fast = DecodeWeights(params, cfg, method, max_rows=4)
    seen = []
    project = fast.project
    fast.project = lambda l, site, x, spec: seen.append(x.shape[:2]) or project(l, site, x, spec)
    idx = np.random.default_rng(3).integers(0, 13, (B, 3 * Tq))
    kv_a, kv_b = new_cache(params, cfg, B), new_cache(params, cfg, B)
    meter_a, meter_b = SparsityMeter(), SparsityMeter()
    a, b = [], []
    for t in range(0, idx.shape[1], Tq):
        a.append(decode_forward(params, cfg, idx[:, t:t + Tq], kv_a, meter=meter_a))
        b.append(decode_forward(params, cfg, idx[:, t:t + Tq], kv_b, meter=meter_b, fast=fast))
    assert seen and set(seen) == {(B, Tq)}                                   # the multi-token branch ran
    np.testing.assert_allclose(np.concatenate(b, 1), np.concatenate(a, 1), rtol=1e-4, atol=1e-5)
    for site in meter_a.mean():
        assert meter_b.mean()[site] == pytest.approx(meter_a.mean()[site], abs=1e-12)


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("keep,block", [(2, 4), (8, 32), (1, 8), (0, 4)])
def test_nm_rows_matvec_equals_masked_product(method, keep, block):
    """Block Q-Sparse's one-token product: the N:M-masked input times the weights, reading one row
    per nonzero kept input (zeros already in x are not read)."""
    W, x, _ = case(256, (96, 64), 0, seed=keep + block)
    x[::7] = 0.0
    xs = x * nm_mask(x, keep, block)
    y, read = frs.nm_rows_matvec(x, keep, block, rowsparse.input_major(W), method)
    assert read == np.count_nonzero(xs) <= 256 * keep // block
    np.testing.assert_allclose(y, np.concatenate([xs @ w.T for w in W]), rtol=1e-5, atol=1e-4)


def test_rowsparse_reads_fewer_rows_than_k_when_inputs_are_zero(monkeypatch):
    """ReLU2's own zeros are skipped: the down projection reads only the nonzero inputs."""
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=32, sparsity=0.25)
    params = model.init_params(cfg, seed=1)
    seen = []
    orig = rowsparse.rows_matvec

    def spy(vals, idx, Wt):
        seen.append((Wt.shape, idx.shape[0], int(np.count_nonzero(vals))))
        return orig(vals, idx, Wt)
    monkeypatch.setattr("minisparse.rowsparse.rows_matvec", spy)     # the reference topk_rows_matvec's call
    decode_forward(params, cfg, np.array([[3]]), new_cache(params, cfg, 1), fast=DecodeWeights(params, cfg, "gather"))
    K = 32 - round(0.25 * 32)
    by_rows = {shape[0]: (n, nz) for shape, n, nz in seen}
    assert by_rows[32][0] == K                                                  # qkv, o, up_gate: K rows
    assert all(n == nz for n, nz in by_rows.values())                         # every row read has a nonzero input
    assert by_rows[cfg.n_hidden][0] < cfg.n_hidden - round(0.25 * cfg.n_hidden)  # down: fewer than K


@pytest.mark.parametrize("method", ["numba", "gather", "chunked", "no-such-kernel"])
def test_decode_weights_warm_the_numba_kernel_before_the_first_token(monkeypatch, method):
    """numba's first call loads the kernel and starts its threads (~0.4 s): DecodeWeights makes it,
    once, so that generate.py's tokens/s times decoding only. Other methods need no warm-up."""
    if method == "numba" and frs.numba is None:
        pytest.skip("numba is not installed")
    calls = []
    monkeypatch.setattr("minisparse.fast.rowsparse.topk_rows_matvec", lambda x, k, wt, m: calls.append((x.shape, m)))
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, sparsity=0.5)
    DecodeWeights(model.init_params(cfg, seed=1), cfg, method)
    assert calls == ([((16,), "numba")] if method == "numba" else [])


@pytest.mark.parametrize("with_numba", [True, False])
def test_auto_takes_the_row_sparse_kernel_only_where_it_pays(monkeypatch, with_numba):
    """'auto' on the CPU: numba's kernel for projections of >= min_weights weights, the masked
    product for the rest, and for all of them without numba; the decode gives the same logits."""
    if with_numba and frs.numba is None:
        pytest.skip("numba is not installed")
    if not with_numba:
        monkeypatch.setattr("minisparse.fast.rowsparse.numba", None)
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=32, sparsity=0.5)
    params = model.init_params(cfg, seed=1)
    fast = DecodeWeights(params, cfg, min_weights=32 * 96)                   # qkv (32 x 96) and up
    sizes = {(l, site): params[f"h.{l}.{names[0]}"].shape[1] * sum(params[f"h.{l}.{n}"].shape[0] for n in names)
             for l in range(2) for site, names in model.SITE_WEIGHTS.items()}
    if frs.numba is None:
        assert fast.wt == {}                                                   # every one masked
    else:
        assert sorted(fast.wt) == sorted(k for k, n in sizes.items() if n >= 32 * 96) and fast.method == "numba"
        assert ("qkv" in {s for _, s in fast.wt}) and ("o" not in {s for _, s in fast.wt})   # o: 32 x 32
    idx = np.array([[3, 1, 4, 1, 5]])
    a = decode_forward(params, cfg, idx, new_cache(params, cfg, 1))
    kv = new_cache(params, cfg, 1)
    b = np.concatenate([decode_forward(params, cfg, idx[:, t:t + 1], kv, fast=fast) for t in range(5)], 1)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_dense_spec_never_takes_the_rowsparse_path():
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16, sparsity=0.5)
    params = model.init_params(cfg, seed=1)
    fast = DecodeWeights(params, cfg, method="no-such-kernel")                 # would raise if used
    got = generate(params, cfg, np.array([[1, 2]]), 5, temperature=0, spec=SparseSpec(0.0), fast=fast)
    want = generate(params, cfg, np.array([[1, 2]]), 5, temperature=0, spec=SparseSpec(0.0))
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="not one of"):
        generate(params, cfg, np.array([[1, 2]]), 5, temperature=0, fast=fast)


@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("D,O,K", [(64, 96, 0), (64, 96, 3), (512, 1536, 256), (100, 4097, 37), (2048, 6144, 1024)])
def test_cuda_kernel_equals_reference(D, O, K):
    import cupy
    W, x, idx = case(D, (O,), K, seed=K)
    Wt = rowsparse.input_major(W)
    ref = rowsparse.rows_matvec(x[idx], idx, Wt)
    got = frs.rows_matvec(cupy.asarray(x[idx]), cupy.asarray(idx), cupy.asarray(Wt))
    np.testing.assert_allclose(cupy.asnumpy(got), ref, rtol=1e-5, atol=1e-5 * max(1.0, np.sqrt(K)))


def one_row_each(D, seed):
    """conftest.row_kinds as single float32 rows of width D: {kind: x (D,)}."""
    return {kind: x[0].astype(np.float32) for kind, x in row_kinds(np.random.default_rng(seed), N=1, D=D)}


@pytest.mark.parametrize("D", [1, 2, 7, 64, 100, 1500, 4096])
def test_radix_select_keeps_exactly_topk_nonzero(D):
    """The GPU selection's algorithm, in NumPy (runs everywhere): the same positions as topk_nonzero,
    ties at the threshold and zeros included, and subnormal and negative-zero rows too."""
    rows = one_row_each(D, seed=D)
    rows["subnormal"] = (rows["distinct"] * 1e-40).astype(np.float32)
    rows["negative zero"] = -np.zeros(D, dtype=np.float32)
    rows["infinities"] = rows["distinct"].copy()
    rows["infinities"][::3] = np.inf * np.sign(rows["distinct"][::3])     # more infs than k: ties at inf
    for name, x in rows.items():
        for k in sorted({0, 1, D // 3, D // 2, D - 1, D, D + 5}):
            np.testing.assert_array_equal(frs.radix_select(x, k), topk_nonzero(x, k), err_msg=f"{name} k={k}")


@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("D", [1, 64, 100, 1024, 1500, 4096, 5472, frs.CUDA_MAX_D])
def test_cuda_topk_select_keeps_exactly_topk_nonzero(D):
    """With Wt = I, y is the sparsified row itself: each output is one product by 1, so y must equal
    x * topk_mask(x, k) exactly, ties and zeros included, and the count must be topk_nonzero's."""
    import cupy
    from minisparse.topk import topk_mask
    eye = cupy.eye(D, dtype=cupy.float32)
    for name, x in one_row_each(D, seed=D).items():
        for k in sorted({0, 1, D // 3, D // 2, D - 1, D, D + 5}):
            y, n = frs.topk_rows_matvec_cuda(cupy.asarray(x), k, eye)
            want = x * topk_mask(x[None], k)[0]
            np.testing.assert_array_equal(cupy.asnumpy(y), want, err_msg=f"{name} k={k}")
            assert int(n) == topk_nonzero(x, k).shape[0], (name, k)


@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("D,O,k", [(64, 96, 16), (100, 4097, 37), (2048, 6144, 1024), (5472, 2048, 2736),
                                   (frs.CUDA_MAX_D + 8, 64, 100)])
def test_cuda_topk_rows_matvec_equals_reference(D, O, k):
    """The device path (selection and product, or past CUDA_MAX_D topk_nonzero and the kernel) equals
    topk_nonzero + the gather reference, for the kernel's unrolls and block heights too."""
    import cupy
    W, x, _ = case(D, (O,), 0, seed=k)
    Wt = rowsparse.input_major(W)
    idx = topk_nonzero(x, k)
    ref = rowsparse.rows_matvec(x[idx], idx, Wt)
    gx, gWt = cupy.asarray(x), cupy.asarray(Wt)
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(k))
    y, n = frs.topk_rows_matvec(gx, k, gWt)
    np.testing.assert_allclose(cupy.asnumpy(y), ref, **tol)
    assert int(n) == idx.shape[0]
    if D <= frs.CUDA_MAX_D:
        for rows_per_block, unroll in [(16, 4), (64, 8), (7, 8)]:
            y, _ = frs.topk_rows_matvec_cuda(gx, k, gWt, rows_per_block, unroll)
            np.testing.assert_allclose(cupy.asnumpy(y), ref, **tol)


@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a CUDA device")
@pytest.mark.parametrize("activation,nm", [("relu2", None), ("swiglu", None), ("relu2", (2, 4))])
def test_cuda_decode_with_rowsparse_weights_equals_masked_product(activation, nm):
    """A float32 decode on the GPU with DecodeWeights (top-K: selection and product on the device;
    N:M: fast.topk.topk_nonzero per block, then the product kernel) gives the logits and the counted zeros of the masked
    dense product."""
    import cupy
    cfg = model.GPTConfig(vocab_size=29, block_size=12, n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                          sparsity=0.5, activation=activation, nm=nm)
    params = {k: cupy.asarray(v) for k, v in model.init_params(cfg, seed=3).items()}
    fast = DecodeWeights(params, cfg)
    idx = cupy.asarray(np.random.default_rng(0).integers(0, 29, (1, 8)))
    kv_a, kv_b = new_cache(params, cfg, 1), new_cache(params, cfg, 1)
    meter_a, meter_b = SparsityMeter(), SparsityMeter()
    for t in range(8):
        a = decode_forward(params, cfg, idx[:, t:t + 1], kv_a, meter=meter_a)
        b = decode_forward(params, cfg, idx[:, t:t + 1], kv_b, meter=meter_b, fast=fast)
        np.testing.assert_allclose(cupy.asnumpy(b), cupy.asnumpy(a), rtol=1e-4, atol=1e-5)
    for site in meter_a.mean():
        assert meter_b.mean()[site] == pytest.approx(meter_a.mean()[site], abs=1e-12)


# ----------------------------------------------------------------------------- batches: the union of the rows

def test_union_reference_reads_each_needed_row_once_and_equals_the_masked_product():
    """B tokens: the rows read are exactly those some token kept, and y equals xs @ Wt."""
    rng = np.random.default_rng(4)
    W, _, _ = case(64, (40, 24), 0, dtype=np.float64)
    Wt = rowsparse.input_major(W)
    x = rng.standard_normal((5, 64))
    xs = x * (rng.random((5, 64)) < 0.2)                     # ~1 - 0.8^5 = 67% of the rows needed
    xs[:, 10] = 0.0                                          # a row no token kept is not read
    y, read = rowsparse.union_rows_matmul(xs, Wt)
    assert read == int(np.count_nonzero(np.abs(xs).sum(axis=0))) < 64
    np.testing.assert_allclose(y, np.concatenate([xs @ w.T for w in W], axis=1), rtol=1e-12, atol=1e-12)
    y2, read2 = rowsparse.sparse_rows_matmul(x, SparseSpec(0.75), Wt)
    xs2 = x * (np.abs(x) >= np.sort(np.abs(x), axis=1)[:, -16:-15])   # the top 16 of each row (no ties)
    assert read2 == int(np.count_nonzero(np.abs(xs2).sum(axis=0)))
    np.testing.assert_allclose(y2, xs2 @ Wt, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("B,D,O", [(2, 64, 48), (3, 256, 300), (7, 128, 4097), (16, 96, 20)])
def test_union_methods_equal_reference(method, B, D, O):
    """Every kind of row (ties, ReLU2's zeros, all zero, identical, constant), batches whose union is
    not a multiple of the kernel's 4 rows, and output widths that split into uneven tiles."""
    rng = np.random.default_rng(B + D + O)
    Wt = rng.standard_normal((D, O)).astype(np.float32)
    for kind, rows in row_kinds(rng, N=B, D=D):
        xs = (rows * (rng.random((B, D)) < 0.3)).astype(np.float32)
        want, want_read = rowsparse.union_rows_matmul(xs, Wt)
        got, read = frs.union_rows_matmul(xs, Wt, method)
        assert read == want_read, kind
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=kind)


def test_union_unknown_method():
    with pytest.raises(ValueError, match="not one of"):
        frs.union_rows_matmul(np.ones((2, 4), np.float32), np.ones((4, 3), np.float32), "no-such-kernel")


@pytest.mark.parametrize("method", CPU_METHODS)
@pytest.mark.parametrize("sparsity,nm", [(0.5, None), (0.0, (2, 4))])
def test_batch_of_samples_decodes_the_union_and_equals_masked_decode(monkeypatch, method, sparsity, nm):
    """generate() with 8 samples and max_rows 8: every decode step is one union product per
    projection (never a per-token loop), with the greedy tokens of the masked product."""
    cfg = model.GPTConfig(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=32, sparsity=sparsity, nm=nm)
    params = model.init_params(cfg, seed=6)
    prompt = np.random.default_rng(2).integers(0, 13, (8, 1))
    want = generate(params, cfg, prompt, 6, temperature=0)
    fast = DecodeWeights(params, cfg, method, max_rows=8)
    calls = []
    real = frs.union_rows_matmul if method != "gather" else rowsparse.union_rows_matmul
    target = "minisparse.fast.rowsparse.union_rows_matmul" if method != "gather" else \
        "minisparse.rowsparse.union_rows_matmul"
    monkeypatch.setattr(target, lambda xs, *a: calls.append(xs.shape) or real(xs, *a))
    monkeypatch.setattr(fast, "select", None)               # the one-token path would fail
    got = generate(params, cfg, prompt, 6, temperature=0, fast=fast)
    np.testing.assert_array_equal(got, want)
    assert calls and set(calls) == {(8, 32), (8, cfg.n_hidden)}


def test_decode_weights_keep_one_copy_of_the_weights():
    """The params' projection weights become views of the input-major Wt: no second copy, same values."""
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=32, sparsity=0.5)
    params = model.init_params(cfg, seed=1)
    before = {k: v.copy() for k, v in params.items()}
    fast = DecodeWeights(params, cfg, "gather")
    for (l, site), (Wt, sizes) in fast.wt.items():
        for n in model.SITE_WEIGHTS[site]:
            W = params[f"h.{l}.{n}"]
            assert np.shares_memory(W, Wt) and W.base is not None
            np.testing.assert_array_equal(W, before[f"h.{l}.{n}"])
    assert len(fast.wt) == 2 * len(model.SITES)
    idx = np.array([[3, 1, 4, 1, 5, 9]])
    np.testing.assert_allclose(decode_forward(params, cfg, idx, new_cache(params, cfg, 1)),
                               decode_forward(before, cfg, idx, new_cache(before, cfg, 1)), rtol=1e-5, atol=1e-6)


def test_auto_policy_takes_the_masked_product_past_the_crossover():
    big = 2 * frs.AUTO_MIN_WEIGHTS
    m = frs.auto_max_rows(np)
    assert frs.auto_method(np, big, rows=m) == ("numba" if frs.numba is not None else None)
    assert frs.auto_method(np, big, rows=m + 1) is None
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16, sparsity=0.5)
    assert DecodeWeights(model.init_params(cfg, seed=1), cfg, "gather").max_rows == m
