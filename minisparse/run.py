"""A training run: its settings (TrainConfig), its state (RunState) and the ways one starts.

    new_run(tc)                 a tokenizer trained on the corpus, weights from --seed
    init_from_run(tc, given)    the weights and tokenizer of another run (its out_dir) or of a
                                pretrained GGUF model, the architecture theirs; with --sft,
                                finetuning on instruction data (sft.py)
    resume_run(tc, given)       this out_dir's checkpoint: the settings, weights, AdamW's moments,
                                step, thread count and batch generator as saved, so that the run
                                ends with exactly the losses of one that never stopped

Each returns a RunState, everything train.py needs to take the next step, and save_run writes
one back. Nothing is written while a run is set up: a bad input ends in UsageError (one sentence)
before the run's folder exists. `given` names the flags the user typed: those a resume may not
change, those that may not contradict the weights of --init_from, and those that override the
SFT recipe's defaults.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import backend, model, sft
from .batches import SFTBatches, TextBatches
from .checkpoint import check_params, load_checkpoint, save_checkpoint
from .config import GPTConfig
from .data import check_split_lengths, load_text, split_ids, tokenizer_from_dict, train_tokenizer
from .errors import UsageError
from .flags import given_values, option
from .optimizer import AdamW
from .pretrained import is_pretrained_source, load_gguf

# the fields of GPTConfig that define the architecture: fixed by the weights when continuing
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "n_hidden", "block_size", "activation",
               "n_kv_head", "tie_embeddings", "rope_layout", "rope_base", "norm_eps")

# --debug: the settings for stepping through a training step in pdb; a flag given with it wins
DEBUG_PRESET = {"reference": True, "threads": 1, "max_iters": 5, "eval_iters": 2, "eval_at_start": False,
                "bar": False, "out_dir": "out-debug"}
DEBUG_FLAGS = ", ".join(f"--{k}" if v is True else f"--no_{k}" if v is False else f"--{k} {v}"
                        for k, v in DEBUG_PRESET.items())


@dataclass
class TrainConfig:
    """A training run: the model's config and every other flag of train_tiny.py (flags.py).
    The defaults train a good tiny model in a few minutes on a laptop CPU."""
    model: GPTConfig = field(default_factory=GPTConfig)
    out_dir: str = option("out-tiny", "folder for the checkpoint (ckpt.npz) and metrics.jsonl")
    data: str = option("pydoc", "'pydoc' (Python's docs, built in), 'shakespeare' (downloaded once) or a "
                                "UTF-8 text file")
    tokenizer: str = option("char", "'char' (one token per character) or 'bpe' (byte-level BPE trained "
                                    "on the corpus, --vocab_size tokens)")
    batch_size: int = option(12, "sequences per step")
    max_iters: int = option(3000, "training steps")
    learning_rate: float = option(2e-3, "peak learning rate of AdamW")
    min_lr: float = option(2e-4, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "steps of linear warmup")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (not applied to norm gains)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 = off")
    eval_interval: int = option(250, "evaluate and save a checkpoint every this many steps")
    eval_iters: int = option(20, "batches per split when estimating the loss")
    eval_at_start: bool = option(True, "evaluate (and save) at iter 0 too, before the first step")
    seed: int = option(1337, "seed for the weights and the batches")
    device: str = option("cpu", "'cpu' (NumPy) or 'gpu' (CuPy)")
    threads: int = option(0, "CPU cores, each training its share of the batch's sequences, the first in "
                             "this process and each other in a worker process (fast/workers.py); "
                             "0 = one per core up to 20M parameters, else 1")
    reference: bool = option(False, "run the readable reference ops on one thread, none of minisparse/fast/ "
                                    "(slower; to step through a training step in a debugger)")
    bar: bool = option(True, "a progress bar (tqdm); --no_bar logs a plain line per step instead")
    debug: bool = option(False, f"a preset to step through a training step in pdb, its first forward the "
                                f"step's: {DEBUG_FLAGS}; flags given with it win")
    init_from: str = option("", "continue-training: start from the weights of the run in this out_dir, or "
                                "from a pretrained model: 'smollm2' (SmolLM2-135M-Instruct) or a "
                                "LLaMA-family .gguf file")
    resume: bool = option(False, "continue this out_dir's interrupted run exactly where it stopped")
    sft: str = option("", "supervised finetuning of the --init_from model on instruction data, the loss on "
                          "the responses only (sft.py): 'tasks' (checkable templated tasks), 'pydoc' (the "
                          "docs as Q&A), 'mix' (both) or a .jsonl file of prompt/response objects. Unless "
                          "given: one epoch, warmup 0.03 of the steps, cosine to 0, no weight decay")

    @classmethod
    def from_flags(cls, given):
        """The config of train_tiny.py's parsed flags, a dict of those the user gave."""
        return cls(model=GPTConfig(**given_values(GPTConfig, given)), **given_values(cls, given))

    def get(self, name):
        """The value of flag `name`, a field of this config or of its model config."""
        return getattr(self, name) if name != "model" and hasattr(self, name) else getattr(self.model, name)

    def to_dict(self):
        return {**asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, d):
        return cls(**{**d, "model": GPTConfig.from_dict(d["model"])})

    def validate(self):
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise UsageError(f"--{name} {v!r} is not allowed: it must be a whole number >= 1.")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise UsageError(f"--threads {self.threads!r} is not allowed: it must be a whole number >= 0 "
                             "(0 = auto: one per core for small models).")
        if not isinstance(self.warmup_iters, int) or self.warmup_iters < 0:
            raise UsageError(f"--warmup_iters {self.warmup_iters!r} is not allowed: it must be >= 0.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise UsageError(f"--learning_rate {self.learning_rate!r} is not allowed: it must be a finite number > 0.")
        for name in ("min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UsageError(f"--{name} {v!r} is not allowed: it must be a finite number >= 0.")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not (0 <= v < 1):
                raise UsageError(f"--{name} {v!r} is not allowed: it must be in [0, 1).")
        if self.device not in ("cpu", "gpu"):
            raise UsageError(f"--device {self.device!r} is not known: use 'cpu' or 'gpu'.")
        if self.sft and not (self.init_from or self.resume):
            raise UsageError(f"--sft {self.sft!r} needs --init_from: finetuning starts from a trained model "
                             "(a run's out_dir, 'smollm2' or a .gguf file).")
        if self.resume and self.init_from:
            raise UsageError("--resume and --init_from cannot be used together: resume continues this "
                             "out_dir's run, init_from starts a new run from another's weights.")


def with_presets(given):
    """The parsed flags `given` (a dict) with --debug's preset filled in for the flags not given."""
    return {**DEBUG_PRESET, **given} if given.get("debug") else given


@dataclass
class RunState:
    """Everything a run needs to take its next step, and what its checkpoint holds (save_run)."""
    tc: TrainConfig            # the settings: a resumed run's as saved
    cfg: GPTConfig             # the model trained: tc.model with the tokenizer's vocab_size
    params: dict               # {name: array}, updated in place by every step
    opt: AdamW                 # its moments and step count
    tok: object                # the tokenizer (data.py), saved with the weights
    batches: object            # batches.py: TextBatches or SFTBatches, one interface
    step: int = 0              # the next iteration: 0, or where a resumed run stopped
    template: object = None    # a finetuning run's sft.ChatTemplate, else None
    threads: int = None        # the parts per batch a resumed run's checkpoint records (it keeps them)


def start_run(tc, given=()):
    """The RunState that tc asks for: resumed (--resume), from other weights (--init_from) or new."""
    if tc.resume:
        return resume_run(tc, given)
    if tc.init_from:
        return init_from_run(tc, given)
    return new_run(tc)


def new_run(tc):
    """A run from scratch: a tokenizer trained on the corpus (--tokenizer), the weights from --seed."""
    text = load_text(tc.data)
    tok = train_tokenizer(text, tc.tokenizer, tc.model.vocab_size)
    batches = text_batches(tc, tok, text)
    cfg = replace(tc.model, vocab_size=tok.vocab_size)           # the model config trained
    params = model.init_params(cfg, seed=tc.seed)
    return RunState(tc, cfg, params, adamw(tc, params), tok, batches)


def init_from_run(tc, given=()):
    """A new run from the weights of another run (--init_from its out_dir) or of a pretrained GGUF
    model ('smollm2' or a .gguf file): their architecture and tokenizer, a fresh optimizer. With
    --sft, the finetuning's chat template, tokenizer and weights (sft_start) and its examples."""
    src_meta = {}
    if is_pretrained_source(tc.init_from):                     # a GGUF file (pretrained.py)
        params, src_cfg, tok, _ = load_gguf(tc.init_from, block_size=tc.model.block_size)
    else:
        params, _, src_cfg, tok, src_meta = load_run(tc.init_from)
    for name in ARCH_FIELDS:          # the architecture comes with the weights
        if name in given and tc.get(name) != getattr(src_cfg, name):
            raise UsageError(f"--{name} {tc.get(name)!r} does not match the weights in "
                             f"{tc.init_from!r} ({getattr(src_cfg, name)!r}): drop the flag to use theirs.")
    tc.model = replace(tc.model, **{name: getattr(src_cfg, name) for name in ARCH_FIELDS})
    tc.tokenizer = tok.kind
    template = None
    if tc.sft:
        template, tok, params = sft_start(tc, tok, params, src_cfg, src_meta, is_pretrained_source(tc.init_from))
    batches = run_batches(tc, tok, template, given)
    cfg = replace(tc.model, vocab_size=tok.vocab_size)
    return RunState(tc, cfg, params, adamw(tc, params), tok, batches, template=template)


def resume_run(tc, given=()):
    """This out_dir's interrupted run where it stopped, configured as it was: of the flags given, only
    --max_iters, --device and --bar may differ from the saved ones."""
    path = ckpt_path(tc.out_dir)
    params, opt_state, saved_cfg, tok, meta = load_run(tc.out_dir)
    try:
        saved = TrainConfig.from_dict(meta["train"])
        meta["iter"], meta["rng"]
    except (KeyError, TypeError) as e:
        raise UsageError(f"checkpoint {path!r} is corrupt: its metadata lacks or garbles {e}.") from None
    for name in given:
        if name not in ("resume", "out_dir", "device", "max_iters", "bar") and tc.get(name) != saved.get(name):
            raise UsageError(f"--{name} {tc.get(name)!r} differs from the run being resumed "
                             f"({saved.get(name)!r}): --resume continues a run as it was configured.")
    for name in ("max_iters", "device", "bar"):     # the only settings a resume may change
        if name in given:
            setattr(saved, name, getattr(tc, name))
    saved.resume, saved.out_dir = True, tc.out_dir
    tc = saved
    template = sft.template_of(meta)
    if tc.max_iters < meta["iter"]:
        raise UsageError(f"--max_iters {tc.max_iters} is below the {meta['iter']} steps this run has "
                         "already taken: give a larger --max_iters to continue it.")
    if opt_state is None:
        raise UsageError(f"checkpoint {path!r} has no optimizer state, so it cannot be resumed: "
                         "use --init_from to start a new run from its weights.")
    shapes = model.param_shapes(saved_cfg)
    check_params(opt_state["m"], shapes, path)
    check_params(opt_state["v"], shapes, path)
    batches = run_batches(tc, tok, template, given, rng_state=meta["rng"])
    cfg = replace(tc.model, vocab_size=tok.vocab_size)
    opt = adamw(tc, params)
    opt.load_state_dict(opt_state)
    return RunState(tc, cfg, params, opt, tok, batches, meta["iter"], template, meta.get("threads"))


def sft_start(tc, tok, params, src_cfg, src_meta, pretrained):
    """The chat template, tokenizer and weights a finetuning run starts with: a pretrained model's
    tokenizer must have the template's markers; a tiny model's gets them added, and its embedding
    the rows for them (sft.py)."""
    template = sft.template_of(src_meta)
    if pretrained:
        template = sft.SMOLLM2 if tc.init_from == "smollm2" else sft.TINY
        for m in template.markers():
            sft.marker_id(tok, m)                   # raises, in one sentence, for a missing marker
        return template, tok, params
    template = template or sft.TINY
    tok = sft.add_markers(tok, template)
    return template, tok, sft.grow_embeddings(params, src_cfg, tok.vocab_size)


def run_batches(tc, tok, template=None, given=(), rng_state=None):
    """The run's batches: finetuning examples (--sft) or windows of the corpus (--data)."""
    if tc.sft:
        return sft_batches(tc, tok, template, given, rng_state)
    return text_batches(tc, tok, load_text(tc.data), rng_state)


def text_batches(tc, tok, text, rng_state=None):
    """TextBatches of the corpus: its first 90% of tokens to train on, the rest held out (data.py)."""
    train_ids, val_ids = split_ids(tok.encode(text))
    check_split_lengths(train_ids, val_ids, tc.model.block_size)
    return TextBatches(train_ids, val_ids, tc.model.block_size, tc.batch_size, tc.seed, tc.eval_iters, rng_state)


def sft_batches(tc, tok, template, given=(), rng_state=None):
    """SFTBatches of the set's examples (sft.py), every tenth held out. A new finetuning run takes the
    paper's SFT recipe for the settings not given: one epoch, warmup 0.03 of the steps, cosine to 0,
    no weight decay."""
    sets = sft.load_set(tc.sft)
    data = {split: sft.encode_all(tok, template, sets[split], tc.model.block_size, split)
            for split in ("train", "test")}
    if not data["test"]:
        raise UsageError(f"the SFT set {tc.sft!r} holds out no test example (every tenth is held out): "
                         "give it at least 10 examples.")
    if not tc.resume:
        defaults = {"max_iters": sft.steps_per_epoch(len(data["train"]), tc.batch_size),
                    "weight_decay": 0.0, "min_lr": 0.0}
        for name, value in defaults.items():
            if name not in given:
                setattr(tc, name, value)
        if "warmup_iters" not in given:
            tc.warmup_iters = round(0.03 * tc.max_iters)
    return SFTBatches(data["train"], data["test"], tc.sft, tc.batch_size, tc.seed, tc.eval_iters, rng_state)


def adamw(tc, params):
    return AdamW(params, tc.learning_rate, (tc.beta1, tc.beta2), weight_decay=tc.weight_decay)


# ----------------------------------------------------------------------------------------
# the run on disk: out_dir/ckpt.npz (checkpoint.py) and out_dir/metrics.jsonl


def ckpt_path(out_dir):
    return os.path.join(out_dir, "ckpt.npz")


def save_run(run, next_iter, threads):
    """Write run's checkpoint (whole, or not at all: checkpoint.py), from which a resume continues at
    `next_iter`; threads: the parts each batch is split into. Returns next_iter."""
    tc = run.tc
    meta = {"model": run.cfg.to_dict(), "train": tc.to_dict(), "iter": next_iter, "threads": threads,
            "rng": run.batches.state(), "tokenizer": run.tok.to_dict()}
    if run.template is not None:            # generate.py prompts with it and stops at its end marker
        meta["sft"] = {"set": tc.sft, "template": run.template.to_dict()}
    save_checkpoint(ckpt_path(tc.out_dir), run.params, meta, run.opt.state_dict())
    return next_iter


def load_run(out_dir, dtype=np.float32):
    """Params (on the device, in `dtype`: float32 to run, float64 to audit), GPTConfig, tokenizer and
    meta of a saved run."""
    path = ckpt_path(out_dir)
    params, opt_state, meta = load_checkpoint(path)
    try:
        cfg = GPTConfig.from_dict(meta["model"])
        tok = tokenizer_from_dict(meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"checkpoint {path!r} is corrupt: its metadata lacks {e}.") from None
    check_params(params, model.param_shapes(cfg), path)
    params = {k: backend.asarray(v, dtype=dtype) for k, v in params.items()}
    return params, opt_state, cfg, tok, meta


def read_metrics(out_dir):
    """(training lines, evaluation lines) of a run's metrics.jsonl, each a list of dicts."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [m for m in lines if not m.get("eval")], [m for m in lines if m.get("eval")]


def kept_metrics(path, before_iter):
    """The lines of metrics.jsonl for iterations before `before_iter` (what a resume keeps)."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["iter"] < before_iter:
                    kept.append(line)
            except (ValueError, KeyError):
                break                       # a torn last line from a kill: drop it and what follows
    return kept
