"""Sparse decoding against dense: one projection at batch 1, then whole-model decode tokens/s.

    python benchmarks/decode_speed.py                   # CPU (NumPy; numba kernel if installed)
    python benchmarks/decode_speed.py --device gpu      # CuPy: cuBLAS against the RawKernel

Part 1, for D inputs and O = 3 D outputs (a fused q/k/v projection) at sparsity S:
  dense   x @ W^T with the (O, D) training layout: what `generate.py --sparsity 0` runs
  sparse  select the top-K of |x| (topk.topk_nonzero, as decode.py does; included in the time), then
          rowsparse.rows_matvec on the input-major Wt (D, O), reading only K rows
  kernel  the same product with the indices given (the part the kernel itself costs)
On the GPU, dense and kernel are GPU times from CUDA events (cupyx.profiler.benchmark);
sparse is wall time, since selecting the indices synchronises with the host.
speedup = dense / sparse, ideal = 1 / (1 - S), efficiency = speedup / ideal.
Part 2: a random-weight model with n_embd 2048, decoding one token at a time after a short
prompt, with --sparsity 0 (dense product) against 50% top-K with DecodeWeights.
Each time is the median of --repeats calls after a warm-up.
"""

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from minisparse import backend, model, rowsparse  # noqa: E402
from minisparse.decode import DecodeWeights, decode_forward, new_cache  # noqa: E402
from minisparse.linear import SparseSpec  # noqa: E402
from minisparse.topk import kept_count, topk_nonzero  # noqa: E402


def timer(xp):
    if xp is np:
        return time.perf_counter
    import cupy

    def t():
        cupy.cuda.Device().synchronize()
        return time.perf_counter()
    return t


def median_ms(f, clock, repeats, gpu_time=False):
    """Median wall time of f() in ms; with gpu_time, the median GPU time (CUDA events) instead."""
    if gpu_time:
        from cupyx.profiler import benchmark
        return 1e3 * float(np.median(benchmark(f, n_repeat=repeats, n_warmup=3).gpu_times))
    f()
    ts = []
    for _ in range(repeats):
        t0 = clock()
        f()
        ts.append(clock() - t0)
    return 1e3 * float(np.median(ts))


def projection_table(xp, method, Ds, Ss, repeats, clock):
    print(f"\n## one projection, batch 1, O = 3 D outputs, float32, method {method}")
    print(f"{'D':>5} {'S':>5} {'dense ms':>9} {'sparse ms':>10} {'kernel ms':>10} {'speedup':>8} "
          f"{'ideal':>6} {'efficiency':>10}")
    rows = []
    for D in Ds:
        O = 3 * D
        rng = np.random.default_rng(D)
        W = xp.asarray(rng.standard_normal((O, D), dtype=np.float32))
        Wt = rowsparse.input_major([W])
        x = xp.asarray(rng.standard_normal((1, D), dtype=np.float32))
        gpu = xp is not np          # GPU: dense and kernel by CUDA events, without Python's overhead
        t_dense = median_ms(lambda: x @ W.T, clock, repeats, gpu)
        for S in Ss:
            K = kept_count(D, S)

            def sparse():                       # as decode.py does for one token
                idx = topk_nonzero(x[0], K)
                return rowsparse.rows_matvec(x[0, idx], idx, Wt, method)
            idx = topk_nonzero(x[0], K)
            vals = x[0, idx]
            t_sparse = median_ms(sparse, clock, repeats)
            t_kernel = median_ms(lambda: rowsparse.rows_matvec(vals, idx, Wt, method), clock, repeats, gpu)
            ideal = 1.0 / (1.0 - S)
            spd = t_dense / t_sparse
            rows.append((D, S, t_dense, t_sparse, t_kernel, spd, ideal))
            print(f"{D:5d} {S:5.2f} {t_dense:9.3f} {t_sparse:10.3f} {t_kernel:10.3f} {spd:7.2f}x "
                  f"{ideal:5.2f}x {spd / ideal:9.0%}", flush=True)
    if xp is not np and 4096 in Ds:          # the CUDA kernel's one tuning knob, at the largest size
        D, O = 4096, 3 * 4096
        rng = np.random.default_rng(D)
        Wt = rowsparse.input_major([xp.asarray(rng.standard_normal((O, D), dtype=np.float32))])
        x = xp.asarray(rng.standard_normal((1, D), dtype=np.float32))
        print("\nCUDA kernel, D 4096, GPU ms by rows_per_block:")
        for S in (0.5, 0.75):
            idx = topk_nonzero(x[0], kept_count(D, S))
            vals = x[0, idx]
            ts = {r: median_ms(lambda: rowsparse.rows_matvec_cuda(vals, idx, Wt, r), clock, repeats, True)
                  for r in (8, 16, 32, 64, 128, 256)}
            print(f"  S {S}: " + ", ".join(f"{r}: {t:.4f}" for r, t in ts.items()))
    return rows


def model_decode(xp, method, n_embd, n_layer, n_new, repeats, clock):
    cfg = model.GPTConfig(vocab_size=96, block_size=n_new + 8, n_layer=n_layer, n_head=n_embd // 64,
                          n_embd=n_embd, sparsity=0.5)
    params = {k: xp.asarray(v) for k, v in model.init_params(cfg, seed=0).items()}
    fast = DecodeWeights(params, cfg, method)
    prompt = xp.asarray(np.arange(4)[None])
    tok = xp.asarray(np.array([[5]]))

    def decode(spec, fw, blas_1=False):
        # as sampling.generate does: the prefill too runs inside quiet_blas. (Run before it, with
        # BLAS's 2 threads, it leaves OpenBLAS's worker spinning for up to ~0.1 s, and the
        # numba kernel then shares a core with it: 1.15x over dense instead of 1.7x.)
        quiet = (fw is not None or blas_1) and xp is np
        with rowsparse.quiet_blas("numba") if quiet else contextlib.nullcontext():
            kv = new_cache(params, cfg, 1)
            decode_forward(params, cfg, prompt, kv, spec, fast=fw)   # prefill, not timed
            t0 = clock()
            for _ in range(n_new):
                decode_forward(params, cfg, tok, kv, spec, fast=fw)
            return clock() - t0
    print(f"\n## whole-model decode: {n_layer} layers, n_embd {n_embd}, n_hidden {cfg.n_hidden}, "
          f"random weights, batch 1, {n_new} tokens after a 4-token prompt (median of {repeats})")
    res = {}
    variants = [("dense (--sparsity 0)", SparseSpec(0.0), None, False),
                ("dense, BLAS at 1 thread", SparseSpec(0.0), None, True),
                ("sparse 0.5, masked product", None, None, False),
                (f"sparse 0.5, rowsparse {method}", None, fast, False)]
    if xp is not np:
        del variants[1]
    for name, spec, fw, blas_1 in variants:
        decode(spec, fw, blas_1)
        t = float(np.median([decode(spec, fw, blas_1) for _ in range(repeats)]))
        res[name] = n_new / t
        print(f"{name:>34}: {n_new / t:8.1f} tokens/s", flush=True)
    best_dense = max(v for k, v in res.items() if k.startswith("dense"))
    print(f"speedup of rowsparse over the faster dense: {res[variants[-1][0]] / best_dense:.2f}x")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--method", default="auto", choices=rowsparse.METHODS)
    p.add_argument("--D", default="512,1024,2048,4096")
    p.add_argument("--S", default="0,0.25,0.5,0.75,0.9")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--n_embd", type=int, default=2048)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_new", type=int, default=24)
    p.add_argument("--skip_model", action="store_true")
    args = p.parse_args(argv)
    backend.set_device(args.device)
    xp = backend.xp
    clock = timer(xp)
    method = rowsparse.best_method() if args.method == "auto" and xp is np else args.method
    print("machine:", describe(args.device))
    print("command: python benchmarks/decode_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    projection_table(xp, method, [int(d) for d in args.D.split(",")], [float(s) for s in args.S.split(",")],
                     args.repeats, clock)
    if not args.skip_model:
        model_decode(xp, method, args.n_embd, args.n_layer, args.n_new, max(3, args.repeats // 5), clock)


if __name__ == "__main__":
    main()
