"""What float64 activations over float32 weights cost and buy: a remedy for top-K's float32 flips.

    env -u OPENBLAS_CORETYPE python benchmarks/precision_remedy.py --tokens 64 --rounds 3

Top-K is discontinuous, so float32's rounding moves channels across the K-th boundary of a sparse
pretrained model and its greedy text can leave float64's (benchmarks/topk_flips.py, RESULTS.md 18).
The remedy keeps the paper's definition (top-K of |x|) and the weights as they are stored, float32,
and computes everything else in float64: the residual stream, the norms, every projection's input
and its sums, the cache, the head. SmolLM2's weights are exactly float32 numbers (the GGUF's Q4_1
values; checked below), so this computes what the float64 reference computes, up to float64's own
rounding. The question is its price: a decode reads the same float32 projection weights, but its
sums run at half float32's vector width, and the embedding (the tied head) is stored in float64.

For SmolLM2-135M at top-K 0.3-0.6, on 4 prompts and a few held-out windows, it reports:
  - what it buys: the rows whose kept set differs from float64's and the greedy next tokens that
    change, for float32 and for the remedy (the reference forward, as topk_flips.py measures them),
    and the largest logit difference of the default decode path (DecodeWeights, the compiled step
    where numba is installed) against the same path in float64 over a greedy continuation;
  - what it costs: decode tokens/s of float32, the remedy and float64 through the default path at
    50% top-K and dense, the variants taking turns, the median of --rounds (the prompt's prefill
    left out), and the bytes of weights each reads per token.
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from benchmarks.topk_flips import PROMPTS, compare, held_out_windows, versions  # noqa: E402
from minisparse import decode, pretrained  # noqa: E402
from minisparse.fast import FAST  # noqa: E402
from minisparse.fast.decode import decode_weights  # noqa: E402
from minisparse.linear import SparseSpec  # noqa: E402
from minisparse.model import SITE_WEIGHTS  # noqa: E402


def projection_names(cfg):
    return {f"h.{l}.{n}" for l in range(cfg.n_layer) for names in SITE_WEIGHTS.values() for n in names}


def variant(params64, cfg, which):
    """The weights of one precision: 'float32', 'mixed' (the projections' weights float32, every other
    array float64, so the activations are float64) or 'float64'."""
    proj = projection_names(cfg)
    if which == "float64":
        return {k: v.copy() for k, v in params64.items()}
    return {k: v.astype(np.float32) if which == "float32" or k in proj else v.copy() for k, v in params64.items()}


def weight_bytes(params, cfg):
    """Bytes of weights a dense token reads: every projection and the head (tied: the embedding)."""
    proj = projection_names(cfg)
    head = params["wte"] if cfg.tie_embeddings else params["lm_head"]
    return sum(params[k].nbytes for k in proj) + head.nbytes


def decode_run(params, cfg, spec, ids, n):
    """Greedy decode of n tokens after ids through the default path: (logits (n + 1, V), tokens,
    seconds of the decode after the prefill). params are rewritten in place (DecodeWeights)."""
    fast = decode_weights(params, cfg, spec, "auto", 1)
    forward = decode.decode_forward if fast is None else fast.decode_forward
    kv = decode.new_cache(params, cfg, 1)
    out, toks = [], []
    ctx = fast.quiet() if fast is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        out.append(forward(params, cfg, np.array([ids]), kv, spec, None, fast, FAST)[0, -1])
        t0 = time.perf_counter()
        for _ in range(n):
            toks.append(int(np.argmax(out[-1])))
            out.append(forward(params, cfg, np.array([[toks[-1]]]), kv, spec, None, fast, FAST)[0, -1])
        dt = time.perf_counter() - t0
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    return np.stack(out).astype(np.float64), toks, dt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sparsities", default="0.3,0.4,0.5,0.6", help="top-K sparsities for what the remedy buys")
    p.add_argument("--windows", type=int, default=8, help="held-out windows of --T tokens, beside the prompts")
    p.add_argument("--T", type=int, default=32, help="tokens per window")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per speed measurement")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the speed measurement (median)")
    p.add_argument("--only_speed", action="store_true", help="measure what it costs only (the speed)")
    args = p.parse_args(argv)
    print("machine:", describe())
    print("versions:", versions())
    print("command: python benchmarks/precision_remedy.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("OPENBLAS_CORETYPE:", os.environ.get("OPENBLAS_CORETYPE", "(unset)"))
    params64, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=args.T + args.tokens + 16, dtype=np.float64)
    exact = all(np.array_equal(v.astype(np.float32).astype(np.float64), v) for v in params64.values())
    print(f"SmolLM2-135M-Instruct; its float64 weights are exactly float32 numbers: {exact}")
    prompts = [tok.encode(t) for t in PROMPTS] + held_out_windows(tok, args.windows, args.T)
    p32, pmix = variant(params64, cfg, "float32"), variant(params64, cfg, "mixed")

    print("NUMBA_NUM_THREADS:", os.environ.get("NUMBA_NUM_THREADS", "(unset)"),
          "OPENBLAS_NUM_THREADS:", os.environ.get("OPENBLAS_NUM_THREADS", "(unset)"))
    if not args.only_speed:
        buys(args, params64, cfg, prompts, p32, pmix)
    cost(args, params64, cfg, tok)


def buys(args, params64, cfg, prompts, p32, pmix):
    print("\n## What it buys: the reference forward (no fast path) against float64, "
          f"{len(prompts)} sequences ({len(PROMPTS)} prompts, {args.windows} windows of {args.T} tokens)")
    print(f"{'S':>4} {'variant':>8} {'rows flipped':>14} {'greedy changed':>15} {'max |dlogit|':>13}")
    for S in (float(v) for v in args.sparsities.split(",")):
        for name, params in (("float32", p32), ("mixed", pmix)):
            res = compare(params64, params, cfg, prompts, S)
            flipped = sum(v[0] for v in res["flips"].values())
            rows = sum(v[1] for v in res["flips"].values())
            changed = sum(s["tok64"] != s["tok32"] for s in res["seqs"])
            dmax = max(s["dall"] for s in res["seqs"])
            print(f"{S:4.1f} {name:>8} {flipped:>7,} / {rows:<6,} {changed:>7} / {len(prompts):<6} {dmax:13.2e}")

    print(f"\n## The default decode path (DecodeWeights, the compiled step where numba is), greedy, "
          f"{args.tokens} tokens after each of the {len(PROMPTS)} prompts, against the same path in float64 (which "
          "equals the float64 reference to ~1e-13: tests/test_float64_audit.py)")
    print(f"{'S':>4} {'variant':>8} {'same tokens':>12} {'max |dlogit| / max |logit|':>28}")
    for S in (0.4, 0.5):
        spec, c = SparseSpec(S), replace(cfg, sparsity=S)
        for name in ("float32", "mixed"):
            same, gap = 0, 0.0
            for ids in prompts[:len(PROMPTS)]:
                want, wtoks, _ = decode_run(variant(params64, cfg, "float64"), c, spec, ids, args.tokens)
                got, gtoks, _ = decode_run(variant(params64, cfg, name), c, spec, ids, args.tokens)
                same += gtoks == wtoks
                k = next((i for i, (a, b) in enumerate(zip(gtoks, wtoks)) if a != b), len(wtoks))
                gap = max(gap, float(np.abs(got[:k + 1] - want[:k + 1]).max() / np.abs(want[:k + 1]).max()))
            print(f"{S:4.1f} {name:>8} {same:>5} / {len(PROMPTS):<5} {gap:28.2e}   (logits compared up to "
                  "the first token that differs)")



def cost(args, params64, cfg, tok):
    print(f"\n## What it costs: decode tokens/s through the default path, {args.tokens} tokens after "
          f"{PROMPTS[0]!r}, prefill left out; the variants take turns, median of {args.rounds} rounds")
    ids = tok.encode(PROMPTS[0])
    for S in (0.5, 0.0):
        spec, c = SparseSpec(S), replace(cfg, sparsity=S)
        times = {name: [] for name in ("float32", "mixed", "float64")}
        for name in times:                           # compiled for this precision before any timing
            decode_run(variant(params64, cfg, name), c, spec, ids, 2)
        for _ in range(args.rounds):
            for name in times:
                params = variant(params64, cfg, name)
                _, _, dt = decode_run(params, c, spec, ids, args.tokens)
                times[name].append(args.tokens / dt)
                del params
        base = statistics.median(times["float32"])
        label = "dense" if S == 0 else f"top-K {S}"
        for name, v in times.items():
            med = statistics.median(v)
            mb = weight_bytes(variant(params64, cfg, name), cfg) / 1e6
            print(f"  {label:>10} {name:>8}: {med:6.1f} tokens/s ({med / base:.2f}x float32); rounds "
                  f"{', '.join(f'{x:.1f}' for x in v)}; weights a dense token reads {mb:,.0f} MB")


if __name__ == "__main__":
    main()
