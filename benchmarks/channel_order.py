"""How much a channel order can lengthen top-K's runs of selected rows on SmolLM2-135M, and why no
more: the statistics of which channels a token keeps, layer by layer (minisparse/channel_order.py).

    env -u OPENBLAS_CORETYPE python benchmarks/channel_order.py [--sparsity 0.5] [--windows 8] [--block 256]

The selections are recorded by the reference model on the built-in pydoc corpus: --windows windows of
--block tokens from its start choose the orders, as many from its middle measure them. Per layer and
site, on the measuring text:
  - kept: how often each channel is kept, its 5%, 50% and 95% quantiles over the channels: a channel
    kept nearly always or nearly never can sit in a long stretch, one kept half the time cannot;
  - |corr|: the mean absolute correlation between two channels' kept indicators, over all pairs: the
    co-selection a clever order could exploit (0: independent);
  - runs a token starts: as stored; with the channels sorted by how often they are kept; in the order
    reorder.py chooses (the greedy chain, channel_order.calibrate, which must share one residual order
    across every layer's qkv and up_gate sites); and, for scale, what independent channels with these
    frequencies would start in the frequency-sorted order, sum_i p_i (1 - p_{i-1}).
Then the totals over the layers, the bytes a run reads (the kept rows' bytes over the runs), and the
runs a random order would give (about D p (1 - p) a site).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from minisparse import channel_order as co  # noqa: E402
from minisparse import pretrained  # noqa: E402
from minisparse.data import load_text  # noqa: E402
from minisparse.model import SITES, site_dims  # noqa: E402


def mean_abs_corr(m):
    f = m.astype(np.float64)
    sd = f.std(axis=0)
    ok = sd > 0
    c = np.corrcoef(f[:, ok].T)
    return float(np.abs(c[~np.eye(len(c), dtype=bool)]).mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--block", type=int, default=256)
    a = p.parse_args()
    t0 = time.perf_counter()
    params, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=a.block)
    print("machine:", describe())
    print("command: python benchmarks/channel_order.py " + " ".join(sys.argv[1:]))
    ids = np.asarray(tok.encode(load_text("pydoc")), dtype=np.int64)
    n = a.windows * a.block
    calib = ids[:n].reshape(a.windows, a.block)
    held = ids[len(ids) // 2:len(ids) // 2 + n].reshape(a.windows, a.block)
    spec = cfg.spec_at(a.sparsity)
    kept_c = co.selections(params, cfg, calib, spec)
    kept_h = co.selections(params, cfg, held, spec)
    order = co.calibrate(kept_c, cfg)
    print(f"SmolLM2-135M, top-K {a.sparsity}; {n:,} pydoc tokens choose the orders, {n:,} others measure them "
          f"({time.perf_counter() - t0:.0f} s)")
    hs, groups = cfg.n_embd // cfg.n_head, cfg.n_head // cfg.n_kv_head
    totals = {s: np.zeros(5) for s in SITES}
    print(f"{'layer':>5} {'site':8s} {'kept 5/50/95%':>16s} {'|corr|':>7s} | runs a token: {'stored':>7s} "
          f"{'by freq':>8s} {'chosen':>7s} {'indep.':>7s}")
    for l in range(cfg.n_layer):
        for site in SITES:
            m = kept_h[l, site]
            freq = m.mean(axis=0)
            if site == "o":       # the value order moves channels within a head only: runs counted per head
                pieces = [m[:, h * hs:(h + 1) * hs] for h in range(cfg.n_head)]
                by_freq = np.concatenate([h * hs + np.argsort(-sum(kept_c[l, "o"][:, k * hs:(k + 1) * hs].mean(0)
                                                                   for k in range(cfg.n_head) if k // groups == h // groups),
                                                              kind="stable") for h in range(cfg.n_head)])
            else:
                pieces = [m]
                by_freq = np.argsort(-(sum(kept_c[ll, s].mean(0) for ll in range(cfg.n_layer)
                                           for s in ("qkv", "up_gate")) if site in ("qkv", "up_gate")
                                       else kept_c[l, site].mean(0)), kind="stable")
            chosen = co.site_orders(order, cfg, l)[site]
            pf = freq[by_freq]
            indep = pf[0] + float(np.sum(pf[1:] * (1 - pf[:-1])))
            row = np.array([co.runs(m), co.runs(m[:, by_freq]), co.runs(m[:, chosen]), indep,
                            float(np.mean([mean_abs_corr(x) for x in pieces]))])
            totals[site] += row
            if l in (0, 1, 2, 7, 15, 22, 28, 29) or l % 5 == 4:
                q = np.quantile(freq, [0.05, 0.5, 0.95])
                print(f"{l:5d} {site:8s} {q[0]:5.2f}/{q[1]:4.2f}/{q[2]:4.2f} {row[4]:7.3f} | {'':13s} "
                      f"{row[0]:7.1f} {row[1]:8.1f} {row[2]:7.1f} {row[3]:7.1f}")
    print("(layers not shown are counted in the totals)")
    print(f"\n{'site':8s} {'rows':>7s} {'stored':>8s} {'by freq':>8s} {'chosen':>8s} {'indep.':>8s} {'random':>8s} "
          f"{'chosen/stored':>14s} {'KB a run stored':>16s} {'chosen':>7s} {'mean |corr|':>12s}")
    all_ = np.zeros(5)
    rows_all = random_all = 0.0
    for site in SITES:
        D, O = site_dims(cfg)[site]
        rows = sum(kept_h[l, site].sum(axis=1).mean() for l in range(cfg.n_layer))
        pk = rows / (D * cfg.n_layer)
        random = cfg.n_layer * D * pk * (1 - pk)
        t = totals[site]
        kb = rows * O * 4 / 1024
        print(f"{site:8s} {rows:7,.0f} {t[0]:8,.0f} {t[1]:8,.0f} {t[2]:8,.0f} {t[3]:8,.0f} {random:8,.0f} "
              f"{t[2] / t[0]:14.3f} {kb / t[0]:16.1f} {kb / t[2]:7.1f} {t[4] / cfg.n_layer:12.3f}")
        all_ += t
        rows_all += rows
        random_all += random
    print(f"{'all':8s} {rows_all:7,.0f} {all_[0]:8,.0f} {all_[1]:8,.0f} {all_[2]:8,.0f} {all_[3]:8,.0f} "
          f"{random_all:8,.0f} {all_[2] / all_[0]:14.3f}")


if __name__ == "__main__":
    main()
