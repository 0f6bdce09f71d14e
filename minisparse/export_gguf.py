"""Hand a minisparse model on to llama.cpp: the dense model as one GGUF file, through the optional
`gguf` package, read back by pretrained.load_gguf.

    tensors     pretrained.py's names read backwards (blk.{l}.attn_q.weight, ...), float32, (out, in)
    q and k     rows in the "pairs" layout (llama.cpp's permutation, half_to_pairs), whatever the
                model's own rope_layout
    tokenizer   the BPE tokenizer's tokens and merges, a finetuned run's chat markers as control tokens
    metadata    the architecture, and "minisparse.qsparse" (export.qsparse_settings) for a reader

llama.cpp runs it dense: the paper's dense fallback. Its "llama" architecture gates with SiLU, so
only SwiGLU models are written. A 1.58-bit model's ternary weights are dequantized, as for the
Hugging Face export (export.py). The file is written to a temporary sibling, then renamed into place.
"""

import json
import os
import tempfile

import numpy as np

from .backend import to_numpy
from .errors import UsageError
from .export import chat_template_jinja, end_of_turn, qsparse_settings
from .model import param_shapes
from .pretrained import NAMES as GGUF_NAMES
from .quant import weight_quant_forward

GGUF_LAYER_NAMES = {ours: theirs for theirs, ours in GGUF_NAMES.items()}      # h.{l}.attn.wq -> blk.{l}.attn_q


def half_to_pairs(w, n_heads):
    """q or k rows (n_heads * hs, C), "half" layout -> "pairs": llama.cpp's converter permutation,
    the inverse of pairs_to_half."""
    hs = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hs // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(params, cfg):
    """{GGUF name: float32 (out, in) array}: pretrained.py's table read backwards."""
    out = {}
    for name in param_shapes(cfg):
        w = np.asarray(to_numpy(params[name]), dtype=np.float32)
        if name in ("wte", "norm_f", "lm_head"):
            out[{"wte": "token_embd.weight", "norm_f": "output_norm.weight", "lm_head": "output.weight"}[name]] = w
            continue
        _, l, rest = name.split(".", 2)
        if cfg.w_bits == 1.58 and rest not in ("attn_norm", "ffn_norm"):
            w = np.asarray(weight_quant_forward(w)[0], dtype=np.float32)     # alpha * codes, as for HF
        if cfg.rope_layout == "half" and rest in ("attn.wq", "attn.wk"):
            w = half_to_pairs(w, cfg.n_head if rest == "attn.wq" else cfg.n_kv_head)
        out[f"blk.{l}.{GGUF_LAYER_NAMES[rest]}.weight"] = np.ascontiguousarray(w)
    return out


def check_gguf_target(to, force):
    """Raise UsageError unless the file `to` may be written (new, or with force an old .gguf)."""
    if not to or not str(to).lower().endswith(".gguf"):
        raise UsageError(f"--to {to!r} is not allowed with --format gguf: give a file name ending in .gguf.")
    if os.path.isdir(to):
        raise UsageError(f"--to {to!r} is a directory: give a file name ending in .gguf.")
    if os.path.exists(to) and not force:
        raise UsageError(f"--to {to!r} exists: choose a new file name, or add --force to replace it.")
    parent = os.path.dirname(os.path.abspath(to))
    if not os.path.isdir(parent):
        raise UsageError(f"--to {to!r}: its parent folder {parent!r} does not exist.")


def export_gguf(params, cfg, tok, to, force=False, chat_template=None, chat=None):
    """Write the dense model as the GGUF file `to` (a temporary file, then renamed). chat_template:
    a pretrained model's Jinja template, written as it is; chat: the sft.ChatTemplate a finetuned
    model was tuned with, written as its template (chat_template_jinja) and its end marker as the
    eos token."""
    if chat is not None:
        chat_template = chat_template_jinja(chat)
    eos_token_id = end_of_turn(chat, tok)
    check_gguf_target(to, force)
    if cfg.activation != "swiglu":
        raise UsageError(f"GGUF export needs a SwiGLU model: llama.cpp's llama architecture has no "
                         f"{cfg.activation!r} feed-forward; export this one with --format hf.")
    if tok is None or tok.kind != "bpe":
        raise UsageError(f"GGUF export needs a byte-level BPE tokenizer, and this run's is "
                         f"{getattr(tok, 'kind', None)!r}: train with --tokenizer bpe, or use --format hf.")
    try:
        import gguf
    except ImportError:
        raise UsageError("GGUF export needs the 'gguf' package: pip install gguf") from None
    spec = json.loads(tok.tok.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    ids = dict(spec["model"]["vocab"])
    ids.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})      # sft.py's chat markers
    vocab = sorted(ids.items(), key=lambda kv: kv[1])
    if [i for _, i in vocab] != list(range(cfg.vocab_size)):
        raise UsageError(f"the tokenizer's {len(vocab)} ids are not 0 .. {cfg.vocab_size - 1}: "
                         "GGUF needs one token for every row of the embedding.")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    digits = "Digits" in json.dumps(spec.get("pre_tokenizer"))          # SmolLM2's pre-tokenizer
    target = os.path.abspath(to)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(target) + ".tmp-", dir=os.path.dirname(target))
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")                     # (it writes general.architecture itself)
        w.add_name("minisparse export")
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.n_hidden)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
        w.add_rope_freq_base(cfg.rope_base)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_string("minisparse.qsparse", json.dumps(qsparse_settings(cfg)))
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm" if digits else "gpt-2")
        w.add_token_list([t for t, _ in vocab])
        w.add_token_types([3 if t in special else 1 for t, _ in vocab])         # 3: control, 1: normal
        w.add_token_merges(merges)
        if chat_template:
            w.add_chat_template(chat_template)
        if eos_token_id is not None:
            w.add_eos_token_id(eos_token_id)
        for name, a in gguf_tensors(params, cfg).items():
            w.add_tensor(name, a)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target
