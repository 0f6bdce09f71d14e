"""Export a minisparse model for the PyTorch / Hugging Face ecosystem: `python export.py --to hf-tiny`.

Writes a directory that transformers' LlamaForCausalLM.from_pretrained loads (model.safetensors,
config.json with the Q-Sparse settings under "qsparse", tokenizer.json); the name table and the
layout changes are in minisparse/export.py. Loaded as it is, the model runs dense (the dense
fallback); minisparse.export.install_qsparse_hooks makes it sparse again. --format gguf writes the
dense SwiGLU model as one GGUF file instead, for llama.cpp (and pretrained.load_gguf;
minisparse/export_gguf.py). Examples:
    python export.py --out_dir out-tiny --to hf-tiny                # a run of train_tiny.py
    python export.py --init_from smollm2 --to hf-smollm2            # a LLaMA-family GGUF file
    python export.py --out_dir out-tiny --to hf-tiny --force        # replace a previous export
    python export.py --out_dir out-smollm2 --format gguf --to smollm2-qsparse.gguf   # for llama.cpp
    python export.py --init_from smollm2 --channel_order smollm2.order.npz --to hf-reordered   # reorder.py's order
"""

import argparse
import dataclasses
import os
import sys

from minisparse import channel_order, export, export_gguf, pretrained, sft
from minisparse.flags import add_channel_order_flag
from minisparse.errors import UsageError
from minisparse.run import load_run


def build_parser():
    p = argparse.ArgumentParser(description="Export a minisparse model as a Hugging Face Llama checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="out-tiny", help="the run to export (its ckpt.npz)")
    p.add_argument("--init_from", default="",
                   help="export a pretrained model instead of a run: 'smollm2' (SmolLM2-135M-Instruct) "
                        "or a LLaMA-family .gguf file")
    p.add_argument("--format", default="hf", choices=("hf", "gguf"),
                   help="hf: a Hugging Face checkpoint directory; gguf: one GGUF file of the dense model")
    p.add_argument("--to", default="", help="the directory (hf: new or empty; see --force) or .gguf file to write")
    p.add_argument("--force", action="store_true", help="replace a previous export at --to")
    p.add_argument("--sparsity", type=float, default=None,
                   help="record another top-K sparsity in config.json's qsparse (default: the model's own)")
    add_channel_order_flag(p)     # without it the channels are written in the order they are stored
    return p


def run(args):
    if args.format == "gguf":                                                          # before loading
        export_gguf.check_gguf_target(args.to, args.force)
    else:
        export.check_target(args.to, args.force, None if args.init_from else args.out_dir)
    template, chat = None, None
    if args.init_from:
        if not pretrained.is_pretrained_source(args.init_from):
            raise UsageError(f"--init_from {args.init_from!r} is not allowed: give 'smollm2' or a .gguf file "
                             "(a run of train_tiny.py is given with --out_dir).")
        if args.format == "gguf" and os.path.abspath(args.to) == os.path.abspath(pretrained.resolve(args.init_from)):
            raise UsageError(f"--to {args.to!r} is the file being exported: choose another name.")
        params, cfg, tok, template = pretrained.load_gguf(args.init_from, block_size=1 << 30)  # its own context
        source = args.init_from
    else:
        params, _, cfg, tok, meta = load_run(args.out_dir)
        source = args.out_dir
        chat = sft.template_of(meta)                   # a finetuned run: its end of turn and template
    if args.sparsity is not None:
        cfg = dataclasses.replace(cfg, sparsity=args.sparsity, nm=None)       # validates the value
    if args.channel_order:
        params = channel_order.reordered(params, cfg, args.channel_order)
    if args.format == "gguf":
        path = export_gguf.export_gguf(params, cfg, tok, args.to, args.force, template, chat)
        print(f"wrote {path}: GGUF llama, n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, vocab_size "
              f"{cfg.vocab_size}, float32, dense (Q-Sparse settings under minisparse.qsparse)")
        return
    path = export.export_hf(params, cfg, tok, args.to, args.force,
                            None if args.init_from else args.out_dir, source, chat)
    s = export.qsparse_settings(cfg)
    print(f"wrote {path}: LlamaForCausalLM, n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, vocab_size "
          f"{cfg.vocab_size}; qsparse sparsity {cfg.overall_sparsity:.2f}, kept per site "
          + ", ".join(f"{k} {v}" for k, v in s["kept"].items())
          + f"; weights {s['weights']}, a_bits {cfg.a_bits}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
