"""Sampling text from the model: temperature, top-k filtering, and the decode loop.

    p = softmax(logits / temperature)            logits: (B, V)
    top_k: logits outside the k largest are set to -inf before the softmax
    temperature 0: greedy, argmax(logits)

The loop prefills the prompt into the key/value cache, then feeds one token at a time
(decode.py). When the context reaches block_size, the cache is rebuilt from the last
block_size // 2 tokens (a sliding window), so generation can run past block_size.
"""

import contextlib

import numpy as np

from .backend import array_module, to_numpy
from .decode import SparsityMeter, decode_forward, new_cache
from .errors import UsageError
from .model import REFERENCE


def sample_next(logits, temperature, top_k, rng):
    """logits (B, V) on the host -> next token ids (B,) int64, drawn with the NumPy Generator rng."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits / temperature
    if top_k is not None and 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k:-top_k + 1]          # (B, 1)
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    # inverse-CDF draw; the min guards against a cumulative sum that ends a hair below u
    return np.minimum((np.cumsum(p, axis=-1) < u).sum(axis=-1), p.shape[-1] - 1)


def generate(params, cfg, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, rng=None,
             spec=None, meter=None, fast=None, stop_id=None, ops=REFERENCE, on_prefill=None, score_prompt=True):
    """prompt_ids (B, T0) ints -> (B, T0 + n) ints, as a NumPy array, n <= max_new_tokens.

    fast: a fast.decode.DecodeWeights, to read only the selected weight rows; each call then goes through
    its decode_forward (a single token through fast/step.py's compiled step where it applies); ops: model.Ops.
    stop_id: a token (end of turn) after which a row is done; generation ends when every row is.
    on_prefill: called once with the prompt's logits (B, T0, V) and its ids (B, T0); it may return another spec (the dense
    fallback), and then the prompt is run again with that spec, and decoding goes on with it; `fast` stays
    only where it serves that spec (DecodeWeights.serves: the compiled step decodes dense too).
    score_prompt=False: on_prefill needs only the last position's logits (B, 1, V), e.g. a hook that
    just notes the time; the prefill then skips the head's product at the other positions."""
    if not temperature >= 0:                      # also rejects nan
        raise UsageError(f"temperature {temperature!r} is not allowed: it must be >= 0 (0 = greedy).")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens {max_new_tokens!r} is not allowed: it must be >= 0.")
    rng = np.random.default_rng(0) if rng is None else rng
    meter = SparsityMeter() if meter is None else meter
    out = np.asarray(prompt_ids, dtype=np.int64)
    if out.shape[1] == 0:
        raise UsageError("the prompt is empty: give at least one token of text.")
    xp = array_module(params["wte"])
    with fast.quiet() if fast is not None else contextlib.nullcontext():   # BLAS settings for its kernels
        out = _decode_loop(params, cfg, out, max_new_tokens, temperature, top_k, rng, spec, meter, fast, xp,
                           stop_id, ops, on_prefill, score_prompt)
    return out


def _decode_loop(params, cfg, out, max_new_tokens, temperature, top_k, rng, spec, meter, fast, xp, stop_id, ops,
                 on_prefill=None, score_prompt=True):
    kv = None
    done = np.zeros(out.shape[0], dtype=bool)
    forward = decode_forward if fast is None else fast.decode_forward     # a compiled step where it has one

    def prefill_context():                   # the BLAS threads for many tokens (DecodeWeights.prefill)
        return fast.prefill() if fast is not None else contextlib.nullcontext()
    for _ in range(max_new_tokens):
        if kv is None or kv.length == cfg.block_size:
            # (re)fill the cache with the most recent context
            keep = cfg.block_size if kv is None else cfg.block_size // 2
            kv = new_cache(params, cfg, out.shape[0])
            # the head at the last position only, unless on_prefill scores the whole prompt
            with prefill_context():
                logits = forward(params, cfg, xp.asarray(out[:, -keep:]), kv, spec, meter, fast, ops,
                                 last_only=on_prefill is None or not score_prompt)
            switch = on_prefill(logits, out[:, -keep:]) if on_prefill is not None else None
            on_prefill = None                                 # the prompt only, not a refill
            if switch is not None:                           # the cache holds the old spec's keys: redo it
                spec = switch
                if fast is not None and not fast.serves(spec):   # the plain product decodes it as well
                    fast, forward = None, decode_forward
                meter.reset()                                 # count what the new spec computes
                kv = new_cache(params, cfg, out.shape[0])
                with prefill_context():
                    logits = forward(params, cfg, xp.asarray(out[:, -keep:]), kv, spec, meter, fast, ops,
                                     last_only=True)
        else:
            logits = forward(params, cfg, xp.asarray(out[:, -1:]), kv, spec, meter, fast, ops)
        nxt = sample_next(to_numpy(logits[:, -1, :]), temperature, top_k, rng)
        out = np.concatenate([out, nxt[:, None]], axis=1)
        if stop_id is not None:
            done |= nxt == stop_id
            if done.all():
                break
    return out
