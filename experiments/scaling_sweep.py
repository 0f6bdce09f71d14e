"""The scaling-law sweep: a grid of tiny models (sizes x sparsities), equal tokens for every run.

    python experiments/scaling_sweep.py                 # the committed grid (sweep.csv: seconds per run)
    python experiments/scaling_sweep.py --plot          # fit the law to the CSV and draw the figure
    python experiments/scaling_sweep.py --bits 1.58     # the same sizes in 1.58 bits (sweep_b158.csv)
    python experiments/scaling_sweep.py --bits 1.58 --plot   # its fit, beside the full-precision one

Each run trains with minisparse.train (the loop behind train_tiny.py) in OUT/RUN_NAME and,
when it finishes, appends one row to the CSV: the model's size and sparsity, N and N_a
(model.count_params / activated_params), the final validation loss, tokens and seconds.
The sweep is resumable: a run that has its row is skipped, and a run that was stopped
halfway (Ctrl-C, or a killed process) continues from its last checkpoint (--resume).
Ctrl-C stops the run in flight cleanly and then the sweep.
"""

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minisparse import scaling                             # noqa: E402
from minisparse.errors import UsageError                    # noqa: E402
from minisparse.config import GPTConfig                     # noqa: E402
from minisparse.run import TrainConfig                      # noqa: E402
from minisparse.train import train                          # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# (n_layer, n_embd, n_head): head size 32; N = 106k, 221k, 602k, 1.27M projection weights (12x)
SIZES = [(2, 64, 2), (2, 96, 3), (3, 128, 4), (4, 160, 5)]
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8]
COLUMNS = ["run", "n_layer", "n_embd", "N", "N_a", "N_a_measured", "S", "measured_sparsity",
           "val_loss", "train_loss", "tokens", "seconds"]


# --bits: full precision, or 1.58-bit Q-Sparse (ternary weights, INT8 inputs; docs/qsparse.md, Sec. 5)
BITS = {"16": dict(w_bits=16, a_bits=16), "1.58": dict(w_bits=1.58, a_bits=8)}
# the 1.58-bit grid: its optimum is expected higher (the paper: 61% against 46%), so 0.8 is kept, 0.25 dropped
SPARSITIES_B158 = [0.0, 0.4, 0.5, 0.6, 0.7, 0.8]


def run_name(n_layer, n_embd, S, bits="16"):
    return f"L{n_layer}-C{n_embd}-S{S:g}" + ("" if bits == "16" else f"-b{bits}")


def read_rows(path):
    """The CSV's rows as dicts of numbers (run names stay strings); [] when there is no file."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in COLUMNS[1:]:
            r[k] = float(r[k])
    return rows


def append_row(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def sweep(args):
    done = {r["run"] for r in read_rows(args.csv)}
    grid = [(L, C, H, S) for (L, C, H) in SIZES for S in (SPARSITIES if args.bits == "16" else SPARSITIES_B158)]
    print(f"{len(grid)} runs, {len(done)} already in {args.csv}; {args.max_iters} steps x "
          f"{args.batch_size} x {args.block_size} = {args.max_iters * args.batch_size * args.block_size:,} tokens each")
    for i, (L, C, H, S) in enumerate(grid):
        name = run_name(L, C, S, args.bits)
        if name in done:
            continue
        out = os.path.join(args.out_dir, name)
        resume = os.path.exists(os.path.join(out, "ckpt.npz"))
        tc = TrainConfig(out_dir=out, model=GPTConfig(n_layer=L, n_embd=C, n_head=H, sparsity=S,
                                                      block_size=args.block_size, **BITS[args.bits]),
                         batch_size=args.batch_size, max_iters=args.max_iters,
                         eval_interval=args.eval_interval, eval_iters=args.eval_iters, data=args.data,
                         resume=resume)
        print(f"[{i + 1}/{len(grid)}] {name}{' (resuming)' if resume else ''}", flush=True)
        t0 = time.perf_counter()
        res = train(tc, given=("out_dir", "resume", "max_iters") if resume else (), progress=not args.quiet,
                    log=lambda m: None)
        if res["interrupted"]:
            print(f"stopped: {name} is saved and will resume on the next call.")
            return False
        N, N_a = res["N"], res["N_a"]
        measured = res["N_a_measured"]
        append_row(args.csv, {
            "run": name, "n_layer": L, "n_embd": C, "N": N, "N_a": N_a,
            "N_a_measured": measured, "S": S, "measured_sparsity": round(1 - measured / N, 4),
            "val_loss": round(res["val_loss"], 5), "train_loss": round(res["train_loss"], 5),
            "tokens": args.max_iters * args.batch_size * args.block_size,
            "seconds": round(time.perf_counter() - t0, 1)})
        print(f"    val loss {res['val_loss']:.4f}, {time.perf_counter() - t0:.0f} s", flush=True)
    return True


def plot(args):
    """Fit the law to the CSV and draw loss against N_a for each S, with the fitted curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    rows = read_rows(args.csv)
    if not rows:
        raise UsageError(f"{args.csv!r} has no runs yet: run the sweep first.")
    N, S, Lv = (np.array([r[k] for r in rows]) for k in ("N", "S", "val_loss"))
    fit = scaling.fit_law(N, S, Lv)
    s_star = scaling.optimal_sparsity(*(fit[k] for k in scaling.NAMES))
    print("fit: " + ", ".join(f"{k} {fit[k]:.4g}" for k in scaling.NAMES) + f"; S* = {s_star:.4f}")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    grid = np.geomspace(N.min() * 0.1, N.max() * 1.2, 200)
    for j, s in enumerate(sorted(set(S))):
        sel = S == s
        color = plt.cm.viridis(j / max(1, len(set(S)) - 1))
        ax.scatter(N[sel] * (1 - s), Lv[sel], color=color, s=18, label=f"S = {s:g}")
        n_a = grid * (1 - s)
        ok = n_a >= (N.min() * (1 - s)) * 0.9
        ax.plot(n_a[ok], scaling.law_at_budget(n_a[ok], s, *(fit[k] for k in scaling.NAMES)), color=color, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("activated parameters per token, N_a")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(f"scaling sweep: fitted law, S* = {s_star:.1%}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {os.path.relpath(args.png)}")


def bootstrap_s_star(N, S, Lv, fit, n=200, seed=0):
    """S* of the law refitted to n resamples of the runs (with replacement), each fit started from
    `fit`: the spread that the choice of runs alone puts on S*."""
    import numpy as np
    rng = np.random.default_rng(seed)
    start = [tuple(fit[k] for k in scaling.NAMES)]
    out = []
    for _ in range(n):
        i = rng.integers(0, len(N), len(N))
        if len(set(S[i])) < 3 or len(set(N[i])) < 2:
            continue                                      # too few distinct points to fit the law
        f = scaling.fit_law(N[i], S[i], Lv[i], starts=start)
        out.append(scaling.optimal_sparsity(*(f[k] for k in scaling.NAMES)))
    return np.array(out)


def compare(args):
    """The 1.58-bit law beside the full-precision one: both fits, S* with a bootstrap interval, and
    one figure (the 1.58-bit runs with their fit; the loss at a fixed N_a against S for both)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    laws = {}
    for name, path in (("full precision", os.path.join(HERE, "scaling", "sweep.csv")), ("1.58-bit", args.csv)):
        rows = read_rows(path)
        if not rows:
            raise UsageError(f"{path!r} has no runs yet: run the sweep first.")
        N, S, Lv = (np.array([r[k] for r in rows]) for k in ("N", "S", "val_loss"))
        fit = scaling.fit_law(N, S, Lv)
        s_star = scaling.optimal_sparsity(*(fit[k] for k in scaling.NAMES))
        boot = bootstrap_s_star(N, S, Lv, fit)
        lo, hi = np.percentile(boot, [5, 95])
        laws[name] = (N, S, Lv, fit, s_star, boot)
        print(f"{name}: {len(rows)} runs; fit " + ", ".join(f"{k} {fit[k]:.4g}" for k in scaling.NAMES)
              + f"; S* = {s_star:.4f} (bootstrap over runs, {len(boot)} resamples: 90% in [{lo:.4f}, {hi:.4f}])")
    b_fp, b_158 = laws["full precision"][5], laws["1.58-bit"][5]
    m = min(len(b_fp), len(b_158))
    print(f"S*(1.58-bit) - S*(full precision) = {laws['1.58-bit'][4] - laws['full precision'][4]:+.4f}; "
          f"in {np.mean(b_158[:m] > b_fp[:m]):.0%} of paired resamples the 1.58-bit S* is the higher")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    N, S, Lv, fit, s_star, _ = laws["1.58-bit"]
    grid = np.geomspace(N.min() * 0.1, N.max() * 1.2, 200)
    for j, s_ in enumerate(sorted(set(S))):
        sel = S == s_
        color = plt.cm.viridis(j / max(1, len(set(S)) - 1))
        axes[0].scatter(N[sel] * (1 - s_), Lv[sel], color=color, s=18, label=f"S = {s_:g}")
        n_a = grid * (1 - s_)
        ok = n_a >= (N.min() * (1 - s_)) * 0.9
        axes[0].plot(n_a[ok], scaling.law_at_budget(n_a[ok], s_, *(fit[k] for k in scaling.NAMES)), color=color, lw=1)
    axes[0].set(xscale="log", xlabel="activated parameters per token, N_a", ylabel="validation loss (nats/char)",
                title="1.58-bit runs and their fitted law")
    axes[0].legend(fontsize=8)
    s_grid = np.linspace(0.0, 0.9, 181)
    for (name, (N_, _, _, fit_, s_star_, boot)), color in zip(laws.items(), ("C0", "C3")):
        n_a = float(np.exp(np.log(N_).mean()))                # a budget in the middle of the sweep
        curve = scaling.law_at_budget(n_a, s_grid, *(fit_[k] for k in scaling.NAMES))
        lo, hi = np.percentile(boot, [5, 95])
        axes[1].plot(s_grid, curve - curve.min(), color=color, label=f"{name}: S* = {s_star_:.1%} (90%: {lo:.0%}-{hi:.0%})")
        axes[1].axvline(s_star_, color=color, ls=":", lw=1)
        axes[1].axvspan(lo, hi, color=color, alpha=0.08)
    axes[1].set(xlabel="sparsity S", ylabel="loss above the optimum, at fixed N_a",
                title="the two laws at one inference budget", ylim=(-0.005, 0.08))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {os.path.relpath(args.png)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out_dir", default="out-scaling", help="where each run's checkpoint goes")
    p.add_argument("--bits", default="16", choices=sorted(BITS), help="16 (full precision) or 1.58 (1.58-bit Q-Sparse)")
    p.add_argument("--csv", default=None, help="default: scaling/sweep.csv, or sweep_b158.csv with --bits 1.58")
    p.add_argument("--png", default=None, help="default: scaling/sweep.png, or sweep_b158.png with --bits 1.58")
    p.add_argument("--data", default="pydoc")
    p.add_argument("--max_iters", type=int, default=1500)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--eval_interval", type=int, default=500)
    p.add_argument("--eval_iters", type=int, default=40)
    p.add_argument("--plot", action="store_true", help="fit the law to the CSV and draw it; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    tag = "" if args.bits == "16" else "_b158"
    args.csv = args.csv or os.path.join(HERE, "scaling", f"sweep{tag}.csv")
    args.png = args.png or os.path.join(HERE, "scaling", f"sweep{tag}.png")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        if args.plot and args.bits != "16":
            compare(args)
        elif args.plot:
            plot(args)
        elif sweep(args):
            print(f"sweep complete: {args.csv}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
