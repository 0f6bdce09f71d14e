"""Where a decode token's time goes in the compiled step (minisparse/fast/step.py), and at what rate
each part reads its weights. One token at a time after the prompt, the variants taking turns in every
round, on SmolLM2-135M (default) or a train_tiny.py run.

    env -u OPENBLAS_CORETYPE python benchmarks/step_bandwidth.py [--rounds 20] [--sparsity 0,0.5]
                                                                 [--out_dir RUN] [--channel_order FILE]

Variants: each sparsity S, and "no rows", where every site keeps k = 0 inputs, so the layers do all
their work but the products' row reads: the norms, RoPE, the cache, attention, the activation, the
calls. Per variant, the median over the rounds of
  - layers: the blocks' compiled calls (fast.step.layers), ms a token;
  - head: the final norm and the head's product (fast.step.head), ms a token;
  - products: layers minus "no rows" (this includes the selection), and the bytes of the weight rows
    the sites read (the rows the step counts, times each row's bytes), so the rate, GB/s;
  - the head's rate: all its weights, GB/s.
With --channel_order (a file of reorder.py), the same model with its channels in that order is
measured beside the stored one, in alternating blocks of rounds, its variants marked "reordered".
The weights should be larger than the last-level cache (SmolLM2: 0.54 GB of float32 weights read a
token, dense), else this measures the cache.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from minisparse import pretrained  # noqa: E402
from minisparse.decode import new_cache  # noqa: E402
from minisparse.fast import FAST, step as fast_step  # noqa: E402
from minisparse.fast.decode import DecodeWeights  # noqa: E402
from minisparse.model import SITES, head_weight, site_dims  # noqa: E402
from minisparse.run import load_run  # noqa: E402


def measure(params, cfg, fast, ids, variants, rounds):
    """{variant: [(layers s, head s, bytes of the rows read)] per round}, with "no rows" added, and the
    row bytes per site (4,). The prompt ids are prefilled first; every round then decodes the token
    after them (the cache's length stays), each variant in turn."""
    step = fast.step
    variants = {**variants, "no rows": cfg.spec_at(0.0)}
    row_bytes = np.array([step.wts[0][j].shape[1] * step.wts[0][j].itemsize for j in range(len(SITES))])
    kv = new_cache(params, cfg, 1)
    with fast.quiet():
        fast.decode_forward(params, cfg, np.array([ids]), kv, cfg.spec_at(0.0), None, fast, FAST)   # the prompt
        x0 = params["wte"][ids[-1]].copy()
        times = {v: [] for v in variants}
        for r in range(rounds + 1):                   # round 0 warms up, and is not counted
            for name, spec in variants.items():
                k, block = step.selection(cfg, spec)
                if name == "no rows":
                    k = np.zeros_like(k)
                read = np.zeros((cfg.n_layer, len(SITES)), dtype=np.int64)
                x = x0.copy()
                t0 = time.perf_counter()
                fast_step.layers(params, cfg, step, x, kv, k, block, read)   # kv.length stays: same position
                t1 = time.perf_counter()
                fast_step.head(params, cfg, step, x)
                t2 = time.perf_counter()
                if r:
                    times[name].append((t1 - t0, t2 - t1, int((read.sum(axis=0) * row_bytes).sum())))
    return times, row_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--sparsity", default="0,0.5", help="comma-separated top-K sparsities")
    p.add_argument("--out_dir", default=None, help="a train_tiny.py run instead of SmolLM2-135M")
    p.add_argument("--channel_order", default="", help="also measure the model in this channel order (reorder.py)")
    p.add_argument("--blocks", type=int, default=4, help="with --channel_order: alternate the two this many times")
    a = p.parse_args()
    if fast_step.numba is None:
        sys.exit("benchmarks/step_bandwidth.py measures the compiled step, which needs numba (pip install numba).")
    if a.out_dir:
        params, _, cfg, tok, _ = load_run(a.out_dir)
        ids = [0]
    else:
        params, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=256)
        ids = tok.encode(pretrained.chat_prompt("Explain Python's with statement."))
    models = {"": (params, DecodeWeights(params, cfg))}
    if a.channel_order:
        from minisparse import channel_order
        order, _ = channel_order.load(a.channel_order, cfg)
        p2 = channel_order.apply(params, cfg, order)
        models[" reordered"] = (p2, DecodeWeights(p2, cfg))
    fast = models[""][1]
    step = fast.step
    print("machine:", describe())
    print("command: python benchmarks/step_bandwidth.py " + " ".join(sys.argv[1:]))
    print("load average before:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    model_bytes = sum(w.nbytes for ws in step.wts for w in ws)
    W = head_weight(params, cfg)
    print(f"model: {a.out_dir or 'SmolLM2-135M'}, {cfg.n_layer} layers, n_embd {cfg.n_embd}; the projections' "
          f"weights {model_bytes / 1e9:.3f} GB, the head's {W.nbytes / 1e9:.3f} GB ({W.dtype}); "
          f"the step's split: {step.tiles.tolist()}")

    variants = {f"S {s}": cfg.spec_at(float(s)) for s in a.sparsity.split(",")}
    times, bases = {}, {}
    blocks = a.blocks if a.channel_order else 1
    for b in range(blocks):                       # the two orders take turns, a block of rounds each
        for tag, (pm, fm) in models.items():
            got, row_bytes = measure(pm, cfg, fm, ids, variants, max(1, a.rounds // blocks))
            for name, ts in got.items():
                times.setdefault(name + tag, []).extend(ts)
                bases[name + tag] = "no rows" + tag
    print("load average after:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"{'variant':>18} | layers ms | head ms | products ms | rows read GB | products GB/s | head GB/s")
    for name in times:
        base = statistics.median(t[0] for t in times[bases[name]])
        lay = statistics.median(t[0] for t in times[name])
        hd = statistics.median(t[1] for t in times[name])
        nbytes = times[name][0][2]
        prod = lay - base
        rate = f"{nbytes / prod / 1e9:13.1f}" if not name.startswith("no rows") else f"{'-':>13}"
        print(f"{name:>18} | {1e3 * lay:9.2f} | {1e3 * hd:7.2f} | {1e3 * prod:11.2f} | {nbytes / 1e9:12.3f} | "
              f"{rate} | {W.nbytes / hd / 1e9:9.1f}")
    print(f"inputs per site: {dict(zip(SITES, (site_dims(cfg)[s][0] for s in SITES)))}; "
          f"row bytes per site: {dict(zip(SITES, row_bytes.tolist()))}")


if __name__ == "__main__":
    main()
