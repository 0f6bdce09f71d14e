"""Softmax cross-entropy, the language-modelling loss, averaged over the counted tokens.

    p = softmax(logits)                         logits, p: (N, V),  targets: (N,)
    c[n] = 1 if targets[n] != IGNORE else 0     IGNORE = -1: a token that is not counted
    M = sum_n c[n]                              the counted tokens
    loss = -(1/M) sum_n c[n] log p[n, targets[n]]
         = (1/M) sum_n c[n] (logsumexp(logits[n]) - logits[n, targets[n]])

Backward:
    dlogits[n] = c[n] (p[n] - onehot(targets[n])) / M * dloss

Finetuning (sft.py) sets the targets of the prompt's tokens and of the padding to IGNORE, so
only the response is learned. Without any IGNORE target, M = N and this is the plain mean.
A batch in which nothing is counted (M = 0) has loss 0 and gradient 0 rather than 0 / 0: it
holds nothing to learn, and a NaN would stop the run.
"""

from .backend import array_module

IGNORE = -1


def cross_entropy_forward(logits, targets):
    xp = array_module(logits)
    N = logits.shape[0]
    counted = targets != IGNORE                                 # (N,) bool
    M = int(counted.sum())
    safe = xp.where(counted, targets, 0)                        # (N,) an ignored row reads column 0, then counts 0
    z = logits - logits.max(axis=-1, keepdims=True)             # (N, V) shift for stability
    z_target = z[xp.arange(N), safe]                            # (N,)
    # exp, then the normalisation, overwrite z in place: with a 49152-token vocabulary an
    # (N, V) array is 100 MB at N = 512, and this keeps one of them instead of three
    p = xp.exp(z, out=z)                                        # (N, V) exp(z)
    sumexp = p.sum(axis=-1, keepdims=True)                      # (N, 1)
    per_token = xp.log(sumexp[:, 0]) - z_target                 # (N,)
    loss = (per_token * counted).sum() / max(M, 1)              # 0-d; 0 when nothing is counted
    p /= sumexp                                                 # (N, V) softmax
    return loss, (p, safe, counted, M)


def cross_entropy_backward(dloss, cache):
    p, safe, counted, M = cache
    xp = array_module(p)
    N = p.shape[0]
    dlogits = p.copy()
    dlogits[xp.arange(N), safe] -= 1
    if M < N:                                                   # ignored rows get no gradient
        dlogits *= counted[:, None]
    dlogits *= dloss / max(M, 1)
    return dlogits
