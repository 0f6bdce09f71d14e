"""Train a tiny Q-Sparse GPT on a laptop CPU: `python train_tiny.py` (no download, no flag needed).

Flags are named as in nanoGPT and are the fields of minisparse.config.GPTConfig and
minisparse.run.TrainConfig, one to one, with their help (minisparse/flags.py);
`--key value` and `--key=value` both work. `python train_tiny.py --help` lists them all.
Examples:
    python train_tiny.py                                   # Q-Sparse at 50%, the README's main job
    python train_tiny.py --sparsity 0 --out_dir out-dense  # the dense baseline
    python train_tiny.py --nm 16:32                        # Block Q-Sparse, 16 kept of every 32
    python train_tiny.py --resume                          # continue an interrupted run
    python train_tiny.py --debug                           # 5 steps of the readable ops, in out-debug/,
                                                           # to step through in pdb (see below)
    python train_tiny.py --init_from smollm2 --sparsity 0.5 --out_dir out-smollm2   # Q-Sparse a real LLM

--debug is a preset (minisparse/run.py, DEBUG_PRESET): --reference, --threads 1, --max_iters 5,
--eval_iters 2, --no_eval_at_start, --no_bar and --out_dir out-debug, each overridden by a flag
given with it. Its first forward is the training step's, so a breakpoint in topk_mask stops there:
    python -m pdb -c "b minisparse/topk.py:39" -c c train_tiny.py --debug     # 39: topk_mask's first line
"""

import argparse
import sys

from minisparse.config import GPTConfig
from minisparse.errors import UsageError
from minisparse.flags import add_flags
from minisparse.run import TrainConfig, with_presets
from minisparse.train import TrainingDiverged, train


def build_parser():
    p = argparse.ArgumentParser(description="Train a tiny Q-Sparse GPT (minisparse).")
    add_flags(p.add_argument_group("model (GPTConfig)"), GPTConfig)
    add_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig, skip=("model",))
    return p


def main(argv=None):
    given = with_presets(vars(build_parser().parse_args(argv)))    # only the flags typed, and --debug's
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
