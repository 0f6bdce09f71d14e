"""Measure a model on your own text at several sparsities, choose one under a quality budget, A/B-test.

    python evaluate.py --out_dir out-tiny                       # the run's held-out text, S = 0 .. 0.6
    python evaluate.py --init_from smollm2 --data my.txt --sparsity 0,0.3,0.4,16:32 --budget 2%
    python evaluate.py --out_dir out-tiny --allocate layer_site  # per-layer, per-site sparsities
    python evaluate.py --ab out-dense out-tiny@0.5              # two models (or settings), paired

On the same windows of the text, for each setting: perplexity with its 95% interval (a bootstrap
over windows), its change against dense (paired), top-1 agreement with dense, KL(dense || sparse),
N_a nominal and measured, and decode tokens/s on this machine. It prints a table and writes
evaluation.json, evaluation.csv and (with matplotlib) evaluation.png to --report_dir. The JSON
also holds the prompt-loss thresholds that `generate.py --fallback auto` reads.
The measurements are minisparse/evaluate.py's, and --allocate's minisparse/allocation.py's.
"""

import argparse
import csv
import json
import os
import sys
import tempfile

import numpy as np
from tqdm import tqdm

from minisparse import allocation, backend, evaluate as ev
from minisparse.data import load_text, split_ids
from minisparse.errors import UsageError
from minisparse.flags import add_dtype_flag, parse_nm
from minisparse.precision import load_dtype, with_precision
from minisparse.fast import FAST
from minisparse.pretrained import is_pretrained_source, load_gguf
from minisparse.run import load_run

DEFAULT_SPARSITIES = "0,0.3,0.4,0.5,0.6"


def build_parser():
    p = argparse.ArgumentParser(description="Measure a minisparse model at several sparsities on your text.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out-tiny", help="the run to measure (its ckpt.npz)")
    p.add_argument("--init_from", default="", help="a pretrained model instead: 'smollm2' or a .gguf file")
    p.add_argument("--data", default="", help="a UTF-8 text file to measure on (default: the held-out 10%% of "
                   "the run's corpus; for a pretrained model, of the built-in pydoc corpus)")
    p.add_argument("--sparsity", default=DEFAULT_SPARSITIES,
                   help="comma-separated settings: top-K sparsities in [0, 1) and N:M blocks such as 16:32; "
                        "dense (0) is always measured, the trained setting is added")
    p.add_argument("--block", type=int, default=0, help="tokens per window (default: block_size, at most 256)")
    p.add_argument("--max_windows", type=int, default=64, help="windows scored at most, evenly spread")
    p.add_argument("--budget", default="", help="choose the sparsest setting within this: a perplexity "
                   "increase such as 2%% or a mean KL such as kl=0.05, at the 95%% interval's upper end")
    p.add_argument("--allocate", default="", choices=("", "layer", "site", "layer_site"),
                   help="also build per-layer / per-site sparsities at the same nominal N_a as the chosen (or "
                        "sparsest) uniform top-K, from sensitivity curves on a calibration part of the windows, "
                        "and compare the two on the rest")
    p.add_argument("--allocate_at", type=float, default=None,
                   help="with --allocate: match the N_a of this top-K sparsity (one of --sparsity) instead")
    p.add_argument("--calib_fraction", type=float, default=0.25,
                   help="with --allocate: the share of windows (the first ones) used for calibration")
    p.add_argument("--fallback_quantile", type=float, default=0.95,
                   help="the quantile of in-distribution prompt losses that generate.py --fallback auto "
                        "takes as its threshold (1 - this = the share of such prompts it decodes dense)")
    p.add_argument("--ab", nargs=2, metavar=("A", "B"), default=None,
                   help="A/B: two models or settings, SOURCE or SOURCE@SETTING (a run dir, smollm2 or a .gguf; "
                        "@0.5, @16:32, @0 for dense), scored on the same tokens, paired")
    p.add_argument("--speed_tokens", type=int, default=32, help="tokens decoded to measure tokens/s; 0 = skip")
    p.add_argument("--speed_rounds", type=int, default=3, help="rounds in which the settings take turns")
    p.add_argument("--report_dir", default="", help="where to write the report (default: OUT_DIR/eval, "
                   "or eval-NAME for a pretrained model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    add_dtype_flag(p)
    return p


# the inputs: settings, models, texts

def parse_settings(text):
    """'0,0.5,16:32' -> [(0.0, None), (0.5, None), (0.0, (16, 32))]."""
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if ":" in item:
            out.append((0.0, parse_nm(item)))
            continue
        try:
            s = float(item)
        except ValueError:
            s = float("nan")
        if not 0 <= s < 1:
            raise UsageError(f"--sparsity item {item!r} is not allowed: give top-K sparsities in [0, 1) or "
                             "N:M blocks such as 16:32, separated by commas.")
        out.append((s, None))
    return out


def load_source(source, dtype="float32"):
    """A run directory, 'smollm2' or a .gguf file -> (params in precision `dtype`, one of
    precision.DTYPES, cfg, tokenizer, data source, template)."""
    if is_pretrained_source(source):
        params, cfg, tok, template = load_gguf(source, block_size=256, dtype=load_dtype(dtype))
        return with_precision(params, cfg, dtype), cfg, tok, "pydoc", template
    params, _, cfg, tok, meta = load_run(source, load_dtype(dtype))
    return with_precision(params, cfg, dtype), cfg, tok, meta.get("train", {}).get("data", "pydoc"), None


def text_ids(tok, data, default_source):
    """The tokens to measure on: the whole --data file, or the held-out split of the corpus."""
    if data:
        text = load_text(data)
        if not text.strip():
            raise UsageError(f"--data {data!r} is empty: give a file with text to measure on.")
        return np.asarray(tok.encode(text), dtype=np.int64)
    return split_ids(tok.encode(load_text(default_source)))[1]


def write_atomic(path, write):
    """write(file) into a temporary file beside path, then rename: a reader never sees half a report."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def print_table(rows, speed):
    head = (f"{'setting':>10s} {'ppl':>8s} {'95% CI':>17s} {'vs dense':>9s} {'95% CI':>17s} "
            f"{'top-1 agree':>11s} {'KL nats':>8s} {'N_a nominal':>12s} {'N_a measured':>12s} {'tok/s':>7s}")
    print(head)
    for r in rows:
        sp = speed.get(r["setting"])
        print(f"{r['setting']:>10s} {r['ppl']:8.3f} {r['ppl_lo']:8.3f}..{r['ppl_hi']:<8.3f} {r['d_ppl']:+9.2%} "
              f"{r['d_ppl_lo']:+8.2%}..{r['d_ppl_hi']:<+8.2%} {r['agree']:11.1%} {r['kl']:8.4f} "
              f"{r['na_nominal']:12,d} {r['na_measured']:12,d} " + (f"{sp:7.0f}" if sp else f"{'-':>7s}"))
    print("measured sparsity per site (natural zeros included): " + "; ".join(
        f"{r['setting']} " + " ".join(f"{k} {v:.2f}" for k, v in r["sparsity_by_site"].items()) for r in rows))


def plot(rows, speed, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("evaluate.py: matplotlib is not installed, so no plot was drawn (pip install matplotlib).",
              file=sys.stderr)
        return
    topk = [r for r in rows if ":" not in r["setting"] and r["setting"] != "allocated"]
    S = [0.0 if r["setting"] == "dense" else float(r["setting"][2:]) for r in topk]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.errorbar(S, [100 * r["d_ppl"] for r in topk],
                yerr=[[100 * (r["d_ppl"] - r["d_ppl_lo"]) for r in topk],
                      [100 * (r["d_ppl_hi"] - r["d_ppl"]) for r in topk]], marker="o", capsize=3)
    ax.set_xlabel("top-K sparsity S")
    ax.set_ylabel("perplexity vs dense (%)")
    if speed:
        ax2 = ax.twinx()
        ax2.plot(S, [speed.get(r["setting"], np.nan) for r in topk], "s--", color="tab:orange")
        ax2.set_ylabel("decode tokens/s", color="tab:orange")
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(path), ".tmp-" + os.path.basename(path))
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def run_ab(args):
    (a_src, a_set), (b_src, b_set) = [(s.split("@", 1) + [None])[:2] for s in args.ab]
    models = []
    for src, setting in ((a_src, a_set), (b_src, b_set)):
        params, cfg, tok, default_data, _ = load_source(src, args.dtype)
        if setting is None:
            plan = ev.uniform(cfg, cfg.sparsity, cfg.nm, label="as trained")
        else:
            (s, nm), = parse_settings(setting)
            plan = ev.uniform(cfg, s, nm)
        models.append((src, params, cfg, tok, default_data, plan))
    ids = [text_ids(m[3], args.data, m[4]) for m in models]
    if len(ids[0]) != len(ids[1]) or not np.array_equal(ids[0], ids[1]):
        raise UsageError(f"--ab {a_src!r} and {b_src!r} tokenize the text differently, so their losses are not "
                         "on the same tokens: compare models that share a tokenizer.")
    T = args.block or min(256, models[0][2].block_size, models[1][2].block_size)
    x, y = ev.windows(ids[0], T, args.max_windows)
    losses = []
    with tqdm(total=2 * len(x), desc="A/B windows", dynamic_ncols=True) as bar:
        for src, params, cfg, tok, _, plan in models:
            losses.append(ev.score(params, cfg, x, y, [plan], FAST, progress=bar.update)[plan.label].loss)
    idx = ev.bootstrap_indices(len(x), seed=args.seed)
    (d, d_lo, d_hi), (r, r_lo, r_hi) = ev.paired_difference(losses[0], losses[1], idx)
    print(f"A = {args.ab[0]}: loss {losses[0].mean():.4f} nats/token; B = {args.ab[1]}: {losses[1].mean():.4f}; "
          f"{x.size:,} tokens in {len(x)} windows of {T}")
    print(f"B - A: {d:+.4f} nats/token (95% CI {d_lo:+.4f} .. {d_hi:+.4f}), perplexity {r:+.2%} "
          f"({r_lo:+.2%} .. {r_hi:+.2%}); " + ("the interval excludes 0" if d_lo > 0 or d_hi < 0
                                               else "the interval includes 0: no difference shown"))
    return dict(a=args.ab[0], b=args.ab[1], tokens=int(x.size), windows=len(x), block=T,
                loss_a=float(losses[0].mean()), loss_b=float(losses[1].mean()),
                d_loss=[d, d_lo, d_hi], d_ppl=[r, r_lo, r_hi])


def run(args):
    if args.max_windows < 2:
        raise UsageError(f"--max_windows {args.max_windows} is not allowed: the interval needs >= 2 windows.")
    if args.speed_tokens < 0 or args.speed_rounds < 1:
        raise UsageError(f"--speed_tokens {args.speed_tokens} / --speed_rounds {args.speed_rounds}: give "
                         "tokens >= 0 and rounds >= 1.")
    if not 0 < args.fallback_quantile < 1:
        raise UsageError(f"--fallback_quantile {args.fallback_quantile} is not allowed: it must be in (0, 1).")
    if not 0 < args.calib_fraction < 1:
        raise UsageError(f"--calib_fraction {args.calib_fraction} is not allowed: it must be in (0, 1).")
    budget = ev.parse_budget(args.budget) if args.budget else None
    source = args.init_from or args.out_dir
    report_dir = args.report_dir or ev.default_report_dir(source)
    if args.ab:
        result = run_ab(args)
        os.makedirs(report_dir, exist_ok=True)
        write_atomic(os.path.join(report_dir, "ab.json"), lambda f: json.dump(result, f, indent=1))
        print(f"wrote {os.path.join(report_dir, 'ab.json')}")
        return
    settings = parse_settings(args.sparsity)
    params, cfg, tok, default_data, _ = load_source(source, args.dtype)
    trained = (cfg.sparsity, cfg.nm)
    if trained not in settings and trained != (0.0, None):
        settings.append(trained)
    plans = [ev.uniform(cfg, s, nm) for s, nm in settings]           # each checked against this model
    labels = [p.label for p in plans]
    plans = [p for i, p in enumerate(plans) if p.label not in labels[:i]]         # each setting once
    topk = [p.label for p in plans if p.spec(0, "qkv").nm is None and not p.spec(0, "qkv").dense]
    if args.allocate_at is not None and ev.uniform(cfg, args.allocate_at).label not in topk:
        raise UsageError(f"--allocate_at {args.allocate_at} is not allowed: it must be one of the top-K "
                         f"sparsities of --sparsity ({', '.join(topk) or 'none'}).")
    ids = text_ids(tok, args.data, default_data)
    T = args.block or min(256, cfg.block_size)
    if not 2 <= T <= cfg.block_size:
        raise UsageError(f"--block {T} is not allowed: it must be in [2, block_size = {cfg.block_size}].")
    x, y = ev.windows(ids, T, args.max_windows)
    calib = None
    if args.allocate:
        n_cal = max(1, int(round(args.calib_fraction * len(x))))
        if len(x) - n_cal < 2:
            raise UsageError(f"--allocate needs >= 2 held-out windows after {n_cal} for calibration, and the "
                             f"text has {len(x)}: give more text or a lower --calib_fraction.")
        calib, (x, y) = (x[:n_cal], y[:n_cal]), (x[n_cal:], y[n_cal:])
    print(f"{source}: {x.size:,} tokens in {len(x)} windows of {T}" +
          (f", {calib[0].size:,} more for calibration" if calib else ""), file=sys.stderr)

    with tqdm(total=len(x), desc="scoring windows", dynamic_ncols=True) as bar:
        scores = ev.score(params, cfg, x, y, plans, FAST, progress=bar.update)
    idx = ev.bootstrap_indices(len(x), seed=args.seed)
    rows = ev.summarize(scores, cfg, idx)
    uniform_rows = list(rows)
    report = dict(source=source, data=args.data or f"held-out split of {default_data!r}", tokens=int(x.size),
                  windows=len(x), block=T, bootstrap=ev.BOOTSTRAP, command="python evaluate.py " +
                  " ".join(sys.argv[1:]), machine=_machine())

    chosen = ev.choose(uniform_rows, budget) if budget else None
    if budget:
        what = f"perplexity +{budget[1]:.1%}" if budget[0] == "ppl" else f"KL {budget[1]} nats"
        key = "d_ppl_hi" if budget[0] == "ppl" else "kl_hi"
        shown = (lambda v: f"{v:+.2%}") if budget[0] == "ppl" else (lambda v: f"{v:.4f}")
        print(f"budget {what}: chose {chosen['setting']} ({shown(chosen[key])} at the interval's upper end, "
              f"N_a {chosen['na_nominal']:,}); " +
              ", ".join(f"{r['setting']} {shown(r[key])}" for r in uniform_rows if r is not chosen))
        report["budget"] = dict(kind=budget[0], limit=budget[1], chosen=chosen["setting"])

    if args.allocate:
        report["allocation"] = _allocate(args, params, cfg, calib, x, y, scores, plans, chosen, rows, idx)

    report["fallback"] = {
        r["setting"]: dict(quantile=args.fallback_quantile,
                           thresholds={str(n): t for n, t in ev.fallback_thresholds(
                               scores[r["setting"]].loss, args.fallback_quantile).items()})
        for r in uniform_rows if r["setting"] != "dense"}
    speed = {}
    if args.speed_tokens:
        n0 = min(16, T)                                  # the prompt: the first tokens of the text
        n = max(1, min(args.speed_tokens, cfg.block_size - n0))
        speed = ev.decode_speed(params, cfg, backend.asarray(x[0, :n0]), plans, n, args.speed_rounds)
        report["speed"] = dict(tokens=n, rounds=args.speed_rounds, tokens_per_s=speed)
    print_table(rows, speed)
    if speed:
        print(f"tokens/s: {report['speed']['tokens']} tokens decoded greedy after a {n0}-token prompt, the median "
              f"of {args.speed_rounds} rounds in which the settings take turns; machine: {report['machine']}")
    report["rows"] = rows
    os.makedirs(report_dir, exist_ok=True)
    write_atomic(os.path.join(report_dir, "evaluation.json"), lambda f: json.dump(report, f, indent=1))
    fields = [k for k in rows[0] if k != "sparsity_by_site"] + [f"zeros_{s}" for s in rows[0]["sparsity_by_site"]]

    def write_csv(f):
        w = csv.writer(f)
        w.writerow(fields + ["tokens_per_s"])
        for r in rows:
            w.writerow([r[k] for k in fields if k in r] + list(r["sparsity_by_site"].values())
                       + [speed.get(r["setting"], "")])
    write_atomic(os.path.join(report_dir, "evaluation.csv"), write_csv)
    plot(rows, speed, os.path.join(report_dir, "evaluation.png"))
    print(f"wrote {report_dir}/evaluation.json, .csv, .png", file=sys.stderr)


def _allocate(args, params, cfg, calib, x, y, scores, plans, chosen, rows, idx):
    """Per-group sparsities at the nominal N_a of a uniform top-K, compared with it on the held-out windows."""
    topk = [p for p in plans if not p.spec(0, "qkv").dense and p.spec(0, "qkv").nm is None]
    if not topk:
        raise UsageError("--allocate needs a top-K sparsity above 0 in --sparsity to match its N_a.")
    if args.allocate_at is not None:
        target = next(p for p in topk if p.label == ev.uniform(cfg, args.allocate_at).label)    # checked in run
    elif chosen is not None and chosen["setting"] not in ("dense",) and ":" not in chosen["setting"]:
        target = next(p for p in topk if p.label == chosen["setting"])
    else:
        target = max(topk, key=lambda p: p.spec(0, "qkv").sparsity)
    groups = allocation.units(cfg, args.allocate)
    with tqdm(total=len(groups) * len(allocation.LEVELS), desc="sensitivity", dynamic_ncols=True) as bar:
        curves, base = allocation.sensitivity(params, cfg, *calib, groups, FAST, progress=bar.update)
    plan, levels = allocation.allocate(cfg, groups, curves, base, ev.nominal_na(cfg, target))
    with tqdm(total=len(x), desc="scoring allocation", dynamic_ncols=True) as bar:
        s = ev.score(params, cfg, x, y, [plan], FAST, progress=bar.update)
    rows.extend(r for r in ev.summarize({"dense": scores["dense"], **s}, cfg, idx) if r["setting"] != "dense")
    (d, lo, hi), _ = ev.paired_difference(scores[target.label].loss, s["allocated"].loss, idx)
    wins = hi < 0
    print(f"allocated by {args.allocate} at N_a {ev.nominal_na(cfg, plan):,} (uniform {target.label}: "
          f"{ev.nominal_na(cfg, target):,}): loss {d:+.4f} nats/token against uniform (95% CI {lo:+.4f} .. "
          f"{hi:+.4f}); " + ("picks the allocation" if wins else f"keeps uniform {target.label}: the allocation "
                             "is not shown better"))
    return dict(by=args.allocate, against=target.label, levels=levels, sparsity=plan.to_dict(), na=ev.nominal_na(cfg, plan),
                na_uniform=ev.nominal_na(cfg, target), d_loss=[d, lo, hi], picks="allocated" if wins else target.label,
                calibration_windows=len(calib[0]))


def _machine():
    try:
        from benchmarks.machine import describe
        return describe()
    except ImportError:
        return ""


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"evaluate.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
