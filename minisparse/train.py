"""The training loop behind train_tiny.py: data, model, AdamW, evaluation, checkpoints, resume.

One step at iteration `it`:
    x, y = get_batch(train, rng)                      (B, T) tokens and their next tokens
    loss, grads = forward and backward: model.forward_backward, or with the fast ops
                  the batch split into `threads` parts whose gradients add up, one on
                  this process and each other in a worker process (fast/parallel.py,
                  fast/workers.py); --reference runs the readable ops on one thread
    clip_grad_norm(grads, grad_clip)
    AdamW.step(params, grads, lr_at(it))              warmup, then cosine to min_lr

Every eval_interval steps (and at the end) the loss is estimated on eval_iters batches
of each split and a checkpoint is written (checkpoint.py). Evaluation batches come from
a generator seeded by (seed, it), so they depend on nothing but the iteration: a run
stopped and resumed (--resume) ends with exactly the losses of one that never stopped.
Ctrl-C finishes the current step, saves, and stops. A non-finite loss stops training
and keeps the last good checkpoint.

metrics.jsonl in out_dir gets one JSON object a line: a training line per step
{"iter", "train_loss", "lr", "tokens_per_s", "grad_norm", "sparsity": {site: zeros}}, and an
evaluation line {"iter", "eval": true, "train_loss", "val_loss", "sparsity"} every eval_interval
(its sparsity measured on the validation batches).
"""

import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import backend, model, sft
from .fast import FAST, parallel
from .fast.workers import Workers, shared_bytes, shared_memory_free
from .fast.runtime import retain_freed_memory
from .checkpoint import check_params, load_checkpoint, save_checkpoint
from .data import check_split_lengths, get_batch, load_text, split_ids, tokenizer_from_dict, train_tokenizer
from .errors import UsageError
from .flags import given_values, option
from .model import GPTConfig
from .optimizer import AdamW, clip_grad_norm
from .loss import IGNORE
from .pretrained import is_pretrained_source, load_gguf
from .schedule import lr_at

# the fields of GPTConfig that define the architecture: fixed by the weights when continuing
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "n_hidden", "block_size", "activation",
               "n_kv_head", "tie_embeddings", "rope_layout", "rope_base", "norm_eps")


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
    seed: int = option(1337, "seed for the weights and the batches")
    device: str = option("cpu", "'cpu' (NumPy) or 'gpu' (CuPy)")
    threads: int = option(0, "CPU cores, each training its share of the batch's sequences, the first in "
                             "this process and each other in a worker process (fast/workers.py); "
                             "0 = one per core up to 20M parameters, else 1")
    reference: bool = option(False, "run the readable reference ops on one thread, none of minisparse/fast/ "
                                    "(slower; to step through a training step in a debugger)")
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


class TrainingDiverged(RuntimeError):
    pass


def _diverged(what, value, it, last_saved, path):
    return TrainingDiverged(f"the {what} became {value} at iter {it}: stopping; the last good checkpoint "
                            f"(iter {last_saved}) is kept in {path}. Try a lower --learning_rate.")


def ckpt_path(out_dir):
    return os.path.join(out_dir, "ckpt.npz")


def load_run(out_dir, dtype=np.float32):
    """Params (on the device, in `dtype`: float32 to run, float64 to audit), GPTConfig, tokenizer and
    meta of a saved run."""
    path = ckpt_path(out_dir)
    params, opt_state, meta = load_checkpoint(path)
    try:
        cfg = model.GPTConfig.from_dict(meta["model"])
        tok = tokenizer_from_dict(meta["tokenizer"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"checkpoint {path!r} is corrupt: its metadata lacks {e}.") from None
    check_params(params, model.param_shapes(cfg), path)
    params = {k: backend.asarray(v, dtype=dtype) for k, v in params.items()}
    return params, opt_state, cfg, tok, meta


def estimate_loss(params, cfg, data, tc, it, ops=model.REFERENCE, threads=None, workers=None):
    """Mean loss over eval_iters batches of each split, drawn from a generator seeded by (seed, it),
    and the sparsity measured on them: {"train": loss, "val": loss, "train_sparsity": {site: zeros}, ...}.
    threads None: the readable forward (model.forward_loss); a count: fast/parallel.py's forward,
    which keeps no caches and splits the batch over that many threads; workers: the same forward
    with the parts in worker processes (fast/workers.py). All give the same numbers."""
    out = {}
    for split, ids in data.items():
        rng = np.random.default_rng([tc.seed, it, 0 if split == "train" else 1])
        losses, zeros = [], {site: 0.0 for site in model.SITES}
        for _ in range(tc.eval_iters):
            x, y = get_batch(ids, cfg.block_size, tc.batch_size, rng)
            x, y = backend.asarray(x), backend.asarray(y)
            if workers is not None:
                loss, per_layer = workers.forward_loss(params, cfg, x, y, ops)
            elif threads is None:
                loss, per_layer = model.forward_loss(params, cfg, x, y, ops)
            else:
                loss, per_layer = parallel.forward_loss(params, cfg, x, y, ops, threads)
            losses.append(loss)
            for site, frac in model.average_over_layers(per_layer).items():
                zeros[site] += frac / tc.eval_iters
        out[split] = sum(losses) / len(losses)
        out[split + "_sparsity"] = zeros
    return out


def estimate_sft_loss(params, cfg, examples, tc, ops=model.REFERENCE):
    """estimate_loss for finetuning: the mean loss over the response tokens of the first
    eval_iters * batch_size examples of each split (sft.Encoded), evenly spaced through it (the sets
    list their kinds one after another), every counted token weighing the same, and the sparsity
    measured on them."""
    out = {}
    n_examples = tc.eval_iters * tc.batch_size
    for split, encoded in examples.items():
        spread = encoded[::max(1, len(encoded) // n_examples)][:n_examples]
        out[split], out[split + "_sparsity"] = sft.response_scores(params, cfg, spread, tc.batch_size, ops)
    return out


def _sft_start(tc, tok, params, src_cfg, src_meta, pretrained):
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


def read_metrics(out_dir):
    """(training lines, evaluation lines) of a run's metrics.jsonl, each a list of dicts."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return [m for m in lines if not m.get("eval")], [m for m in lines if m.get("eval")]


def _read_metrics(path, before_iter):
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


def start_workers(params, cfg, threads, tc, opt, log=print):
    """The worker processes that run the parts of each batch after the first, and share the
    optimizer's step (fast/workers.py), or None where the batch is not split over processes: one
    part, the reference ops, or the GPU; or too little shared memory, where the parts run as threads
    (fast/parallel.py, the same numbers) and `log` says so. params and opt's moments move into
    shared memory."""
    if threads == 1 or tc.reference or tc.device != "cpu":
        return None
    need, free = shared_bytes(params, threads, opt), shared_memory_free()
    if free is not None and need > free:
        log(f"note: the worker processes would need {need / 2**20:.0f} MB of shared memory and /dev/shm has "
            f"{free / 2**20:.0f} MB free, so the {threads} parts of each batch run as threads instead (slower, "
            "the same numbers); a container can be given more with docker run --shm-size.")
        return None
    return Workers(params, cfg, threads, opt)


def train(tc, given=(), progress=True, log=print):
    """Run training as `tc` says. `given` names the flags the user set (for --resume/--init_from checks).
    Returns a summary dict: final losses, time, measured sparsity, N and N_a."""
    tc.validate()
    backend.set_device(tc.device)
    if not tc.reference:
        retain_freed_memory()          # no page faults from re-allocating activations (fast/runtime.py)
    path = ckpt_path(tc.out_dir)
    metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")

    opt_state, start_iter, rng_state, saved_threads, template = None, 0, None, None, None
    if tc.resume:
        params, opt_state, cfg, tok, meta = load_run(tc.out_dir)
        try:
            saved = TrainConfig.from_dict(meta["train"])
            meta["iter"], meta["rng"]
        except (KeyError, TypeError) as e:
            raise UsageError(f"checkpoint {path!r} is corrupt: its metadata lacks or garbles {e}.") from None
        for name in given:
            if name not in ("resume", "out_dir", "device", "max_iters") and tc.get(name) != saved.get(name):
                raise UsageError(f"--{name} {tc.get(name)!r} differs from the run being resumed "
                                 f"({saved.get(name)!r}): --resume continues a run as it was configured.")
        for name in ("max_iters", "device"):     # the only settings a resume may change
            if name in given:
                setattr(saved, name, getattr(tc, name))
        saved.resume, saved.out_dir = True, tc.out_dir
        tc = saved
        start_iter, rng_state, saved_threads = meta["iter"], meta["rng"], meta.get("threads")
        template = sft.template_of(meta)
        if tc.max_iters < start_iter:
            raise UsageError(f"--max_iters {tc.max_iters} is below the {start_iter} steps this run has "
                             "already taken: give a larger --max_iters to continue it.")
        if opt_state is None:
            raise UsageError(f"checkpoint {path!r} has no optimizer state, so it cannot be resumed: "
                             "use --init_from to start a new run from its weights.")
        shapes = model.param_shapes(cfg)
        check_params(opt_state["m"], shapes, path)
        check_params(opt_state["v"], shapes, path)
    elif tc.init_from:
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
        if tc.sft:
            template, tok, params = _sft_start(tc, tok, params, src_cfg, src_meta,
                                               is_pretrained_source(tc.init_from))
    if tc.sft:                       # examples (sft.py): prompt + response, the loss on the response
        sets = sft.load_set(tc.sft)
        data = {split: sft.encode_all(tok, template, sets[split], tc.model.block_size, split)
                for split in ("train", "test")}
        data["val"] = data.pop("test")
        if not data["val"]:
            raise UsageError(f"the SFT set {tc.sft!r} holds out no test example (every tenth is held out): "
                             "give it at least 10 examples.")
        if not tc.resume:            # the paper's SFT recipe, for the settings not given
            defaults = {"max_iters": sft.steps_per_epoch(len(data["train"]), tc.batch_size),
                        "weight_decay": 0.0, "min_lr": 0.0}
            for name, value in defaults.items():
                if name not in given:
                    setattr(tc, name, value)
            if "warmup_iters" not in given:
                tc.warmup_iters = round(0.03 * tc.max_iters)
        sizes = (f"SFT set {tc.sft!r}: {len(data['train']):,} training examples, {len(data['val']):,} held out; "
                 f"{tc.max_iters} steps = {tc.max_iters * tc.batch_size / len(data['train']):.2f} epochs")
    else:
        text = load_text(tc.data)
        if not (tc.resume or tc.init_from):
            tok = train_tokenizer(text, tc.tokenizer, tc.model.vocab_size)
        train_ids, val_ids = split_ids(tok.encode(text))
        check_split_lengths(train_ids, val_ids, tc.model.block_size)
        data = {"train": train_ids, "val": val_ids}
        sizes = f"train {len(train_ids):,} tokens, val {len(val_ids):,}"
    cfg = replace(tc.model, vocab_size=tok.vocab_size)           # the model config trained
    if not (tc.resume or tc.init_from):
        params = model.init_params(cfg, seed=tc.seed)

    opt = AdamW(params, tc.learning_rate, (tc.beta1, tc.beta2), weight_decay=tc.weight_decay)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    rng = np.random.default_rng(tc.seed)
    if rng_state is not None:
        rng.bit_generator.state = rng_state

    ops = model.REFERENCE if tc.reference else FAST
    # the batch is split over this many threads on the CPU. The rounding of the summed gradients
    # depends on it, so a resumed run keeps the count its checkpoint records (--threads 0 would
    # pick another on a machine with other cores)
    if tc.device == "gpu" or tc.reference:
        threads = 1
    elif saved_threads is not None:
        threads = saved_threads
    else:
        threads = tc.threads or parallel.auto_threads(sum(int(p.size) for p in params.values()))

    os.makedirs(tc.out_dir, exist_ok=True)          # only now: a bad input above leaves nothing behind
    kept = _read_metrics(metrics_path, start_iter) if tc.resume else []
    metrics = open(metrics_path, "w")
    metrics.writelines(kept)

    def save(next_iter):
        metrics.flush()
        meta = {"model": cfg.to_dict(), "train": tc.to_dict(), "iter": next_iter, "threads": threads,
                "rng": rng.bit_generator.state, "tokenizer": tok.to_dict()}
        if template is not None:            # generate.py prompts with it and stops at its end marker
            meta["sft"] = {"set": tc.sft, "template": template.to_dict()}
        save_checkpoint(path, params, meta, opt.state_dict())
        return next_iter

    # Ctrl-C asks to stop; the step in flight finishes so the saved state is whole
    stop = {"asked": False}
    old_handler = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        if stop["asked"]:                 # a second Ctrl-C: stop at once
            signal.signal(signal.SIGINT, old_handler)
            raise KeyboardInterrupt
        stop["asked"] = True
    signal.signal(signal.SIGINT, on_sigint)

    N, N_a = model.count_params(cfg), model.activated_params(cfg)
    log(f"model: {cfg.n_layer} layers, {cfg.n_embd} channels, vocab {cfg.vocab_size} ({tok.kind}); "
        f"N = {N:,} projection weights, N_a = {N_a:,} per token at sparsity {cfg.overall_sparsity:.2f}; "
        f"{sizes}")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_iters, initial=start_iter, desc="train", dynamic_ncols=True)
    last_saved, last = start_iter, {}
    tok_per_s, stopped, per_layer = None, False, None
    seen = {"tokens": 0, "response_tokens": 0}
    workers = None
    t_start = time.perf_counter()
    try:
        # inside the try: if they cannot start, the finally below still restores Ctrl-C and closes
        workers = start_workers(params, cfg, threads, tc, opt, log=bar.write if bar else log)
        for it in range(start_iter, tc.max_iters + 1):
            if it % tc.eval_interval == 0 or it == tc.max_iters:
                losses = (estimate_sft_loss(params, cfg, data, tc, ops) if tc.sft else
                          estimate_loss(params, cfg, data, tc, it, ops, None if tc.reference else threads, workers))
                if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
                    # never overwrite the last good checkpoint with broken weights
                    raise _diverged("evaluation loss", losses["val"], it, last_saved, path)
                last.update(val_loss=losses["val"], eval_train_loss=losses["train"])
                metrics.write(json.dumps({"iter": it, "eval": True, "train_loss": losses["train"],
                                          "val_loss": losses["val"], "sparsity": losses["val_sparsity"]}) + "\n")
                msg = f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                (bar.write if bar else log)(msg)
                last_saved = save(it)
            if it == tc.max_iters:
                break
            t0 = time.perf_counter()
            if tc.sft:                  # rows of examples, padded; the batch depends on `it` alone
                x, y = sft.batch_at(data["train"], it, tc.batch_size, tc.seed)
            else:
                x, y = get_batch(train_ids, cfg.block_size, tc.batch_size, rng)
            tokens_per_step = x.size
            seen["tokens"] += x.size
            seen["response_tokens"] += int((y != IGNORE).sum())
            x, y = backend.asarray(x), backend.asarray(y)
            if tc.reference:
                loss, grads, per_layer = model.forward_backward(params, cfg, x, y)
            elif workers is not None:
                loss, grads, per_layer = workers.forward_backward(params, cfg, x, y, ops)
            else:
                loss, grads, per_layer = parallel.forward_backward(params, cfg, x, y, ops, threads)
            if not math.isfinite(loss):
                raise _diverged("training loss", loss, it, last_saved, path)
            norm = clip_grad_norm(grads, tc.grad_clip)
            if not math.isfinite(norm):
                raise _diverged("gradient norm", norm, it, last_saved, path)
            lr = lr_at(it, tc.learning_rate, tc.min_lr, tc.warmup_iters, tc.max_iters)
            if workers is not None:
                workers.optimizer_step(opt, params, grads, lr)
            else:
                opt.step(params, grads, lr)
            # free this step's gradients now: kept until the next step replaced them, two sets
            # would be alive at once (for SmolLM2 the gradients alone are 0.5 GB)
            del grads
            sparsity = model.average_over_layers(per_layer)             # per_layer: {layer: {site: zeros}}
            dt = time.perf_counter() - t0
            tok_per_s = tokens_per_step / dt if tok_per_s is None else 0.9 * tok_per_s + 0.1 * tokens_per_step / dt
            last.update(train_loss=loss, sparsity=sparsity)
            line = {"iter": it, "train_loss": loss, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                    "grad_norm": norm, "sparsity": sparsity}
            if tc.sft:
                line.update(tokens=int(x.size), response_tokens=int((y != IGNORE).sum()))
            metrics.write(json.dumps(line) + "\n")
            if bar:                     # the postfix is drawn when update redraws (tqdm's mininterval),
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_per_s:,.0f}",      # not at every step
                                sparsity=f"{sum(sparsity.values()) / len(sparsity):.2f}", refresh=False)
                bar.update(1)
            if stop["asked"]:
                last_saved = save(it + 1)
                stopped = True
                (bar.write if bar else log)(f"interrupted: saved the run at iter {it + 1} to {path}; "
                                            "continue it with --resume.")
                break
    finally:
        signal.signal(signal.SIGINT, old_handler)
        if workers is not None:
            workers.close()
        if bar:
            bar.close()
        metrics.close()
    measured = model.activated_params(cfg, per_layer) if per_layer is not None else None
    return {"iters": last_saved, "interrupted": stopped, "seconds": time.perf_counter() - t_start,
            "val_loss": last.get("val_loss"), "train_loss": last.get("eval_train_loss"),
            "sparsity": last.get("sparsity"), "N": N, "N_a": N_a, "N_a_measured": measured,
            "checkpoint": path, **seen}
