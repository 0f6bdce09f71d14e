"""Batched decoding, tokens/s against the batch B: dense, masked and row-sparse (the union).

    env -u OPENBLAS_CORETYPE python benchmarks/batch_decode.py --cache_mb 480

Part 1, one projection of D inputs and O = 3 D outputs (a fused q/k/v), B tokens at once, 50% top-K:
  dense       x @ W^T, W (O, D): what `--sparsity 0` runs
  masked      the top-K of each token, then xs @ W^T: every weight is read
  masked Wt   the same product from the input-major Wt (D, O), as a prefill reads it now
              (DecodeWeights keeps one copy of the weights)
  per-token   each token its own rows, B calls of fast.rowsparse.topk_rows_matvec: B x K rows read
  union       the top-K of each token, then fast.rowsparse.union_rows_matmul: each row of the
              union read once for all B tokens (the batched row-sparse product)
tokens/s = B / (ms per call); every selection is in the time. Each call reads a different copy
of the weights, enough copies to pass twice the last-level cache (--cache_mb), so the weights
come from main memory. The variants take turns (decode_speed.interleaved_ms); medians.
Part 2, a random-weight model (--n_embd, --n_layer), B sequences decoded one token each after a
4-token prompt: dense (--sparsity 0), masked (no DecodeWeights) and row-sparse (DecodeWeights
with max_rows = B, so every step takes the union), variants in turn, median of --model_repeats.
Random inputs select nearly independently, as the measured unions do (benchmarks/batch_union.py).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.decode_speed import interleaved_ms  # noqa: E402
from benchmarks.machine import describe, last_level_cache_mb  # noqa: E402
from minisparse import model, rowsparse  # noqa: E402
from minisparse.decode import decode_forward, new_cache  # noqa: E402
from minisparse.fast import FAST  # noqa: E402
from minisparse.fast import rowsparse as fast_rowsparse  # noqa: E402
from minisparse.fast.decode import DecodeWeights  # noqa: E402
from minisparse.fast.topk import sparsify  # noqa: E402
from minisparse.linear import SparseSpec  # noqa: E402


def projection_rows(D, Bs, S, repeats, cache_mb):
    O = 3 * D
    rng = np.random.default_rng(D)
    W = rng.standard_normal((O, D), dtype=np.float32)
    copies = max(2, int(np.ceil(2 * cache_mb * 2**20 / W.nbytes)))
    Ws = [W] + [W.copy() for _ in range(copies - 1)]
    Wts = [rowsparse.input_major([w]) for w in Ws]
    spec = SparseSpec(S)
    K = spec.kept(D)
    names = ("dense", "masked", "masked Wt", "per-token", "union")
    print(f"\n## one projection, D {D}, O {O}, top-K S {S}, float32, weights cycled through {copies} copies "
          f"({copies * W.nbytes / 2**20:.0f} MB, twice the {cache_mb:.0f} MB cache); tokens/s (ms per call)")
    print(f"{'B':>3} " + " ".join(f"{n:>18}" for n in names) + f" {'union rows':>10} {'union / best other':>18}")
    out = {}
    for B in tqdm(Bs, desc=f"D {D}", file=sys.stderr):
        x = rng.standard_normal((B, D), dtype=np.float32)

        def per_token(i):
            for b in range(B):
                fast_rowsparse.topk_rows_matvec(x[b], K, Wts[i % copies], "numba")
        fs = [lambda i: x @ Ws[i % copies].T,
              lambda i: sparsify(x, spec)[0] @ Ws[i % copies].T,
              lambda i: sparsify(x, spec)[0] @ Wts[i % copies],
              per_token,
              lambda i: fast_rowsparse.union_rows_matmul(sparsify(x, spec)[0], Wts[i % copies], "numba")]
        with fast_rowsparse.quiet_blas("numba"):      # as generate.py decodes: BLAS on one thread
            ts = interleaved_ms(fs, time.perf_counter, repeats)
        read = fast_rowsparse.union_rows_matmul(sparsify(x, spec)[0], Wts[0], "numba")[1]
        tps = [B / (t / 1e3) for t in ts]
        out[B] = dict(zip(names, tps))
        print(f"{B:3d} " + " ".join(f"{v:9.0f} ({t:6.2f})" for v, t in zip(tps, ts))
              + f" {read / D:10.3f} {tps[4] / max(tps[:4]):17.2f}x", flush=True)
    return out


def model_rows(n_embd, n_layer, Bs, n_new, repeats):
    cfg = model.GPTConfig(vocab_size=96, block_size=n_new + 8, n_layer=n_layer, n_head=n_embd // 64,
                          n_embd=n_embd, sparsity=0.5)
    params = model.init_params(cfg, seed=0)
    fast = DecodeWeights(params, cfg, "numba")       # params' projections become views of its Wt
    n_proj = model.count_params(cfg)
    print(f"\n## whole-model decode: {n_layer} layers, n_embd {n_embd}, n_hidden {cfg.n_hidden}, random weights, "
          f"{n_proj * 4 / 2**20:.0f} MB of projection weights; B sequences, {n_new} tokens each after a 4-token "
          f"prompt; tokens/s = B x {n_new} / time (median of {repeats}, taking turns)")
    names = ("dense", "masked", "row-sparse union")
    print(f"{'B':>3} " + " ".join(f"{n:>16}" for n in names) + f" {'union / dense':>13} {'union / masked':>14}")
    out = {}
    for B in tqdm(Bs, desc="model", file=sys.stderr):
        fast.max_rows = B
        prompt = np.arange(4 * B).reshape(B, 4) % 96
        tok = (np.arange(B)[:, None] * 7) % 96

        def decode(spec, fw):
            with fast_rowsparse.quiet_blas("numba"):
                kv = new_cache(params, cfg, B)
                decode_forward(params, cfg, prompt, kv, spec, fast=fw, ops=FAST)
                t0 = time.perf_counter()
                for _ in range(n_new):
                    decode_forward(params, cfg, tok, kv, spec, fast=fw, ops=FAST)
                return time.perf_counter() - t0
        variants = [(SparseSpec(0.0), None), (None, None), (None, fast)]
        times = [[] for _ in variants]
        for spec, fw in variants:
            decode(spec, fw)                          # untimed: warms caches and threads
        for _ in range(repeats):
            for t, (spec, fw) in zip(times, variants):
                time.sleep(0.2)
                t.append(decode(spec, fw))
        tps = [B * n_new / float(np.median(t)) for t in times]
        out[B] = dict(zip(names, tps))
        print(f"{B:3d} " + " ".join(f"{v:16.1f}" for v in tps) + f" {tps[2] / tps[0]:12.2f}x {tps[2] / tps[1]:13.2f}x",
              flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--D", default="2048")
    p.add_argument("--B", default="1,2,4,8,16,32,64")
    p.add_argument("--S", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--cache_mb", type=float, default=0.0, help="the last-level cache; 0 = read from the machine")
    p.add_argument("--n_embd", type=int, default=2048)
    p.add_argument("--n_layer", type=int, default=3)
    p.add_argument("--model_B", default="1,2,4,8,16")
    p.add_argument("--n_new", type=int, default=8)
    p.add_argument("--model_repeats", type=int, default=3)
    p.add_argument("--skip_model", action="store_true")
    p.add_argument("--threads", type=int, default=0,
                   help="numba's threads (BLAS runs on one while numba decodes); 0 = numba's default. On a "
                        "machine shared with other jobs, 1 keeps a kernel from waiting for a busy core")
    args = p.parse_args(argv)
    if fast_rowsparse.numba is None:
        print("batch_decode.py needs numba: pip install -r requirements-fast.txt", file=sys.stderr)
        return 2
    if args.threads:
        fast_rowsparse.numba.set_num_threads(args.threads)
    cache_mb = args.cache_mb or last_level_cache_mb()
    print("machine:", describe())
    print(f"numba threads {fast_rowsparse.numba.get_num_threads()} ({fast_rowsparse.numba.threading_layer()}"
          f" layer after the first call); load average at the start {os.getloadavg()[0]:.2f}")
    print("command: python benchmarks/batch_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    Bs = [int(b) for b in args.B.split(",")]
    for D in (int(d) for d in args.D.split(",")):
        projection_rows(D, Bs, args.S, args.repeats, cache_mb)
    if not args.skip_model:
        model_rows(args.n_embd, args.n_layer, [int(b) for b in args.model_B.split(",")], args.n_new,
                   args.model_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
