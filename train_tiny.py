"""Train a tiny Q-Sparse GPT on a laptop CPU: `python train_tiny.py` (no download, no flag needed).

Flags are named as in nanoGPT and are the fields of minisparse.model.GPTConfig and
minisparse.train.TrainConfig, one to one, with their help (minisparse/flags.py);
`--key value` and `--key=value` both work. `python train_tiny.py --help` lists them all.
Examples:
    python train_tiny.py                                   # Q-Sparse at 50%, the README's main job
    python train_tiny.py --sparsity 0 --out_dir out-dense  # the dense baseline
    python train_tiny.py --nm 16:32                        # Block Q-Sparse, 16 kept of every 32
    python train_tiny.py --resume                          # continue an interrupted run
    python train_tiny.py --reference --max_iters 5         # the readable ops only, to step through
    python train_tiny.py --init_from smollm2 --sparsity 0.5 --out_dir out-smollm2   # Q-Sparse a real LLM
"""

import argparse
import sys

from minisparse.errors import UsageError
from minisparse.flags import add_flags
from minisparse.model import GPTConfig
from minisparse.train import TrainConfig, TrainingDiverged, train


def build_parser():
    p = argparse.ArgumentParser(description="Train a tiny Q-Sparse GPT (minisparse).")
    add_flags(p.add_argument_group("model (GPTConfig)"), GPTConfig)
    add_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig, skip=("model",))
    return p


def main(argv=None):
    given = vars(build_parser().parse_args(argv))       # only the flags the user typed
    try:
        s = train(TrainConfig.from_flags(given), given=set(given))
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
