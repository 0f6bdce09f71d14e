"""Hand a minisparse model on: a Hugging Face checkpoint directory that transformers'
LlamaForCausalLM loads, with the Q-Sparse settings beside it.

    model.safetensors     every weight, float32, under Hugging Face's names (below)
    config.json           LlamaConfig's fields, plus "qsparse": the sparsity settings
    tokenizer.json        the run's tokenizer, for AutoTokenizer (tokenizer_config.json names its class),
                          every id of the model: a finetuned run's chat markers too
    generation_config.json  for a finetuned run: its end-of-turn marker as eos_token_id (config.json too),
                          and tokenizer_config.json its chat template (chat_template_jinja)

Our parameters and Hugging Face's Llama are the same computation, name for name:

    wte                   model.embed_tokens.weight                 (V, C)
    h.{l}.attn_norm       model.layers.{l}.input_layernorm.weight   (C,)
    h.{l}.attn.wq         model.layers.{l}.self_attn.q_proj.weight  (C, C)        rows: see rope_layout
    h.{l}.attn.wk, wv     ... self_attn.k_proj, v_proj .weight      (Hkv*hs, C)   k rows: see rope_layout
    h.{l}.attn.wo         ... self_attn.o_proj.weight               (C, C)
    h.{l}.ffn_norm        ... post_attention_layernorm.weight       (C,)
    h.{l}.ffn.w_gate      ... mlp.gate_proj.weight                  (Hd, C)
    h.{l}.ffn.w_up        ... mlp.up_proj.weight                    (Hd, C)
    h.{l}.ffn.w_down      ... mlp.down_proj.weight                  (C, Hd)
    norm_f                model.norm.weight                         (C,)
    lm_head               lm_head.weight  (absent when tied: tie_word_embeddings true)

Why each line carries over unchanged:
- a projection is (out, in), torch.nn.Linear's weight layout, and y = x W^T in both;
- LlamaMLP computes down(act(gate(x)) * up(x)); ours is m = u * act(g) with u = x W_up^T, g = x W_gate^T,
  so w_gate is gate_proj and w_up is up_proj; act "relu2" is transformers' ACT2FN["relu2"]
  (max(z, 0)^2, Eq. 11) and "swiglu" is "silu";
- LlamaRMSNorm is x * rsqrt(mean(x^2) + eps) * weight, eps inside the root, as norm.py;
- attention scales by head_dim^-0.5 and repeats each key/value head for n_head / n_kv_head queries;
- RoPE: theta_i = base^(-2i/hs) on the two halves of a head, our rope_layout "half". A model
  with rope_layout "pairs" (one loaded from GGUF) rotates adjacent channels instead; its q and k
  rows are reordered per head, even channels first, then odd ones (the inverse of llama.cpp's
  permutation), so HF's halves are our pairs. Attention only takes q.k, and the same reordering
  of q and k leaves every dot product as it was.

Q-Sparse is not part of the Llama architecture: config.json's "qsparse" records it, and
`install_qsparse_hooks` honours it on a loaded model with forward pre-hooks at the four sites
(q/k/v_proj, o_proj, gate/up_proj, down_proj), each sparsifying its projection's input per
token by top-K (or N:M), with straight-through gradients, then INT8 if a_bits is 8. Without the
hooks the model runs dense: the paper's dense fallback. A 1.58-bit model (w_bits 1.58) is
exported with its ternary weights dequantized, Q_w(W) = alpha * codes (quant.py), so that
transformers multiplies what minisparse does; "qsparse" says so ("weights": "ternary"), and the
hooks do not ternarize again (Q_w of Q_w(W) is not Q_w(W): alpha changes).

A GGUF file for llama.cpp is written by export_gguf.py.

safetensors is written here (no dependency): an 8-byte little-endian header length, a JSON
header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}} padded
with spaces to 8 bytes, then each tensor's little-endian bytes, row-major, in header order.
The directory is written whole into a temporary sibling, then renamed into place.
"""

import json
import os
import shutil
import tempfile

import numpy as np

from .backend import to_numpy
from .errors import UsageError
from .model import SITES, param_shapes, site_dims
from .quant import weight_quant_forward
from .topk import kept_count

# Hugging Face's module names at each site, the same for every layer
HF_SITES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
            "up_gate": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}
HF_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
                  "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
                  "ffn_norm": "post_attention_layernorm", "ffn.w_gate": "mlp.gate_proj",
                  "ffn.w_up": "mlp.up_proj", "ffn.w_down": "mlp.down_proj"}
HF_ACT = {"relu2": "relu2", "swiglu": "silu"}
MARKER = "model.safetensors"          # what makes a directory a previous export, which --force may replace


def hf_name(name):
    """Our parameter name -> Hugging Face's tensor name (the table above)."""
    if name == "wte":
        return "model.embed_tokens.weight"
    if name == "norm_f":
        return "model.norm.weight"
    if name == "lm_head":
        return "lm_head.weight"
    _, l, rest = name.split(".", 2)                                   # h.{l}.{rest}
    return f"model.layers.{l}.{HF_LAYER_NAMES[rest]}.weight"


def pairs_to_half(w, n_heads):
    """q or k rows (n_heads * hs, C) of a "pairs" model -> the "half" layout: per head, the even
    rows 0, 2, 4, ... then the odd rows 1, 3, 5, ... (llama.cpp's converter does the opposite,
    reshape(n_heads, 2, hs/2, C).swapaxes(1, 2))."""
    hs = w.shape[0] // n_heads
    return w.reshape(n_heads, hs // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def hf_state_dict(params, cfg):
    """{Hugging Face name: float32 array} for our params; q and k rows put in the "half" layout,
    ternary weights dequantized for a 1.58-bit model, no lm_head when the head is tied."""
    out = {}
    for name in param_shapes(cfg):
        w = np.asarray(to_numpy(params[name]), dtype=np.float32)
        rest = name.split(".", 2)[-1]
        if cfg.w_bits == 1.58 and rest in ("attn.wq", "attn.wk", "attn.wv", "attn.wo",
                                           "ffn.w_gate", "ffn.w_up", "ffn.w_down"):
            w = np.asarray(weight_quant_forward(w)[0], dtype=np.float32)     # alpha * codes, per tensor
        if cfg.rope_layout == "pairs" and rest in ("attn.wq", "attn.wk"):
            w = pairs_to_half(w, cfg.n_head if rest == "attn.wq" else cfg.n_kv_head)
        out[hf_name(name)] = w
    return out


def qsparse_settings(cfg):
    """config.json's "qsparse": what install_qsparse_hooks needs, and what a reader needs to know."""
    widths = {site: D for site, (D, _) in site_dims(cfg).items()}
    kept = {site: cfg.spec.kept(D) for site, D in widths.items()}
    return {"sparsity": cfg.sparsity, "nm": list(cfg.nm) if cfg.nm is not None else None,
            "ste": cfg.ste, "a_bits": cfg.a_bits, "w_bits": cfg.w_bits,
            "weights": "ternary" if cfg.w_bits == 1.58 else "full",
            "sites": {site: list(HF_SITES[site]) for site in SITES},
            "inputs": widths, "kept": kept,
            "source_rope_layout": cfg.rope_layout}


def hf_config(cfg):
    """config.json for transformers' LlamaForCausalLM, "qsparse" added."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.n_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.n_embd // cfg.n_head,
        "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        # transformers 4 reads rope_theta; 5 reads rope_parameters (and moves rope_theta there)
        "rope_theta": cfg.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": HF_ACT[cfg.activation],
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "torch_dtype": "float32", "qsparse": qsparse_settings(cfg),
    }


# ----------------------------------------------------------------------------------------
# files

SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
                      np.dtype("int64"): "I64", np.dtype("int32"): "I32"}


def write_safetensors(path, tensors, metadata=None):
    """tensors {name: array} -> the safetensors file at path (the format above)."""
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        a = np.asarray(a)
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes(order="C")   # little-endian, row-major
        header[name] = {"dtype": SAFETENSORS_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)                       # the tensors start 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in blobs:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def hf_tokenizer_json(tok):
    """The tokenizer as a `tokenizers` JSON string: a BPE run's own (its added tokens included); a
    char run's one token per character (WordLevel over single characters, decoded by joining them),
    then its added tokens (a finetuned run's chat markers), so that every id of the model has one."""
    if tok.kind == "bpe":
        return tok.tok.to_str()
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {c: i for i, c in enumerate(tok.chars)}
    vocab.update({t: len(tok.chars) + i for i, t in enumerate(tok.specials)})     # sft.py's chat markers
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")   # every character alone
    t.decoder = decoders.Fuse()                                                      # joined without spaces
    # matched whole before the split, as CharTokenizer.encode does; they keep their vocabulary ids
    t.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in tok.specials])
    return t.to_str()


def chat_template_jinja(template):
    """sft.ChatTemplate as the Jinja chat template transformers' apply_chat_template runs: the same
    text as template.prompt for a user turn with add_generation_prompt, and each finished turn closed
    by template.end (the model's end of turn). A system message given replaces the default one."""
    lit = json.dumps                                       # a JSON string is a Jinja string literal
    start, end = lit(template.start), lit(template.end)
    system = "none" if template.system is None else lit(template.system)
    return ("{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set sys = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set sys = " + system + " -%}{%- set turns = messages -%}{%- endif -%}"
            "{%- if sys is not none -%}{{ " + start + " + 'system\n' + sys + " + end + " + '\n' }}{%- endif -%}"
            "{%- for m in turns -%}{{ " + start + " + m['role'] + '\n' + m['content'] + " + end
            + " + '\n' }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ " + start + " + 'assistant\n' }}{%- endif -%}")


def check_target(to, force, source_dir=None):
    """Raise UsageError unless the directory `to` may be written: it does not exist, is empty,
    or (with force) holds a previous export; never the run's own folder or one above it."""
    if not to:
        raise UsageError("--to is needed: the directory to write the Hugging Face checkpoint into.")
    target = os.path.abspath(to)
    if source_dir is not None:
        src = os.path.abspath(source_dir)
        if src == target or src.startswith(target.rstrip(os.sep) + os.sep):
            raise UsageError(f"--to {to!r} is the run's own folder or holds it: choose another directory.")
    if os.path.exists(target) and not os.path.isdir(target):
        raise UsageError(f"--to {to!r} is a file: give a directory to write the checkpoint into.")
    if os.path.isdir(target) and os.listdir(target):
        if not force:
            raise UsageError(f"--to {to!r} is not empty: choose a new directory, or add --force to "
                             "replace a previous export there.")
        if not os.path.isfile(os.path.join(target, MARKER)):
            raise UsageError(f"--to {to!r} is not empty and holds no {MARKER}, so it is not a previous "
                             "export: --force replaces only those; choose a new directory.")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise UsageError(f"--to {to!r}: its parent folder {parent!r} does not exist.")


def end_of_turn(chat, tok):
    """The id of a finetuned model's end-of-turn marker (chat: its sft.ChatTemplate), or None."""
    return chat.end_id(tok) if chat is not None and tok is not None else None


def check_vocab(tok, cfg):
    """Raise UsageError unless the tokenizer has exactly the model's ids 0 .. V - 1."""
    if tok is not None and tok.vocab_size != cfg.vocab_size:
        raise UsageError(f"the tokenizer has {tok.vocab_size} ids and the model {cfg.vocab_size}: an export "
                         "needs one token for every row of the embedding.")


def export_hf(params, cfg, tok, to, force=False, source_dir=None, source="", chat=None):
    """Write the Hugging Face checkpoint directory `to` atomically: everything goes into a
    temporary sibling first, which then takes `to`'s place (a previous export, with force, is
    removed only after that). chat: the sft.ChatTemplate a finetuned model was tuned with; its end
    marker becomes eos_token_id (where generate stops) and it is written as the chat template.
    Returns the absolute path written."""
    check_target(to, force, source_dir)
    check_vocab(tok, cfg)
    eos = end_of_turn(chat, tok)
    target = os.path.abspath(to)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".tmp-", dir=os.path.dirname(target))
    try:
        write_safetensors(os.path.join(tmp, MARKER), hf_state_dict(params, cfg),
                          {"exported_by": "minisparse", "source": str(source)})
        config = hf_config(cfg)
        generation = {"_from_model_config": True}
        if tok is not None:
            with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
                f.write(hf_tokenizer_json(tok))
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                          "clean_up_tokenization_spaces": False}
            if eos is not None:
                config["eos_token_id"] = generation["eos_token_id"] = eos
                tok_config.update(eos_token=chat.end, chat_template=chat_template_jinja(chat))
            _write_json(os.path.join(tmp, "tokenizer_config.json"), tok_config)
        _write_json(os.path.join(tmp, "config.json"), config)
        _write_json(os.path.join(tmp, "generation_config.json"), generation)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _move_into_place(tmp, target):
    """tmp -> target. An empty target is replaced by the rename itself; a previous export is moved
    aside first, then deleted, so that a failure leaves either the old export or the new one."""
    if os.path.isdir(target) and os.listdir(target):
        old = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".old-", dir=os.path.dirname(target))
        os.replace(target, os.path.join(old, "export"))
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if os.path.isdir(target):
            os.rmdir(target)
        os.replace(tmp, target)


# ----------------------------------------------------------------------------------------
# Q-Sparse on a loaded transformers model (torch is imported here only: a user's choice)


def torch_topk_mask(x, k):
    """topk.topk_mask in torch: (..., D) bool, True at the k largest |x| of each row. A stable sort
    keeps the lower channel among ties, as topk.py does, so a row never keeps more than k."""
    import torch
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order, True)


def install_qsparse_hooks(hf_model, settings=None, sparsity=None):
    """Forward pre-hooks on a transformers LlamaForCausalLM that make it the Q-Sparse model of
    settings (default: hf_model.config.qsparse): each hooked projection's input x (..., D) becomes

        xs = x * TopK(|x|)         per token, K = settings["kept"][site]  (or N:M blocks)
        xs = Q(xs)                 INT8 absmax per token, when a_bits is 8 (quant.py)

    with straight-through gradients (Eq. 13; the masked ones, Eq. 12, when ste is false), so the
    model can be trained on in PyTorch as well. Ties keep the lower channel, as topk.py does.
    sparsity: another top-K sparsity at inference (0: only the quantization, if any).
    Returns the hook handles; handle.remove() for each restores the dense model."""
    import torch

    s = dict(settings if settings is not None else getattr(hf_model.config, "qsparse"))
    nm = tuple(s["nm"]) if s.get("nm") and sparsity is None else None
    if sparsity is not None:
        s["kept"] = {site: kept_count(D, sparsity) for site, D in s["inputs"].items()}

    def make_hook(site):
        D, k = s["inputs"][site], s["kept"][site]

        def hook(module, args):
            x = args[0]
            if nm is not None:
                keep, block = nm
                mask = torch_topk_mask(x.reshape(*x.shape[:-1], D // block, block), keep).reshape(x.shape)
            elif k < D:
                mask = torch_topk_mask(x, k)
            else:
                mask = None
            xs = x
            if mask is not None:
                xs = torch.where(mask, x, torch.zeros_like(x))                  # gradient: masked (Eq. 12)
                if s["ste"]:
                    xs = x + (xs - x).detach()                                  # value xs, gradient identity
            if s["a_bits"] == 8:
                scale = 127.0 / (xs.abs().amax(dim=-1, keepdim=True) + 1e-5)    # quant.EPS
                xq = torch.clamp(torch.round(xs * scale), -128, 127) / scale
                xs = xs + (xq - xs).detach()                                    # rounding: straight through
            return (xs,) + tuple(args[1:])
        return hook

    handles = []
    for layer in hf_model.model.layers:
        for site in SITES:
            for path in s["sites"][site]:
                module = layer.get_submodule(path)
                handles.append(module.register_forward_pre_hook(make_hook(site)))
    return handles
