"""Data parallelism in processes: fast/parallel.py's split of the batch, every part but the first
run by a worker process of its own, the parameters in shared memory; and the optimizer's step
shared between the processes.

    w = Workers(params, cfg, parts, opt)     params' arrays (and opt's moments) move into shared memory
    w.forward_backward(params, cfg, x, y)    equals parallel.forward_backward(params, cfg, x, y, FAST, parts)
    w.forward_loss(params, cfg, x, y)        equals parallel.forward_loss(params, cfg, x, y, FAST, parts)
    w.optimizer_step(opt, params, grads, lr) equals opt.step(params, grads, lr)
                                             all bit for bit (tests/test_workers.py)
    w.close()                                the workers end, and params and opt hold plain arrays again

Why not threads: the threads of one process share Python's interpreter lock (the GIL). NumPy lets
go of it inside each operation and takes it back after, and a training step of a small model is
about a thousand operations of a few microseconds on each part. Two threads then hand the lock to
each other at nearly every operation, and a handoff costs more than such an operation. Two
processes each have their own interpreter, and each part runs as fast as it does alone
(benchmarks/RESULTS.md).

How: the parameters live in one block of shared memory that every process maps. A worker
receives its part's token ids through a pipe, runs model.forward_backward on them with BLAS on
one thread, writes its gradients into a shared block of its own and sends back its loss and
measured sparsity. The main process runs part 0 meanwhile, then adds the workers' gradients in
part order, as fast/parallel.py adds its threads' (so the sums are the same bit for bit), into a
shared block that forward_backward returns: the gradients are views of it, valid until the next
call. Clipping scales them there. With the optimizer given, its moments m and v are shared too,
the parameters are dealt into one group per process, and optimizer_step updates each group in
its own process, every parameter by the reference's AdamW.update. An evaluation forward sends
back its logits and counts (parallel.part_forward). A worker ignores Ctrl-C: the main process
finishes the step and saves (train.py).
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
from ..optimizer import AdamW
from . import FAST, parallel
from .runtime import blas_threads, retain_freed_memory


def _views(block, layout, dtype):
    """{name: array} over a shared block, each at its offset (in items) with its shape."""
    return {k: np.ndarray(shape, dtype=dtype, buffer=block.buf, offset=off * np.dtype(dtype).itemsize)
            for k, (off, shape) in layout.items()}


def deal(sizes, parts):
    """The indices of `sizes` dealt into `parts` groups of about equal total: the largest first,
    each to the group with the least so far; every group in index order."""
    groups = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        g = totals.index(min(totals))
        groups[g].append(i)
        totals[g] += sizes[i]
    return [sorted(g) for g in groups]


def _serve(conn, cfg, layout, dtype, names, adam, keys):
    """A worker's loop: a part's step, forward or optimizer update for each message, until None.
    names: the shared blocks' names, {"params", "grads", "sum", "m", "v"} (the last two with an
    optimizer); adam: (betas, eps, weight_decay) or None; keys: the parameters it updates."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)           # Ctrl-C is the main process's to handle
    retain_freed_memory()
    blocks = {what: shared_memory.SharedMemory(name=n) for what, n in names.items()}
    arrays = {what: _views(b, layout, dtype) for what, b in blocks.items()}
    params, grads = arrays["params"], arrays["grads"]
    opt = None
    if adam is not None:
        betas, eps, weight_decay = adam
        opt = AdamW(params, 0.0, betas, eps, weight_decay)
        opt.m, opt.v = arrays["m"], arrays["v"]                # the main process's moments
    with blas_threads(1) or contextlib.nullcontext():
        conn.send(("ready", None, None))
        while True:
            try:
                msg = conn.recv()
            except EOFError:                                  # the main process is gone
                break
            if msg is None:
                break
            kind, a, b, c = msg
            try:
                if kind == "step":                            # a, b, c: x, y, the part's weight
                    loss, g, zeros = model.forward_backward(params, cfg, a, b, FAST, dloss=c)
                    for k, ga in g.items():
                        grads[k][...] = ga
                    conn.send(("ok", loss, zeros))
                elif kind == "forward":                       # a: x
                    logits, counts = parallel.part_forward(params, cfg, a, FAST)
                    conn.send(("ok", logits, counts))
                else:                                         # "adam"; a, b: lr, t
                    opt.t = b
                    for k in keys:
                        opt.update(k, params[k], arrays["sum"][k], a)
                    conn.send(("ok", None, None))
            except Exception:                                 # told to the main process, which raises it
                conn.send(("error", traceback.format_exc(), None))
    del params, grads, arrays, opt
    for b in blocks.values():
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


def shared_blocks(parts, opt=None):
    """What Workers(params, cfg, parts, opt) keeps in shared memory, one block each, every block as
    large as the parameters: the parameters, their summed gradients, with an optimizer its two
    moments, and each worker's gradients."""
    return ["params", "sum"] + (["m", "v"] if opt is not None else []) + [f"grads {i}" for i in range(1, parts)]


def shared_bytes(params, parts, opt=None):
    """The bytes of shared memory Workers(params, cfg, parts, opt) maps."""
    return len(shared_blocks(parts, opt)) * sum(int(a.nbytes) for a in params.values())


def shared_memory_free(path="/dev/shm"):
    """The bytes free where Linux keeps shared memory, or None where that is not known (another
    system, or no such folder). A container often gives it only 64 MB, and a process that writes
    past it is killed (SIGBUS), so the room is checked before the blocks are made."""
    import os
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


class Workers:
    """parts - 1 worker processes for the parts after the first; see the module's docstring."""

    def __init__(self, params, cfg, parts, opt=None):
        dtypes = {a.dtype for a in params.values()}
        if len(dtypes) != 1 or not isinstance(next(iter(params.values())), np.ndarray):
            raise ValueError("Workers needs the parameters as NumPy arrays of one dtype")
        self.dtype = dtypes.pop()
        self.parts, self.params, self.cfg, self.opt = parts, params, cfg, opt
        self.layout, n = {}, 0
        for k, a in params.items():
            self.layout[k] = (n, a.shape)
            n += a.size
        self.blocks, self.conns, self.procs, self.grads = [], [], [], []
        nbytes = max(1, n * np.dtype(self.dtype).itemsize)
        try:
            shared = {}                                       # the blocks every process maps, by name
            for what in shared_blocks(parts, opt):
                self.blocks.append(shared_memory.SharedMemory(create=True, size=nbytes))
                shared[what] = self.blocks[-1]
            self._move(params, shared["params"])              # the same values, in shared memory now
            self.sum = _views(shared["sum"], self.layout, self.dtype)
            self.grads = [_views(shared[f"grads {i}"], self.layout, self.dtype) for i in range(1, parts)]
            names = list(params)
            self.groups = [[names[i] for i in g] for g in deal([params[k].size for k in names], parts)]
            adam = None
            if opt is not None:
                self._move(opt.m, shared["m"])
                self._move(opt.v, shared["v"])
                adam = (opt.betas, opt.eps, opt.weight_decay)
            ctx = multiprocessing.get_context("spawn")        # no fork of a process with threads
            for i in range(1, parts):
                block_names = {what: shared[what].name for what in ("params", "sum", "m", "v") if what in shared}
                block_names["grads"] = shared[f"grads {i}"].name
                here, there = ctx.Pipe()
                p = ctx.Process(target=_serve, args=(there, cfg, self.layout, self.dtype, block_names, adam,
                                                     self.groups[i]), daemon=True, name="minisparse-worker")
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

    def _move(self, arrays, block):
        """Copy each array of the dict into the block and put the block's view in its place."""
        views = _views(block, self.layout, self.dtype)
        for k in arrays:
            views[k][...] = arrays[k]
            arrays[k] = views[k]

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

    def _run(self, messages, own):
        """Send messages[i] to worker i, run own() here, then collect the replies in order. Every
        reply is read even when a part fails, so none is left for the next call."""
        sent = 0
        try:
            for i, msg in enumerate(messages):
                self._send(i, msg)
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
        the workers: (loss, grads, measured sparsity); grads are views of shared memory, valid
        until the next call."""
        self._check(params, cfg, ops)
        parts = parallel.split(x.shape[0], self.parts)
        weights = parallel.part_weights(y, parts)
        mine, replies = self._run([("step", x[p], y[p], w) for p, w in zip(parts[1:], weights[1:])],
                                  lambda: parallel.part_step(params, cfg, x, y, parts[0], weights[0], FAST))
        results = [mine]
        for i, (loss, zeros) in enumerate(replies):
            share = (parts[i + 1].stop - parts[i + 1].start) / x.shape[0]
            results.append((weights[i + 1] * loss, self.grads[i], share, zeros))
        return parallel.combine_steps(cfg, results, into=self.sum)

    def forward_loss(self, params, cfg, x, y, ops=FAST):
        """parallel.forward_loss(params, cfg, x, y, FAST, parts), the parts after the first in the
        workers: (loss, measured sparsity)."""
        self._check(params, cfg, ops)
        parts = parallel.split(x.shape[0], self.parts)
        mine, replies = self._run([("forward", x[p], None, None) for p in parts[1:]],
                                  lambda: parallel.part_forward(params, cfg, x[parts[0]], FAST))
        return parallel.combine_forwards(cfg, [mine] + replies, y)

    def optimizer_step(self, opt, params, grads, lr):
        """opt.step(params, grads, lr), each process updating its group of parameters. grads must be
        what forward_backward returned (the workers read them from shared memory); anything else is
        updated here, by opt.step itself."""
        if opt is not self.opt or params is not self.params or \
                any(grads[k] is not self.sum[k] for k in grads) or grads.keys() != params.keys():
            return opt.step(params, grads, lr)
        opt.t += 1
        self._run([("adam", lr, opt.t, None)] * (self.parts - 1),
                  lambda: [opt.update(k, params[k], grads[k], lr) for k in self.groups[0]])

    def close(self):
        """End the workers, give params (and the optimizer's moments) plain arrays of their values
        again, free the shared memory."""
        atexit.unregister(self.close)
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
        self.conns, self.procs, self.grads, self.sum = [], [], [], {}
        for arrays in [self.params] + ([self.opt.m, self.opt.v] if self.opt is not None else []):
            for k in arrays:
                if not arrays[k].flags.owndata:
                    arrays[k] = np.array(arrays[k])
        for b in self.blocks:
            with contextlib.suppress(BufferError):            # an array of it still held elsewhere
                b.close()
            b.unlink()
        self.blocks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
