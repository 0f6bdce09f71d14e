"""The learning-rate schedule: linear warmup, then cosine decay to a floor (as in nanoGPT).

    lr(it) = lr_max * (it + 1) / (warmup + 1)                           it < warmup
    lr(it) = lr_min + (lr_max - lr_min) * (1 + cos(pi * r)) / 2,         r = (it - warmup) / (decay - warmup)
    lr(it) = lr_min                                                      it >= decay
"""

import math


def lr_at(it, lr_max, lr_min, warmup_iters, decay_iters):
    if it < warmup_iters:
        return lr_max * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return lr_min
    r = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * r)) * (lr_max - lr_min)
