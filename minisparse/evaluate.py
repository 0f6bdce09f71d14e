"""Measure a model on your own text before trusting a sparsity: quality against dense, with error bars.

The paper's deployment advice is a rollout: measure the saving and the quality on the
deployment's own data, tune the sparsity to it, compare sparse against dense before trusting
it, and keep a dense fallback. This file holds the measurements; evaluate.py (the program)
prints and saves them. Every sparse setting is scored on the same W windows of T tokens as
dense, so each comparison is paired:

    loss[w, t]   = -log p_S(y[w, t] | x[w, :t+1])                 per token, (W, T)
    ppl          = exp(mean loss)
    d_ppl        = exp(mean(loss_S - loss_dense)) - 1             the relative perplexity change
    kl[w, t]     = sum_v p_dense(v) (log p_dense(v) - log p_S(v)) KL(dense || sparse), nats
    agree[w, t]  = argmax p_S == argmax p_dense                   top-1 next-token agreement

Error bars come from a bootstrap over windows: the windows are resampled with replacement
(all settings with the same draw, so a difference keeps its pairing) and the 2.5 and 97.5
percentiles of the statistic are the 95% interval. Tokens within a window are not
independent; windows, far apart in the text, nearly are.

A sparsity setting is a Plan: one SparseSpec per (layer, site). A uniform plan applies one
sparsity everywhere (the programs' --sparsity); allocation.py builds a non-uniform one from
sensitivity curves measured on a calibration set, and `fallback_thresholds` calibrates the
prompt-loss rule of generate.py --fallback auto.
"""

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np

from . import backend, model
from .backend import to_numpy
from .errors import UsageError
from .linear import sparse_linear_forward, zero_fraction
from .model import SITE_WEIGHTS, SITES
from .fast import FAST
from .fast.decode import decode_weights
from .pretrained import is_pretrained_source
from .sampling import generate

BOOTSTRAP = 2000                  # resamples: the interval's ends move by well under its width


# ----------------------------------------------------------------------------------------
# plans: a SparseSpec per (layer, site)

@dataclass(frozen=True)
class Plan:
    """The sparsity of every projection site of every layer: specs[(l, site)] -> SparseSpec."""
    specs: dict
    label: str

    def spec(self, l, site):
        return self.specs[(l, site)]

    @property
    def dense(self):
        return all(s.dense for s in self.specs.values())

    def to_dict(self):
        """{"l.site": sparsity}: the JSON form evaluate.py writes and generate.py --sparsity_plan reads."""
        return {f"{l}.{site}": s.sparsity for (l, site), s in self.specs.items()}

    @classmethod
    def from_dict(cls, d, cfg, label="plan"):
        want = {f"{l}.{site}" for l in range(cfg.n_layer) for site in SITES}
        if not isinstance(d, dict) or set(d) != want or not all(
                isinstance(v, (int, float)) and 0 <= v < 1 for v in d.values()):
            raise UsageError(f"the sparsity plan does not fit this model: it needs a sparsity in [0, 1) for each "
                             f"of the {len(want)} sites 'layer.site' of its {cfg.n_layer} layers.")
        return cls({(int(k.split(".")[0]), k.split(".")[1]): cfg.spec_at(float(v)) for k, v in d.items()}, label)


def plan_from_report(path, cfg):
    """The allocated plan of an evaluate.py --allocate report -> Plan."""
    try:
        with open(path) as f:
            d = json.load(f)["allocation"]["sparsity"]
    except FileNotFoundError:
        raise UsageError(f"--sparsity_plan {path!r} does not exist: run evaluate.py --allocate first.") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--sparsity_plan {path!r} is not an evaluate.py --allocate report "
                         f"({type(e).__name__}: {e}).") from None
    return Plan.from_dict(d, cfg, f"sparsity plan {path}")


def uniform(cfg, sparsity=0.0, nm=None, label=None):
    """One sparsity (or N:M) at every site: what --sparsity / --nm give. The setting is checked
    against the model as GPTConfig checks it (one sentence for, say, an N:M that does not divide C)."""
    spec = replace(cfg, sparsity=sparsity, nm=nm).spec
    if label is None:
        label = "dense" if spec.dense else (f"{nm[0]}:{nm[1]}" if nm else f"S={sparsity:g}")
    return Plan({(l, s): spec for l in range(cfg.n_layer) for s in SITES}, label)


def nominal_na(cfg, plan):
    """N_a of a plan, nominal: for every projection, the inputs kept by its spec times its outputs."""
    dims = model.site_dims(cfg)
    total = 0
    for (l, site), spec in plan.specs.items():
        D, O = dims[site]
        total += spec.kept(D) * O
    return total


def measured_na(cfg, zeros):
    """N_a from the measured zero fraction at each (layer, site) (natural zeros counted too)."""
    return model.activated_params(cfg, {l: {site: zeros[l, site] for site in SITES} for l in range(cfg.n_layer)})


# ----------------------------------------------------------------------------------------
# scoring

def windows(ids, T, max_windows=None):
    """Non-overlapping windows of T + 1 tokens -> x, y (W, T); at most max_windows, evenly spread."""
    ids = np.asarray(ids, dtype=np.int64)
    starts = np.arange(0, len(ids) - T, T)
    if len(starts) == 0:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than one window of {T + 1}: "
                         "give a longer text or a smaller --block.")
    if max_windows is not None and len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).astype(int)]
    offsets = starts[:, None] + np.arange(T)[None, :]                   # (W, T)
    return ids[offsets], ids[offsets + 1]


def log_softmax(logits):
    """(..., V) -> log p (..., V), float64: KL sums V terms, float32 would lose the small ones."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return z


def plan_forward(params, cfg, idx, plan, ops, zeros=None):
    """Logits (B, T, V) of the model with each site sparsified as the plan says.
    zeros: a dict (l, site) -> [sum of zero fractions * tokens, tokens], accumulated when given."""
    n = idx.shape[0] * idx.shape[1]

    def project(l, site, x):
        ys, c = sparse_linear_forward(x, [params[f"h.{l}.{w}"] for w in SITE_WEIGHTS[site]],
                                      plan.spec(l, site), ops.sparsify)
        if zeros is not None:
            acc = zeros.setdefault((l, site), [0.0, 0])
            acc[0] += zero_fraction(c) * n
            acc[1] += n
        return ys

    return to_numpy(model.forward(params, cfg, backend.asarray(idx), ops=ops, project=project)[0])


@dataclass
class Scores:
    """Per-token measurements of one plan on the W x T windows, and its measured sparsity."""
    plan: Plan
    loss: np.ndarray           # (W, T) nats
    kl: np.ndarray             # (W, T) KL(dense || this), nats; zeros for dense itself
    agree: np.ndarray          # (W, T) bool, top-1 equal to dense's
    zeros: dict                # (l, site) -> measured zero fraction of the projection inputs


def windows_per_forward(W, T, V):
    """Windows scored in one forward: about 8M logits at a time, at least one."""
    return max(1, min(W, (8 << 20) // (T * V)))


def score(params, cfg, x, y, plans, ops=model.REFERENCE, batch=None, progress=None):
    """Score every plan on the same windows, against the dense model -> {label: Scores}.
    The dense plan is scored once whether or not it is listed; batch: windows per forward
    (default: about 8M logits at a time). progress: a callable(n) told of each window done."""
    W, T = x.shape
    batch = batch or windows_per_forward(W, T, cfg.vocab_size)
    dense = uniform(cfg)
    plans = [dense] + [p for p in plans if p.label != dense.label]
    out = {p.label: dict(loss=np.empty((W, T)), kl=np.zeros((W, T)), agree=np.ones((W, T), bool), zeros={})
           for p in plans}
    for s in range(0, W, batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        ref = None
        for p in plans:
            o = out[p.label]
            lp = log_softmax(plan_forward(params, cfg, xb, p, ops, o["zeros"]))      # (b, T, V)
            o["loss"][s:s + batch] = -np.take_along_axis(lp, yb[..., None], axis=-1)[..., 0]
            if ref is None:
                ref = lp                                                          # dense is first
                ref_top = lp.argmax(-1)
                ref_p = np.exp(lp)
            else:
                o["kl"][s:s + batch] = (ref_p * (ref - lp)).sum(-1)
                o["agree"][s:s + batch] = lp.argmax(-1) == ref_top
        if progress is not None:
            progress(len(xb))
    return {p.label: Scores(p, o["loss"], o["kl"], o["agree"],
                            {k: z / max(1, n) for k, (z, n) in o["zeros"].items()})
            for p, o in zip(plans, out.values())}


# ----------------------------------------------------------------------------------------
# error bars

def bootstrap_indices(W, n=BOOTSTRAP, seed=0):
    """(n, W) window indices drawn with replacement: one draw shared by every statistic."""
    return np.random.default_rng(seed).integers(0, W, size=(n, W))


def interval(per_window, stat, idx):
    """(point, lo, hi): stat of the per-window values, and its bootstrap 95% interval over windows.
    per_window: (W,) or (W, k); stat: a function of an array of the same kind (resampled rows)."""
    point = stat(per_window)
    draws = np.array([stat(per_window[i]) for i in idx])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return float(point), float(lo), float(hi)


def summarize(scores, cfg, idx):
    """One row per plan: perplexity and its change against dense, agreement, KL, N_a; intervals."""
    dense = scores["dense"]
    d_win = dense.loss.mean(axis=1)                                        # (W,)
    rows = []
    for label, s in scores.items():
        win = s.loss.mean(axis=1)
        ppl = interval(win, lambda a: math.exp(a.mean()), idx)
        dppl = interval(win - d_win, lambda a: math.expm1(a.mean()), idx)
        _, kl_lo, kl_hi = interval(s.kl.mean(axis=1), np.mean, idx)
        rows.append(dict(
            setting=label, ppl=ppl[0], ppl_lo=ppl[1], ppl_hi=ppl[2],
            d_ppl=dppl[0], d_ppl_lo=dppl[1], d_ppl_hi=dppl[2],
            agree=float(s.agree.mean()), kl=float(s.kl.mean()), kl_lo=kl_lo, kl_hi=kl_hi,
            na_nominal=nominal_na(cfg, s.plan), na_measured=measured_na(cfg, s.zeros),
            sparsity_by_site={site: float(np.mean([z for (l, st), z in s.zeros.items() if st == site]))
                              for site in SITES}))
    return rows


def paired_difference(loss_a, loss_b, idx):
    """B against A on the same windows: mean loss difference (nats/token) and relative perplexity
    change, each (point, lo, hi)."""
    d = loss_b.mean(axis=1) - loss_a.mean(axis=1)                        # (W,)
    return interval(d, np.mean, idx), interval(d, lambda a: math.expm1(a.mean()), idx)


# ----------------------------------------------------------------------------------------
# choosing a sparsity under a budget

def parse_budget(text):
    """'2%' -> ('ppl', 0.02): perplexity may rise 2%; 'kl=0.05' -> ('kl', 0.05): mean KL in nats."""
    t = str(text).strip()
    try:
        if t.endswith("%"):
            v = float(t[:-1]) / 100
            if v > 0 and math.isfinite(v):
                return "ppl", v
        elif t.lower().startswith("kl="):
            v = float(t[3:])
            if v > 0 and math.isfinite(v):
                return "kl", v
    except ValueError:
        pass
    raise UsageError(f"--budget {text!r} is not allowed: give a perplexity increase such as '2%' "
                     "or a mean KL(dense || sparse) in nats such as 'kl=0.05', above 0.")


def choose(rows, budget):
    """The sparsest uniform row whose interval's upper end stays within the budget, or None.
    The upper end, not the estimate: a setting 'within 2%' should be within 2% at 95% confidence."""
    kind, limit = budget
    key = "d_ppl_hi" if kind == "ppl" else "kl_hi"
    ok = [r for r in rows if r[key] <= limit]
    return max(ok, key=lambda r: (-r["na_nominal"], r["setting"])) if ok else None


# ----------------------------------------------------------------------------------------
# the fallback rule's calibration

PROMPT_LENGTHS = (8, 16, 32, 64, 128, 256)


def prompt_losses(loss, n):
    """The mean loss the prefill of an n-token prompt sees, per window: tokens 1..n-1 predicted
    from those before them (the window's first n - 1 targets). loss: (W, T) -> (W,)."""
    return loss[:, :n - 1].mean(axis=1)


def fallback_thresholds(loss, quantile):
    """{n: threshold} for prompt lengths n up to the window: the `quantile` of in-distribution
    prompts' mean loss. A prompt scoring above it is taken as unlike the calibration text."""
    T = loss.shape[1]
    return {n: float(np.quantile(prompt_losses(loss, n), quantile)) for n in PROMPT_LENGTHS if n <= T + 1}


def threshold_for(thresholds, n):
    """The calibrated threshold for a prompt of n tokens: that of the longest calibrated length <= n
    (the shortest one for shorter prompts), since a short prompt's mean loss is noisier."""
    by_length = {int(k): v for k, v in thresholds.items()}          # JSON keys are strings
    below = [k for k in sorted(by_length) if k <= n]
    k = below[-1] if below else min(by_length)
    return float(by_length[k]), k


class FallbackRule:
    """generate.py --fallback auto: decode dense when the prompt looks unlike the calibration text.

    The prefill under the sparse model already gives the prompt's logits; its mean next-token loss
    over the scored span is compared with the threshold evaluate.py calibrated for that sparsity and a
    prompt of that length (the `quantile` of in-distribution prompts). Above it, the prompt is taken as
    shifted and decoded dense."""

    def __init__(self, thresholds, quantile, setting):
        self.thresholds, self.quantile, self.setting = thresholds, quantile, setting

    @classmethod
    def from_report(cls, report_path, setting):
        """The rule for `setting` (a plan label such as 'S=0.5') from an evaluate.py report."""
        try:
            with open(report_path) as f:
                report = json.load(f)
            entry = report["fallback"]
        except FileNotFoundError:
            raise UsageError(f"--fallback auto needs the calibration {report_path!r}, which does not exist: "
                             "run evaluate.py on in-distribution text first (or give --calibration FILE).") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"--calibration {report_path!r} is not an evaluate.py report "
                             f"({type(e).__name__}: {e}).") from None
        if setting not in entry:
            raise UsageError(f"--calibration {report_path!r} has no thresholds for {setting}, only for "
                             f"{', '.join(entry) or 'none'}: run evaluate.py --sparsity with it.")
        return cls(entry[setting]["thresholds"], entry[setting]["quantile"], setting)

    def decide(self, logits, ids, span=None):
        """logits (T0, V), ids (T0,) of one prompt; span (start, stop): the positions to score (the
        user's text inside a chat template), default all. -> (dense?, loss, threshold, length)."""
        start, stop = span if span is not None else (0, len(ids))
        n = stop - start
        if n < 2:
            return False, float("nan"), float("nan"), n         # nothing is predicted from one token
        lp = log_softmax(to_numpy(logits)[start:stop - 1])
        loss = float(-np.take_along_axis(lp, np.asarray(ids[start + 1:stop])[:, None], axis=-1).mean())
        threshold, _ = threshold_for(self.thresholds, n)
        return loss > threshold, loss, threshold, n


def find_span(ids, part):
    """(start, stop) of the sub-sequence `part` in ids (the last occurrence), or None."""
    n = len(part)
    for s in range(len(ids) - n, -1, -1):
        if n and list(ids[s:s + n]) == list(part):
            return s, s + n
    return None


# ----------------------------------------------------------------------------------------
# where a report lives; decode speed

def default_report_dir(source):
    """Where evaluate.py writes, and generate.py --fallback auto reads, a model's report:
    RUN/eval for a run, eval-NAME in the current directory for a pretrained model."""
    if is_pretrained_source(source):
        return "eval-" + os.path.splitext(os.path.basename(str(source)))[0]
    return os.path.join(source, "eval")


def decode_speed(params, cfg, prompt, plans, n_tokens, rounds):
    """Decode tokens/s of each uniform plan, greedy, the plans taking turns: {label: median}. Each plan
    decodes as generate.py decodes it: dense too through the compiled step where that applies. The
    prompt's prefill takes more BLAS threads only where the process set generate.py's short
    OPENBLAS_THREAD_TIMEOUT before NumPy loaded (DecodeWeights.prefill); evaluate.py does not."""
    specs = [p.spec(0, "qkv") for p in plans]
    fast = decode_weights(params, cfg, next((s for s in specs if not s.dense), specs[0]))   # shared by all
    times = {p.label: [] for p in plans}
    for _ in range(rounds):
        for p in plans:
            spec = p.spec(0, "qkv")
            t0 = time.perf_counter()
            generate(params, cfg, prompt[None], n_tokens, 0.0, None, None, spec, None,
                     fast if fast is not None and fast.serves(spec) else None, None, FAST)
            times[p.label].append(n_tokens / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}
