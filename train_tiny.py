"""Train a tiny Q-Sparse GPT on a laptop CPU: `python train_tiny.py` (no download, no flag needed).

Flags are named as in nanoGPT and map one to one onto minisparse.train.TrainConfig;
`--key value` and `--key=value` both work. `python train_tiny.py --help` lists them all.
Examples:
    python train_tiny.py                                   # Q-Sparse at 50%, ~3 min on 2 cores
    python train_tiny.py --sparsity 0 --out_dir out-dense  # the dense baseline
    python train_tiny.py --nm 16:32                        # Block Q-Sparse, 16 kept of every 32
    python train_tiny.py --resume                          # continue an interrupted run
    python train_tiny.py --init_from smollm2 --sparsity 0.5 --out_dir out-smollm2   # Q-Sparse a real LLM
"""

import argparse
import sys
from dataclasses import fields

from minisparse.errors import UsageError
from minisparse.train import TrainConfig, TrainingDiverged, train

HELP = {
    "out_dir": "folder for the checkpoint (ckpt.npz) and metrics.jsonl",
    "data": "'pydoc' (Python's docs, built in), 'shakespeare' (downloaded once) or a UTF-8 text file",
    "tokenizer": "'char' (one token per character) or 'bpe' (byte-level BPE trained on the corpus)",
    "vocab_size": "BPE vocabulary size (>= 257); ignored for char",
    "n_layer": "number of Transformer blocks",
    "n_head": "attention heads per block (must divide n_embd)",
    "n_embd": "channels of the residual stream",
    "n_hidden": "FFN width; 0 = 8/3 n_embd rounded up to a multiple of 32",
    "block_size": "context length in tokens",
    "activation": "FFN gate: 'relu2' (ReLU2-GLU, the paper's choice from scratch) or 'swiglu'",
    "n_kv_head": "key/value heads, grouped-query attention (must divide n_head); 0 = n_head",
    "tie_embeddings": "use the token embedding as the LM head",
    "rope_layout": "rotary layout: 'half' (Hugging Face) or 'pairs' (GGUF files)",
    "rope_base": "rotary embedding base",
    "norm_eps": "RMSNorm epsilon",
    "sparsity": "fraction of every projection input zeroed by top-K, in [0, 1); 0 = dense",
    "nm": "Block Q-Sparse KEEP:BLOCK, e.g. 16:32 keeps 16 of every 32 channels (overrides --sparsity)",
    "no_ste": "ablation: masked gradient (Eq. 12) instead of the straight-through estimator",
    "batch_size": "sequences per step",
    "max_iters": "training steps",
    "learning_rate": "peak learning rate of AdamW",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "steps of linear warmup",
    "weight_decay": "AdamW decoupled weight decay (not applied to norm gains)",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this; 0 = off",
    "eval_interval": "evaluate and save a checkpoint every this many steps",
    "eval_iters": "batches per split when estimating the loss",
    "seed": "seed for the weights and the batches",
    "device": "'cpu' (NumPy) or 'gpu' (CuPy)",
    "threads": "CPU threads, each training its share of the batch's sequences; 0 = one per core "
               "up to 20M parameters, else 1",
    "init_from": "continue-training: start from the weights of the run in this out_dir, or from a "
                 "pretrained model: 'smollm2' (SmolLM2-135M-Instruct) or a LLaMA-family .gguf file",
    "resume": "continue this out_dir's interrupted run exactly where it stopped",
}


def build_parser():
    p = argparse.ArgumentParser(description="Train a tiny Q-Sparse GPT (minisparse).",
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name}", action="store_true", help=HELP[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(f"--{f.name}", type=kind, help=f"{HELP[f.name]} (default: {default!r})")
    return p


def main(argv=None):
    given = vars(build_parser().parse_args(argv))       # only the flags the user typed
    tc = TrainConfig(**given)
    try:
        s = train(tc, given=set(given))
    except UsageError as e:
        print(f"train_tiny.py: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"train_tiny.py: {e}", file=sys.stderr)
        return 1
    if s["val_loss"] is not None and not s["interrupted"]:
        sp = s["sparsity"] or {}
        print(f"done: iter {s['iters']}, val loss {s['val_loss']:.4f}, {s['seconds']:.0f} s; "
              f"measured sparsity " + ", ".join(f"{k} {v:.2f}" for k, v in sp.items()) +
              f"; N_a {s['N_a']:,} of N {s['N']:,}; checkpoint {s['checkpoint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
