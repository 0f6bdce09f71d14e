"""The key/value-cache decode path computes exactly what the full forward computes."""

import numpy as np
import pytest

from minisparse import model
from minisparse.decode import SparsityMeter, decode_forward, new_cache
from minisparse.linear import SparseSpec
from minisparse.sampling import generate, sample_next
from minisparse.errors import UsageError


@pytest.mark.parametrize("sparsity,nm,activation,extra", [
    (0.0, None, "relu2", {}), (0.5, None, "relu2", {}), (0.0, (2, 4), "swiglu", {}),
    (0.5, None, "swiglu", dict(n_head=4, n_kv_head=2, tie_embeddings=True, rope_layout="pairs"))])
def test_decode_equals_full_forward(sparsity, nm, activation, extra):
    cfg = model.GPTConfig(**{**dict(vocab_size=13, block_size=10, n_layer=2, n_head=2, n_embd=16), **extra},
                          activation=activation, sparsity=sparsity, nm=nm)
    params = model.init_params(cfg, seed=3, dtype=np.float64)
    idx = np.random.default_rng(0).integers(0, 13, (2, 10))
    full, _, _ = model.forward(params, cfg, idx)                             # (B, T, V)
    # prefill 4 tokens, then one at a time
    kv = new_cache(params, cfg, 2)
    pieces = [decode_forward(params, cfg, idx[:, :4], kv)]
    for t in range(4, 10):
        pieces.append(decode_forward(params, cfg, idx[:, t:t + 1], kv))
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-10, atol=1e-12)


def test_prefill_last_only_gives_the_last_position_and_the_same_cache():
    # a sampler's prefill skips the head at every position but the last: the same logits there,
    # the same keys and values in the cache, so the tokens after it are the same too
    cfg = model.GPTConfig(vocab_size=13, block_size=10, n_layer=2, n_head=4, n_embd=16, n_kv_head=2, sparsity=0.5)
    params = model.init_params(cfg, seed=5, dtype=np.float64)
    idx = np.random.default_rng(2).integers(0, 13, (2, 7))
    kv_all, kv_last = new_cache(params, cfg, 2), new_cache(params, cfg, 2)
    every = decode_forward(params, cfg, idx[:, :6], kv_all)                  # (2, 6, V)
    last = decode_forward(params, cfg, idx[:, :6], kv_last, last_only=True)  # (2, 1, V)
    assert last.shape == (2, 1, 13)
    np.testing.assert_allclose(last[:, 0], every[:, -1], rtol=1e-12, atol=1e-14)   # BLAS may block (B, 1) apart
    for a, b in zip(kv_all.k + kv_all.v, kv_last.k + kv_last.v):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(decode_forward(params, cfg, idx[:, 6:], kv_last),
                                  decode_forward(params, cfg, idx[:, 6:], kv_all))
    with pytest.raises(ValueError, match="last_only"):
        model.forward(params, cfg, idx, idx, last_only=True)


def test_generate_prefills_with_the_head_at_the_last_position_only(monkeypatch):
    # the loop asks for the last position's logits at the prefill (and at a refill), but for every
    # position when on_prefill scores the prompt
    import minisparse.sampling as sampling
    cfg = model.GPTConfig(vocab_size=13, block_size=6, n_layer=1, n_head=2, n_embd=16)
    params = model.init_params(cfg, seed=3)
    shapes = []

    def spy(params, cfg, idx, kv, *args, **kw):
        logits = decode_forward(params, cfg, idx, kv, *args, **kw)
        shapes.append((idx.shape[1], logits.shape[1]))
        return logits
    monkeypatch.setattr(sampling, "decode_forward", spy)
    prompt = np.array([[1, 2, 3, 4]])
    generate(params, cfg, prompt, 5, temperature=0.0)
    assert shapes[0] == (4, 1) and shapes[1] == (1, 1)
    assert (3, 1) in shapes                                                   # the refill at block_size
    shapes.clear()
    generate(params, cfg, prompt, 2, temperature=0.0, on_prefill=lambda logits, ids: None)
    assert shapes[0] == (4, 4)
    shapes.clear()                                                            # a hook that only notes the time
    generate(params, cfg, prompt, 2, temperature=0.0, on_prefill=lambda logits, ids: None, score_prompt=False)
    assert shapes[0] == (4, 1)


def test_dense_override_and_meter():
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=16, sparsity=0.5)
    params = model.init_params(cfg, seed=3, dtype=np.float64)
    idx = np.random.default_rng(1).integers(0, 13, (1, 8))
    dense_cfg = model.GPTConfig(**{**cfg.to_dict(), "sparsity": 0.0})
    meter = SparsityMeter()
    got = decode_forward(params, cfg, idx, new_cache(params, cfg, 1), SparseSpec(0.0), meter)
    np.testing.assert_allclose(got, model.forward(params, dense_cfg, idx)[0], rtol=1e-12)
    meter2 = SparsityMeter()
    decode_forward(params, cfg, idx, new_cache(params, cfg, 1), None, meter2)
    assert meter2.mean()["qkv"] == pytest.approx(0.5)                        # K = 8 of 16
    assert meter.mean()["qkv"] < 0.01                                         # dense: no zeros added


def test_generate_runs_past_block_size_and_is_repeatable():
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=1, n_head=2, n_embd=16)
    params = model.init_params(cfg, seed=0)
    a = generate(params, cfg, [[1, 2, 3]], 20, temperature=1.0, top_k=5, rng=np.random.default_rng(7))
    b = generate(params, cfg, [[1, 2, 3]], 20, temperature=1.0, top_k=5, rng=np.random.default_rng(7))
    assert a.shape == (1, 23) and np.array_equal(a, b)
    assert ((a >= 0) & (a < 13)).all()


def test_greedy_follows_full_forward_argmax():
    cfg = model.GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16)
    params = model.init_params(cfg, seed=5, dtype=np.float64)
    out = generate(params, cfg, [[4, 7]], 6, temperature=0)
    for t in range(2, 8):
        logits = model.forward(params, cfg, out[:, :t])[0]
        assert out[0, t] == logits[0, -1].argmax()


def test_sample_next_top_k_and_bad_values():
    rng = np.random.default_rng(0)
    logits = np.array([[0.0, 5.0, 4.0, -1.0]])
    draws = {int(sample_next(logits, 1.0, 2, rng)[0]) for _ in range(200)}
    assert draws == {1, 2}                                                   # only the two largest
    with pytest.raises(UsageError, match="temperature"):
        generate({"wte": np.zeros((3, 2))}, None, [[0]], 1, temperature=-1)
    with pytest.raises(UsageError, match="max_new_tokens"):
        generate({"wte": np.zeros((3, 2))}, None, [[0]], -3)
