"""A non-uniform sparsity at the same N_a: sparsify the layers or sites that cost least.

Each group of (layer, site) that shares one sparsity (units) gets a sensitivity curve on a
calibration set: the mean loss with that group alone sparsified at each level of LEVELS, the
rest dense. `allocate` starts dense and raises, one step at a time, the group whose next level
costs the least loss per weight saved, until N_a reaches the target:

    ratio(g, s) = (loss_g(s) - loss_g(s_now)) / (weights saved by s - weights saved by s_now)

It assumes the groups' losses add, each curve having been measured with the others dense;
evaluate.py (the program) checks the result on held-out windows against the uniform plan of the
same N_a (evaluate.py's measurements: minisparse/evaluate.py).
"""

import numpy as np

from . import model
from .errors import UsageError
from .evaluate import Plan, log_softmax, nominal_na, plan_forward, uniform, windows_per_forward
from .model import SITES
from .topk import kept_count

LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def units(cfg, by):
    """Groups of (layer, site) that share one sparsity: by 'layer', 'site' or 'layer_site'."""
    L = range(cfg.n_layer)
    if by == "layer":
        return {f"layer {l}": [(l, s) for s in SITES] for l in L}
    if by == "site":
        return {s: [(l, s) for l in L] for s in SITES}
    if by == "layer_site":
        return {f"{l}.{s}": [(l, s)] for l in L for s in SITES}
    raise UsageError(f"--allocate {by!r} is not known: use 'layer', 'site' or 'layer_site'.")


def sensitivity(params, cfg, x, y, groups, ops, levels=LEVELS, progress=None):
    """Mean calibration loss with one group sparsified at each level and the rest dense:
    {group: {level: loss}}, and the dense loss."""
    dense = uniform(cfg)
    base = float(score_loss(params, cfg, x, y, dense, ops))
    curves = {}
    for g, members in groups.items():
        curves[g] = {}
        for s in levels:
            specs = dict(dense.specs)
            specs.update({m: cfg.spec_at(s) for m in members})
            curves[g][s] = float(score_loss(params, cfg, x, y, Plan(specs, g), ops))
            if progress is not None:
                progress(1)
    return curves, base


def score_loss(params, cfg, x, y, plan, ops, batch=None):
    """Mean next-token loss of one plan on the windows (no dense comparison)."""
    W, T = x.shape
    batch = batch or windows_per_forward(W, T, cfg.vocab_size)
    total = 0.0
    for s in range(0, W, batch):
        lp = log_softmax(plan_forward(params, cfg, x[s:s + batch], plan, ops))
        total += -np.take_along_axis(lp, y[s:s + batch][..., None], axis=-1).sum()
    return total / x.size


def allocate(cfg, groups, curves, base, target_na, levels=LEVELS):
    """Greedy: start dense; repeatedly raise the one group whose next step costs the least loss per
    weight saved, until N_a <= target_na. Assumes the groups' losses add (each curve was measured with
    the others dense), which the held-out comparison then checks. -> Plan."""
    dims = model.site_dims(cfg)

    def saved(members, s):
        return sum((dims[site][0] - kept_count(dims[site][0], s)) * dims[site][1] for (_, site) in members)

    level = {g: 0.0 for g in groups}
    cost = {g: {0.0: base, **curves[g]} for g in groups}
    na = nominal_na(cfg, uniform(cfg))                  # dense
    while na > target_na:
        best = None
        for g, members in groups.items():
            for s in levels:
                if s <= level[g]:
                    continue
                gain = saved(members, s) - saved(members, level[g])
                if gain <= 0:
                    continue
                ratio = (cost[g][s] - cost[g][level[g]]) / gain
                if best is None or ratio < best[0]:
                    best = (ratio, g, s, gain)
        if best is None:
            break                                    # every group at the highest level
        _, g, s, gain = best
        level[g] = s
        na -= gain
    specs = {m: cfg.spec_at(level[g]) for g, members in groups.items() for m in members}
    return Plan(specs, "allocated"), level
