"""The batch split over worker processes (minisparse/fast/workers.py) gives what the split over
threads (fast/parallel.py) gives, bit for bit: the loss, every gradient, the measured sparsity,
the evaluation's loss; the workers see the optimizer's updates; their failures are told."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minisparse import model, train as train_mod
from minisparse.fast import FAST, parallel
from minisparse.fast.workers import Workers
from minisparse.optimizer import AdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(sparsity=0.0, nm=None, B=5, dtype=np.float32, **kw):
    cfg = model.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=16, n_hidden=32,
                          sparsity=sparsity, nm=nm, **kw)
    params = model.init_params(cfg, seed=1, dtype=dtype)
    idx = np.random.default_rng(2).integers(0, 11, (B, 9))
    return cfg, params, idx[:, :-1], idx[:, 1:]


def assert_same_step(a, b):
    assert a[0] == b[0]                                            # the loss, bit for bit
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert np.array_equal(a[1][k], b[1][k]), k
    assert a[2] == b[2]                                            # measured sparsity


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("sparsity, nm, kw", [
    (0.0, None, {}),
    (0.5, None, {}),
    (0.0, (2, 4), dict(activation="swiglu", n_kv_head=2, tie_embeddings=True)),
])
def test_workers_step_and_evaluation_equal_the_threads(parts, sparsity, nm, kw):
    cfg, params, x, y = setup(sparsity, nm, **kw)
    copy = {k: v.copy() for k, v in params.items()}
    ref = parallel.forward_backward(copy, cfg, x, y, FAST, parts)
    ref_eval = parallel.forward_loss(copy, cfg, x, y, FAST, parts)
    with Workers(params, cfg, parts) as w:
        got = w.forward_backward(params, cfg, x, y)
        assert_same_step(got, ref)
        assert w.forward_loss(params, cfg, x, y) == ref_eval
        assert len(w.procs) == parts - 1 and all(p.is_alive() for p in w.procs)
    assert all(not p.is_alive() for p in w.procs) or w.procs == []


def test_workers_with_masked_targets_and_fewer_sequences_than_parts():
    """Finetuning's masked targets weight the parts by counted tokens; a batch of 2 sequences over
    3 parts leaves a worker idle."""
    cfg, params, x, y = setup(0.5)
    y = y.copy()
    y[0, :7] = -1
    y[1, :] = -1
    copy = {k: v.copy() for k, v in params.items()}
    with Workers(params, cfg, 3) as w:
        assert_same_step(w.forward_backward(params, cfg, x, y), parallel.forward_backward(copy, cfg, x, y, FAST, 3))
        assert_same_step(w.forward_backward(params, cfg, x[:2], y[:2]),
                         parallel.forward_backward(copy, cfg, x[:2], y[:2], FAST, 3))


def test_workers_see_the_optimizers_updates_and_params_are_plain_after_close():
    cfg, params, x, y = setup(0.5)
    copy = {k: v.copy() for k, v in params.items()}
    opt, opt_ref = AdamW(params), AdamW(copy)
    with Workers(params, cfg, 2) as w:
        for _ in range(3):
            _, grads, _ = w.forward_backward(params, cfg, x, y)
            opt.step(params, grads, 1e-2)
            _, grads_ref, _ = parallel.forward_backward(copy, cfg, x, y, FAST, 2)
            opt_ref.step(copy, grads_ref, 1e-2)
        for k in params:
            assert np.array_equal(params[k], copy[k]), k
    for k in params:                                               # after close: the same values, own memory
        assert params[k].flags.owndata and np.array_equal(params[k], copy[k]), k


def test_a_workers_error_is_raised_with_its_traceback():
    cfg, params, x, y = setup()
    with Workers(params, cfg, 2) as w:
        bad = x.copy()
        bad[-1, 0] = 99                                            # out of the vocabulary, in the worker's part
        with pytest.raises(RuntimeError, match="worker process 1 failed:(.|\n)*IndexError"):
            w.forward_backward(params, cfg, bad, y)
        assert_same_step(w.forward_backward(params, cfg, x, y),   # and it serves the next step
                         parallel.forward_backward({k: v.copy() for k, v in params.items()}, cfg, x, y, FAST, 2))


def test_a_worker_that_dies_is_named():
    cfg, params, x, y = setup()
    with Workers(params, cfg, 2) as w:
        w.procs[0].kill()
        w.procs[0].join()
        with pytest.raises(RuntimeError, match="worker process 1 ended unexpectedly"):
            w.forward_backward(params, cfg, x, y)


def test_workers_take_only_what_they_were_made_with():
    cfg, params, x, y = setup()
    with Workers(params, cfg, 2) as w:
        with pytest.raises(ValueError, match="made with"):
            w.forward_backward({k: v.copy() for k, v in params.items()}, cfg, x, y)
        with pytest.raises(ValueError, match="made with"):
            w.forward_backward(params, cfg, x, y, model.REFERENCE)


def test_a_script_that_trains_at_its_top_level_runs_once(tmp_path):
    """A started worker must not run the main script again (a spawned process would, to find what
    the script defined): a script with no `if __name__ == "__main__"` would train inside its worker."""
    script = tmp_path / "top.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import numpy as np
        from minisparse import model
        from minisparse.fast.workers import Workers
        print("script ran", flush=True)
        cfg = model.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, n_hidden=16)
        params = model.init_params(cfg, seed=1)
        x = np.zeros((2, 8), dtype=np.int64)
        with Workers(params, cfg, 2) as w:
            print("loss", w.forward_backward(params, cfg, x, x)[0], flush=True)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("script ran") == 1 and out.stdout.count("loss") == 1, out.stdout


def test_training_with_workers_writes_the_metrics_of_training_with_threads(tmp_path, monkeypatch):
    """train.py's run, its parts in worker processes, against the same run where /dev/shm has no
    room for them, so the parts run as fast/parallel.py's threads (and the log says why): every line
    of metrics.jsonl equal but the speed, the checkpoints equal."""
    from minisparse.checkpoint import load_checkpoint
    from minisparse.run import TrainConfig
    from minisparse.train import train

    def run(out, free):
        started, said = [], []
        start = train_mod.start_workers
        monkeypatch.setattr(train_mod, "shared_memory_free", lambda: free)
        monkeypatch.setattr(train_mod, "start_workers", lambda *a, **k: started.append(start(*a, **k)) or started[-1])
        cfg = model.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=4, n_embd=16, n_hidden=32, sparsity=0.5)
        tc = TrainConfig(model=cfg, data="pydoc", out_dir=str(out), batch_size=4, max_iters=12,
                         eval_interval=6, eval_iters=2, threads=2, tokenizer="char")
        train(tc, progress=False, log=said.append)
        lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
        for line in lines:
            line.pop("tokens_per_s", None)
        return lines, load_checkpoint(str(out / "ckpt.npz"))[0], started[0], said

    got, got_params, workers, said = run(tmp_path / "workers", None)
    assert isinstance(workers, Workers) and not any("shared memory" in s for s in said)
    ref, ref_params, threads, said = run(tmp_path / "threads", 1000)
    assert threads is None and any("would need" in s and "/dev/shm has 0 MB free" in s and "run as threads" in s for s in said)
    assert len(got) == 12 + 3 and got == ref
    for k in ref_params:
        assert np.array_equal(got_params[k], ref_params[k]), k


def test_shared_bytes_counts_every_block():
    from minisparse.fast.workers import shared_bytes
    cfg, params, _, _ = setup()
    n = sum(a.nbytes for a in params.values())
    assert shared_bytes(params, 2) == 3 * n                        # params, the sum, one worker's grads
    assert shared_bytes(params, 3, AdamW(params)) == 6 * n         # two workers' grads, m and v
    with Workers(params, cfg, 3, AdamW(params)) as w:
        assert sum(b.size for b in w.blocks) >= 6 * n


def test_a_failure_in_this_process_leaves_no_reply_behind():
    """The first part fails here while the worker's succeeds: the worker's reply is read before the
    error is raised, so the next step gets its own."""
    cfg, params, x, y = setup()
    with Workers(params, cfg, 2) as w:
        bad = x.copy()
        bad[0, 0] = 99                                             # in this process's part
        with pytest.raises(IndexError):
            w.forward_backward(params, cfg, bad, y)
        with pytest.raises(IndexError):
            w.forward_loss(params, cfg, bad, y)
        assert_same_step(w.forward_backward(params, cfg, x, y),
                         parallel.forward_backward({k: v.copy() for k, v in params.items()}, cfg, x, y, FAST, 2))


@pytest.mark.parametrize("parts", [2, 3])
def test_the_optimizers_step_shared_between_the_processes_equals_adamw(parts):
    """Each process updates its group of parameters with AdamW.update: after steps with clipping
    (which scales the shared gradients in place), the weights and the moments are AdamW's, bit for
    bit, and so is a checkpoint's optimizer state."""
    from minisparse.optimizer import clip_grad_norm
    cfg, params, x, y = setup(0.5)
    copy = {k: v.copy() for k, v in params.items()}
    opt, opt_ref = AdamW(params, weight_decay=0.1), AdamW(copy, weight_decay=0.1)
    with Workers(params, cfg, parts, opt) as w:
        assert sorted(k for g in w.groups for k in g) == sorted(params) and all(w.groups)
        for it in range(3):
            _, grads, _ = w.forward_backward(params, cfg, x, y)
            assert all(grads[k] is w.sum[k] for k in grads)         # shared, for the workers to read
            clip_grad_norm(grads, 0.05)
            w.optimizer_step(opt, params, grads, 1e-2 * (it + 1))
            _, grads_ref, _ = parallel.forward_backward(copy, cfg, x, y, FAST, parts)
            clip_grad_norm(grads_ref, 0.05)
            opt_ref.step(copy, grads_ref, 1e-2 * (it + 1))
        assert opt.t == opt_ref.t == 3
        for k in params:
            assert np.array_equal(params[k], copy[k]), k
            assert np.array_equal(opt.m[k], opt_ref.m[k]) and np.array_equal(opt.v[k], opt_ref.v[k]), k
        other = {k: g.copy() for k, g in grads.items()}          # not the shared gradients: done here
        w.optimizer_step(opt, params, other, 1e-2)
        opt_ref.step(copy, other, 1e-2)
        assert all(np.array_equal(params[k], copy[k]) for k in params)
    for arrays in (params, opt.m, opt.v):                          # plain arrays again after close
        assert all(a.flags.owndata for a in arrays.values())
    assert all(np.array_equal(opt.m[k], opt_ref.m[k]) for k in params)


def test_deal_balances_sizes():
    from minisparse.fast.workers import deal
    assert deal([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    assert deal([3, 3, 2, 2], 2) == [[0, 2], [1, 3]]
    assert deal([1], 3) == [[0], [], []]


def test_training_whose_workers_cannot_start_restores_ctrl_c(tmp_path, monkeypatch):
    """Workers fail to start (say, no shared memory): train() raises that error, and its Ctrl-C
    handler is gone again, as after any other failure inside the run."""
    import signal
    from minisparse.run import TrainConfig
    from minisparse.train import train

    def fail(*a, **k):
        raise OSError("no shared memory here")
    monkeypatch.setattr(train_mod, "Workers", fail)
    before = signal.getsignal(signal.SIGINT)
    cfg = model.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, n_hidden=16)
    tc = TrainConfig(model=cfg, data="pydoc", out_dir=str(tmp_path / "run"), batch_size=4, max_iters=2,
                     eval_interval=2, eval_iters=1, threads=2, tokenizer="char")
    with pytest.raises(OSError, match="no shared memory"):
        train(tc, progress=False, log=lambda *a: None)
    assert signal.getsignal(signal.SIGINT) is before
