"""Where float32 rounding moves a channel across top-K's K-th boundary, against float64.

    OPENBLAS_NUM_THREADS=1 python benchmarks/topk_flips.py --smollm2 --sparsities 0,0.3,0.4,0.5,0.6 \
        --smollm2_windows 24 --runs out-flips-s50,out-flips-dense

Top-K is discontinuous: a channel whose |x| sits next to the K-th largest of its row is kept or
dropped on a rounding error, and the change reaches every later layer. For each model and
sparsity S this runs the reference forward (model.forward with model.REFERENCE: no fast paths)
over a few prompts twice, with the weights in float64 (the ground truth) and the same weights
rounded to float32, and records every projection input's kept set by wrapping the selection the
forward calls (Ops.sparsify = linear.sparsify, recorded in this process only). A row is one
token at one site (qkv, o, up_gate, down) of one layer. Reported:

  - flips: the fraction of rows whose kept set (the channels kept with a nonzero value: the
    dropped zeros of ReLU2 do not count) differs between float32 and float64, per layer and site;
  - gap: over the float64 rows of every site, the relative gap at the boundary
        (|x|_(K) - |x|_(K+1)) / |x|_(K)      (|x| sorted descending; rows with |x|_(K) = 0 left out)
    its 1%, 10% and 50% quantiles, and the fraction of rows under 1e-5;
  - the greedy next token (argmax of the last position's logits) of float32 against float64, the
    largest |logit difference| at the last position and at any position, and the positions whose
    argmax differs;
  - the cascade: per prompt, the first (layer, site) with a flip, the float64 gap of that row and
    the float32 input's largest error there relative to |x|_(K), then the flipped rows per layer.

Models: SmolLM2-135M-Instruct (--smollm2; training-free top-K: it was trained dense) and
train_tiny.py runs (--runs; each evaluated at --tiny_sparsity), e.g. one trained with Q-Sparse at
S = 0.5 (the STE) and one trained dense, to see whether training with top-K widens the gaps.
"""

import argparse
import os
import platform
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe, revision  # noqa: E402
from minisparse import model, pretrained  # noqa: E402
from minisparse.data import load_text  # noqa: E402
from minisparse.linear import sparsify  # noqa: E402
from minisparse.model import REFERENCE, SITES  # noqa: E402
from minisparse.topk import kept_count  # noqa: E402
from minisparse.train import load_run  # noqa: E402

PROMPTS = ("The capital of France is",
           "def fibonacci(n):\n    return",
           "The quick brown fox jumps over the",
           "In Python, a list is")
QUANTILES = (0.01, 0.10, 0.50)


def recorded_forward(params, cfg, ids, sparsity):
    """The reference forward of ids (T,) at `sparsity`: (logits (T, V), {(l, site): (x (T, D), kept (T, D))}).
    kept: the channels the selection kept with a nonzero value."""
    calls = []

    def recording_sparsify(x, spec):                       # linear.sparsify, its input and mask kept
        xs, mask = sparsify(x, spec)
        if mask is not None:
            x2 = np.array(x).reshape(-1, x.shape[-1])
            calls.append((x2, (mask.reshape(x2.shape) & (x2 != 0))))
        return xs, mask

    ops = replace(REFERENCE, name="reference (recording its selection)", sparsify=recording_sparsify)
    logits, _, _ = model.forward(params, replace(cfg, sparsity=sparsity), np.asarray(ids)[None], ops=ops,
                                 keep_caches=False)
    if calls and len(calls) != cfg.n_layer * len(SITES):
        raise RuntimeError(f"the forward made {len(calls)} selections, not {cfg.n_layer * len(SITES)}")
    rec = {(l, site): calls[len(SITES) * l + i] for l in range(cfg.n_layer) for i, site in enumerate(SITES)} \
        if calls else {}
    return np.asarray(logits[0], dtype=np.float64), rec


def boundary_gap(x, K):
    """(|x|_(K) - |x|_(K+1)) / |x|_(K) per row of x (N, D); NaN where |x|_(K) = 0 or K = D."""
    a = -np.sort(-np.abs(x), axis=-1)
    if K >= x.shape[-1]:
        return np.full(x.shape[0], np.nan)
    aK, aK1 = a[:, K - 1], a[:, K]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(aK > 0, (aK - aK1) / aK, np.nan)


def compare(params64, params32, cfg, prompts, sparsity):
    """Every number of one (model, sparsity): a dict (see report)."""
    L = cfg.n_layer
    flips = {(l, s): [0, 0] for l in range(L) for s in SITES}        # [flipped rows, rows]
    gaps, gaps_site, errs = [], {s: [] for s in SITES}, []
    seqs = []
    for ids in prompts:
        lg64, r64 = recorded_forward(params64, cfg, ids, sparsity)
        lg32, r32 = recorded_forward(params32, cfg, ids, sparsity)
        d = np.abs(lg32 - lg64)
        seq = {"T": len(ids), "tok64": int(lg64[-1].argmax()), "tok32": int(lg32[-1].argmax()),
               "dlast": float(d[-1].max()), "dall": float(d.max()),
               "pos_changed": int((lg32.argmax(-1) != lg64.argmax(-1)).sum()),
               "first": None, "per_layer": [0] * L}
        for l in range(L):
            for s in SITES:
                if (l, s) not in r64:
                    continue
                x64, k64 = r64[(l, s)]
                x32, k32 = r32[(l, s)]
                K = kept_count(x64.shape[-1], sparsity)
                g = boundary_gap(x64, K)
                if seq["first"] is None:                  # float32's own error, before any flip upstream
                    aK = -np.sort(-np.abs(x64), axis=-1)[:, K - 1]
                    with np.errstate(invalid="ignore", divide="ignore"):
                        errs.append(np.abs(x32.astype(np.float64) - x64).max(axis=-1) / aK)
                gaps.append(g)
                gaps_site[s].append(g)
                diff = (k64 != k32).any(axis=-1)                         # (T,) rows whose kept set differs
                flips[(l, s)][0] += int(diff.sum())
                flips[(l, s)][1] += len(diff)
                seq["per_layer"][l] += int(diff.sum())
                if seq["first"] is None and diff.any():
                    t = int(np.argmax(diff))
                    aK = -np.sort(-np.abs(x64[t]))[K - 1]
                    err = float(np.abs(x32[t].astype(np.float64) - x64[t]).max() / aK)
                    seq["first"] = (l, s, t, float(g[t]), err, int((k64[t] != k32[t]).sum()))
        seqs.append(seq)
    cat = lambda gs: np.concatenate(gs) if gs else np.array([np.nan])   # noqa: E731
    return {"flips": flips, "gaps": cat(gaps), "gaps_site": {s: cat(v) for s, v in gaps_site.items()},
            "errs": cat(errs),
            "seqs": seqs}


def quantiles(g):
    """(the QUANTILES of the gaps that are not exact ties, their count, the fraction of them under 1e-5,
    the fraction of rows with an exact tie at the boundary)."""
    g = g[np.isfinite(g)]
    ties = float((g == 0).mean()) if g.size else float("nan")
    g = g[g > 0]
    if g.size == 0:
        return [float("nan")] * len(QUANTILES), 0, float("nan"), ties
    return [float(np.quantile(g, q)) for q in QUANTILES], g.size, float((g < 1e-5).mean()), ties


def report(name, cfg, res, sparsity, tok, prompts):
    """Print one (model, sparsity)'s tables; return its summary row."""
    L, flips, seqs = cfg.n_layer, res["flips"], res["seqs"]
    D = {"qkv": cfg.n_embd, "o": cfg.n_embd, "up_gate": cfg.n_embd, "down": cfg.n_hidden}
    print(f"\n## {name}, S = {sparsity}")
    if sparsity > 0:
        print("K kept of D: " + ", ".join(f"{s} {kept_count(D[s], sparsity)}/{D[s]}" for s in SITES))
        print("rows whose kept set differs, float32 vs float64 (fraction of the "
              f"{flips[(0, 'qkv')][1]} token rows per layer and site):")
        print(f"{'layer':>5} " + " ".join(f"{s:>8}" for s in SITES))
        for l in range(L):
            print(f"{l:5d} " + " ".join(f"{flips[(l, s)][0] / flips[(l, s)][1]:8.3f}" for s in SITES))
        tot = [sum(flips[(l, s)][0] for l in range(L)) / sum(flips[(l, s)][1] for l in range(L)) for s in SITES]
        print(f"{'all':>5} " + " ".join(f"{v:8.3f}" for v in tot))
        q, n, under, ties = quantiles(res["gaps"])
        print(f"float64 gap (|x|_(K) - |x|_(K+1)) / |x|_(K) over {n} rows: "
              + ", ".join(f"q{int(100 * p)}% {v:.2e}" for p, v in zip(QUANTILES, q)) + f"; under 1e-5: {under:.4f}; "
              f"rows with an exact tie at the boundary (left out) {ties:.4f}")
        e = res["errs"][np.isfinite(res["errs"])]
        if e.size:
            print(f"float32 input error max_d |x32 - x64| / |x|_(K), rows before the sequence's first flip ({e.size}): "
                  f"median {np.median(e):.2e}, q99% {np.quantile(e, 0.99):.2e}, max {e.max():.2e}")
        for s in SITES:
            qs, ns, us, ts = quantiles(res["gaps_site"][s])
            print(f"    {s:>8}: " + ", ".join(f"q{int(100 * p)}% {v:.2e}" for p, v in zip(QUANTILES, qs))
                  + f"; under 1e-5: {us:.4f} ({ns} rows); exact ties {ts:.4f}")
    print("per prompt: greedy next token f64 / f32, max |dlogit| last position / any, positions whose argmax "
          "changed; first flip (layer.site, token, float64 gap, float32 error / |x|_(K), channels changed); "
          "flipped rows per layer from there on (of 4 T)")
    for ids, seq in list(zip(prompts, seqs))[:len(PROMPTS)]:
        t64, t32 = tok.decode([seq["tok64"]]), tok.decode([seq["tok32"]])
        line = (f"  T={seq['T']:2d} {tok.decode(list(ids))[:24]!r:28} {t64!r} / {t32!r}"
                f"{'' if seq['tok64'] == seq['tok32'] else ' CHANGED'}; |dlogit| {seq['dlast']:.2e} / "
                f"{seq['dall']:.2e}; argmax changed at {seq['pos_changed']}/{seq['T']}")
        print(line)
        if seq["first"] is not None:
            l, s, t, g, err, nch = seq["first"]
            print(f"      first flip L{l}.{s} token {t}: gap {g:.2e}, f32 error {err:.2e}, {nch} channels; "
                  f"per layer: {' '.join(str(v) for v in seq['per_layer'][l:])}")
        elif sparsity > 0:
            print("      no flip")
    if len(seqs) > len(PROMPTS):
        w = seqs[len(PROMPTS):]
        firsts = [seq["first"][0] for seq in w if seq["first"] is not None]
        print(f"  {len(w)} windows of {w[0]['T']} tokens of held-out pydoc: greedy next token changed in "
              f"{sum(s['tok64'] != s['tok32'] for s in w)}; argmax changed at "
              f"{sum(s['pos_changed'] for s in w)}/{sum(s['T'] for s in w)} positions; max |dlogit| "
              f"{max(s['dlast'] for s in w):.2e} / {max(s['dall'] for s in w):.2e}; windows with a flip "
              f"{len(firsts)}, first flip layers {sorted(firsts)}")
    rows = sum(v[1] for v in flips.values())
    q = quantiles(res["gaps"])[0]
    firsts = [seq["first"][0] if seq["first"] else None for seq in seqs[:len(PROMPTS)]]
    return {"name": name, "S": sparsity, "flip": sum(v[0] for v in flips.values()) / rows if rows else float("nan"),
            "q": q, "changed": sum(s["tok64"] != s["tok32"] for s in seqs), "n": len(seqs),
            "seq_flipped": sum(s["first"] is not None for s in seqs),
            "pos": (sum(s["pos_changed"] for s in seqs), sum(s["T"] for s in seqs)),
            "dlast": max(s["dlast"] for s in seqs), "dall": max(s["dall"] for s in seqs), "firsts": firsts}


def summary(rows):
    print("\n## summary (float32 against float64, reference forward)")
    print("| model | S | rows flipped | gap q1% | gap q10% | gap q50% | first flip layer per prompt "
          "| sequences with a flip | greedy next token changed | argmax changed, all positions "
          "| max abs dlogit, last / any |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = " ".join("-" if v is None else str(v) for v in r["firsts"]) if r["S"] > 0 else "-"
        qs = " | ".join(f"{v:.1e}" for v in r["q"]) if r["S"] > 0 else "- | - | -"
        fl = f"{r['flip']:.3f}" if r["S"] > 0 else "-"
        print(f"| {r['name']} | {r['S']} | {fl} | {qs} | {f} | {r['seq_flipped']}/{r['n']} | {r['changed']}/{r['n']} | "
              f"{r['pos'][0]}/{r['pos'][1]} | {r['dlast']:.1e} / {r['dall']:.1e} |")


def held_out_windows(tok, n, T, seed=0):
    """n windows of T tokens from random offsets of the held-out 10% of the pydoc corpus."""
    if n == 0:
        return []
    text = load_text("pydoc")
    val = np.asarray(tok.encode(text[int(0.9 * len(text)):][:200_000]))
    starts = np.random.default_rng(seed).integers(0, len(val) - T, size=n)
    return [val[s:s + T] for s in starts]


def versions():
    out = [f"python {platform.python_version()}"]
    for mod in ("gguf", "tokenizers"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except (ImportError, AttributeError):
            pass
    rev, edited = revision(os.path.dirname(os.path.abspath(__file__)))
    if rev:
        out.append(f"git {rev}{' (+ uncommitted changes)' if edited else ''}")
    return ", ".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct, training-free top-K")
    p.add_argument("--sparsities", default="0,0.3,0.4,0.5,0.6", help="SmolLM2's sparsities, comma-separated")
    p.add_argument("--smollm2_windows", type=int, default=8, help="SmolLM2: also this many windows of "
                   "held-out pydoc text (the last 10%%), for the row statistics")
    p.add_argument("--smollm2_T", type=int, default=32, help="tokens per SmolLM2 window")
    p.add_argument("--runs", default="", help="train_tiny.py out_dirs, comma-separated")
    p.add_argument("--tiny_sparsity", type=float, default=0.5, help="the sparsity the runs are evaluated at")
    p.add_argument("--windows", type=int, default=64, help="the runs: also this many windows of block_size "
                   "tokens of held-out pydoc text (the last 10%%), for the row statistics")
    p.add_argument("--windows_T", type=int, default=0, help="the runs: tokens per window (0: the run's block_size)")
    args = p.parse_args(argv)
    print("machine:", describe())
    print("versions:", versions())
    print("command: python benchmarks/topk_flips.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"prompts: {len(PROMPTS)}, raw text (no chat template): {list(PROMPTS)}")
    rows = []
    if args.smollm2:
        params64, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=64, dtype=np.float64)
        params32 = {k: v.astype(np.float32) for k, v in params64.items()}   # the file's float32 values, exactly
        prompts = [tok.encode(t) for t in PROMPTS] + held_out_windows(tok, args.smollm2_windows, args.smollm2_T)
        print(f"\n# SmolLM2-135M-Instruct: {cfg.n_layer} layers, n_embd {cfg.n_embd}, n_hidden {cfg.n_hidden}, "
              f"{cfg.activation}; trained dense, top-K applied training-free; prompt tokens "
              f"{[len(x) for x in prompts[:len(PROMPTS)]]}, then {args.smollm2_windows} windows of {args.smollm2_T} "
              "tokens of held-out pydoc (seed 0)")
        for S in (float(v) for v in args.sparsities.split(",")):
            rows.append(report("SmolLM2-135M", cfg, compare(params64, params32, cfg, prompts, S), S, tok, prompts))
        del params64, params32
    for out_dir in (d for d in args.runs.split(",") if d):
        params32, _, cfg, tok, meta = load_run(out_dir)
        params64 = {k: v.astype(np.float64) for k, v in params32.items()}
        trained = f"Q-Sparse top-K S = {cfg.sparsity} (STE {cfg.ste})" if cfg.sparsity > 0 else "dense"
        prompts = [tok.encode(t) for t in PROMPTS]
        T = args.windows_T or cfg.block_size
        prompts += held_out_windows(tok, args.windows, T)
        print(f"\n# run {out_dir}: {cfg.n_layer} layers, n_embd {cfg.n_embd}, n_hidden {cfg.n_hidden}, "
              f"{cfg.activation}, vocab {cfg.vocab_size}; trained {trained}, {meta.get('iter')} steps; "
              f"prompt tokens {[len(x) for x in prompts[:len(PROMPTS)]]}, then {args.windows} windows of "
              f"{T} tokens of held-out pydoc (seed 0)")
        S = args.tiny_sparsity
        size = "SmolLM2-135M" if cfg.n_layer == 30 and cfg.n_embd == 576 else "tiny"
        how = "continue-trained" if meta.get("train", {}).get("init_from") else "trained"
        name = f"{size}, {how} {'S=' + str(cfg.sparsity) if cfg.sparsity > 0 else 'dense'}"
        rows.append(report(name, cfg, compare(params64, params32, cfg, prompts, S), S, tok, prompts))
    summary(rows)
    return rows


if __name__ == "__main__":
    main()
