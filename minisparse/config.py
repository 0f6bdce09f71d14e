"""GPTConfig: the Q-Sparse GPT's architecture and sparsity (model.py), one dataclass.

Each field is also a flag of train_tiny.py (flags.py), with its default and help. A config
checks itself when it is made (validate): a setting that cannot be built ends in one
sentence naming the value and what is allowed. `spec` is what every projection site runs:
the linear.SparseSpec of top-K at `sparsity` (or Block Q-Sparse `nm`), STE or masked
gradient, and the precision of inputs and weights.
"""

import math
from dataclasses import asdict, dataclass, fields

from .errors import UsageError
from .flags import option, parse_nm
from .linear import SparseSpec, check_bits
from .nm import check_nm
from .topk import kept_count

GATES = ("relu2", "swiglu")        # the FFN gates model.ACTIVATIONS computes


@dataclass
class GPTConfig:
    """The model's architecture and sparsity. Each field is also a flag of train_tiny.py (flags.py)."""
    vocab_size: int = option(512, "vocabulary size: set by the corpus for --tokenizer char, the size to "
                                 "train for bpe (>= 257)")
    block_size: int = option(64, "context length in tokens")
    n_layer: int = option(4, "number of Transformer blocks")
    n_head: int = option(4, "attention heads per block (must divide n_embd)")
    n_embd: int = option(128, "channels of the residual stream")
    n_hidden: int = option(0, "FFN width Hd; 0 = 8/3 n_embd rounded up to a multiple of 32")
    activation: str = option("relu2", "FFN gate: 'relu2' (ReLU2-GLU, Eq. 11, from scratch) or 'swiglu' "
                                      "(continue-training)")
    sparsity: float = option(0.5, "fraction of every projection input zeroed by top-K, in [0, 1); 0 = dense")
    nm: tuple = option(None, "Block Q-Sparse KEEP:BLOCK, e.g. 16:32 keeps 16 of every 32 channels "
                             "(overrides --sparsity)", parse=parse_nm)
    ste: bool = option(True, "straight-through gradient (Eq. 13); --no_ste is the masked-gradient "
                             "ablation (Eq. 12)")
    a_bits: int = option(16, "precision of every projection input: 16 (full) or 8 (INT8 absmax per token, "
                             "Eq. 5-6)")
    w_bits: float = option(16, "precision of every projection weight: 16 (full) or 1.58 (BitNet b1.58 "
                               "ternary, Eq. 8-10)")
    rope_base: float = option(10000.0, "rotary embedding base")
    norm_eps: float = option(1e-5, "RMSNorm epsilon")
    n_kv_head: int = option(0, "key/value heads, grouped-query attention (must divide n_head); 0 = n_head")
    tie_embeddings: bool = option(False, "use the token embedding as the LM head")
    rope_layout: str = option("half", "rotary layout: 'half' (Hugging Face, rotate the two halves) or "
                                      "'pairs' (GGUF files, adjacent pairs)")

    def __post_init__(self):
        if self.nm is not None:
            self.nm = tuple(self.nm)
        if self.n_hidden == 0:
            self.n_hidden = 32 * math.ceil(8 * self.n_embd / 3 / 32)
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        self.validate()

    def validate(self):
        """Raise UsageError, in one sentence, for a configuration that cannot be built."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UsageError(f"{name}={v!r} is not allowed: it must be a whole number >= 1.")
        if self.n_embd % self.n_head != 0:
            raise UsageError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                             "each head needs n_embd / n_head channels.")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise UsageError(f"head size n_embd / n_head = {self.n_embd // self.n_head} is odd: "
                             "rotary embeddings rotate pairs of channels, so it must be even.")
        if not (isinstance(self.n_kv_head, int) and self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0):
            raise UsageError(f"n_kv_head={self.n_kv_head!r} is not allowed: it must divide n_head={self.n_head} "
                             "(each key/value head serves n_head / n_kv_head query heads).")
        if self.rope_layout not in ("half", "pairs"):
            raise UsageError(f"rope_layout {self.rope_layout!r} is not known: use 'half' or 'pairs'.")
        if self.activation not in GATES:
            raise UsageError(f"activation {self.activation!r} is not known: use 'relu2' or 'swiglu'.")
        for site, D in (("the attention inputs", self.n_embd), ("the down projection", self.n_hidden)):
            if kept_count(D, self.sparsity) < 1:        # (raises for a sparsity outside [0, 1))
                raise UsageError(f"sparsity {self.sparsity} keeps no input of the {D} channels of {site} "
                                 f"(K = 0): choose a sparsity below {1 - 0.5 / D:.4g} or a wider model.")
        if self.nm is not None:
            if len(self.nm) != 2:
                raise UsageError(f"N:M sparsity {self.nm!r} is not allowed: give (keep, block), e.g. 16:32.")
            check_nm(self.nm[0], self.nm[1], self.n_embd)
            if self.nm[0] < 1:
                raise UsageError(f"N:M sparsity keeps {self.nm[0]} of every {self.nm[1]} channels: "
                                 "a model must keep at least 1 (0 would zero every projection input).")
            check_nm(self.nm[0], self.nm[1], self.n_hidden)
        check_bits(self.a_bits, self.w_bits)
        if not (isinstance(self.rope_base, (int, float)) and self.rope_base > 0):
            raise UsageError(f"rope_base={self.rope_base!r} is not allowed: it must be > 0.")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise UsageError(f"norm_eps={self.norm_eps!r} is not allowed: it must be > 0.")

    @property
    def spec(self):
        return self.spec_at(self.sparsity, self.nm)

    def spec_at(self, sparsity, nm=None):
        """This model's spec at another sparsity (0: the dense fallback), in the precision it was
        trained in."""
        return SparseSpec(sparsity, nm, self.ste, self.a_bits, self.w_bits)

    @property
    def overall_sparsity(self):
        """The nominal fraction of inputs zeroed at every site (top-K or N:M)."""
        return 1.0 - self.nm[0] / self.nm[1] if self.nm is not None else self.sparsity

    def to_dict(self):
        d = asdict(self)
        d["nm"] = list(self.nm) if self.nm is not None else None
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UsageError(f"config keys {sorted(unknown)} are not known: allowed are {sorted(known)}.")
        return cls(**d)
