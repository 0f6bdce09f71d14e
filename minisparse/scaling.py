"""The Q-Sparse scaling law, its fit, and the inference-optimal sparsity (paper Sec. 3, Eq. 15-23).

    L(N, S) = E + A(S) / N^alpha,     A(S) = B + C * exp(beta / (1 - S))          (Eq. 15, 16)

N is the number of projection weights (model.count_params), S the top-K sparsity, L the
validation loss. Every term is positive, so the law is fitted in log space for positivity:
theta = (log E, log B, log C, alpha, beta), minimising (as the paper does, after Chinchilla)

    sum_i Huber_delta( log L(N_i, S_i; theta) - log L_i ),   delta = 1e-3

with L-BFGS from every point of a grid of starts, keeping the best.

For a fixed inference budget of N_a = N (1 - S) activated parameters per token:

    L(N_a, S) = E + A(S) * ((1 - S) / N_a)^alpha                                 (Eq. 23)

whose minimum over S does not depend on N_a. Setting d/dS log(A(S) (1 - S)^alpha) = 0
with u = beta / (1 - S) gives

    C e^u (u - alpha) = alpha B,

increasing in u for u > alpha, so S* = 1 - beta / u* is found by bisection. With B = 0 it
is exactly S* = 1 - beta / alpha. Paper (rounded): E 1.86, B 0.01, C 1.89, alpha 0.10,
beta 0.05, and a reported S* of 45.58% (the rounded constants give about 50%).
"""

import itertools
import math

import numpy as np

PAPER = {"E": 1.86, "B": 0.01, "C": 1.89, "alpha": 0.10, "beta": 0.05}
PAPER_S_STAR = 0.4558
NAMES = ("E", "B", "C", "alpha", "beta")


def law(N, S, E, B, C, alpha, beta):
    """Eq. 15-16: predicted loss for N projection weights at sparsity S (arrays broadcast)."""
    N, S = np.asarray(N, dtype=np.float64), np.asarray(S, dtype=np.float64)
    return E + (B + C * np.exp(beta / (1.0 - S))) / N ** alpha


def law_at_budget(N_a, S, E, B, C, alpha, beta):
    """Eq. 23: predicted loss for N_a activated parameters at sparsity S (so N = N_a / (1 - S))."""
    S = np.asarray(S, dtype=np.float64)
    return law(np.asarray(N_a, dtype=np.float64) / (1.0 - S), S, E, B, C, alpha, beta)


def optimal_sparsity(E, B, C, alpha, beta, tol=1e-12):
    """S* minimising Eq. 23 for any N_a: solve C e^u (u - alpha) = alpha B for u > alpha."""
    if beta <= 0:                      # sparsity never costs loss: the optimum runs to S -> 1
        return 1.0
    g = lambda u: C * math.exp(u) * (u - alpha) - alpha * B
    lo, hi = alpha, alpha + 1.0        # g(alpha) = -alpha B <= 0, and g grows for u > alpha - 1
    while g(hi) < 0:
        hi *= 2.0
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if g(mid) < 0 else (lo, mid)
    u_star = 0.5 * (lo + hi)
    return max(0.0, 1.0 - beta / u_star)   # u* <= beta would mean S* <= 0: dense is optimal


# ----------------------------------------------------------------------------------------
# fitting


def _huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta, logN, S, logL, delta):
    """sum Huber(log L_hat - log L) and its gradient w.r.t. theta = (log E, log B, log C, alpha, beta)."""
    e, b, c, alpha, beta = theta
    E, B, C = np.exp(e), np.exp(b), np.exp(c)
    inv_na = np.exp(-alpha * logN)                   # 1 / N^alpha
    growth = C * np.exp(beta / (1.0 - S))            # C exp(beta / (1 - S))
    A = B + growth
    pred = E + A * inv_na
    r = np.log(pred) - logL
    dr = np.clip(r, -delta, delta) / pred            # Huber'(r) * d log(pred) / d pred
    grad = np.array([
        np.sum(dr * E),                              # d pred / d log E = E
        np.sum(dr * B * inv_na),                     # d pred / d log B = B / N^alpha
        np.sum(dr * growth * inv_na),                # d pred / d log C
        np.sum(dr * -A * logN * inv_na),             # d pred / d alpha
        np.sum(dr * growth / (1.0 - S) * inv_na),    # d pred / d beta
    ])
    value = float(np.sum(_huber(r, delta)))
    return (value, grad) if math.isfinite(value) else (math.inf, grad)   # a step too far: the line search halves it


def lbfgs(f, x0, iters=2000, memory=10, gtol=1e-12, ftol=1e-13):
    """Minimise f(x) -> (value, gradient) with L-BFGS and a backtracking (Armijo) line search."""
    x = np.array(x0, dtype=np.float64)
    fx, g = f(x)
    s_hist, y_hist = [], []
    for _ in range(iters):
        if not np.all(np.isfinite(g)) or np.max(np.abs(g)) < gtol:
            break
        # two-loop recursion: d = -H g
        q, alphas = g.copy(), []
        for s, y in reversed(list(zip(s_hist, y_hist))):
            a = s @ q / (y @ s)
            alphas.append(a)
            q -= a * y
        if s_hist:
            q *= (s_hist[-1] @ y_hist[-1]) / (y_hist[-1] @ y_hist[-1])
        for (s, y), a in zip(zip(s_hist, y_hist), reversed(alphas)):
            q += s * (a - (y @ q) / (y @ s))
        d = -q
        if g @ d >= 0:                               # not a descent direction: restart from -g
            d, s_hist, y_hist = -g, [], []
        step, accepted = 1.0, False
        for _ in range(60):
            x_new = x + step * d
            f_new, g_new = f(x_new)
            if math.isfinite(f_new) and f_new <= fx + 1e-4 * step * (g @ d):
                accepted = True
                break
            step *= 0.5
        if not accepted:
            break
        s, y = x_new - x, g_new - g
        if s @ y > 1e-300:
            s_hist.append(s)
            y_hist.append(y)
            if len(s_hist) > memory:
                s_hist.pop(0)
                y_hist.pop(0)
        converged = fx - f_new <= ftol * abs(fx) + 1e-300
        x, fx, g = x_new, f_new, g_new
        if converged:
            break
    return x, fx


def default_starts():
    """The grid of starting points: (E, B, C, alpha, beta)."""
    return list(itertools.product((0.5, 2.0), (0.01, 0.3), (0.5, 4.0),
                                  (0.05, 0.2, 0.5), (0.01, 0.1, 0.5)))


def fit_law(N, S, L, delta=1e-3, starts=None):
    """Fit Eq. 15-16 to runs (N_i, S_i, L_i). Returns {"E", "B", "C", "alpha", "beta", "objective"}."""
    N, S, L = (np.asarray(a, dtype=np.float64) for a in (N, S, L))
    if not (N.shape == S.shape == L.shape) or N.size < len(NAMES):
        raise ValueError(f"fit_law needs at least {len(NAMES)} runs of equal-length N, S, L; got {N.size}.")
    logN, logL = np.log(N), np.log(L)

    def f(th):
        with np.errstate(all="ignore"):      # far-off trial steps overflow; they come back as inf
            return _objective(th, logN, S, logL, delta)

    best = None
    for E0, B0, C0, a0, b0 in (starts or default_starts()):
        x, fx = lbfgs(f, [math.log(E0), math.log(B0), math.log(C0), a0, b0])
        if math.isfinite(fx) and (best is None or fx < best[1]):
            best = (x, fx)
    e, b, c, alpha, beta = best[0]
    return {"E": math.exp(e), "B": math.exp(b), "C": math.exp(c), "alpha": float(alpha),
            "beta": float(beta), "objective": best[1]}
