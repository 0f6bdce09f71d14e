"""Sparse decoding against dense: one projection at batch 1, then whole-model decode tokens/s.

    python benchmarks/decode_speed.py                   # CPU (NumPy; numba kernel if installed)
    python benchmarks/decode_speed.py --device gpu      # CuPy: cuBLAS against fast/rowsparse.cu's kernels

Part 1, for D inputs and O = 3 D outputs (a fused q/k/v projection) at sparsity S:
  dense   x @ W^T with the (O, D) training layout: what `generate.py --sparsity 0` runs
  sparse  select the top-K of |x| and multiply only those rows of the input-major Wt (D, O), as
          decode.py does (fast.rowsparse.topk_rows_matvec; the selection is included in the time)
  kernel  the product alone, with the indices given
  nm      Block Q-Sparse at the same S: keep = M (1 - S) of every block of M = --nm_block inputs
          (fast.rowsparse.nm_rows_matvec, selection included); CPU only (on the GPU its selection syncs)
speedup = dense / sparse, ideal = 1 / (1 - S), efficiency = speedup / ideal.
Each call reads a different copy of the weights, enough copies to pass twice the last-level
cache (--cache_mb), so that the weights come from main memory as a model's many matrices would,
not from a cache that one repeated matrix fits in.
CPU times are wall times, the median of --repeats calls; dense, sparse and kernel take turns in
blocks (interleaved_ms). GPU times are device times: 20 calls queued behind a kernel that holds
the GPU, so that they run back to back, timed by CUDA events (median of --repeats), free of
Python's launch overhead; part 2's whole-model decode shows what Python's launches cost.
Part 2: a random-weight model with n_embd 2048, decoding one token at a time after a short
prompt, with --sparsity 0 (dense product) against 50% top-K, and 50% N:M, with DecodeWeights.
"""

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe, last_level_cache_mb  # noqa: E402
from minisparse import backend, model, rowsparse  # noqa: E402
from minisparse.decode import decode_forward, new_cache  # noqa: E402
from minisparse.fast import FAST  # noqa: E402
from minisparse.fast import rowsparse as fast_rowsparse  # noqa: E402
from minisparse.fast.decode import DecodeWeights  # noqa: E402
from minisparse.linear import SparseSpec  # noqa: E402
from minisparse.fast.topk import topk_nonzero  # noqa: E402
from minisparse.topk import kept_count  # noqa: E402


def timer(xp):
    if xp is np:
        return time.perf_counter
    import cupy

    def t():
        cupy.cuda.Device().synchronize()
        return time.perf_counter()
    return t


def interleaved_ms(fs, clock, repeats, rounds=4, settle_s=0.2):
    """The median wall time in ms of each f in fs over calls f(i), i = 0 .. repeats-1, made in
    `rounds` rounds of a block of calls to each f in turn, so that the slow spells of a shared
    machine fall on all of them alike. Before each block, a pause of settle_s: after a call,
    OpenBLAS's and numba's idle threads spin for a while, and a call of the other library
    made then shares the cores with them (calling the two alternately slows both); and an
    untimed call, which wakes the threads that the pause put to sleep."""
    for f in fs:
        f(0)
    ts = [[] for _ in fs]
    block = -(-repeats // rounds)
    for r in range(rounds):
        for f, t in zip(fs, ts):
            time.sleep(settle_s)
            f(r * block)                                 # untimed: wakes the threads up
            for i in range(r * block, min(repeats, (r + 1) * block)):
                t0 = clock()
                f(i)
                t.append(clock() - t0)
    return [1e3 * float(np.median(t)) for t in ts]


_SPIN = r"""extern "C" __global__ void spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}"""


def gpu_ms(f, repeats, calls=20, hold_ms=5.0):
    """Device time of one f(i) in ms, free of Python's launch overhead: a spin kernel holds the GPU
    for hold_ms while Python queues f(0) .. f(calls-1) behind it, so that they run back to back
    (nvbench's "blocking kernel"); CUDA events around the calls time them. The median of `repeats`."""
    import cupy as cp
    spin = cp.RawKernel(_SPIN, "spin")
    start, end = cp.cuda.Event(), cp.cuda.Event()
    f(0)
    cp.cuda.Device().synchronize()
    ts = []
    for _ in range(repeats):
        spin((1,), (1,), (np.uint64(hold_ms * 1e6),))
        t0 = time.perf_counter()
        start.record()
        for i in range(calls):
            f(i)
        end.record()
        queued = time.perf_counter() - t0
        end.synchronize()
        if queued * 1e3 > hold_ms:             # Python fell behind the GPU: the gaps would count
            raise RuntimeError(f"queueing {calls} calls took {queued * 1e3:.1f} ms, over the {hold_ms} ms hold")
        ts.append(cp.cuda.get_elapsed_time(start, end) / calls)
    return float(np.median(ts))


def nm_keep(S, block):
    """keep such that keep:block is sparsity S, or None where block (1 - S) is not a whole number
    in 1 .. block - 1 (then N:M has no such sparsity)."""
    keep = block * (1.0 - S)
    return int(round(keep)) if abs(keep - round(keep)) < 1e-9 and 1 <= round(keep) < block else None


def projection_table(xp, method, Ds, Ss, repeats, clock, cache_mb, nm_block=32):
    gpu = xp is not np
    nm_block = 0 if gpu else nm_block         # the N:M selection's nonzero() syncs with the GPU
    print(f"\n## one projection, batch 1, O = 3 D outputs, float32, method {method}, "
          f"weights cycled through {2 * cache_mb:.0f} MB (twice the {cache_mb:.0f} MB cache)"
          + (f"; nm = N:M with blocks of {nm_block}" if nm_block else ""))
    print(f"{'D':>5} {'S':>5} {'dense ms':>9} {'sparse ms':>10} {'kernel ms':>10} {'speedup':>8} "
          f"{'ideal':>6} {'efficiency':>10}" + (f" {'nm keep':>8} {'nm ms':>7} {'nm speedup':>10}" if nm_block else ""))
    rows = []
    for D in Ds:
        O = 3 * D
        rng = np.random.default_rng(D)
        W = xp.asarray(rng.standard_normal((O, D), dtype=np.float32))
        copies = max(2, int(np.ceil(2 * cache_mb * 2**20 / W.nbytes)))
        Ws = [W] + [W.copy() for _ in range(copies - 1)]             # distinct memory, same values
        Wts = [rowsparse.input_major([w]) for w in Ws]
        x = xp.asarray(rng.standard_normal((1, D), dtype=np.float32))
        for S in Ss:
            K = kept_count(D, S)
            idx = topk_nonzero(x[0], K)
            vals = x[0, idx]
            keep = nm_keep(S, nm_block) if nm_block and D % nm_block == 0 else None
            fs = [lambda i: x @ Ws[i % copies].T,
                  # sparse: as decode.py does for one token, selection included
                  lambda i: fast_rowsparse.topk_rows_matvec(x[0], K, Wts[i % copies], method),
                  # the product alone, on other copies than the sparse call just read
                  lambda i: fast_rowsparse.rows_matvec(vals, idx, Wts[(i + copies // 2) % copies], method)]
            if keep is not None:              # Block Q-Sparse: the same count of rows, chosen per block
                fs.append(lambda i: fast_rowsparse.nm_rows_matvec(x[0], keep, nm_block, Wts[i % copies], method))
            if gpu:
                ts = [gpu_ms(f, repeats) for f in fs]
            else:
                ts = interleaved_ms(fs, clock, repeats)
            t_dense, t_sparse, t_kernel = ts[:3]
            t_nm = ts[3] if keep is not None else None
            ideal = 1.0 / (1.0 - S)
            spd = t_dense / t_sparse
            rows.append((D, S, t_dense, t_sparse, t_kernel, spd, ideal, t_nm))
            nm_cells = ""
            if nm_block:
                nm_cells = (f" {keep:>5d}:{nm_block:<2d} {t_nm:7.3f} {t_dense / t_nm:9.2f}x" if keep is not None
                            else f" {'-':>8} {'-':>7} {'-':>10}")
            print(f"{D:5d} {S:5.2f} {t_dense:9.3f} {t_sparse:10.3f} {t_kernel:10.3f} {spd:7.2f}x "
                  f"{ideal:5.2f}x {spd / ideal:9.0%}" + nm_cells, flush=True)
        if gpu and D == max(Ds):              # the CUDA kernel's knobs, and the bandwidth it reaches
            print(f"\nCUDA rows_matvec at D {D}, device ms (GB/s of weights read) by rows_per_block x unroll;"
                  f" cuBLAS dense {t_dense:.4f} ms ({W.nbytes / t_dense / 1e6:.0f} GB/s):")
            for S in (0.0, 0.5, 0.75):
                K = kept_count(D, S)
                idx = topk_nonzero(x[0], K)
                vals = x[0, idx]
                cells = []
                for r in (16, 32, 64, 128):
                    for u in (4, 8):
                        t = gpu_ms(lambda i: fast_rowsparse.rows_matvec_cuda(vals, idx, Wts[i % copies], r, u), repeats)
                        cells.append(f"{r}x{u}: {t:.4f} ({K * O * 4 / t / 1e6:.0f})")
                print(f"  S {S}: " + ", ".join(cells), flush=True)
            del Ws, Wts
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
        # BLAS's threads, it leaves OpenBLAS's workers spinning, and the numba kernel then shares
        # a core with them.)
        quiet = (fw is not None or blas_1) and xp is np
        with fast_rowsparse.quiet_blas("numba") if quiet else contextlib.nullcontext():
            kv = new_cache(params, cfg, 1)
            decode_forward(params, cfg, prompt, kv, spec, fast=fw, ops=FAST)   # prefill, not timed
            t0 = clock()
            for _ in range(n_new):
                decode_forward(params, cfg, tok, kv, spec, fast=fw, ops=FAST)
            return clock() - t0
    print(f"\n## whole-model decode: {n_layer} layers, n_embd {n_embd}, n_hidden {cfg.n_hidden}, "
          f"random weights, batch 1, {n_new} tokens after a 4-token prompt (median of {repeats}, taking turns)")
    res = {}
    topk_name, nm_name = f"sparse 0.5, rowsparse {method}", f"sparse 16:32 N:M, rowsparse {method}"
    variants = [("dense (--sparsity 0)", SparseSpec(0.0), None, False),
                ("dense, BLAS at 1 thread", SparseSpec(0.0), None, True),
                ("sparse 0.5, masked product", None, None, False),
                (topk_name, None, fast, False),
                (nm_name, SparseSpec(0.0, nm=(16, 32)), fast, False)]   # Block Q-Sparse, same weights
    if xp is not np:
        del variants[1]
    times = {name: [] for name, *_ in variants}
    for name, spec, fw, blas_1 in variants:            # untimed: compiles, warms the caches
        decode(spec, fw, blas_1)
    for _ in range(repeats):                           # in turn, so that slow spells fall on all alike
        for name, spec, fw, blas_1 in variants:
            time.sleep(0.2)                            # idle BLAS / numba threads go to sleep
            times[name].append(decode(spec, fw, blas_1))
    for name, *_ in variants:
        res[name] = n_new / float(np.median(times[name]))
        print(f"{name:>37}: {res[name]:8.1f} tokens/s", flush=True)
    best_dense = max(v for k, v in res.items() if k.startswith("dense"))
    print(f"speedup over the faster dense: top-K rowsparse {res[topk_name] / best_dense:.2f}x, "
          f"N:M rowsparse {res[nm_name] / best_dense:.2f}x")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--method", default="auto", choices=fast_rowsparse.METHODS)
    p.add_argument("--D", default="512,1024,2048,4096")
    p.add_argument("--S", default="0,0.25,0.5,0.75,0.9")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--n_embd", type=int, default=2048)
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_new", type=int, default=24)
    p.add_argument("--skip_model", action="store_true")
    p.add_argument("--nm_block", type=int, default=32,
                   help="M of the N:M columns (keep = M (1 - S)); 0 leaves them out")
    p.add_argument("--cache_mb", type=float, default=0.0,
                   help="the last-level cache to defeat, in MB (0: read it from the machine)")
    args = p.parse_args(argv)
    backend.set_device(args.device)
    xp = backend.xp
    clock = timer(xp)
    method = fast_rowsparse.best_method() if args.method == "auto" and xp is np else args.method
    print("machine:", describe(args.device))
    print("command: python benchmarks/decode_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    projection_table(xp, method, [int(d) for d in args.D.split(",")], [float(s) for s in args.S.split(",")],
                     args.repeats, clock, args.cache_mb or last_level_cache_mb(args.device), args.nm_block)
    if not args.skip_model:
        model_decode(xp, method, args.n_embd, args.n_layer, args.n_new, max(3, args.repeats // 5), clock)


if __name__ == "__main__":
    main()
