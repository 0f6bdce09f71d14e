"""Peak memory of decoding: dense against row-sparse, each in its own process.

    env -u OPENBLAS_CORETYPE python benchmarks/decode_memory.py                 # SmolLM2-135M
    env -u OPENBLAS_CORETYPE python benchmarks/decode_memory.py --init_from out-tiny

Each variant runs in a fresh Python process that loads the model, prepares it as generate.py
does, and decodes --tokens greedy tokens after a short prompt; its peak resident set size is the
child's ru_maxrss (os.wait4), so one variant's memory never counts against another's:
  dense        --sparsity 0: the (O, D) weights as loaded, no DecodeWeights
  masked       50% top-K with the masked product (--kernel masked), no DecodeWeights
  row-sparse   50% top-K with DecodeWeights: the input-major copy is the only one (params' entries
               become views of it)
  two copies   the same, with the loaded (O, D) weights kept alive beside the input-major copy:
               what DecodeWeights cost before it shared its memory
"""

import argparse
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks.machine import describe  # noqa: E402

CHILD = r"""
import sys
import numpy as np
from minisparse import pretrained
from minisparse.run import load_run
from minisparse.fast import FAST
from minisparse.fast.decode import DecodeWeights
from minisparse.sampling import generate
source, variant, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if pretrained.is_pretrained_source(source):
    params, cfg, tok, _ = pretrained.load_gguf(source)
else:
    params, _, cfg, tok, _ = load_run(source)
spec = cfg.spec_at(0.0) if variant == "dense" else cfg.spec_at(0.5)
kept = dict(params) if variant == "two copies" else None        # holds the loaded arrays alive
fast = DecodeWeights(params, cfg, "auto") if variant in ("row-sparse", "two copies") else None
prompt = np.array([tok.encode("The capital of France is")], dtype=np.int64)
out = generate(params, cfg, prompt, n, temperature=0, spec=spec, fast=fast, ops=FAST)
print(f"{out.shape[1] - prompt.shape[1]} tokens decoded, {len(fast.wt) if fast else 0} projections input-major")
"""

VARIANTS = ("dense", "masked", "row-sparse", "two copies")


def peak_rss(source, variant, tokens):
    """-> (peak RSS in MB, the child's one line of output)."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, source, variant, str(tokens)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.stdout.read()                                        # to the end: the child has exited
    _, status, usage = os.wait4(p.pid, 0)                        # this child's own rusage
    if status != 0:
        raise SystemExit(f"the {variant!r} child failed:\n{out}")
    return usage.ru_maxrss / 1024, out.strip().splitlines()[-1]  # Linux: ru_maxrss is in KB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init_from", default="smollm2", help="'smollm2', a .gguf file or a train_tiny.py out_dir")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="each variant runs this many times, in turn")
    args = p.parse_args(argv)
    print("machine:", describe())
    print("command: python benchmarks/decode_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"\n## peak RSS of a process that loads {args.init_from} and decodes {args.tokens} greedy tokens")
    peaks = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            mb, line = peak_rss(args.init_from, v, args.tokens)
            peaks[v].append(mb)
            print(f"round {r + 1}: {v:>11}: {mb:7.0f} MB peak RSS ({line})", flush=True)
    dense = min(peaks["dense"])
    print("\nsmallest peak of each variant, and against dense:")
    for v in VARIANTS:
        print(f"{v:>11}: {min(peaks[v]):7.0f} MB  {min(peaks[v]) / dense:5.2f}x dense")
    return 0


if __name__ == "__main__":
    sys.exit(main())
