"""Data parallelism in processes: fast/parallel.py's split of the batch, every part but the first
run by a worker process of its own, the parameters in shared memory.

    w = Workers(params, cfg, parts)          params' arrays move into shared memory (the same values)
    w.forward_backward(params, cfg, x, y)    equals parallel.forward_backward(params, cfg, x, y, FAST, parts)
    w.forward_loss(params, cfg, x, y)        equals parallel.forward_loss(params, cfg, x, y, FAST, parts)
                                             both bit for bit (tests/test_workers.py)
    w.close()                                the workers end, and params hold plain arrays again

Why not threads: the threads of one process share Python's interpreter lock (the GIL). NumPy lets
go of it inside each operation and takes it back after, and a training step of a small model is
about a thousand operations of a few microseconds on each part. Two threads then hand the lock to
each other at nearly every operation, and a handoff costs more than such an operation. Two
processes each have their own interpreter, and each part runs as fast as it does alone
(benchmarks/RESULTS.md).

How: the parameters live in one block of shared memory that every process maps; the optimizer
updates them in place in the main process, and the workers read the new values at the next
step. A worker receives its part's token ids through a pipe, runs model.forward_backward on them
with BLAS on one thread, writes its gradients into a shared block of its own and sends back its
loss and measured sparsity. The main process runs part 0 meanwhile, then adds the workers'
gradients in part order, as fast/parallel.py adds its threads', so the sums are the same bit for
bit. An evaluation forward sends back its logits and counts instead (parallel.part_forward).
A worker ignores Ctrl-C: the main process finishes the step and saves (train.py).
"""

import atexit
import contextlib
import multiprocessing
import signal
import sys
import traceback
import types
from multiprocessing import shared_memory

import numpy as np

from .. import model
from . import FAST, parallel
from .runtime import blas_threads, retain_freed_memory


def _views(buf, layout, dtype):
    """{name: array} over the buffer, each at its offset (in items) with its shape."""
    return {k: np.ndarray(shape, dtype=dtype, buffer=buf, offset=off * np.dtype(dtype).itemsize)
            for k, (off, shape) in layout.items()}


def _block(n_items, dtype):
    return shared_memory.SharedMemory(create=True, size=max(1, n_items * np.dtype(dtype).itemsize))


def _serve(conn, cfg, layout, dtype, params_name, grads_name):
    """A worker's loop: a part's step or forward for each message, until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)           # Ctrl-C is the main process's to handle
    retain_freed_memory()
    blocks = [shared_memory.SharedMemory(name=n) for n in (params_name, grads_name)]
    params, grads = (_views(b.buf, layout, dtype) for b in blocks)
    with blas_threads(1) or contextlib.nullcontext():
        conn.send(("ready", None, None))
        while True:
            try:
                msg = conn.recv()
            except EOFError:                                  # the main process is gone
                break
            if msg is None:
                break
            kind, x, y, w = msg
            try:
                if kind == "step":
                    loss, g, zeros = model.forward_backward(params, cfg, x, y, FAST, dloss=w)
                    for k, a in g.items():
                        grads[k][...] = a
                    conn.send(("ok", loss, zeros))
                else:
                    logits, counts = parallel.part_forward(params, cfg, x, FAST)
                    conn.send(("ok", logits, counts))
            except Exception:                                 # told to the main process, which raises it
                conn.send(("error", traceback.format_exc(), None))
    del params, grads
    for b in blocks:
        b.close()


@contextlib.contextmanager
def _main_hidden():
    """While a worker is started, __main__ is an empty module: a spawned process runs the main
    script again (to find what it defined) unless the main module names no file, and a script
    that trains at its top level, with no `if __name__ == "__main__"`, would then train again
    inside its worker. The worker needs nothing from __main__: its function is this module's."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class Workers:
    """parts - 1 worker processes for the parts after the first; see the module's docstring."""

    def __init__(self, params, cfg, parts):
        dtypes = {a.dtype for a in params.values()}
        if len(dtypes) != 1 or not isinstance(next(iter(params.values())), np.ndarray):
            raise ValueError("Workers needs the parameters as NumPy arrays of one dtype")
        self.dtype = dtypes.pop()
        self.parts, self.params, self.cfg = parts, params, cfg
        self.layout, n = {}, 0
        for k, a in params.items():
            self.layout[k] = (n, a.shape)
            n += a.size
        self.block = _block(n, self.dtype)
        shared = _views(self.block.buf, self.layout, self.dtype)
        for k in params:                                      # the same values, in shared memory now
            shared[k][...] = params[k]
            params[k] = shared[k]
        ctx = multiprocessing.get_context("spawn")            # no fork of a process with threads
        self.grad_blocks, self.grads, self.conns, self.procs = [], [], [], []
        try:
            for _ in range(parts - 1):
                gb = _block(n, self.dtype)
                self.grad_blocks.append(gb)
                self.grads.append(_views(gb.buf, self.layout, self.dtype))
                here, there = ctx.Pipe()
                p = ctx.Process(target=_serve, args=(there, cfg, self.layout, self.dtype, self.block.name, gb.name),
                                daemon=True, name="minisparse-worker")
                with _main_hidden():
                    p.start()
                there.close()
                self.conns.append(here)
                self.procs.append(p)
            for i in range(len(self.conns)):
                self._receive(i)                              # "ready": the worker started
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)                           # a program that ends without close()

    def _ended(self, i):
        self.procs[i].join(timeout=1)
        return RuntimeError(f"training worker process {i + 1} ended unexpectedly "
                            f"(exit code {self.procs[i].exitcode}).")

    def _send(self, i, msg):
        try:
            self.conns[i].send(msg)
        except OSError:                                   # a broken pipe: the worker is gone
            raise self._ended(i) from None

    def _receive(self, i):
        try:
            status, a, b = self.conns[i].recv()
        except (EOFError, OSError):
            raise self._ended(i) from None
        if status == "error":
            raise RuntimeError(f"training worker process {i + 1} failed:\n{a}")
        return a, b

    def _run(self, n, messages, own):
        """Send messages[i] to worker i for i < n - 1, run own() here, then collect the n - 1 replies
        in order. Every reply is read even when a part fails, so none is left for the next call."""
        sent = 0
        try:
            for i in range(n - 1):
                self._send(i, messages[i])
                sent += 1
            with blas_threads(1) or contextlib.nullcontext():
                mine = own()
        finally:
            replies, error = [], None
            for i in range(sent):
                try:
                    replies.append(self._receive(i))
                except RuntimeError as e:
                    error = error or e
        if error is not None:
            raise error
        return mine, replies

    def _check(self, params, cfg, ops):
        if params is not self.params or cfg != self.cfg or ops is not FAST:
            raise ValueError("Workers runs the fast ops on the params and config it was made with")

    def forward_backward(self, params, cfg, x, y, ops=FAST):
        """parallel.forward_backward(params, cfg, x, y, FAST, parts), the parts after the first in
        the workers: (loss, grads, measured sparsity)."""
        self._check(params, cfg, ops)
        parts = parallel.split(x.shape[0], self.parts)
        weights = parallel.part_weights(y, parts)
        mine, replies = self._run(len(parts), [("step", x[p], y[p], w) for p, w in zip(parts[1:], weights[1:])],
                                  lambda: parallel.part_step(params, cfg, x, y, parts[0], weights[0], FAST))
        results = [mine]
        for i, (loss, zeros) in enumerate(replies):
            share = (parts[i + 1].stop - parts[i + 1].start) / x.shape[0]
            results.append((weights[i + 1] * loss, self.grads[i], share, zeros))
        return parallel.combine_steps(cfg, results)

    def forward_loss(self, params, cfg, x, y, ops=FAST):
        """parallel.forward_loss(params, cfg, x, y, FAST, parts), the parts after the first in the
        workers: (loss, measured sparsity)."""
        self._check(params, cfg, ops)
        parts = parallel.split(x.shape[0], self.parts)
        mine, replies = self._run(len(parts), [("forward", x[p], None, None) for p in parts[1:]],
                                  lambda: parallel.part_forward(params, cfg, x[parts[0]], FAST))
        return parallel.combine_forwards(cfg, [mine] + replies, y)

    def close(self):
        """End the workers, give params plain arrays of their values again, free the shared memory."""
        atexit.unregister(self.close)
        if self.block is None:                                # closed already
            return
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        for c in self.conns:
            c.close()
        self.conns, self.procs, self.grads = [], [], []
        for k in self.params:
            self.params[k] = np.array(self.params[k])
        for b in self.grad_blocks + [self.block]:
            with contextlib.suppress(BufferError):            # an array of it still held elsewhere
                b.close()
            b.unlink()
        self.grad_blocks, self.block = [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
