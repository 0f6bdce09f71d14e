"""End-to-end tests of the two programs a user runs, train_tiny.py and generate.py.

A tiny model (1 layer, 2 heads, 16 channels, context 16, batch 4, 8 steps) is trained on a
~3 KB corpus written into a temporary folder, so the whole file runs in seconds on a CPU:

    train -> checkpoint -> interrupt (a real SIGINT) -> --resume, bit-exact against a run
    that never stopped -> --init_from a dense run at 50% sparsity -> generate.py

and every mistake a user can make (a bad flag, a missing or corrupt file, an impossible
configuration) must end in exit status 2 and one sentence on stderr, never a stack trace.
Most checks call `train_tiny.main(argv)` / `generate.main(argv)` in-process (fast); a few
run the real command line in a subprocess, `--key=value` syntax and `--help` included.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest

import generate
import train_tiny
from minisparse import checkpoint, model
from minisparse.fast import FAST
from minisparse.fast import rowsparse as fast_rowsparse
from minisparse import batches as mbatches, run as mrun, train as mtrain
from minisparse.checkpoint import load_checkpoint, save_checkpoint
from minisparse.data import load_text, split_ids
from minisparse.schedule import lr_at
from minisparse.run import read_metrics
from conftest import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
        "--batch_size", "4", "--max_iters", "8", "--eval_interval", "4", "--eval_iters", "2"]


def tiny(corpus, out_dir, *extra):
    """The argv of a tiny training run; later flags override earlier ones (argparse keeps the last)."""
    return [*TINY, "--data", str(corpus), "--out_dir", str(out_dir), *(str(a) for a in extra)]


def call(program, argv, capsys):
    """Run program.main(argv) in-process -> (exit status, stdout, stderr).
    An exception escaping main is what a user would see as a stack trace: it fails the test."""
    capsys.readouterr()
    try:
        rc = program.main([str(a) for a in argv])
    except SystemExit as e:                                   # argparse's usage errors
        rc = e.code
    except Exception as e:
        raise AssertionError(f"{program.__name__}.main({argv}) raised {type(e).__name__}: {e} -- a user "
                             "would see a stack trace instead of one sentence and exit status 2") from e
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_sentence(rc, err, prog, *needles, code=2):
    """Exit `code`, no traceback, and stderr is exactly one line 'prog: <sentence>.' holding every needle."""
    assert rc == code, f"{prog} exited {rc}, expected {code}; stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    msg = lines[0]
    assert msg.startswith(f"{prog}: ") and msg.endswith("."), msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def losses(out_dir):
    """(per-step training losses with their lr, eval losses): what an exact resume must reproduce."""
    step_lines, eval_lines = read_metrics(out_dir)
    steps = [(m["iter"], m["train_loss"], m["lr"], m["sparsity"]) for m in step_lines]
    evals = [(m["iter"], m["train_loss"], m["val_loss"]) for m in eval_lines]
    return steps, evals


def ckpt(out_dir):
    return os.path.join(str(out_dir), "ckpt.npz")


class Interrupt:
    """Deliver a real SIGINT to this process during the n-th *training* batch of train().

    The evaluation also calls get_batch (eval_iters batches per split at every evaluation), so
    counting every call would tie n to the evaluation schedule. Only calls whose caller is
    TextBatches.next, the training step's batch, are counted (the frame's code object is
    next's), so n is the training step index + 1 whatever eval_interval and eval_iters are.
    The loop's handler then lets that step finish, saves at iter n and stops."""

    def __init__(self, monkeypatch, n):
        self.n, self.count, self.real = n, 0, mbatches.get_batch
        monkeypatch.setattr(mbatches, "get_batch", self)

    def __call__(self, *args, **kwargs):
        if sys._getframe(1).f_code is mbatches.TextBatches.next.__code__:
            self.count += 1
            if self.count == self.n:
                os.kill(os.getpid(), signal.SIGINT)
        return self.real(*args, **kwargs)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~3 KB of English-ish text with a small char vocabulary (lowercase, digits, '.', ' ', newline)."""
    return write_corpus(tmp_path_factory, "the cat sat on a mat and saw dog run to big red box", 120)


def _train(corpus, out_dir, *extra):
    rc = train_tiny.main(tiny(corpus, out_dir, *extra))
    assert rc == 0 and os.path.isfile(ckpt(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def sparse_run(corpus, tmp_path_factory):
    """A finished Q-Sparse run (ReLU2-GLU, 50% top-K); a higher lr so 8 steps move the weights."""
    return _train(corpus, tmp_path_factory.mktemp("sparse"), "--warmup_iters", 0, "--learning_rate", 1e-2)


@pytest.fixture(scope="module")
def dense_run(corpus, tmp_path_factory):
    """A finished dense SwiGLU run: the source of continue-training."""
    return _train(corpus, tmp_path_factory.mktemp("dense"), "--sparsity", 0, "--activation", "swiglu",
                  "--warmup_iters", 0, "--learning_rate", 1e-2)


@pytest.fixture
def run_copy(sparse_run, tmp_path):
    """A private copy of sparse_run, free to corrupt."""
    dst = tmp_path / "copy"
    shutil.copytree(sparse_run, dst)
    return dst


# ----------------------------------------------------------------------------- the happy path

def test_training_writes_checkpoint_and_metrics(sparse_run):
    params, opt_state, meta = load_checkpoint(ckpt(sparse_run))
    assert meta["iter"] == 8 and opt_state["t"] == 8
    assert meta["model"]["n_embd"] == 16 and meta["model"]["sparsity"] == 0.5
    cfg = model.GPTConfig.from_dict(meta["model"])
    assert {k: v.shape for k, v in params.items()} == model.param_shapes(cfg)
    assert not os.path.exists(ckpt(sparse_run) + ".tmp"), "the atomic save left its .tmp file behind"
    steps, evals = losses(sparse_run)
    assert [s[0] for s in steps] == list(range(8))
    assert [e[0] for e in evals] == [0, 4, 8]
    assert evals[-1][2] < evals[0][2], "8 steps at lr 1e-2 did not lower the validation loss"


def test_interrupted_and_resumed_run_equals_one_that_never_stopped(corpus, tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    # a short warmup, so that steps 2..7 follow the cosine decay, whose length is max_iters
    rc, _, _ = call(train_tiny, tiny(corpus, a, "--warmup_iters", 2), capsys)
    assert rc == 0

    stop = Interrupt(monkeypatch, 3)               # Ctrl-C during the step at iter 2
    rc, out, _ = call(train_tiny, tiny(corpus, b, "--warmup_iters", 2), capsys)
    monkeypatch.undo()
    assert rc == 0
    assert stop.count == 3, f"training went on for {stop.count} batches after the SIGINT"
    assert "interrupted: saved the run at iter 3" in out and "--resume" in out
    assert load_checkpoint(ckpt(b))[2]["iter"] == 3
    assert not os.path.exists(ckpt(b) + ".tmp")

    # --max_iters 8 is repeated on purpose: a bare --resume is checked on its own below
    rc, out, _ = call(train_tiny, ["--resume", "--out_dir", b, "--max_iters", 8], capsys)
    assert rc == 0 and "done: iter 8" in out

    steps_a, evals_a = losses(a)
    steps_b, evals_b = losses(b)
    assert steps_b == steps_a                     # exact: every training loss, lr and sparsity
    assert evals_b == evals_a                     # exact: every eval loss
    pa, oa, ma = load_checkpoint(ckpt(a))
    pb, ob, mb = load_checkpoint(ckpt(b))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), f"param {k} differs after resume"
        assert np.array_equal(oa["m"][k], ob["m"][k]) and np.array_equal(oa["v"][k], ob["v"][k]), k
    assert oa["t"] == ob["t"] == 8
    assert ma["rng"] == mb["rng"] and ma["iter"] == mb["iter"] == 8


def test_resume_keeps_the_thread_count_the_run_started_with(corpus, tmp_path, capsys, monkeypatch):
    """--threads 0 picks one thread per core, and the split changes the rounding of the summed
    gradients: a run resumed on a machine with another core count must keep the count it began with."""
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setattr("minisparse.fast.parallel.cores", lambda: 2)
    assert call(train_tiny, tiny(corpus, a, "--threads", 0), capsys)[0] == 0
    stop = Interrupt(monkeypatch, 3)
    assert call(train_tiny, tiny(corpus, b, "--threads", 0), capsys)[0] == 0
    monkeypatch.undo()
    assert stop.count == 3 and load_checkpoint(ckpt(b))[2]["threads"] == 2
    monkeypatch.setattr("minisparse.fast.parallel.cores", lambda: 1)          # "another machine"
    rc, out, _ = call(train_tiny, ["--resume", "--out_dir", b], capsys)
    assert rc == 0 and "done: iter 8" in out
    assert losses(b) == losses(a)
    pa, pb = load_checkpoint(ckpt(a))[0], load_checkpoint(ckpt(b))[0]
    assert all(np.array_equal(pa[k], pb[k]) for k in pa), "the resumed run's weights differ"


def test_bare_resume_keeps_the_runs_max_iters(corpus, tmp_path, capsys, monkeypatch):
    """README: 'python train_tiny.py --resume continues, and ends with exactly the losses of a run
    that was never stopped'. Resume is interrupted again at its first step, so a regression to
    the default 3000 steps shows in the checkpoint without running 3000 steps."""
    b = tmp_path / "b"
    Interrupt(monkeypatch, 3)
    rc, _, _ = call(train_tiny, tiny(corpus, b, "--warmup_iters", 2), capsys)
    monkeypatch.undo()
    assert rc == 0 and load_checkpoint(ckpt(b))[2]["iter"] == 3
    Interrupt(monkeypatch, 1)
    rc, _, _ = call(train_tiny, ["--resume", "--out_dir", b], capsys)
    monkeypatch.undo()
    assert rc == 0
    meta = load_checkpoint(ckpt(b))[2]
    assert meta["iter"] == 4
    lr3 = [m["lr"] for m in read_metrics(b)[0] if m["iter"] == 3]
    assert meta["train"]["max_iters"] == 8 and lr3 == [lr_at(3, 2e-3, 2e-4, 2, 8)], (
        f"BUG: a bare --resume set max_iters to {meta['train']['max_iters']} (the TrainConfig default), "
        "not the resumed run's 8, so the cosine schedule (and the length) of the run changed; "
        "train.py should keep saved.max_iters unless --max_iters was given")


def test_resume_rejects_a_changed_flag(sparse_run, run_copy, capsys):
    rc, _, err = call(train_tiny, ["--resume", "--out_dir", run_copy, "--sparsity", 0.3], capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "--sparsity", "0.3", "0.5")


def test_resume_to_fewer_iters_than_done_is_a_usage_error(run_copy, capsys):
    before = load_checkpoint(ckpt(run_copy))[2]["iter"]
    rc, out, err = call(train_tiny, ["--resume", "--out_dir", run_copy, "--max_iters", 2], capsys)
    assert rc == 2 and "max_iters" in err, (
        f"BUG: --resume --max_iters 2 on a run already at iter {before} exited {rc} with stdout {out!r} "
        f"and stderr {err!r}: it silently does nothing (and rewrites metrics.jsonl); it should be one "
        "UsageError naming --max_iters and the checkpoint's iter")


def test_continue_training_starts_from_the_dense_weights(corpus, dense_run, tmp_path, capsys):
    other = tmp_path / "other"
    rc, out, _ = call(train_tiny, ["--init_from", dense_run, "--sparsity", 0.5, "--out_dir", other,
                                   "--data", corpus, "--batch_size", 4, "--max_iters", 4,
                                   "--eval_interval", 4, "--eval_iters", 2], capsys)
    assert rc == 0 and "done: iter 4" in out
    _, _, meta = load_checkpoint(ckpt(other))
    assert meta["model"]["sparsity"] == 0.5
    assert meta["model"]["activation"] == "swiglu"              # the architecture came with the weights
    assert (meta["model"]["n_embd"], meta["model"]["n_layer"], meta["model"]["block_size"]) == (16, 1, 16)

    # the iter-0 evaluation must be the dense run's weights evaluated at 50% sparsity
    src_params, _, src_cfg, tok, _ = mrun.load_run(str(dense_run))
    assert src_cfg.sparsity == 0.0
    cfg = model.GPTConfig.from_dict(meta["model"])
    tc = mrun.TrainConfig.from_dict(meta["train"])
    train_ids, val_ids = split_ids(tok.encode(load_text(str(corpus))))
    data = {"train": train_ids, "val": val_ids}
    expected = mbatches.estimate_loss(src_params, cfg, data, tc, 0, FAST)     # the ops train.py runs
    first = read_metrics(other)[1][0]
    assert first["iter"] == 0
    assert (first["train_loss"], first["val_loss"]) == (expected["train"], expected["val"])
    # ... and not a fresh initialisation, nor the dense model left dense
    fresh = mbatches.estimate_loss(model.init_params(cfg, seed=tc.seed), cfg, data, tc, 0)
    dense = mbatches.estimate_loss(src_params, src_cfg, data, tc, 0)
    assert first["val_loss"] != fresh["val"] and first["val_loss"] != dense["val"]
    assert first["val_loss"] < fresh["val"] - 0.05, (first["val_loss"], fresh["val"])


def test_continue_training_rejects_other_architecture(dense_run, corpus, tmp_path, capsys):
    rc, _, err = call(train_tiny, ["--init_from", dense_run, "--n_embd", 32, "--out_dir", tmp_path / "o",
                                   "--data", corpus], capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "--n_embd", "32", "16")


def test_generate_prints_prompt_and_summary(sparse_run, capsys):
    rc, out, err = call(generate, ["--out_dir", sparse_run, "--prompt", "the cat", "--max_new_tokens", 30], capsys)
    assert rc == 0, err
    assert out.startswith("the cat")
    assert len(out) == len("the cat") + 30 + 1                   # char tokens: one char each, plus print's newline
    for needle in ("tokens/s", "N_a", "measured sparsity", "sparsity 0.50", "30 tokens",
                   "of which the prompt: 7 tokens in", "the decode: 30 tokens in"):   # "the cat": 7 char tokens
        assert needle in err, f"{needle!r} not in the summary {err!r}"
    assert "dense" not in err
    total = float(re.search(r"30 tokens in ([0-9.]+) s:", err).group(1))
    parts = [float(t) for t in re.findall(r"tokens in ([0-9.]+) s[;,]", err)]   # the prompt's, the decode's
    assert len(parts) == 2 and abs(sum(parts) - total) <= 0.011, (parts, total)    # each rounded to 0.01 s


def test_generate_without_a_prompt_works_on_a_corpus_without_capitals(sparse_run, capsys):
    """The corpus has no 'T': a bare generate.py (no --prompt) must still sample, from a newline."""
    rc, out, err = call(generate, ["--out_dir", sparse_run, "--max_new_tokens", 12], capsys)
    assert rc == 0, err
    assert out.startswith("\n") and len(out) == 1 + 12 + 1     # the start token, 12 new, print's newline
    assert "12 tokens" in err


def watch_last_only(monkeypatch):
    """A list that receives model.forward's last_only at every call from now on."""
    seen, forward = [], model.forward

    def spy(*args, **kw):
        seen.append(kw.get("last_only", False))
        return forward(*args, **kw)
    monkeypatch.setattr(model, "forward", spy)
    return seen


def test_generate_prefills_the_head_at_the_last_position_only(sparse_run, capsys, monkeypatch):
    """generate.py's prompt timer needs no logits but the last (--fallback auto reads them all)."""
    seen = watch_last_only(monkeypatch)
    rc, _, err = call(generate, ["--out_dir", sparse_run, "--prompt", "the ", "--max_new_tokens", 3, "--kernel",
                                 "masked"], capsys)
    assert rc == 0, err
    assert seen[0] is True                                     # the prefill (tests/test_evaluate.py: the fallback's)


def test_generate_dense_fallback(sparse_run, capsys):
    rc, out, err = call(generate, ["--out_dir", sparse_run, "--prompt", "the", "--max_new_tokens", 10,
                                   "--sparsity", 0], capsys)
    assert rc == 0 and out.startswith("the")
    assert "dense" in err and "sparsity 0.50" not in err
    assert "qkv 0.00" in err                                    # no top-K zeros reached the projections


def test_generate_is_repeatable(sparse_run, capsys):
    def sample(*extra):
        rc, out, err = call(generate, ["--out_dir", sparse_run, "--prompt", "the ", "--max_new_tokens", 60,
                                       *extra], capsys)
        assert rc == 0, err
        return out
    assert sample("--temperature", 0, "--seed", 1) == sample("--temperature", 0, "--seed", 2)   # greedy
    assert sample("--temperature", 1, "--seed", 7) == sample("--temperature", 1, "--seed", 7)
    assert sample("--temperature", 1, "--seed", 7) != sample("--temperature", 1, "--seed", 8)
    two = sample("--num_samples", 2)
    assert "sample 1" in two and "sample 2" in two


@pytest.mark.parametrize("kernel", ["masked", "gather", "chunked"] + (["numba"] if fast_rowsparse.numba else []))
def test_generate_kernels_give_the_same_greedy_text(kernel, sparse_run, capsys):
    """Every --kernel computes the same projections (to float32 rounding): greedy text agrees."""
    def greedy(k):
        rc, out, err = call(generate, ["--out_dir", sparse_run, "--prompt", "the ", "--max_new_tokens", 40,
                                       "--temperature", 0, "--kernel", k], capsys)
        assert rc == 0, err
        return out, err
    (want, _), (got, err) = greedy("masked"), greedy(kernel)
    assert got == want
    assert "measured sparsity per site: qkv 0.50" in err


def _no_fast_paths(monkeypatch):
    """Make every fast op and the thread split raise: a run that still works used none of them."""
    def boom(*a, **k):
        raise AssertionError("a fast path ran under --reference")
    for name in ("topk.sparsify", "topk.topk_nonzero", "rope.rotate", "norm.rmsnorm_forward",
                 "norm.rmsnorm_backward", "embedding.embedding_backward", "parallel.forward_backward",
                 "rowsparse.topk_rows_matvec", "rowsparse.nm_rows_matvec", "runtime.retain_freed_memory"):
        monkeypatch.setattr(f"minisparse.fast.{name}", boom)
    monkeypatch.setattr("minisparse.fast.FAST", None)
    monkeypatch.setattr("minisparse.train.FAST", None)
    monkeypatch.setattr("generate.FAST", None)
    monkeypatch.setattr("minisparse.fast.decode.DecodeWeights", boom)      # what generate.decode_weights builds


def test_reference_runs_train_and_decode_on_the_readable_ops_alone(corpus, tmp_path, capsys, monkeypatch):
    """--reference: a training run and a decode that touch nothing in minisparse/fast/, with the
    losses of the fast path to float32 rounding."""
    fast_dir, ref_dir = tmp_path / "fast", tmp_path / "ref"
    assert call(train_tiny, tiny(corpus, fast_dir), capsys)[0] == 0
    _no_fast_paths(monkeypatch)
    rc, out, err = call(train_tiny, tiny(corpus, ref_dir, "--reference"), capsys)
    assert rc == 0, err
    (steps_f, evals_f), (steps_r, evals_r) = losses(fast_dir), losses(ref_dir)
    assert len(steps_r) == len(steps_f) == 8
    for a, b in zip(steps_f + evals_f, steps_r + evals_r):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=1e-4), (a, b)
    rc, out, err = call(generate, ["--out_dir", ref_dir, "--prompt", "the ", "--max_new_tokens", 20,
                                   "--temperature", 0, "--reference"], capsys)
    assert rc == 0, err
    assert out.startswith("the ") and "measured sparsity per site: qkv 0.50" in err
    monkeypatch.undo()
    rc, fast_out, _ = call(generate, ["--out_dir", ref_dir, "--prompt", "the ", "--max_new_tokens", 20,
                                      "--temperature", 0], capsys)
    assert rc == 0 and fast_out == out                               # greedy text: the same tokens


def test_debug_preset_stops_first_in_the_training_step_and_writes_only_out_debug(corpus, tmp_path, capsys,
                                                                                 monkeypatch):
    """python train_tiny.py --debug: a breakpoint in topk_mask first stops in train_step's forward, not
    in an evaluation; the run writes out-debug/ and nothing else (never out-tiny/); plain log lines, no
    tqdm bar to garble pdb's prompt. The first call is caught with sys.setprofile, as a debugger would
    see it, the stack read from its frame."""
    from minisparse import topk
    monkeypatch.chdir(tmp_path)
    first = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is topk.topk_mask.__code__ and not first:
            while frame is not None:
                first.append(frame.f_code)
                frame = frame.f_back

    sys.setprofile(profile)
    try:
        rc, out, err = call(train_tiny, ["--debug", "--data", corpus, *TINY[:8]], capsys)   # a tiny model
    finally:
        sys.setprofile(None)
    assert rc == 0, err
    assert first, "topk_mask was never called"
    names = [code.co_name for code in first]
    assert mtrain.train_step.__code__ in first and model.forward_backward.__code__ in first, names
    assert mbatches.text_estimate.__code__ not in first, f"the first topk_mask call is an evaluation's: {names}"
    assert sorted(os.listdir(tmp_path)) == ["out-debug"], os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / "out-debug")) == ["ckpt.npz", "metrics.jsonl"]
    t = load_checkpoint(ckpt(tmp_path / "out-debug"))[2]["train"]
    assert (t["reference"], t["threads"], t["max_iters"], t["eval_at_start"], t["bar"]) == (True, 1, 5, False, False)
    steps, evals = losses(tmp_path / "out-debug")
    assert [s[0] for s in steps] == [0, 1, 2, 3, 4] and [e[0] for e in evals] == [5]   # no evaluation at iter 0
    assert [l.split(":")[0] for l in out.splitlines() if l.startswith("iter ")] == [f"iter {i}" for i in range(6)]
    assert "it/s" not in err and "train:" not in err, err                               # no tqdm bar


def test_158_bit_run_trains_records_its_precision_and_decodes(corpus, tmp_path, capsys):
    d = tmp_path / "b158"
    rc, out, err = call(train_tiny, tiny(corpus, d, "--w_bits", 1.58, "--a_bits", 8, "--learning_rate", 1e-2), capsys)
    assert rc == 0, err
    meta = load_checkpoint(ckpt(d))[2]
    assert (meta["model"]["w_bits"], meta["model"]["a_bits"]) == (1.58, 8)
    evals = losses(d)[1]
    assert evals[-1][2] < evals[0][2]                                   # it learns
    texts = {}
    for kernel in ("masked", "auto", "gather"):
        rc, texts[kernel], err = call(generate, ["--out_dir", d, "--prompt", "the ", "--max_new_tokens", 20,
                                                 "--temperature", 0, "--kernel", kernel], capsys)
        assert rc == 0, err
        assert texts[kernel].startswith("the ") and "tokens/s" in err
    assert texts["auto"] == texts["masked"] == texts["gather"]          # every kernel, the same tokens


def test_generate_numba_kernel_without_numba_is_one_sentence(sparse_run, capsys, monkeypatch):
    monkeypatch.setattr(fast_rowsparse, "numba", None)
    rc, _, err = call(generate, ["--out_dir", sparse_run, "--prompt", "the", "--kernel", "numba"], capsys)
    assert_one_sentence(rc, err, "generate.py", "numba", "pip install numba")


# ----------------------------------------------------------------------------- divergence and atomic saves

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_diverging_run_exits_1_and_keeps_the_last_good_checkpoint(corpus, tmp_path, capsys):
    d = tmp_path / "d"
    rc, _, err = call(train_tiny, tiny(corpus, d, "--learning_rate", 1e30), capsys)
    assert rc == 1, f"lr 1e30 did not diverge within 8 steps (exit {rc})"
    assert "Traceback" not in err
    msgs = [l for l in err.splitlines() if l.startswith("train_tiny.py: ")]
    assert len(msgs) == 1 and "became" in msgs[0], err
    evals = read_metrics(d)[1]
    params, _, meta = load_checkpoint(ckpt(d))
    assert meta["iter"] == evals[-1]["iter"] == 0
    assert f"iter {meta['iter']}" in msgs[0] and ckpt(d) in msgs[0]
    assert all(np.isfinite(v).all() for v in params.values())
    assert not os.path.exists(ckpt(d) + ".tmp")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_diverging_run_never_saves_non_finite_weights(corpus, tmp_path, capsys):
    """With an evaluation every step, the step that blows the weights up (finite loss, non-finite
    gradient norm) is followed by an evaluation that saves them before the next loss is checked."""
    d = tmp_path / "d"
    rc, _, err = call(train_tiny, tiny(corpus, d, "--learning_rate", 1e30, "--eval_interval", 1), capsys)
    assert rc == 1 and "became" in err
    params, _, meta = load_checkpoint(ckpt(d))
    bad = sorted(k for k, v in params.items() if not np.isfinite(v).all())
    assert not bad, (
        f"BUG: the 'last good checkpoint' (iter {meta['iter']}) holds non-finite weights {bad[:3]}: train.py "
        "saves at an evaluation without checking that the eval losses (and the previous step's grad norm) "
        "are finite; it should raise TrainingDiverged before save() when they are not")


def test_interrupted_save_keeps_the_previous_checkpoint(run_copy, monkeypatch):
    path = ckpt(run_copy)
    before_params, before_opt, before_meta = load_checkpoint(path)
    real_savez = np.savez

    def savez_then_crash(f, **arrays):          # half a file written, then the disk fills up
        real_savez(f, **arrays)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.np, "savez", savez_then_crash)
    new = {k: v + 1 for k, v in before_params.items()}
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, new, {**before_meta, "iter": 99}, before_opt)
    monkeypatch.undo()
    params, _, meta = load_checkpoint(path)
    assert meta["iter"] == before_meta["iter"] == 8
    for k in before_params:
        assert np.array_equal(params[k], before_params[k]), k


# ----------------------------------------------------------------------------- bad input to train_tiny.py

SHORT_VAL = "ab" * 60          # 120 tokens: training 108, validation 12 < block_size + 1 = 17
SHORT_TRAIN = "abcdefghij"     # 10 tokens: training 9


@pytest.mark.parametrize("extra, needles", [
    (["--sparsity", "1.0"], ["sparsity 1.0", "[0, 1)"]),
    (["--sparsity", "-0.1"], ["sparsity -0.1", "[0, 1)"]),
    (["--n_embd", "8", "--sparsity", "0.95"], ["sparsity 0.95", "8 channels", "K = 0"]),
    (["--w_bits", "2"], ["w_bits=2.0", "16 or 1.58"]),
    (["--a_bits", "4"], ["a_bits=4", "16 or 8"]),
    (["--n_embd", "30", "--n_head", "4"], ["n_embd=30", "n_head=4", "divisible"]),
    (["--nm", "3:5"], ["block 5", "16"]),
    (["--nm", "20:16"], ["keep=20", "block=16"]),
    (["--nm", "abc"], ["'abc'", "KEEP:BLOCK"]),
    (["--n_layer", "0"], ["n_layer", "0"]),
    (["--batch_size", "-1"], ["--batch_size -1"]),
    (["--max_iters", "0"], ["--max_iters 0"]),
    (["--block_size", "0"], ["block_size", "0"]),
    (["--eval_iters", "0"], ["--eval_iters 0"]),
    (["--learning_rate", "nan"], ["--learning_rate nan", "finite"]),
    (["--learning_rate", "inf"], ["--learning_rate inf", "finite"]),
    (["--device", "tpu"], ["'tpu'", "cpu"]),
    (["--threads", "-1"], ["--threads -1", ">= 0"]),
    (["--resume", "--init_from", "elsewhere"], ["--resume", "--init_from"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_train_bad_flag(extra, needles, corpus, tmp_path, capsys):
    rc, _, err = call(train_tiny, tiny(corpus, tmp_path / "o", *extra), capsys)
    assert_one_sentence(rc, err, "train_tiny.py", *needles)


def test_train_nm_keeping_nothing_is_rejected(corpus, tmp_path, capsys):
    rc, out, err = call(train_tiny, tiny(corpus, tmp_path / "o", "--nm", "0:16"), capsys)
    assert rc == 2, (f"BUG: --nm 0:16 (keep 0 of every 16 channels = sparsity 1.0) trained and exited {rc}; "
                     "top-K rejects sparsity 1.0, so GPTConfig.validate should require keep >= 1 (not nm.check_nm: "
                     "nm_mask with keep 0 is tested as valid in test_topk.py)")


def test_train_gpu_without_cupy(corpus, tmp_path, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    rc, _, err = call(train_tiny, tiny(corpus, tmp_path / "o", "--device", "gpu"), capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "CuPy")
    rc, _, err = call(generate, ["--out_dir", tmp_path / "o", "--device", "gpu"], capsys)
    assert_one_sentence(rc, err, "generate.py", "CuPy")


@pytest.mark.parametrize("text, needles", [
    (None, ["corpus.txt", "does not exist"]),
    ("", ["corpus.txt", "empty"]),
    (" \n\n ", ["corpus.txt", "empty"]),
    (SHORT_VAL, ["validation split has 12 tokens", "block_size + 1 = 17"]),
    (SHORT_TRAIN, ["training split has 9 tokens", "block_size + 1 = 17"]),
], ids=["missing", "empty", "whitespace", "short-val", "short-train"])
def test_train_bad_corpus(text, needles, tmp_path, capsys):
    path = tmp_path / "corpus.txt"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    rc, _, err = call(train_tiny, tiny(path, tmp_path / "o"), capsys)
    assert_one_sentence(rc, err, "train_tiny.py", *needles)


def test_train_argparse_errors_exit_2(capsys):
    rc, _, err = call(train_tiny, ["--bogus", "1"], capsys)
    assert rc == 2 and "unrecognized arguments: --bogus" in err and "Traceback" not in err
    rc, _, err = call(train_tiny, ["--n_layer", "abc"], capsys)
    assert rc == 2 and "--n_layer" in err and "'abc'" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- missing, corrupt and foreign checkpoints

def test_missing_checkpoint(corpus, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = call(train_tiny, tiny(corpus, empty, "--resume"), capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "ckpt.npz", "does not exist")
    rc, _, err = call(train_tiny, tiny(corpus, tmp_path / "o", "--init_from", empty), capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "ckpt.npz", "does not exist")
    rc, _, err = call(generate, ["--out_dir", empty], capsys)
    assert_one_sentence(rc, err, "generate.py", "ckpt.npz", "does not exist")


def _garbage(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(3000))


def _truncated(path):
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[:len(raw) // 2])


def _empty(path):
    open(path, "wb").close()


def _npy(path):                 # a NumPy file, but a single .npy array, not an .npz archive
    with open(path, "wb") as f:
        np.save(f, np.zeros(3, dtype=np.float32))


def _meta_not_an_object(path):  # a valid archive whose meta.json is JSON, but a list
    np.savez(path, **{"meta.json": np.frombuffer(b"[1, 2]", dtype=np.uint8)})


CORRUPTIONS = {"garbage": _garbage, "truncated": _truncated, "empty-file": _empty,
               "npy-not-npz": _npy, "meta-is-a-list": _meta_not_an_object}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_checkpoint(how, run_copy, corpus, tmp_path, capsys):
    CORRUPTIONS[how](ckpt(run_copy))
    rc, _, err = call(generate, ["--out_dir", run_copy, "--prompt", "the"], capsys)
    assert_one_sentence(rc, err, "generate.py", "ckpt.npz")
    rc, _, err = call(train_tiny, ["--resume", "--out_dir", run_copy], capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "ckpt.npz")
    rc, _, err = call(train_tiny, tiny(corpus, tmp_path / "o", "--init_from", run_copy), capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "ckpt.npz")


def test_checkpoint_whose_params_do_not_fit_its_config(run_copy, corpus, tmp_path, capsys):
    params, opt_state, meta = load_checkpoint(ckpt(run_copy))
    params["h.0.attn.wq"] = np.zeros((16, 8), dtype=np.float32)        # the config needs (16, 16)
    save_checkpoint(ckpt(run_copy), params, meta, opt_state)
    rc, _, err = call(generate, ["--out_dir", run_copy, "--prompt", "the"], capsys)
    assert_one_sentence(rc, err, "generate.py", "'h.0.attn.wq'", "(16, 8)", "(16, 16)")
    rc, _, err = call(train_tiny, ["--resume", "--out_dir", run_copy], capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "'h.0.attn.wq'", "(16, 8)")
    rc, _, err = call(train_tiny, tiny(corpus, tmp_path / "o", "--init_from", run_copy), capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "'h.0.attn.wq'", "(16, 8)")


def test_resume_checkpoint_whose_optimizer_state_does_not_fit(run_copy, capsys):
    params, opt_state, meta = load_checkpoint(ckpt(run_copy))
    opt_state["m"]["wte"] = np.zeros((3, 3), dtype=np.float32)
    save_checkpoint(ckpt(run_copy), params, meta, opt_state)
    try:
        rc, _, err = call(train_tiny, ["--resume", "--out_dir", run_copy], capsys)
    except AssertionError as e:
        raise AssertionError(f"BUG: {e}. train.py's resume passes the AdamW moments to load_state_dict "
                             "without checking their names and shapes (check_params on m and v)") from None
    assert_one_sentence(rc, err, "train_tiny.py", "ckpt.npz")


# ----------------------------------------------------------------------------- bad input to generate.py

@pytest.mark.parametrize("extra, needles", [
    (["--temperature", "-1"], ["temperature -1", ">= 0"]),
    (["--max_new_tokens", "-1"], ["max_new_tokens -1", ">= 0"]),
    (["--num_samples", "0"], ["--num_samples 0", ">= 1"]),
    (["--top_k", "-1"], ["--top_k -1"]),
    (["--prompt", "日本"], ["'日'", "'本'", "vocabulary"]),
    (["--sparsity", "1.5"], ["sparsity 1.5", "[0, 1)"]),
    (["--device", "tpu"], ["'tpu'"]),
    (["--init_from", "out-tiny"], ["'out-tiny'", "smollm2", ".gguf"]),
    (["--init_from", "no/such/model.gguf"], ["no/such/model.gguf", "no such GGUF file"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_generate_bad_flag(extra, needles, sparse_run, capsys):
    rc, _, err = call(generate, ["--out_dir", sparse_run, "--prompt", "the", *extra], capsys)
    assert_one_sentence(rc, err, "generate.py", *needles)


def test_generate_nan_temperature(sparse_run, capsys):
    rc, out, err = call(generate, ["--out_dir", sparse_run, "--prompt", "the", "--max_new_tokens", 8,
                                   "--temperature", "nan"], capsys)
    assert rc == 2, (f"BUG: --temperature nan was accepted (exit {rc}, stdout {out!r}): every probability "
                     "becomes nan and the sampler returns token 0 (here '\\n') forever; "
                     "sampling.generate should reject a temperature that is not a number >= 0")


# ----------------------------------------------------------------------------- the real command line

def cli(script, *args):
    env = {k: v for k, v in os.environ.items() if k != "MINISPARSE_DEVICE"}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, script, *(str(a) for a in args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_help_lists_every_flag():
    r = cli("train_tiny.py", "--help")
    assert r.returncode == 0, r.stderr
    for f in fields(mrun.TrainConfig) + fields(model.GPTConfig):
        if f.name != "model":
            assert f"--{f.name}" in r.stdout, f"--{f.name} missing from --help"
    assert "--no_ste" in r.stdout
    for program, flag in (("generate.py", "--fallback"), ("evaluate.py", "--budget"), ("export.py", "--format")):
        r = cli(program, "--help")                   # argparse formats every help string: a bare % fails
        assert r.returncode == 0 and flag in r.stdout, (program, r.stderr)


def test_cli_train_and_generate_with_key_equals_value(corpus, tmp_path):
    out_dir = tmp_path / "cli"
    args = [f"{flag}={value}" for flag, value in zip(TINY[::2], TINY[1::2])]       # --n_layer=1 ...
    r = cli("train_tiny.py", *args, f"--data={corpus}", f"--out_dir={out_dir}", "--sparsity=0.25")
    assert r.returncode == 0, r.stderr
    assert "done: iter 8" in r.stdout and "Traceback" not in r.stderr
    _, _, meta = load_checkpoint(ckpt(out_dir))
    assert meta["model"]["sparsity"] == 0.25 and meta["train"]["max_iters"] == 8
    assert not os.path.exists(ckpt(out_dir) + ".tmp")
    assert len(read_metrics(out_dir)[0]) == 8

    r = cli("generate.py", f"--out_dir={out_dir}", "--prompt=the dog", "--max_new_tokens=12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the dog") and "tokens/s" in r.stderr and "N_a" in r.stderr


def test_cli_bad_input_is_one_sentence(corpus, tmp_path):
    r = cli("train_tiny.py", *tiny(corpus, tmp_path / "o", "--sparsity", "1.0"))
    assert_one_sentence(r.returncode, r.stderr, "train_tiny.py", "sparsity 1.0")
    r = cli("train_tiny.py", "--n_layer", "abc")
    assert r.returncode == 2 and "invalid int value" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    _garbage(ckpt(bad))
    r = cli("generate.py", "--out_dir", bad)
    assert_one_sentence(r.returncode, r.stderr, "generate.py", "corrupt")


def test_train_init_from_missing_gguf_is_one_sentence(corpus, tmp_path, capsys):
    rc, _, err = call(train_tiny, ["--init_from", tmp_path / "missing.gguf", "--out_dir", tmp_path / "o",
                                   "--data", corpus], capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "missing.gguf", "no such GGUF file")


def test_generate_sets_a_short_openblas_thread_timeout_before_numpy_loads():
    """OpenBLAS reads OPENBLAS_THREAD_TIMEOUT once, when NumPy loads it: generate.py sets it (4, unless
    the user set another) before it imports NumPy, which DecodeWeights.prefill relies on."""
    probe = ("import sys, builtins\n"
             "real = builtins.__import__\n"
             "def spy(name, *a, **k):\n"
             "    if name == 'numpy' and 'numpy' not in sys.modules:\n"
             "        import os; print('at numpy:', os.environ.get('OPENBLAS_THREAD_TIMEOUT'))\n"
             "    return real(name, *a, **k)\n"
             "builtins.__import__ = spy\n"
             "import generate\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "at numpy: 4"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, "OPENBLAS_THREAD_TIMEOUT": "12"},
                         capture_output=True, text=True)
    assert out.stdout.splitlines()[0] == "at numpy: 12"                # the user's own value is kept
