"""Sample text from a model trained by train_tiny.py: `python generate.py`.

Loads out_dir/ckpt.npz with its tokenizer, decodes with a key/value cache (each new token
costs one position), and prints the text, then tokens/s (of the whole call, and of the decode
after the prompt's prefill), the activated parameters per token N_a against the dense count N,
and the sparsity measured at each projection site.
`--sparsity 0` runs the dense fallback (the paper's deployment advice for inputs unlike
the training data); another value overrides the trained top-K sparsity.
"""

import os

# Read by OpenBLAS when NumPy loads it, so set before any import: its idle threads then sleep at
# once instead of spinning for tenths of a second. The prompt's prefill can then run BLAS on the
# threads the user allows without the spinning threads slowing the compiled decode step that follows
# (fast.decode.DecodeWeights.prefill). A value set by the user is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")     # 2^4 cycles, its smallest

import argparse
from dataclasses import replace
import sys
import time

import numpy as np

from minisparse import backend, channel_order, model, pretrained, sft
from minisparse import evaluate as ev
from minisparse.data import start_ids
from minisparse.decode import SparsityMeter
from minisparse.fast import FAST
from minisparse.fast import rowsparse as fast_rowsparse
from minisparse.fast.decode import decode_weights
from minisparse.errors import UsageError
from minisparse.flags import add_channel_order_flag, add_dtype_flag
from minisparse.precision import load_dtype, with_precision
from minisparse.sampling import generate
from minisparse.train import load_run


def build_parser():
    p = argparse.ArgumentParser(description="Sample from a minisparse run.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out-tiny", help="the run to load (its ckpt.npz)")
    p.add_argument("--init_from", default="",
                   help="sample from a pretrained model instead of a run: 'smollm2' (SmolLM2-135M-Instruct) "
                        "or a LLaMA-family .gguf file")
    p.add_argument("--raw", action="store_true",
                   help="with a pretrained instruct model: continue the prompt as plain text, without the chat template")
    p.add_argument("--prompt", default="",
                   help="text to continue; empty: start from a newline, or a token every model knows (data.start_ids)")
    p.add_argument("--max_new_tokens", type=int, default=300, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top_k", type=int, default=40, help="sample only from the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, default=1337, help="seed of the sampler")
    p.add_argument("--num_samples", type=int, default=1, help="independent samples, decoded as one batch")
    p.add_argument("--device", default="cpu", help="'cpu' (NumPy) or 'gpu' (CuPy)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="override the trained sparsity at inference; 0 = dense fallback (default: as trained)")
    p.add_argument("--sparsity_plan", default="",
                   help="an evaluate.py --allocate report (evaluation.json): decode with its sparsity per layer and site")
    p.add_argument("--fallback", default="off", choices=("off", "auto"),
                   help="auto: score the prompt under the sparse model (its prefill); above the threshold that "
                        "evaluate.py calibrated on in-distribution text, decode dense instead, and say so")
    p.add_argument("--calibration", default="",
                   help="with --fallback auto: the evaluate.py report to take the threshold from "
                        "(default: OUT_DIR/eval/evaluation.json, or eval-NAME/evaluation.json for a pretrained model)")
    p.add_argument("--kernel", default="auto", choices=("auto", "numba", "chunked", "gather", "masked"),
                   help="how a sparse projection is computed when decoding: read only the selected weight "
                        "rows (numba; chunked NumPy; gather, the reference; with --device gpu any of these runs "
                        "the CUDA kernels), or 'masked', the dense product of the masked input, as in training. "
                        "auto: the row-sparse kernel where it pays (minisparse/fast/rowsparse.py, auto_method). With numba, "
                        "auto and numba decode one token at a time through a compiled step (minisparse/fast/step.py), "
                        "dense included")
    add_dtype_flag(p)
    add_channel_order_flag(p)
    p.add_argument("--reference", action="store_true",
                   help="run the readable reference ops and the masked product (unless --kernel is given; "
                        "'gather' is the reference row-sparse product), none of minisparse/fast/: to step "
                        "through a decode step in a debugger")
    return p


def run(args):
    if args.num_samples < 1:
        raise UsageError(f"--num_samples {args.num_samples} is not allowed: it must be >= 1.")
    if args.top_k < 0:
        raise UsageError(f"--top_k {args.top_k} is not allowed: it must be >= 0 (0 = no filtering).")
    backend.set_device(args.device)
    template, stop_id = None, None
    if args.init_from:
        if not pretrained.is_pretrained_source(args.init_from):
            raise UsageError(f"--init_from {args.init_from!r} is not allowed: give 'smollm2' or a .gguf file "
                             "(a run of train_tiny.py is loaded with --out_dir).")
        params, cfg, tok, template = pretrained.load_gguf(args.init_from, dtype=load_dtype(args.dtype))
    else:
        params, _, cfg, tok, meta = load_run(args.out_dir, load_dtype(args.dtype))
        template = sft.template_of(meta)           # a finetuned run: the chat template it was tuned with
    params = with_precision(params, cfg, args.dtype)
    tuned = isinstance(template, sft.ChatTemplate)
    ids_eot = tok.encode(template.end if tuned else "<|im_end|>") if template else []
    if template and len(ids_eot) == 1:
        stop_id = ids_eot[0]                       # the instruct model ends its turn with <|im_end|>
    spec = cfg.spec
    if args.sparsity is not None:
        spec = replace(cfg, sparsity=args.sparsity, nm=None).spec      # GPTConfig checks the value
    run_cfg = replace(cfg, sparsity=spec.sparsity, nm=spec.nm)
    plan = None
    if args.sparsity_plan:
        if args.sparsity is not None or args.fallback != "off":
            raise UsageError("--sparsity_plan sets the sparsity of every site: it cannot be combined with "
                             "--sparsity or --fallback.")
        plan = ev.plan_from_report(args.sparsity_plan, cfg)
    if args.channel_order:
        params = channel_order.reordered(params, run_cfg, args.channel_order, plan)
    text = args.prompt
    if template and not args.raw:
        text = template.prompt(args.prompt) if tuned else pretrained.chat_prompt(args.prompt)
    ids = tok.encode(text) or start_ids(tok)       # an empty prompt: start from a known token
    prompt = np.array([ids] * args.num_samples, dtype=np.int64)
    meter = SparsityMeter()
    if args.kernel == "numba" and fast_rowsparse.numba is None:
        raise UsageError("--kernel numba needs the optional package numba (pip install numba); "
                         "--kernel auto uses it when it is there and NumPy otherwise.")
    kernel = args.kernel
    if args.reference and kernel == "auto":
        kernel = "masked"
    fast = decode_weights(params, cfg, plan or spec, kernel, args.num_samples)     # dense: the compiled step, if any
    on_prefill, decision = None, {}
    if args.fallback == "auto":
        on_prefill = fallback_hook(args, cfg, spec, tok, ids, text != args.prompt, decision)
    t0, marks = time.perf_counter(), {}

    def prefill_done(logits, prompt_ids):           # times the prompt apart from the decode that follows
        marks["prefill"] = time.perf_counter()
        return on_prefill(logits, prompt_ids) if on_prefill is not None else None

    out = generate(params, cfg, prompt, args.max_new_tokens, args.temperature, args.top_k or None,
                   np.random.default_rng(args.seed), plan or spec, meter, fast, stop_id,
                   model.REFERENCE if args.reference else FAST, prefill_done, score_prompt=on_prefill is not None)
    if decision.get("dense"):
        spec = cfg.spec_at(0.0)
        run_cfg = replace(cfg, sparsity=0.0, nm=None)
    dt = time.perf_counter() - t0
    for i, row in enumerate(out):
        if args.num_samples > 1:
            print(f"---------- sample {i + 1}")
        if template and not args.raw:               # the question, then the answer up to the end of the turn
            answer = row[len(ids):].tolist()
            answer = answer[:answer.index(stop_id)] if stop_id in answer else answer
            print(f"{args.prompt}\n{tok.decode(answer)}")
        else:
            print(tok.decode(row.tolist()))
    if args.max_new_tokens == 0:
        return                                     # nothing was decoded, so nothing was measured
    measured = meter.mean()
    per_layer = {l: measured for l in range(cfg.n_layer)}
    n_new = (out.shape[1] - prompt.shape[1]) * args.num_samples
    print("----------", file=sys.stderr)
    how = (plan.label if plan is not None else "dense" if spec.dense
           else "sparsity " + format(run_cfg.overall_sparsity, ".2f"))
    print(f"{n_new} tokens in {dt:.2f} s: {n_new / max(dt, 1e-9):,.0f} tokens/s ({how})", file=sys.stderr)
    if "prefill" in marks and not decision.get("dense"):    # a dense refill would count as decoding
        t_prompt, t_decode = marks["prefill"] - t0, t0 + dt - marks["prefill"]
        print(f"of which the prompt: {prompt.size} tokens in {t_prompt:.2f} s; the decode: {n_new} tokens in "
              f"{t_decode:.2f} s, {n_new / max(t_decode, 1e-9):,.0f} tokens/s", file=sys.stderr)
    nominal = ev.nominal_na(cfg, plan) if plan is not None else model.activated_params(run_cfg)
    print(f"activated parameters per token N_a: {nominal:,} nominal, "
          f"{model.activated_params(run_cfg, per_layer):,} measured, of N = {model.count_params(cfg):,} "
          "(embedding and head excluded)", file=sys.stderr)
    print("measured sparsity per site: " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()), file=sys.stderr)


def fallback_hook(args, cfg, spec, tok, ids, templated, decision):
    """The on_prefill of --fallback auto: decide from the prompt's loss, print the path taken."""
    if spec.dense:
        raise UsageError("--fallback auto needs a sparse model or --sparsity above 0: this one decodes dense.")
    setting = ev.uniform(cfg, spec.sparsity, spec.nm).label
    path = args.calibration or os.path.join(ev.default_report_dir(args.init_from or args.out_dir), "evaluation.json")
    rule = ev.FallbackRule.from_report(path, setting)
    span = ev.find_span(ids, tok.encode(args.prompt)) if templated else None    # the user's text only

    def on_prefill(logits, prefill_ids):
        whole = len(prefill_ids[0]) == len(ids)          # else the context holds the prompt's last part
        dense, loss, threshold, n = rule.decide(logits[0], prefill_ids[0], span if whole else None)
        decision["dense"] = dense
        how = (f"prompt loss {loss:.3f} nats/token over {n} tokens, threshold {threshold:.3f} "
               f"(the {rule.quantile:.0%} quantile of in-distribution prompts at {setting})")
        print(f"fallback: {how}: " + ("decoding dense" if dense else f"decoding sparse ({setting})")
              if n >= 2 else f"fallback: a prompt of {n} token cannot be scored: decoding sparse ({setting})",
              file=sys.stderr)
        return cfg.spec_at(0.0) if dense else None

    return on_prefill


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"generate.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
