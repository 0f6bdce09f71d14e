"""Where a decode step's time goes: cProfile of generate() on SmolLM2-135M, top-K 50% through
DecodeWeights (with numba: the compiled step, fast/step.py; without: the row-sparse kernels), then,
unprofiled, the dense decode's wall time through the same DecodeWeights and through the masked
product (fast=None), and the 50% top-K decode's again.

    env -u OPENBLAS_CORETYPE python benchmarks/profile_decode.py [--tokens 32] [--sparsity 0.5]
"""

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from minisparse import pretrained  # noqa: E402
from minisparse.fast import FAST  # noqa: E402
from minisparse.fast.decode import DecodeWeights  # noqa: E402
from minisparse.sampling import generate  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--top", type=int, default=25, help="functions listed, by their own time")
    a = p.parse_args()
    print("machine:", describe())
    print("command: python benchmarks/profile_decode.py " + " ".join(sys.argv[1:]))
    print("load average before:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    params, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=256)
    ids = np.array([tok.encode("Explain Python's with statement.")])
    fast = DecodeWeights(params, cfg)
    spec = cfg.spec_at(a.sparsity)
    generate(params, cfg, ids, 4, 0.0, None, None, spec, None, fast, None, FAST)          # warm up
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    generate(params, cfg, ids, a.tokens, 0.0, None, None, spec, None, fast, None, FAST)
    pr.disable()
    sparse = time.perf_counter() - t0
    print(f"top-K {a.sparsity}: {a.tokens} tokens in {sparse:.3f} s ({1000 * sparse / a.tokens:.1f} ms a token, "
          f"under the profiler; the compiled step: {fast.step is not None})")
    for what, s, f in (("dense, DecodeWeights", 0.0, fast), ("dense, masked product", 0.0, None),
                       (f"top-K {a.sparsity}, DecodeWeights", a.sparsity, fast)):
        generate(params, cfg, ids, 4, 0.0, None, None, cfg.spec_at(s), None, f, None, FAST)     # warm up
        t0 = time.perf_counter()
        generate(params, cfg, ids, a.tokens, 0.0, None, None, cfg.spec_at(s), None, f, None, FAST)
        t = time.perf_counter() - t0
        print(f"{what}: {a.tokens} tokens in {t:.3f} s ({1000 * t / a.tokens:.1f} ms a token, not profiled)")
    print("load average after:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(a.top)
    root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    text = out.getvalue().replace(os.path.join(root, "benchmarks", "..") + os.sep, "")
    print(text.replace(root + os.sep, "").replace(sys.prefix + os.sep, "<python>" + os.sep))   # no local paths


if __name__ == "__main__":
    main()
