"""The table of experiments/sft/results.md: finetuning with Q-Sparse, each model before and after.

For SmolLM2-135M-Instruct (training-free: the pretrained weights run at that sparsity) and for
the tiny model (its pretrained run, with the turn markers added as sft.py does), then for every
finetuned run of experiments/sft_runs.sh:
  - held-out response loss: the mean loss over the response tokens of the pydoc topics held out
    (SmolLM2) and of the tasks' test items, the prompt masked as in training;
  - exact-match accuracy on the tasks' test items (PER_KIND of each kind, all held-out facts),
    greedy decoding (sampling.generate, temperature 0) up to the end-of-turn token, with a
    95% Wilson interval from the number of items;
  - for a finetuned run: its steps, the tokens it saw (all positions, and the response tokens
    the loss counted), its wall time and peak memory (from its log LOGDIR/NAME.out).
Usage: python experiments/sft_eval.py [--log experiments/logs/sft] [--per_kind 12] [--only PART [--setting S]]
"""

import argparse
import glob
import json
import os
import re
import sys
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minisparse import backend, model, sft  # noqa: E402
from minisparse.fast import FAST  # noqa: E402
from minisparse.pretrained import load_gguf  # noqa: E402
from minisparse.sampling import generate  # noqa: E402
from minisparse.run import load_run, read_metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTINGS = [("dense", 0.0, None), ("top-K 40%", 0.4, None), ("top-K 50%", 0.5, None), ("Block 16:32", 0.0, (16, 32))]
SMOLLM2_RUNS = {"dense": "smollm2-dense", "top-K 40%": "smollm2-s0.4", "top-K 50%": "smollm2-s0.5",
                "Block 16:32": "smollm2-nm16-32"}
SMOLLM2_DIRS = {"dense": "out-sft-smollm2-dense", "top-K 40%": "out-sft-smollm2-s0.4",
                "top-K 50%": "out-sft-smollm2-s0.5", "Block 16:32": "out-sft-smollm2-nm"}
TINY_RUNS = {"dense": "tiny-dense", "top-K 50%": "tiny-s0.5", "Block 16:32": "tiny-nm16-32"}
TINY_DIRS = {"dense": "out-sft-tiny-dense", "top-K 50%": "out-sft-tiny-s0.5", "Block 16:32": "out-sft-tiny-nm"}


def test_items(per_kind):
    """The first per_kind test items of each templated task, and every held-out fact."""
    items, seen = [], {}
    for ex in sft.task_examples()["test"]:
        seen[ex.kind] = seen.get(ex.kind, 0) + 1
        if ex.kind == "fact" or seen[ex.kind] <= per_kind:
            items.append(ex)
    return items


def evaluate(params, cfg, tok, template, items, pydoc_test, batch_size=4):
    """{loss_tasks, loss_pydoc, correct, n, by_kind}: cfg carries the sparsity to run at."""
    out = {}
    enc = sft.encode_all(tok, template, items, cfg.block_size, "test")
    out["loss_tasks"] = sft.response_loss(params, cfg, enc, batch_size, FAST)
    if pydoc_test:
        enc = sft.encode_all(tok, template, pydoc_test, cfg.block_size, "pydoc test")
        out["loss_pydoc"] = sft.response_loss(params, cfg, enc, batch_size, FAST)
    end = template.end_id(tok)
    prompts = [tok.encode(template.prompt(ex.prompt)) for ex in items]
    answers = [None] * len(items)
    # prompts of one length decode as one batch (the decoder has no padding mask); greedy, each row
    # read up to its end-of-turn token
    by_len = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    for P, rows in by_len.items():
        n_new = min(max(len(tok.encode(items[i].response)) for i in rows) + 3, cfg.block_size - P)
        out_ids = generate(params, cfg, np.array([prompts[i] for i in rows]), n_new, temperature=0.0,
                           spec=cfg.spec, stop_id=end, ops=FAST)
        for i, row in zip(rows, out_ids[:, P:].tolist()):
            answers[i] = tok.decode(row[:row.index(end)] if end in row else row)
    correct, by_kind = 0, {}
    for ex, answer in zip(items, answers):
        ok = sft.exact_match(answer, ex.response)
        correct += ok
        k = by_kind.setdefault(ex.kind, [0, 0])
        k[0] += ok
        k[1] += 1
    out.update(correct=correct, n=len(items), by_kind=by_kind,
               samples=[(ex.prompt, a) for ex, a in list(zip(items, answers))[::12]])
    return out


def run_facts(log, name, out_dir):
    """Steps, tokens, wall time and peak memory of a finetuning run, from its metrics and log."""
    steps, evals = read_metrics(out_dir)
    text = open(os.path.join(log, name + ".out")).read()
    done = re.search(r"done: iter (\d+), val loss ([\d.]+), (\d+) s", text)
    mem = re.search(r"peak memory (\d+) KB", text)
    return {"steps": len(steps), "tokens": sum(m["tokens"] for m in steps),
            "response_tokens": sum(m["response_tokens"] for m in steps),
            "seconds": int(done.group(3)) if done else None,
            "peak_gb": int(mem.group(1)) / 1e6 if mem else None}


def at(cfg, sparsity, nm):
    return replace(cfg, sparsity=sparsity, nm=nm)


def smollm2_before(log, items, pydoc_test, block_size):
    rows = []
    params, cfg, tok, _ = load_gguf("smollm2", block_size=block_size)
    for name, s, nm in SETTINGS:
        t0 = time.perf_counter()
        r = evaluate(params, at(cfg, s, nm), tok, sft.SMOLLM2, items, pydoc_test)
        rows.append({"model": "SmolLM2-135M", "setting": name, "when": "before SFT (training-free)", **r})
        print(f"smollm2 {name} before: {r['correct']}/{r['n']}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def smollm2_after(log, items, pydoc_test, block_size, only=None):
    rows = []
    for name, _, _ in SETTINGS:
        if only and name != only:
            continue
        out_dir = os.path.join(ROOT, SMOLLM2_DIRS[name])
        if not os.path.exists(os.path.join(out_dir, "ckpt.npz")):
            print(f"smollm2 {name}: no run in {out_dir}, left out", file=sys.stderr)
            continue
        params, _, cfg, tok, meta = load_run(out_dir)
        r = evaluate(params, cfg, tok, sft.template_of(meta), items, pydoc_test)
        rows.append({"model": "SmolLM2-135M", "setting": name, "when": "after SFT",
                     **r, **run_facts(log, SMOLLM2_RUNS[name], out_dir)})
        print(f"smollm2 {name} after: {r['correct']}/{r['n']}", file=sys.stderr)
        del params
    return rows


def tiny_rows(log, items, pydoc_test, block_size):
    rows = []
    pre = os.path.join(ROOT, "out-sft-tiny-pre")
    if not os.path.exists(os.path.join(pre, "ckpt.npz")):
        return rows
    params, _, cfg, tok, _ = load_run(pre)
    tok2 = sft.add_markers(tok, sft.TINY)
    params = sft.grow_embeddings(params, cfg, tok2.vocab_size)
    cfg = replace(cfg, vocab_size=tok2.vocab_size)
    for name, s, nm in SETTINGS:
        if name in TINY_RUNS:
            r = evaluate(params, at(cfg, s, nm), tok2, sft.TINY, items, None)
            rows.append({"model": "tiny", "setting": name, "when": "before SFT (training-free)", **r})
    for name, run in TINY_RUNS.items():
        out_dir = os.path.join(ROOT, TINY_DIRS[name])
        if not os.path.exists(os.path.join(out_dir, "ckpt.npz")):
            continue
        params, _, cfg, tok, meta = load_run(out_dir)
        r = evaluate(params, cfg, tok, sft.template_of(meta), items, None)
        rows.append({"model": "tiny", "setting": name, "when": "after SFT", **r, **run_facts(log, run, out_dir)})
    return rows


PARTS = {"smollm2-before": smollm2_before, "smollm2-after": smollm2_after, "tiny": tiny_rows}


def _part_order(path):
    """rows-smollm2-before, then rows-smollm2-after*, in SETTINGS order, then rows-tiny."""
    name = os.path.basename(path)[len("rows-"):-len(".json")]
    keys = ["smollm2-before"] + [f"smollm2-after-{n.replace(' ', '_').replace('%', '')}" for n, _, _ in SETTINGS]
    return (keys.index(name) if name in keys else 5 if name == "smollm2-after" else 9, name)


def fmt(r):
    lo, hi = sft.wilson(r["correct"], r["n"])
    acc = f"{100 * r['correct'] / r['n']:.1f}% ({100 * lo:.0f}-{100 * hi:.0f}%)"
    kinds = ", ".join(f"{k} {c}/{n}" for k, (c, n) in r["by_kind"].items())
    loss_p = f"{r['loss_pydoc']:.3f}" if "loss_pydoc" in r else ""
    run = ""
    if "steps" in r:
        run = (f"{r['steps']} | {r['tokens']:,} ({r['response_tokens']:,}) | "
               f"{r['seconds'] / 60:.1f} | {r['peak_gb']:.2f}" if r["seconds"] and r["peak_gb"] else f"{r['steps']} | | |")
    else:
        run = " | | | "
    return (f"| {r['model']} | {r['setting']} | {r['when']} | {loss_p} | {r['loss_tasks']:.3f} | {acc} | "
            f"{kinds} | {run} |")


def write_atomic(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", default="experiments/logs/sft")
    ap.add_argument("--per_kind", type=int, default=12)
    ap.add_argument("--block_size", type=int, default=96, help="SmolLM2's context, as in sft_runs.sh")
    ap.add_argument("--only", default="", choices=("", "table") + tuple(PARTS),
                    help="measure one part's rows (kept in experiments/sft/rows-PART.json), or none ('table'); "
                         "the table is made from every part measured")
    ap.add_argument("--setting", default="", choices=("",) + tuple(SMOLLM2_DIRS),
                    help="with --only smollm2-after: one finetuned run (rows-smollm2-after-SETTING.json), so "
                         "that the four can be measured at once")
    args = ap.parse_args(argv)
    from benchmarks.machine import describe
    items = test_items(args.per_kind)
    pydoc_test = sft.pydoc_examples()["test"]
    t0 = time.perf_counter()
    for part, measure in PARTS.items():
        if args.only in ("", part):
            if part == "smollm2-after" and args.setting:
                rows = smollm2_after(args.log, items, pydoc_test, args.block_size, args.setting)
                part = f"{part}-{args.setting.replace(' ', '_').replace('%', '')}"
            else:
                rows = measure(args.log, items, pydoc_test, args.block_size)
            write_atomic(os.path.join(HERE, "sft", f"rows-{part}.json"), json.dumps(rows, indent=1))
    rows = []
    for path in sorted(glob.glob(os.path.join(HERE, "sft", "rows-*.json")), key=_part_order):
        rows += json.load(open(path))
    header = ("| model | sparsity | when | held-out pydoc loss | held-out task loss | exact match (95% Wilson) | "
              "by kind | steps | tokens seen (response) | minutes | peak GB |\n|" + "---|" * 11)
    text = "\n".join([
        "# Supervised finetuning with Q-Sparse (minisparse)", "",
        f"Machine: {describe()}. Command: `bash experiments/sft_runs.sh` (runs, logs in "
        "[experiments/logs/sft](../logs/sft/)), then `python experiments/sft_eval.py` (this table).", "",
        f"Test items: {len(items)} ({args.per_kind} of each templated task, every held-out fact); "
        f"held-out pydoc topics: {len(pydoc_test)}. Exact match: greedy decoding up to the end of the turn, "
        "the answer stripped, equal to the reference. Loss: mean over the response tokens, the prompt masked.",
        "", header, *[fmt(r) for r in rows], "",
        "Tokens seen: every position of the padded batches (in brackets, the response tokens the loss "
        "counted). Minutes and peak memory (maximum resident set) are each run's own, from its log; "
        "the four SmolLM2 runs ran at the same time on a 2-core machine shared with other jobs, so "
        "the minutes are no speed measurement.", "",
        "## Greedy answers (every twelfth test item)", "",
        *[f"- {r['model']} {r['setting']}, {r['when']}: " +
          "; ".join(f"{p!r} -> {a!r}" for p, a in r["samples"]) for r in rows], "",
        f"Time of the last call of this script: {(time.perf_counter() - t0) / 60:.1f} minutes.", ""])
    write_atomic(os.path.join(HERE, "sft", "results.md"), text)
    write_atomic(os.path.join(HERE, "sft", "results.json"), json.dumps(rows, indent=1))
    print(text)


if __name__ == "__main__":
    main()
