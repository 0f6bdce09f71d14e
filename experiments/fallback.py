"""The dense fallback that decides itself, measured: generate.py --fallback auto's rule on
in-distribution and shifted prompts, in lesson 08's setting and on SmolLM2-135M.

    python experiments/fallback.py            # writes experiments/fallback/results.md and results.json
    python experiments/fallback.py --table    # only rewrites results.md from results.json

The rule (minisparse/evaluate.py, FallbackRule): the prefill of a prompt of P tokens under the
sparse model gives its mean next-token loss; above the threshold calibrated on in-distribution
text (the 95% quantile of such prompts' losses, as evaluate.py writes it), decode dense.

Settings (the fallback is always the same weights with top-K off, as generate.py runs it):
    tiny CT 50%   lesson 08's models: a dense SwiGLU model (2 layers, 64 channels, 800 steps on the
                  pydoc corpus), continue-trained at 50% top-K (300 steps)
    tiny TF 50%   the same dense model with 50% top-K switched on without training
    SmolLM2 TF 40%  SmolLM2-135M-Instruct, top-K 40% without training
Texts: the held-out pydoc split (in distribution: its first half calibrates, prompts come from the
second half), lesson 08's shifted texts, the source of textwrap.py and the Zen of Python, and the
Zen as the `this` module stores it, ROT13-encoded: text unlike anything a model was trained on.

For each prompt: the rule's choice, and the loss of the next C tokens of the text (teacher-forced)
under sparse, under dense, and under the rule's choice. Decode speed: generate() on some prompts of each
text, sparse (row-sparse kernel), dense and auto, taking turns; the median tokens/s.
"""

import codecs
import contextlib
import inspect
import io
import json
import os
import statistics
import sys
import textwrap
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from minisparse import evaluate as ev  # noqa: E402
from minisparse import pretrained  # noqa: E402
from minisparse.data import load_text, split_ids  # noqa: E402
from minisparse.fast import FAST  # noqa: E402
from minisparse.fast.decode import DecodeWeights  # noqa: E402
from minisparse.config import GPTConfig  # noqa: E402
from minisparse.sampling import generate  # noqa: E402
from minisparse.run import TrainConfig, load_run  # noqa: E402
from minisparse.train import train  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "fallback", "runs")       # the tiny models (not committed: .gitignore)
QUANTILE = 0.95
SPEED_PROMPTS, SPEED_TOKENS = 4, 24


def shifted_texts():
    with contextlib.redirect_stdout(io.StringIO()):          # `import this` prints the Zen
        import this
    return {"textwrap.py": inspect.getsource(textwrap), "Zen of Python": codecs.decode(this.s, "rot13"),
            "Zen, ROT13-encoded": this.s}


def prompt_windows(ids, T, at_least=8):
    """Windows of T + 1 tokens: non-overlapping, or overlapping for a text too short for `at_least`."""
    ids = np.asarray(ids, dtype=np.int64)
    stride = T if (len(ids) - 1) // T >= at_least else max(1, (len(ids) - T - 1) // at_least)
    starts = np.arange(0, len(ids) - T, stride)
    off = starts[:, None] + np.arange(T)[None, :]
    return ids[off], ids[off + 1]


def tiny_models():
    """Lesson 08's dense SwiGLU model and its 50% continuation, trained once into RUNS."""
    dense_dir, ct_dir = os.path.join(RUNS, "dense"), os.path.join(RUNS, "ct50")
    quiet = lambda *a, **k: None                                  # noqa: E731
    if not os.path.exists(os.path.join(dense_dir, "ckpt.npz")):
        cfg = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, activation="swiglu", sparsity=0.0)
        train(TrainConfig(model=cfg, out_dir=dense_dir, batch_size=8, eval_iters=20, max_iters=800,
                          eval_interval=100, learning_rate=3e-3, min_lr=3e-4, warmup_iters=30), progress=False, log=quiet)
    if not os.path.exists(os.path.join(ct_dir, "ckpt.npz")):
        train(TrainConfig(model=GPTConfig(sparsity=0.5), out_dir=ct_dir, init_from=dense_dir, batch_size=8,
                          eval_iters=20, max_iters=300, eval_interval=25, learning_rate=1e-3, min_lr=1e-4,
                          warmup_iters=10), progress=False, log=quiet)
    p_dense, _, cfg_dense, tok, _ = load_run(dense_dir)
    p_ct, _, cfg_ct, _, _ = load_run(ct_dir)
    return tok, [("tiny CT 50%", p_ct, cfg_ct, 0.5), ("tiny TF 50%", p_dense, cfg_dense, 0.5)]


def measure(name, params, cfg, S, tok, texts, P, C):
    """The rule on every prompt of every text, and decode speed -> (rows, speed)."""
    T = P + C
    plan = ev.uniform(cfg, S)
    spec = cfg.spec_at(S)
    known = getattr(tok, "stoi", None)
    enc = {k: tok.encode("".join(c for c in v if c in known) if known else v) for k, v in texts.items()}
    val = enc.pop("pydoc val")
    half = len(val) // 2
    xc, yc = ev.windows(val[:half], T)
    cal_scores = ev.score(params, cfg, xc, yc, [plan], FAST)
    cal = cal_scores[plan.label].loss
    thresholds = {str(k): v for k, v in ev.fallback_thresholds(cal, QUANTILE).items()}
    threshold, _ = ev.threshold_for(thresholds, P)
    # the alternative this experiment compares: a dense prefill too, and the prompt's sparse - dense gap
    gap_threshold = float(np.quantile(ev.prompt_losses(cal, P) - ev.prompt_losses(cal_scores["dense"].loss, P),
                                      QUANTILE))
    rows, speed = [], {}
    for text, ids in [("pydoc val (in distribution)", val[half:])] + list(enc.items()):
        x, y = prompt_windows(ids, T)
        s = ev.score(params, cfg, x, y, [plan], FAST)
        sp, de = s[plan.label].loss, s["dense"].loss
        go_dense = ev.prompt_losses(sp, P) > threshold                       # (W,)
        cont_s, cont_d = sp[:, P - 1:].mean(1), de[:, P - 1:].mean(1)         # the next C tokens
        auto = np.where(go_dense, cont_d, cont_s)
        gap_dense = ev.prompt_losses(sp, P) - ev.prompt_losses(de, P) > gap_threshold
        auto_gap = np.where(gap_dense, cont_d, cont_s)
        gap = cont_s.mean() - cont_d.mean()
        rows.append(dict(setting=name, text=text, prompts=len(x), dense_rate=float(go_dense.mean()),
                         threshold=threshold, sparse=float(cont_s.mean()), dense=float(cont_d.mean()),
                         auto=float(auto.mean()), gap_rule_dense_rate=float(gap_dense.mean()),
                         gap_rule=float(auto_gap.mean()),
                         gap_rule_recovered=float((cont_s.mean() - auto_gap.mean()) / gap) if abs(gap) > 1e-12
                         else float("nan"),
                         recovered=float((cont_s.mean() - auto.mean()) / gap) if abs(gap) > 1e-12 else float("nan"),
                         gap_sent_dense=float((cont_s - cont_d)[go_dense].mean()) if go_dense.any() else float("nan"),
                         gap_kept_sparse=float((cont_s - cont_d)[~go_dense].mean()) if (~go_dense).any() else float("nan")))
        speed[text] = decode_speed(params, cfg, spec, x[:SPEED_PROMPTS, :P], thresholds, plan.label)
        print(f"{name} | {text}: {rows[-1]}", flush=True)
    return rows, speed


def decode_speed(params, cfg, spec, prompts, thresholds, label):
    """Median tokens/s over the prompts of sparse, dense and auto (the rule's choice, its re-prefill
    included), the three taking turns on each prompt."""
    fast = DecodeWeights(params, cfg)
    rule = ev.FallbackRule(thresholds, QUANTILE, label)

    def on_prefill(logits, ids):
        return cfg.spec_at(0.0) if rule.decide(logits[0], ids[0])[0] else None

    n = min(SPEED_TOKENS, cfg.block_size - prompts.shape[1])
    times = {"sparse": [], "dense": [], "auto": []}
    for p in prompts:
        for how in times:
            s = cfg.spec_at(0.0) if how == "dense" else spec
            t0 = time.perf_counter()
            generate(params, cfg, p[None], n, 0.0, None, None, s, None, fast if fast.serves(s) else None, None,
                     FAST, on_prefill if how == "auto" else None)
            times[how].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    t_start = time.time()
    os.makedirs(os.path.join(HERE, "fallback"), exist_ok=True)
    tok, tiny = tiny_models()
    texts = {"pydoc val": tok.decode(list(split_ids(tok.encode(load_text("pydoc")))[1])), **shifted_texts()}
    rows, speeds = [], {}
    for name, params, cfg, S in tiny:
        r, sp = measure(name, params, cfg, S, tok, texts, P=16, C=16)
        rows += r
        speeds[name] = sp
    params, cfg, stok, _ = pretrained.load_gguf("smollm2", block_size=256)
    stexts = {"pydoc val": stok.decode(list(split_ids(stok.encode(load_text("pydoc")))[1][:8192])), **shifted_texts()}
    r, sp = measure("SmolLM2 TF 40%", params, cfg, 0.4, stok, stexts, P=32, C=64)
    rows += r
    speeds["SmolLM2 TF 40%"] = sp
    write(rows, speeds, time.time() - t_start)


def write(rows, speeds, seconds):
    out = ["# The dense fallback that decides itself (generate.py --fallback auto)\n",
           f"Machine: {describe()}. Command: `python experiments/fallback.py` ({seconds / 60:.1f} minutes).",
           f"Threshold: the {QUANTILE:.0%} quantile of the sparse model's prompt loss on in-distribution prompts "
           "(the first half of the held-out pydoc split); prompts of 16 tokens (tiny, continuation 16) and 32 "
           "(SmolLM2, continuation 64). Losses in nats/token on the continuation, teacher-forced.\n",
           "| setting | text | prompts | decoded dense | continuation loss: sparse | dense - sparse | auto - sparse "
           "| tokens/s sparse | dense | auto | gap rule: decoded dense | auto - sparse |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = speeds[r["setting"]][r["text"]]
        out.append(f"| {r['setting']} | {r['text']} | {r['prompts']} | {r['dense_rate']:.0%} | {r['sparse']:.3f} | "
                   f"{r['dense'] - r['sparse']:+.3f} | {r['auto'] - r['sparse']:+.3f} | "
                   f"{sp['sparse']:.0f} | {sp['dense']:.0f} | {sp['auto']:.0f} | {r['gap_rule_dense_rate']:.0%} | "
                   f"{r['gap_rule'] - r['sparse']:+.3f} |")
    out.append("\nA negative \"dense - sparse\" is what a perfect fallback could gain on that text; \"auto - sparse\" is "
               "what the rule gains (negative: better than staying sparse; positive: falling back made it worse, "
               "which happens where the dense model is the worse one). The gap rule, for comparison (not what "
               "generate.py runs): prefill the prompt dense too, and decode dense where the prompt's sparse - dense "
               "loss is above the same quantile of in-distribution prompts' gaps.")
    with open(os.path.join(HERE, "fallback", "results.md"), "w") as f:
        f.write("\n".join(out) + "\n")
    with open(os.path.join(HERE, "fallback", "results.json"), "w") as f:
        json.dump(dict(rows=rows, speed=speeds, seconds=seconds), f, indent=1)
    print("\n".join(out))


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:                  # rewrite results.md from results.json, measuring nothing
        with open(os.path.join(HERE, "fallback", "results.json")) as f:
            saved = json.load(f)
        write(saved["rows"], saved["speed"], saved["seconds"])
    else:
        main()
