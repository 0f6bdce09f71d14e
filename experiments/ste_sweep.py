"""The straight-through estimator (Eq. 13) against the masked gradient (Eq. 12), at laptop scale.

Two questions, asked of the same runs:
  1. loss: at equal steps, data and seed, does a model trained with the STE end with a lower
     validation loss than one trained with the masked gradient (the paper's Fig. 8 ablation)?
  2. mechanism: does the gradient that reaches each layer's weights shrink toward the lower layers
     under the masked gradient (the paper's Fig. 2, a 300M model at 50% top-K)?

    nice -n 19 python experiments/ste_sweep.py --depths 6 --sparsities 0 0.5 0.8 0.9    # then, as committed:
    nice -n 19 python experiments/ste_sweep.py --depths 2
    nice -n 19 python experiments/ste_sweep.py --depths 16 --sparsities 0.9 0.5 0
    python experiments/ste_sweep.py --report                # rebuild results.md from the logs only
    nice -n 19 python experiments/ste_sweep.py --depths 6 --sparsities 0.5 --seeds 1   # one pair, ~3 min

The committed sweep: depths 2, 6 and 16 (--depths), top-K 0.5, 0.8 and 0.9 (16 layers: 0.5 and 0.9
only, for time), 3 seeds, each rule, and a dense run (S = 0) of every seed and depth: runs of
1000 steps (57 in all), each with a 50-step rerun. A run takes about 30 s (2 layers), 1-2 minutes (6) and 3-4
minutes (16) on a 2-core AMD EPYC when it has a core to itself, several times longer beside other
jobs; experiments/logs/ste/*.out hold each run's wall seconds.

Every run is `python train_tiny.py` with the flags below (64 channels, 4 heads, context 64, and
--n_layer from --depths: narrower than train_tiny.py's default 4 x 128, so that a run takes minutes
here and the deep models still train), on the built-in corpus (pydoc, characters). A pair of runs
differs only in --no_ste; runs of one seed share the initial weights and the training batches.
After each run the script measures, with the package's own functions:
  - the final validation loss on 60 fixed batches of the validation split (the same batches for
    every run), beside train_tiny.py's own final estimate (20 batches drawn from (seed, step));
  - the gradient norm reaching each block's projection weights, ||dW|| over the block's seven
    weights together (wq, wk, wv, wo, w_up, w_gate, w_down) and per weight, and the embedding's,
    from model.forward_backward (the reference ops, before any clipping) on 8 fixed validation
    batches, averaged over them: at the initial weights (the pair's common start), at step 50 (a
    50-step rerun with the same flags, whose first 50 steps are those of the long run: checked)
    and at the end, each under the rule the run trained with; and at the end also under the other
    rule at the same weights (the backward alone changes; the forward and loss are identical).
The masked gradient is chosen by GPTConfig.ste = False: its SparseSpec(ste=False) makes
linear.sparse_linear_backward return topk.topk_backward(dxs, mask, ste=False) = dxs * mask.

Logs, in experiments/logs/ste/: NAME.out (the command, train_tiny.py's evaluations and its done line),
NAME.json (this script's measurements of that run), machine.txt. Checkpoints go to out-ste/ (not
committed). A finished run (its .json exists) is skipped, so the sweep resumes where it stopped.
results.md's tables are written from the .json files; the text below its marker line is kept.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import re
import subprocess
import sys
import time

# one BLAS thread, here and in the runs: on a 2-core machine shared with other jobs two threads that
# wait on each other made small products several times slower (as experiments/sft_runs.sh found)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np                                              # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from minisparse import model                                    # noqa: E402
from minisparse.data import get_batch, load_text, split_ids    # noqa: E402
from minisparse.run import load_run, read_metrics              # noqa: E402

LOG = os.path.join(HERE, "logs", "ste")
WORK = os.path.join(REPO, "out-ste")
RESULTS = os.path.join(HERE, "ste", "results.md")
MARKER = "<!-- everything above this line is written by experiments/ste_sweep.py; the text below is kept -->"

MODEL_FLAGS = ["--n_embd", "64", "--n_head", "4", "--block_size", "64"]     # and --n_layer, swept
TRAIN_FLAGS = ["--batch_size", "12", "--eval_interval", "250", "--eval_iters", "20", "--threads", "1"]
EARLY = 50                           # the step of the early gradient measurement
PROJ = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w_up", "ffn.w_gate", "ffn.w_down")
N_GRAD_BATCHES, N_VAL_BATCHES = 8, 60
# two-sided 95% Student t quantiles, by degrees of freedom (no scipy needed)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def set_paths(log, work, results):
    global LOG, WORK, RESULTS
    LOG, WORK, RESULTS = os.path.abspath(log), os.path.abspath(work), os.path.abspath(results)


def run_name(L, S, seed, ste):
    if S == 0:
        return f"L{L}-s0.0-seed{seed}-dense"   # no mask: the two rules are the same model
    return f"L{L}-s{S}-seed{seed}-{'ste' if ste else 'masked'}"


def train_command(L, S, seed, ste, iters, out_dir, extra=()):
    return ([sys.executable, "train_tiny.py", "--n_layer", str(L), *MODEL_FLAGS, "--sparsity", str(S), "--seed", str(seed),
             "--max_iters", str(iters), *TRAIN_FLAGS, "--out_dir", os.path.relpath(out_dir, REPO), *extra]
            + ([] if ste else ["--no_ste"]))


def train(cmd, out_path):
    """Run train_tiny.py; its stdout (evaluations and the done line) goes to out_path, tqdm to stderr."""
    env = dict(os.environ, NUMBA_NUM_THREADS="1")
    shown = " ".join(["python"] + cmd[1:])
    t0 = time.perf_counter()
    with open(out_path, "w") as f:
        f.write(f"$ {shown}\n")
        f.flush()
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.DEVNULL, env=env, check=True)
        f.write(f"wall {time.perf_counter() - t0:.1f} s\n")
    return time.perf_counter() - t0


def fixed_batches(cfg, tok, n, seed, batch_size=12):
    _, val_ids = split_ids(tok.encode(load_text("pydoc")))
    rng = np.random.default_rng(seed)
    return [get_batch(val_ids, cfg.block_size, batch_size, rng) for _ in range(n)]


def layer_norms(params, cfg, batches):
    """||dW|| per block (the seven projection weights together) and per weight, and ||d wte||,
    each the mean over `batches` of one batch's gradient norm; and the mean loss."""
    blocks = np.zeros(cfg.n_layer)
    per = {p: np.zeros(cfg.n_layer) for p in PROJ}
    wte, loss_sum = 0.0, 0.0
    for x, y in batches:
        loss, g, _ = model.forward_backward(params, cfg, x, y)
        loss_sum += loss
        for l in range(cfg.n_layer):
            sq = [float(np.sum(np.square(g[f"h.{l}.{p}"], dtype=np.float64))) for p in PROJ]
            blocks[l] += math.sqrt(sum(sq)) / len(batches)
            for p, s in zip(PROJ, sq):
                per[p][l] += math.sqrt(s) / len(batches)
        wte += float(np.linalg.norm(g["wte"].astype(np.float64))) / len(batches)
    return {"blocks": blocks.tolist(), "per_weight": {p: v.tolist() for p, v in per.items()},
            "wte": wte, "loss": loss_sum / len(batches)}


def mean_loss(params, cfg, batches):
    return float(np.mean([model.forward_loss(params, cfg, x, y)[0] for x, y in batches]))


def measure(L, S, seed, ste, seconds):
    """The measurements of one finished run (its long and its early checkpoint)."""
    name = run_name(L, S, seed, ste)
    long_dir, early_dir = os.path.join(WORK, name), os.path.join(WORK, name + "-early")
    params, _, cfg, tok, _ = load_run(long_dir)
    params_e, _, cfg_e, _, _ = load_run(early_dir)
    assert cfg.ste == ste and cfg.sparsity == S and cfg.n_layer == L and cfg_e == cfg, (cfg, cfg_e)
    # the early rerun's first 50 steps are the long run's: the same training losses, step by step
    steps_long, evals_long = read_metrics(long_dir)
    steps_early, _ = read_metrics(early_dir)
    early_diff = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(steps_long[:EARLY], steps_early))
    assert len(steps_early) == EARLY and early_diff == 0.0, early_diff
    params0 = model.init_params(cfg, seed=seed)          # new_run's weights: init_params(cfg, seed=tc.seed)
    grad_batches = fixed_batches(cfg, tok, N_GRAD_BATCHES, seed=12345)
    val_batches = fixed_batches(cfg, tok, N_VAL_BATCHES, seed=2024)
    other = dataclasses.replace(cfg, ste=not ste)
    gnorm = [m["grad_norm"] for m in steps_long]
    return {
        "name": name, "L": L, "S": S, "seed": seed, "ste": ste, "seconds": seconds,
        "val_loss_fixed": mean_loss(params, cfg, val_batches),
        "val_loss_logged": evals_long[-1]["val_loss"], "train_loss_logged": evals_long[-1]["train_loss"],
        "early_rerun_max_train_loss_diff": early_diff,
        "global_grad_norm": {"steps_0_49": float(np.mean(gnorm[:EARLY])), "last_100": float(np.mean(gnorm[-100:]))},
        "norms": {"init": layer_norms(params0, cfg, grad_batches),
                  "early": layer_norms(params_e, cfg, grad_batches),
                  "early_other_rule": layer_norms(params_e, other, grad_batches),
                  "final": layer_norms(params, cfg, grad_batches),
                  "final_other_rule": layer_norms(params, other, grad_batches)},
        "config": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "block_size": cfg.block_size,
                   "N": model.count_params(cfg)},
    }


def sweep(depths, sparsities, seeds, iters):
    os.makedirs(LOG, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    with open(os.path.join(LOG, "machine.txt"), "w") as f:
        from benchmarks.machine import describe
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        f.write(f"commit: {commit.stdout.strip() or 'unknown'} (with uncommitted changes: see git status)\n"
                f"date: {time.strftime('%Y-%m-%d', time.gmtime())}\nmachine: {describe()}\n")
    for L, S in [(L, S) for L in depths for S in sparsities]:
        for seed in seeds:
            for ste in ((True,) if S == 0 else (True, False)):
                name = run_name(L, S, seed, ste)
                js = os.path.join(LOG, name + ".json")
                if os.path.exists(js):
                    print(f"{name}: done before, skipped", flush=True)
                    continue
                seconds = train(train_command(L, S, seed, ste, iters, os.path.join(WORK, name)),
                                os.path.join(LOG, name + ".out"))
                # the early rerun: same flags but 50 steps (warmup's lr does not depend on max_iters),
                # no evaluation before the end, one batch then: evaluations draw from their own generator
                train(train_command(L, S, seed, ste, EARLY, os.path.join(WORK, name + "-early"),
                                    ("--no_eval_at_start", "--eval_iters", "1")), os.devnull)
                m = measure(L, S, seed, ste, seconds)
                with open(js, "w") as f:
                    json.dump(m, f, indent=1)
                print(f"{name}: {seconds:.0f} s, val loss (60 fixed batches) {m['val_loss_fixed']:.4f}", flush=True)


# ----------------------------------------------------------------------------------------------
# the report


def load_all():
    """{(L, S, seed, ste): measurements} of every logged run."""
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(LOG, "*.json")))]
    return {(r["L"], r["S"], r["seed"], r["ste"]): r for r in runs}


def at_depth(every, depth):
    return {k[1:]: r for k, r in every.items() if k[0] == depth}


def paired(runs):
    """{S: the seeds with both an STE and a masked run} at one depth."""
    return {S: sorted(s for (S_, s, ste) in runs if S_ == S and ste and (S, s, False) in runs)
            for S in sorted({k[0] for k in runs if k[0] > 0})}


def interval(d):
    d = np.asarray(d, dtype=float)
    n, mean = len(d), float(d.mean())
    if n < 2:
        return mean, float("nan"), float("nan")
    half = T975[n - 1] * float(d.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(diffs):
    mean, lo, hi = interval(diffs)
    if len(diffs) < 2:
        return "one seed: no interval"
    if lo > 0:
        return "STE better (masked worse): the interval excludes 0"
    if hi < 0:
        return "masked better: the interval excludes 0"
    signs = sum(d > 0 for d in diffs)
    return f"tie: the interval contains 0 (STE better in {signs} of {len(diffs)} seeds)"


def report():
    every = load_all()
    if not every:
        sys.exit(f"no measurements in {LOG}: run the sweep first")
    depths = sorted({k[0] for k in every})
    one = next(r for r in every.values() if r["S"] > 0)
    cfg = one["config"]
    mpath = os.path.join(LOG, "machine.txt")
    machine = open(mpath).read().strip() if os.path.exists(mpath) else ""
    command = open(os.path.join(LOG, one["name"] + ".out")).readline().strip()
    iters = re.search(r"--max_iters (\d+)", command)
    lines = []
    w = lines.append
    w("# STE against the masked gradient, at laptop scale")
    w("")
    w("The straight-through estimator (Eq. 13, `dx = dxs`) against the masked gradient (Eq. 12,")
    w("`dx = dxs * mask`), trained from the same weights on the same batches. The paper restated:")
    w("docs/qsparse.md, Sec. 2. Made by `experiments/ste_sweep.py` (its docstring says what it runs and")
    w("measures, the commands, and how long they take); the raw logs are in `experiments/logs/ste/`:")
    w("each run's `.out` (its command, evaluations, done line and wall time) and `.json` (the measurements).")
    w("")
    w("```")
    w(machine)
    w("```")
    w("")
    w(f"Models: {', '.join(map(str, depths))} layers, {cfg['n_embd']} channels, {cfg['n_head']} heads, "
      f"context {cfg['block_size']}, ReLU²-GLU; character-level pydoc corpus; batch 12, "
      f"{iters.group(1) if iters else '?'} steps (AdamW, lr 2e-3, warmup 100, cosine to 2e-4), grad clip 1.0. "
      "Each pair differs only in `--no_ste`; the dense run (`--sparsity 0`) of the same seed and depth is the "
      "reference. One run's command:")
    w("")
    w("```")
    w(command)
    w("```")
    w("")
    w("## Summary: masked − STE in final validation loss, paired by seed")
    w("")
    w("Positive where the STE ends lower. The interval is mean ± t·sd/√n (95%, Student t with n − 1")
    w("degrees of freedom); with 3 seeds it is wide.")
    w("")
    w("| layers | N | S | seeds | mean STE | mean masked | masked − STE | 95% interval | verdict |")
    w("|---|---|---|---|---|---|---|---|---|")
    for (depth, S), r in summary().items():
        w(f"| {depth} | {r['N']:,} | {S} | {r['pairs']} | {r['ste']:.4f} | {r['masked']:.4f} | {r['mean']:+.4f} | "
          f"[{r['lo']:+.4f}, {r['hi']:+.4f}] | {r['verdict']} |")
    for depth in depths:
        runs = at_depth(every, depth)
        seeds = sorted({k[1] for k in runs})
        pairs = paired(runs)
        Ss = list(pairs)
        dense = {s: runs[0.0, s, True] for s in seeds if (0.0, s, True) in runs}
        n_params = next(iter(runs.values()))["config"]["N"]
        w("")
        w(f"## {depth} layers (N = {n_params:,} projection weights)")
        w("")
        w(f"### {depth} layers: 1. Final validation loss (60 fixed validation batches, the same for every run)")
        w("")
        w("| S | seed | dense | STE | masked | masked − STE | train_tiny.py's own estimate (20 batches): STE / masked |")
        w("|---|---|---|---|---|---|---|")
        for S in Ss:
            for s in pairs[S]:
                a, b = runs[S, s, True], runs[S, s, False]
                d = f"{dense[s]['val_loss_fixed']:.4f}" if s in dense else "-"
                w(f"| {S} | {s} | {d} | {a['val_loss_fixed']:.4f} | {b['val_loss_fixed']:.4f} | "
                  f"{b['val_loss_fixed'] - a['val_loss_fixed']:+.4f} | {a['val_loss_logged']:.4f} / {b['val_loss_logged']:.4f} |")
        w("")
        w("Per sparsity, the difference masked − STE paired by seed (positive: the STE ends lower). The")
        w("interval is mean ± t·sd/√n (95%, Student t with n − 1 degrees of freedom); with 3 seeds it is")
        w("wide. For scale, the seed-to-seed standard deviation of the STE runs' loss, and each rule's")
        w("mean gap to dense.")
        w("")
        w("| S | seeds | mean STE | mean masked | masked − STE: mean | 95% interval | min .. max | STE seed sd "
          "| STE − dense | masked − dense | verdict |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for S in Ss:
            ss = pairs[S]
            d = [runs[S, s, False]["val_loss_fixed"] - runs[S, s, True]["val_loss_fixed"] for s in ss]
            if not d:
                continue
            mean, lo, hi = interval(d)
            ste_vals = [runs[S, s, True]["val_loss_fixed"] for s in ss]
            msk_vals = [runs[S, s, False]["val_loss_fixed"] for s in ss]
            sd = float(np.std(ste_vals, ddof=1)) if len(ste_vals) > 1 else float("nan")
            dd = [s for s in ss if s in dense]
            gap = lambda ste: (f"{np.mean([runs[S, s, ste]['val_loss_fixed'] - dense[s]['val_loss_fixed'] for s in dd]):+.4f}"
                               if dd else "-")
            w(f"| {S} | {len(d)} | {np.mean(ste_vals):.4f} | {np.mean(msk_vals):.4f} | {mean:+.4f} | "
              f"[{lo:+.4f}, {hi:+.4f}] | {min(d):+.4f} .. {max(d):+.4f} | {sd:.4f} | {gap(True)} | {gap(False)} | "
              f"{verdict(d)} |")
        if dense:
            w("")
            w(f"Dense (S = 0), {len(dense)} seeds: mean {np.mean([r['val_loss_fixed'] for r in dense.values()]):.4f}.")
        w("")
        w(f"### {depth} layers: 2. The gradient reaching each layer (paper Fig. 2)")
        w("")
        w("||dW|| of each block's seven projection weights together, and of the token embedding (`emb`):")
        w("the mean over 8 fixed validation batches of one batch's gradient norm (unclipped, from")
        w("`model.forward_backward`), then the mean over the seeds. Layer 0 is the lowest. *init*: the")
        w("pair's common initial weights under each rule (same forward, same loss). *step 50* and *end*:")
        w("each run's own weights under the rule it trained with; dense is the same seed's dense run.")
        w("*ratio*: STE / masked, 1 where the masked gradient lost nothing.")
        for S in Ss:
            ss = pairs[S]
            if not ss:
                continue
            n_layer = len(runs[S, ss[0], True]["norms"]["init"]["blocks"])
            dd = [s for s in ss if s in dense]

            def col(stage, which, l, seeds_=ss):
                def one_(r):
                    return r["norms"][stage]["wte"] if l == "emb" else r["norms"][stage]["blocks"][l]
                if which == "dense":
                    return float(np.mean([one_(dense[s]) for s in dd])) if dd else float("nan")
                return float(np.mean([one_(runs[S, s, which]) for s in seeds_]))
            w("")
            w(f"**S = {S}** ({len(ss)} seeds)")
            w("")
            w(f"| layer | init STE | init masked | ratio | step {EARLY} dense | step {EARLY} STE | step {EARLY} masked | ratio "
              "| end dense | end STE | end masked | ratio |")
            w("|---|---|---|---|---|---|---|---|---|---|---|---|")
            for l in ["emb", *range(n_layer)]:
                a, b = col("init", True, l), col("init", False, l)
                cells = [f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}"]
                for stage in ("early", "final"):
                    dn, a, b = col(stage, "dense", l), col(stage, True, l), col(stage, False, l)
                    cells += [f"{dn:.3f}", f"{a:.3f}", f"{b:.3f}", f"{a / b:.2f}"]
                w(f"| {l} | " + " | ".join(cells) + " |")
            top = n_layer - 1
            parts = []
            for stage, label in (("init", "init"), ("early", f"step {EARLY}"), ("final", "end")):
                which = ("dense", True, False) if dd and stage != "init" else (True, False)
                names = {"dense": "dense", True: "STE", False: "masked"}
                parts.append(f"{label}: " + ", ".join(f"{names[k]} {col(stage, k, 0) / col(stage, k, top):.2f}"
                                                    for k in which))
            w("")
            w(f"Layer 0 over layer {top}, how much larger the lowest block's gradient is than the top block's: "
              + "; ".join(parts) + ".")
            for stage, label in (("early", f"step {EARLY}"), ("final", "the end")):
                same = np.mean([np.array(runs[S, s, True]["norms"][stage]["blocks"])
                                / np.array(runs[S, s, True]["norms"][stage + "_other_rule"]["blocks"]) for s in ss], axis=0)
                w(f"At the STE runs' weights at {label}, the STE backward over the masked one (same weights, same "
                  "forward): " + ", ".join(f"layer {l} {v:.2f}" for l, v in enumerate(same)) + ".")
            g = {k: [runs[S, s, k]["global_grad_norm"] for s in ss] for k in (True, False)}
            if dd:
                g["dense"] = [dense[s]["global_grad_norm"] for s in dd]
            w("Global gradient norm logged by training (before clipping to 1.0), mean of steps 0-49: "
              + ", ".join(f"{names[k]} {np.mean([x['steps_0_49'] for x in v]):.3f}" for k, v in g.items())
              + "; of the last 100 steps: "
              + ", ".join(f"{names[k]} {np.mean([x['last_100'] for x in v]):.3f}" for k, v in g.items()) + ".")

    kept = ""
    if os.path.exists(RESULTS):
        text = open(RESULTS).read()
        if MARKER in text:
            kept = text.split(MARKER, 1)[1]
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines) + "\n\n" + MARKER + (kept if kept else "\n"))
    print(f"wrote {os.path.relpath(RESULTS, REPO)}")


def summary():
    """{(layers, S): {"pairs": n, "N", "ste", "masked", "mean", "lo", "hi", "min", "max", "verdict"}} of the
    committed logs: what the lessons print (lessons 01 and 05 read it, so they never restate the
    numbers by hand)."""
    every = load_all()
    out = {}
    for depth in sorted({k[0] for k in every}):
        runs = at_depth(every, depth)
        for S, ss in paired(runs).items():
            if not ss:
                continue
            d = [runs[S, s, False]["val_loss_fixed"] - runs[S, s, True]["val_loss_fixed"] for s in ss]
            mean, lo, hi = interval(d)
            out[depth, S] = {"pairs": len(d), "N": runs[S, ss[0], True]["config"]["N"],
                             "ste": float(np.mean([runs[S, s, True]["val_loss_fixed"] for s in ss])),
                             "masked": float(np.mean([runs[S, s, False]["val_loss_fixed"] for s in ss])),
                             "mean": mean, "lo": lo, "hi": hi, "min": min(d), "max": max(d),
                             "verdict": verdict(d)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9],
                    help="0 is the dense reference run of each seed (one run: no mask, no rule to choose)")
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 6, 16], help="n_layer of the runs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--max_iters", type=int, default=1000)
    ap.add_argument("--report", action="store_true", help="only rebuild results.md from experiments/logs/ste/")
    ap.add_argument("--remeasure", action="store_true",
                    help="measure every logged run again from its checkpoints in out-ste/ (no training), then report")
    ap.add_argument("--log_dir", default=LOG, help="where the logs go (default experiments/logs/ste)")
    ap.add_argument("--work_dir", default=WORK, help="where the checkpoints go (default out-ste)")
    ap.add_argument("--results", default=RESULTS, help="the report (default experiments/ste/results.md)")
    args = ap.parse_args(argv)
    set_paths(args.log_dir, args.work_dir, args.results)
    if args.remeasure:
        for (L, S, seed, ste), r in sorted(load_all().items()):
            with open(os.path.join(LOG, r["name"] + ".json"), "w") as f:
                json.dump(measure(L, S, seed, ste, r["seconds"]), f, indent=1)
            print(f"{r['name']}: measured again", flush=True)
    elif not args.report:
        sweep(args.depths, args.sparsities, args.seeds, args.max_iters)
    report()


if __name__ == "__main__":
    main()
