"""Decode speed of one projection in each format, batch 1: float32 against packed ternary (2 bits a
weight), dense and at 50% and 75% top-K.

    env -u OPENBLAS_CORETYPE python benchmarks/ternary_decode.py            # D = 2048, O = 3 D
    env -u OPENBLAS_CORETYPE python benchmarks/ternary_decode.py --D 1024,2048,4096

Rows, one token x (D,) against weights (O, D), O = 3 D, each variant cycling through copies of its
weights that add up to twice the last-level cache, so that every call reads main memory as a
model's many matrices would:
  float32 dense           x @ W^T (BLAS)
  float32 S               fast.rowsparse.topk_rows_matvec (numba): the selected rows of W^T
  ternary dense           fast.ternary.ternary_sparse_matvec at S = 0 (equal to
                          ternary.ternary_sparse_matvec): INT8 codes of x times every packed row
  ternary S               the same at top-K S: only the selected packed rows
Every sparse and ternary time includes its selection and quantization of x; each call takes the
next of TOKENS different inputs, as a decode does. The variants take
turns (decode_speed.interleaved_ms); each cell is a median. Needs numba.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.decode_speed import interleaved_ms  # noqa: E402
from benchmarks.machine import describe, last_level_cache_mb  # noqa: E402
from minisparse import rowsparse, ternary  # noqa: E402
from minisparse.fast import rowsparse as fast_rowsparse  # noqa: E402
from minisparse.fast import ternary as fast_ternary  # noqa: E402
from minisparse.linear import SparseSpec  # noqa: E402
from minisparse.topk import kept_count  # noqa: E402


TOKENS = 64      # the inputs taken in turn: one x every call would let the CPU learn the selection's branches


def copies_for(nbytes, cache_mb):
    return max(2, int(np.ceil(2 * cache_mb * 2**20 / nbytes)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--D", default="2048", help="input widths, comma-separated")
    p.add_argument("--S", default="0.5,0.75", help="top-K sparsities, comma-separated")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--cache_mb", type=float, default=0.0, help="the last-level cache; 0 = read from the machine")
    args = p.parse_args(argv)
    if fast_ternary.numba is None:
        print("ternary_decode.py needs numba: pip install -r requirements-fast.txt", file=sys.stderr)
        return 2
    cache_mb = args.cache_mb or last_level_cache_mb()
    Ss = [float(s) for s in args.S.split(",")]
    print(f"machine: {describe()}")
    print(f"command: python benchmarks/ternary_decode.py --D {args.D} --S {args.S} --repeats {args.repeats}")
    print(f"weights cycled through {2 * cache_mb:.0f} MB per variant (twice the {cache_mb:.0f} MB cache); ms per call, "
          "median; speedups against float32 dense")
    head = f"{'D':>5} {'fp32 dense':>10}" + "".join(f" {'fp32 ' + format(S, 'g'):>10}" for S in Ss) + \
        f" {'tern dense':>10}" + "".join(f" {'tern ' + format(S, 'g'):>10}" for S in Ss)
    print(head)
    for D in (int(d) for d in args.D.split(",")):
        O = 3 * D
        rng = np.random.default_rng(D)
        W = rng.standard_normal((O, D), dtype=np.float32) * 0.02
        n_fp = copies_for(W.nbytes, cache_mb)
        Ws = [W] + [W.copy() for _ in range(n_fp - 1)]
        Wts = [rowsparse.input_major([w]) for w in Ws]
        tw = ternary.pack_weights([W])
        n_t = copies_for(tw.packed.nbytes, cache_mb)
        tws = [tw] + [ternary.TernaryWeights(tw.packed.copy(), tw.col_scale, tw.sizes) for _ in range(n_t - 1)]
        xs = rng.standard_normal((TOKENS, D)).astype(np.float32)       # a new token each call, as in a decode
        fs = [lambda i: xs[i % TOKENS][None] @ Ws[i % n_fp].T]
        for S in Ss:
            K = kept_count(D, S)
            fs.append(lambda i, K=K: fast_rowsparse.topk_rows_matvec(xs[i % TOKENS], K, Wts[i % n_fp], "numba"))
        for S in [0.0] + Ss:
            spec = SparseSpec(S, a_bits=8, w_bits=1.58)
            fs.append(lambda i, spec=spec: fast_ternary.ternary_sparse_matvec(xs[i % TOKENS], spec, tws[i % n_t]))
        ts = interleaved_ms(fs, time.perf_counter, args.repeats)     # BLAS with its own threads
        dense = ts[0]
        print(f"{D:5d} {dense:10.3f}" + "".join(f" {t:10.3f}" for t in ts[1:]))
        print(f"{'':5} {'1.00x':>10}" + "".join(f" {dense / t:9.2f}x" for t in ts[1:]))
        t_tern = ts[1 + len(Ss)]
        print(f"      ternary dense against float32 dense: {dense / t_tern:.2f}x; ternary at S = "
              + ", ".join(f"{S:g}: {t_tern / t:.2f}x" for S, t in zip(Ss, ts[2 + len(Ss):])) + " over ternary dense")
    return 0


if __name__ == "__main__":
    sys.exit(main())
