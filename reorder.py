"""Choose a channel order for a model: `python reorder.py --init_from smollm2 --sparsity 0.5 --to smollm2.order.npz`.

Runs the model on calibration text, records which input channels top-K keeps at every site, and
chains channels that are kept together next to each other (minisparse/channel_order.py), so that a
token's selected weight rows form fewer, longer runs. The order does not change what the model
computes; generate.py and export.py take it with --channel_order FILE. Prints, per site and on
text the order was not chosen on, the runs a token starts before and after, and the bytes a run
reads. Examples:
    python reorder.py --out_dir out-tiny --to out-tiny/order.npz                   # a sparse run of train_tiny.py
    python reorder.py --init_from smollm2 --sparsity 0.5 --to smollm2-s0.5.order.npz
    python generate.py --init_from smollm2 --sparsity 0.5 --channel_order smollm2-s0.5.order.npz
"""

import argparse
from dataclasses import replace
import os
import sys

import numpy as np
from tqdm import tqdm

from minisparse import channel_order, model, pretrained
from minisparse.data import load_text
from minisparse.errors import UsageError
from minisparse.run import load_run


def build_parser():
    p = argparse.ArgumentParser(description="Choose a channel order that lengthens top-K's runs of selected rows.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out-tiny", help="the run to reorder (its ckpt.npz)")
    p.add_argument("--init_from", default="", help="a pretrained model instead: 'smollm2' or a LLaMA-family .gguf file")
    p.add_argument("--sparsity", type=float, default=None,
                   help="the top-K sparsity whose selections the order is chosen for (default: the model's own)")
    p.add_argument("--to", default="", help="the order file to write (.npz); generate.py --channel_order reads it")
    p.add_argument("--force", action="store_true", help="replace an existing file at --to")
    p.add_argument("--text", default="",
                   help="calibration corpus: 'pydoc', 'shakespeare' or a text file (default: a run's own training "
                        "corpus; pydoc for a pretrained model)")
    p.add_argument("--windows", type=int, default=4, help="calibration windows of --block tokens each")
    p.add_argument("--block", type=int, default=0, help="tokens a window (default: the model's context, at most 256)")
    return p


def run(args):
    if not args.to:
        raise UsageError("--to is needed: the order file to write, e.g. --to order.npz.")
    if os.path.exists(args.to) and not args.force:
        raise UsageError(f"--to {args.to!r} exists: give --force to replace it.")
    if args.windows < 1 or args.block < 0 or args.block == 1:
        raise UsageError(f"--windows {args.windows} --block {args.block} is not allowed: at least 1 window of 2 tokens.")
    if args.init_from:
        if not pretrained.is_pretrained_source(args.init_from):
            raise UsageError(f"--init_from {args.init_from!r} is not allowed: give 'smollm2' or a .gguf file "
                             "(a run of train_tiny.py is given with --out_dir).")
        params, cfg, tok, _ = pretrained.load_gguf(args.init_from, block_size=args.block or 256)
        source = args.init_from
        text = args.text or "pydoc"
    else:
        params, _, cfg, tok, meta = load_run(args.out_dir)
        source = args.out_dir
        text = args.text or meta.get("train", {}).get("data", "pydoc")
    block = args.block or min(256, cfg.block_size)
    if block > cfg.block_size:
        raise UsageError(f"--block {args.block} is not allowed: this model's context is {cfg.block_size} tokens.")
    S = cfg.sparsity if args.sparsity is None else args.sparsity
    spec = replace(cfg, sparsity=S, nm=None).spec                # GPTConfig checks the value
    if args.sparsity is None:
        channel_order.check_allowed(cfg)                        # --sparsity makes any model top-K
    if S == 0:
        raise UsageError("this model is dense: give --sparsity, the top-K sparsity to choose the order for, e.g. 0.5.")
    try:
        ids = np.asarray(tok.encode(load_text(text)), dtype=np.int64)
    except UsageError as e:
        raise UsageError(f"--text {text!r} does not fit this model's tokenizer: {e}") from None
    n = args.windows * block
    if len(ids) < 2 * n:
        raise UsageError(f"--text {text!r} has {len(ids):,} tokens: calibration and the check on other text "
                         f"need {2 * n:,} (--windows x --block, twice).")
    calib = ids[:n].reshape(args.windows, block)
    held = ids[len(ids) // 2:len(ids) // 2 + n].reshape(args.windows, block)   # text the order never saw
    with tqdm(total=2 * args.windows, desc="selections (windows)", unit="window") as bar:
        kept = channel_order.selections(params, cfg, calib, spec, bar)
        kept_held = channel_order.selections(params, cfg, held, spec, bar)
    order = channel_order.calibrate(kept, cfg)
    before = channel_order.runs_per_token(kept_held, cfg)
    after = channel_order.runs_per_token(kept_held, cfg, order)
    fitted = channel_order.runs_per_token(kept, cfg, order)
    row_bytes = {site: O * params["wte"].dtype.itemsize for site, (D, O) in model.site_dims(cfg).items()}
    kept_rows = {site: sum(kept_held[l, site].sum() / len(kept_held[l, site]) for l in range(cfg.n_layer))
                 for site in model.SITES}
    print(f"{source}, top-K {S}: runs of selected rows a token starts (all {cfg.n_layer} layers), on "
          f"{n:,} tokens the order was not chosen on")
    print(f"{'site':8s} {'rows':>8s} {'runs before':>12s} {'after':>8s} {'after/before':>13s} "
          f"{'KB a run: before':>17s} {'after':>7s}")
    for site in model.SITES:
        b = kept_rows[site] * row_bytes[site]
        print(f"{site:8s} {kept_rows[site]:8,.0f} {before[site]:12,.0f} {after[site]:8,.0f} "
              f"{after[site] / before[site]:13.3f} {b / before[site] / 1024:17.1f} {b / after[site] / 1024:7.1f}")
    tb, ta = sum(before.values()), sum(after.values())
    print(f"{'all':8s} {sum(kept_rows.values()):8,.0f} {tb:12,.0f} {ta:8,.0f} {ta / tb:13.3f}"
          f"   (on the calibration text itself: {sum(fitted.values()) / sum(channel_order.runs_per_token(kept, cfg).values()):.3f})")
    info = {"source": source, "sparsity": S, "text": text, "windows": args.windows, "block": block,
            "runs_per_token": {"before": before, "after": after}}
    channel_order.save(args.to, order, cfg, info)
    print(f"wrote {args.to}: use it with generate.py or export.py --channel_order {args.to}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"reorder.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
