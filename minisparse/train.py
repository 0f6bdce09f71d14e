"""The training loop behind train_tiny.py: the step, and what sits around it.

One step at iteration `it` (train_step, the first function below):
    x, y = batches.next(it)                           (B, T) tokens and their next tokens
    loss, grads = engine.forward_backward(params, cfg, x, y)
    clip_grad_norm(grads, grad_clip)
    AdamW step(params, grads, lr_at(it))              warmup, then cosine to min_lr

Around it, train():
    set-up      run.py: new_run, resume_run or init_from_run, each returning one RunState (weights,
                AdamW, step, batches, tokenizer, settings); batches.py: pretraining text or SFT
                examples behind one interface
    the engine  choose_engine, once per run: --reference runs the readable ops (model.py) on this
                thread; otherwise the fast ops (minisparse/fast/), the batch split into `threads`
                parts whose gradients add up, one on this process and each other in a worker
                process (fast/workers.py), or in threads (fast/parallel.py) where /dev/shm has no
                room for the workers' shared memory
    evaluation  every eval_interval steps, and at the end: the loss on eval_iters batches of each
                split, then a checkpoint (checkpoint.py). Evaluation batches come from a generator
                seeded by (seed, it), so a run stopped and resumed (--resume) ends with exactly the
                losses of one that never stopped.
    Ctrl-C      finishes the current step, saves, and stops.
    divergence  a non-finite loss or gradient norm stops training and keeps the last good checkpoint.

metrics.jsonl in out_dir gets one JSON object a line: a training line per step
{"iter", "train_loss", "lr", "tokens_per_s", "grad_norm", "sparsity": {site: zeros}}, and an
evaluation line {"iter", "eval": true, "train_loss", "val_loss", "sparsity"} every eval_interval
(its sparsity measured on the validation batches).

To step through a training step in pdb: `python train_tiny.py --debug` (run.DEBUG_PRESET: the
readable ops on one thread, no evaluation before the first step, plain log lines, out-debug/).
"""

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

from . import backend, model
from .fast import FAST, parallel
from .fast.runtime import retain_freed_memory
from .fast.workers import Workers, shared_bytes, shared_memory_free
from .loss import IGNORE
from .optimizer import AdamW, clip_grad_norm
from .run import ckpt_path, kept_metrics, save_run, start_run
from .schedule import lr_at

# where lessons (and generate.py, benchmarks/topk_flips.py) import them from: they live in run.py and batches.py
from .batches import estimate_loss  # noqa: F401
from .run import TrainConfig, load_run, read_metrics  # noqa: F401


def train_step(run, engine, it):
    """One training step at iteration `it`: run.params and run.opt are updated in place. Returns the
    step's loss, lr, grad_norm (before clipping), per_layer (the measured sparsity {layer: {site:
    fraction of zeros}}), tokens and response_tokens (the targets counted in the loss). A loss or
    gradient norm that is not finite raises NotFinite before any weight changes."""
    tc = run.tc
    x, y = run.batches.next(it)                                 # (B, T) int64 each
    counted = int((y != IGNORE).sum())                          # the targets in the loss
    x, y = backend.asarray(x), backend.asarray(y)               # onto the device
    loss, grads, per_layer = engine.forward_backward(run.params, run.cfg, x, y)   # grads: like params
    if not math.isfinite(loss):
        raise NotFinite("training loss", loss)
    norm = clip_grad_norm(grads, tc.grad_clip)                  # scaled in place; the norm before
    if not math.isfinite(norm):
        raise NotFinite("gradient norm", norm)
    lr = lr_at(it, tc.learning_rate, tc.min_lr, tc.warmup_iters, tc.max_iters)
    engine.optimizer_step(run.opt, run.params, grads, lr)       # AdamW
    # grads are freed as this returns, before the next step makes its own: two sets alive at once
    # would double the memory (for SmolLM2 the gradients alone are 0.5 GB)
    return {"loss": loss, "lr": lr, "grad_norm": norm, "per_layer": per_layer,
            "tokens": x.size, "response_tokens": counted}


def train(tc, given=(), progress=True, log=print):
    """Run training as `tc` says. `given` names the flags the user set (for --resume/--init_from checks).
    progress: a tqdm bar (or with tc.bar off, a log line per step); False: only the evaluations.
    Returns a summary dict: final losses, time, measured sparsity, N and N_a."""
    tc.validate()
    backend.set_device(tc.device)
    run = start_run(tc, given)
    tc, cfg, path = run.tc, run.cfg, ckpt_path(run.tc.out_dir)

    os.makedirs(tc.out_dir, exist_ok=True)          # only now: a bad input above leaves nothing behind
    metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")
    kept = kept_metrics(metrics_path, run.step) if tc.resume else []
    metrics = open(metrics_path, "w")
    metrics.writelines(kept)

    def save(next_iter):
        metrics.flush()
        return save_run(run, next_iter, engine.threads)

    stop = CtrlC()
    N, N_a = model.count_params(cfg), model.activated_params(cfg)
    log(f"model: {cfg.n_layer} layers, {cfg.n_embd} channels, vocab {cfg.vocab_size} ({run.tok.kind}); "
        f"N = {N:,} projection weights, N_a = {N_a:,} per token at sparsity {cfg.overall_sparsity:.2f}; "
        f"{run.batches.describe(tc.max_iters)}")
    report = Bar(tc.max_iters, run.step) if progress and tc.bar else Lines(log, every_step=progress)
    last_saved = run.step if tc.resume else None            # the checkpoint on disk from this run
    last, seen = {}, {"tokens": 0, "response_tokens": 0}
    tok_per_s, stopped, per_layer, engine = None, False, None, None
    t_start = time.perf_counter()
    try:
        # inside the try: if the workers cannot start, the finally below still restores Ctrl-C and closes
        engine = choose_engine(run, log=report.write)
        for it in range(run.step, tc.max_iters + 1):
            if it == tc.max_iters or (it % tc.eval_interval == 0 and (it > 0 or tc.eval_at_start)):
                losses = run.batches.estimate(run.params, cfg, it, engine)
                if not (math.isfinite(losses["train"]) and math.isfinite(losses["val"])):
                    # never overwrite the last good checkpoint with broken weights
                    raise _diverged("evaluation loss", losses["val"], it, last_saved, path)
                last.update(val_loss=losses["val"], eval_train_loss=losses["train"])
                metrics.write(json.dumps({"iter": it, "eval": True, "train_loss": losses["train"],
                                          "val_loss": losses["val"], "sparsity": losses["val_sparsity"]}) + "\n")
                report.write(f"iter {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                last_saved = save(it)
            if it == tc.max_iters:
                break
            t0 = time.perf_counter()
            try:
                step = train_step(run, engine, it)
            except NotFinite as e:
                raise _diverged(e.what, e.value, it, last_saved, path) from None
            dt = time.perf_counter() - t0
            per_layer = step["per_layer"]                                  # {layer: {site: zeros}}
            sparsity = model.average_over_layers(per_layer)
            seen["tokens"] += step["tokens"]
            seen["response_tokens"] += step["response_tokens"]
            tok_per_s = step["tokens"] / dt if tok_per_s is None else 0.9 * tok_per_s + 0.1 * step["tokens"] / dt
            last.update(train_loss=step["loss"], sparsity=sparsity)
            line = {"iter": it, "train_loss": step["loss"], "lr": step["lr"], "tokens_per_s": step["tokens"] / dt,
                    "grad_norm": step["grad_norm"], "sparsity": sparsity}
            line.update({name: step[name] for name in run.batches.logged})   # finetuning: the tokens
            metrics.write(json.dumps(line) + "\n")
            report.step(it, step, tok_per_s, sparsity)
            if stop.asked:
                last_saved = save(it + 1)
                stopped = True
                report.write(f"interrupted: saved the run at iter {it + 1} to {path}; continue it with --resume.")
                break
    finally:
        stop.restore()
        if engine is not None:
            engine.close()
        report.close()
        metrics.close()
    measured = model.activated_params(cfg, per_layer) if per_layer is not None else None
    return {"iters": last_saved, "interrupted": stopped, "seconds": time.perf_counter() - t_start,
            "val_loss": last.get("val_loss"), "train_loss": last.get("eval_train_loss"),
            "sparsity": last.get("sparsity"), "N": N, "N_a": N_a, "N_a_measured": measured,
            "checkpoint": path, **seen}


# ----------------------------------------------------------------------------------------
# the engine: how the run's batches are computed, chosen once


@dataclass
class Engine:
    """What train_step and the estimates call. Every choice computes the reference's functions, up to
    float rounding (tests/test_fast.py: the fast ops; test_parallel.py, test_workers.py: the parts)."""
    ops: model.Ops                   # model.REFERENCE or fast.FAST
    threads: int                     # the parts each batch is split into (the checkpoint records it)
    forward_backward: Callable       # (params, cfg, x, y) -> (loss, grads, {layer: {site: zeros}})
    forward_loss: Callable           # (params, cfg, x, y) -> (loss, {layer: {site: zeros}})
    optimizer_step: Callable = AdamW.step         # (opt, params, grads, lr)
    close: Callable = lambda: None


def choose_engine(run, log=print):
    """--reference: the readable ops of model.py on this thread, to step through in a debugger.
    Otherwise the fast ops, each batch split into batch_threads(run) parts: the first on this thread
    and each other in a worker process that also takes its share of the optimizer's step
    (start_workers), or, where the batch is not split over processes, in threads (fast/parallel.py)."""
    if run.tc.reference:
        return Engine(model.REFERENCE, 1, model.forward_backward, partial(model.forward_loss, ops=model.REFERENCE))
    retain_freed_memory()            # no page faults from re-allocating activations (fast/runtime.py)
    threads = batch_threads(run)
    workers = start_workers(run.params, run.cfg, threads, run.tc, run.opt, log=log)
    if workers is None:
        return Engine(FAST, threads, partial(parallel.forward_backward, ops=FAST, threads=threads),
                      partial(parallel.forward_loss, ops=FAST, threads=threads))
    return Engine(FAST, threads, partial(workers.forward_backward, ops=FAST),
                  partial(workers.forward_loss, ops=FAST), workers.optimizer_step, workers.close)


def batch_threads(run):
    """The parts each batch is split into on the CPU. The rounding of the summed gradients depends
    on it, so a resumed run keeps the count its checkpoint records (--threads 0 would pick another on
    a machine with other cores)."""
    if run.tc.device == "gpu":
        return 1
    if run.threads is not None:
        return run.threads
    return run.tc.threads or parallel.auto_threads(sum(int(p.size) for p in run.params.values()))


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


# ----------------------------------------------------------------------------------------
# around the loop: divergence, Ctrl-C, what the user sees


class TrainingDiverged(RuntimeError):
    """Training stopped at a non-finite loss or gradient norm (train_tiny.py exits 1 with its message)."""


class NotFinite(ArithmeticError):
    """A step's loss or gradient norm is inf or NaN (train_step); train() stops with TrainingDiverged."""

    def __init__(self, what, value):
        super().__init__(what, value)
        self.what, self.value = what, value


def _diverged(what, value, it, last_saved, path):
    if last_saved is None:
        return TrainingDiverged(f"the {what} became {value} at iter {it}: stopping before this run wrote a "
                                "checkpoint. Try a lower --learning_rate.")
    return TrainingDiverged(f"the {what} became {value} at iter {it}: stopping; the last good checkpoint "
                            f"(iter {last_saved}) is kept in {path}. Try a lower --learning_rate.")


class CtrlC:
    """Ctrl-C asks the loop to stop: the step in flight finishes, so the saved state is whole. A
    second Ctrl-C stops at once. restore() puts the previous handler back."""

    def __init__(self):
        self.asked = False
        self.old_handler = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self.on_sigint)

    def on_sigint(self, signum, frame):
        if self.asked:
            signal.signal(signal.SIGINT, self.old_handler)
            raise KeyboardInterrupt
        self.asked = True

    def restore(self):
        signal.signal(signal.SIGINT, self.old_handler)


class Bar:
    """A tqdm bar over the run's steps; messages are written above it."""

    def __init__(self, total, initial):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def write(self, msg):
        self.bar.write(msg)

    def step(self, it, step, tok_per_s, sparsity):
        # the postfix is drawn when update redraws (tqdm's mininterval), not at every step
        self.bar.set_postfix(loss=f"{step['loss']:.3f}", tok_s=f"{tok_per_s:,.0f}",
                             sparsity=f"{sum(sparsity.values()) / len(sparsity):.2f}", refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


class Lines:
    """Plain log lines, which leave a debugger's prompt readable: one a step where every_step."""

    def __init__(self, log, every_step=True):
        self.write, self.every_step = log, every_step

    def step(self, it, step, tok_per_s, sparsity):
        if self.every_step:
            self.write(f"iter {it}: loss {step['loss']:.4f}, lr {step['lr']:.2e}, {tok_per_s:,.0f} tokens/s, "
                       f"sparsity {sum(sparsity.values()) / len(sparsity):.2f}")

    def close(self):
        pass
