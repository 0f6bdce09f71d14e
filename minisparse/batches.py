"""Where a training run's batches come from: pretraining text or finetuning examples, one interface.

    batches.next(it)                    x, y (B, T) int64: the batch of step `it`, y the next token
                                        of each x, or loss.IGNORE where a target is not counted
    batches.state()                     what the checkpoint records, so that a resumed run draws
                                        the batches of one that never stopped
    batches.estimate(params, cfg, it, engine)
                                        {"train": loss, "val": loss, "train_sparsity": {site: zeros},
                                         "val_sparsity": {...}}: the held-out estimate at iteration `it`
    batches.describe(max_iters)         one line for the log
    batches.logged                      the step's counts that its metrics.jsonl line adds

TextBatches: windows of the token stream at random starts (data.get_batch), from one generator
seeded by --seed; its state is the checkpoint's "rng". Its estimate draws eval_iters batches of
each split from a generator seeded by (seed, it, split), so it depends on nothing but the iteration,
and runs them through the engine's forward (train.choose_engine).

SFTBatches: rows of prompt + response (sft.py), padded, the loss on the response only. The batch
of step `it` depends on `it` alone (sft.batch_at), so nothing is drawn from its generator; the
checkpoint records that generator's state as for text. Its estimate scores the first
eval_iters * batch_size examples of each split, evenly spaced (the sets list their kinds one after
another), every counted token weighing the same, whole batches at a time on this thread
(sft.response_scores with the engine's ops).
"""

from functools import partial

import numpy as np

from . import backend, model, sft
from .data import get_batch
from .fast import parallel


class TextBatches:
    """Pretraining: random windows of block_size tokens of the training split."""
    logged = ()

    def __init__(self, train_ids, val_ids, block_size, batch_size, seed, eval_iters, rng_state=None):
        self.data = {"train": train_ids, "val": val_ids}
        self.block_size, self.batch_size, self.seed, self.eval_iters = block_size, batch_size, seed, eval_iters
        self.rng = np.random.default_rng(seed)
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state

    def next(self, it):
        return get_batch(self.data["train"], self.block_size, self.batch_size, self.rng)

    def state(self):
        return self.rng.bit_generator.state

    def estimate(self, params, cfg, it, engine):
        return text_estimate(engine.forward_loss, params, cfg, self.data, it, self.seed, self.eval_iters,
                             self.batch_size)

    def describe(self, max_iters):
        return f"train {len(self.data['train']):,} tokens, val {len(self.data['val']):,}"


class SFTBatches:
    """Finetuning: the examples of the set `name` (sft.Encoded), the held-out ones as "val"."""
    logged = ("tokens", "response_tokens")           # rows differ in length and in counted targets

    def __init__(self, train, val, name, batch_size, seed, eval_iters, rng_state=None):
        self.data = {"train": train, "val": val}
        self.name, self.batch_size, self.seed, self.eval_iters = name, batch_size, seed, eval_iters
        self.rng = np.random.default_rng(seed)      # never drawn from: the checkpoint's "rng"
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state

    def next(self, it):
        return sft.batch_at(self.data["train"], it, self.batch_size, self.seed)

    def state(self):
        return self.rng.bit_generator.state

    def estimate(self, params, cfg, it, engine):
        out = {}
        n_examples = self.eval_iters * self.batch_size
        for split, encoded in self.data.items():
            spread = encoded[::max(1, len(encoded) // n_examples)][:n_examples]
            out[split], out[split + "_sparsity"] = sft.response_scores(params, cfg, spread, self.batch_size,
                                                                       engine.ops)
        return out

    def describe(self, max_iters):
        n = len(self.data["train"])
        return (f"SFT set {self.name!r}: {n:,} training examples, {len(self.data['val']):,} held out; "
                f"{max_iters} steps = {max_iters * self.batch_size / n:.2f} epochs")


def text_estimate(forward_loss, params, cfg, data, it, seed, eval_iters, batch_size):
    """Mean loss over eval_iters batches of each split of `data` ({split: token ids}), drawn from a
    generator seeded by (seed, it), and the sparsity measured on them: {"train": loss, "val": loss,
    "train_sparsity": {site: zeros}, ...}. forward_loss: (params, cfg, x, y) -> (loss, per_layer)."""
    out = {}
    for split, ids in data.items():
        rng = np.random.default_rng([seed, it, 0 if split == "train" else 1])
        losses, zeros = [], {site: 0.0 for site in model.SITES}
        for _ in range(eval_iters):
            x, y = get_batch(ids, cfg.block_size, batch_size, rng)
            loss, per_layer = forward_loss(params, cfg, backend.asarray(x), backend.asarray(y))
            losses.append(loss)
            for site, frac in model.average_over_layers(per_layer).items():
                zeros[site] += frac / eval_iters
        out[split] = sum(losses) / len(losses)
        out[split + "_sparsity"] = zeros
    return out


def estimate_loss(params, cfg, data, tc, it, ops=model.REFERENCE, threads=None, workers=None):
    """text_estimate with tc's seed, eval_iters and batch_size and the forward the arguments name:
    threads None, the readable model.forward_loss; a count, fast/parallel.py's forward, which keeps no
    caches and splits the batch over that many threads; workers, the same forward with the parts in
    worker processes (fast/workers.py). All give the same numbers (tests/test_parallel.py)."""
    if workers is not None:
        forward_loss = partial(workers.forward_loss, ops=ops)
    elif threads is None:
        forward_loss = partial(model.forward_loss, ops=ops)
    else:
        forward_loss = partial(parallel.forward_loss, ops=ops, threads=threads)
    return text_estimate(forward_loss, params, cfg, data, it, tc.seed, tc.eval_iters, tc.batch_size)
