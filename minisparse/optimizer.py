"""AdamW (Loshchilov and Hutter 2019) and global gradient-norm clipping.

For each parameter p with gradient g, at step t = 1, 2, ...:

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g^2
    m_hat = m / (1 - beta1^t),   v_hat = v / (1 - beta2^t)
    p = p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)      (decoupled weight decay)

Weight decay is applied to weight matrices only, not to the norm gains (model.is_norm).
The paper trains with betas (0.9, 0.95) and weight decay 0.1 (Sec. 4.1).

Clipping scales every gradient by min(1, max_norm / ||g||), ||g|| over all parameters.
"""

import math

from .backend import array_module
from .model import is_norm


class AdamW:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        xp = array_module(next(iter(params.values())))
        self.m = {k: xp.zeros_like(p) for k, p in params.items()}
        self.v = {k: xp.zeros_like(p) for k, p in params.items()}

    def step(self, params, grads, lr=None):
        """Update `params` in place from `grads`; `lr` overrides the stored rate (for a schedule)."""
        lr = self.lr if lr is None else lr
        self.t += 1
        for k in params:
            self.update(k, params[k], grads[k], lr)

    def update(self, k, p, g, lr):
        """One parameter's step t (self.t, already counted): p, m and v in place."""
        b1, b2 = self.betas
        c1 = 1.0 - b1 ** self.t                                 # bias corrections
        c2 = 1.0 - b2 ** self.t
        m, v = self.m[k], self.v[k]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        if self.weight_decay and not is_norm(k):
            p -= (lr * self.weight_decay) * p                   # decoupled: not through m and v
        p -= (lr / c1) * m / (array_module(v).sqrt(v / c2) + self.eps)

    def state_dict(self):
        """Arrays and scalars to save with a checkpoint."""
        return {"t": self.t, "m": self.m, "v": self.v}

    def load_state_dict(self, state):
        self.t = int(state["t"])
        for k in self.m:
            self.m[k][...] = state["m"][k]
            self.v[k][...] = state["v"][k]


def grad_norm(grads):
    """The global L2 norm of all gradients, a Python float."""
    return math.sqrt(sum(float(array_module(g).vdot(g, g)) for g in grads.values()))   # vdot: g.g, no g*g array


def clip_grad_norm(grads, max_norm):
    """Scale all gradients in place so their global norm is at most max_norm; returns the norm before."""
    norm = grad_norm(grads)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            g *= scale
    return norm
