"""Training-step speed: minisparse (NumPy or CuPy, hand-written backward) against PyTorch, same model.

    python benchmarks/train_speed.py                    # CPU; PyTorch too where it is installed
    python benchmarks/train_speed.py --device gpu       # CuPy against PyTorch on CUDA

The shapes are nanoGPT's baby character config: 4 layers, 4 heads, 128 channels, block 64,
batch 12, vocabulary 96 (the built-in corpus's). One step = forward + backward + gradient
clipping + AdamW, in float32. The PyTorch model below has the same equations (RMSNorm,
rotate-half RoPE, causal attention, ReLU2-GLU, top-K with the straight-through estimator,
untied head), eager mode, no torch.compile, the same thread count as NumPy's BLAS.
minisparse steps as train.train() does: on the CPU the batch is split over one thread per
core, each running its part with BLAS at one thread (minisparse/fast/parallel.py); the row
"--threads 1" is the plain path, one Python thread with BLAS over all cores.

After a warm-up the variants are timed in alternation, in blocks of --block steps (A A A B B B
C C C A A A ...), so a change in the machine's load hits all of them alike; each gets the
median over --steps steps. Peak memory
is measured separately: each variant trains --mem_steps steps in a fresh process, and
the process's peak resident set (VmHWM in /proc/self/status, Linux) is reported.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from benchmarks.machine import describe  # noqa: E402
from minisparse import backend, model  # noqa: E402
from minisparse.fast import FAST, parallel  # noqa: E402
from minisparse.fast.runtime import retain_freed_memory  # noqa: E402
from minisparse.optimizer import AdamW, clip_grad_norm  # noqa: E402

SHAPES = dict(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=128)
BATCH = 12


# ----------------------------------------------------------------------------------------
# minisparse


def minisparse_stepper(sparsity, device, seed=0, threads=0):
    """One training step as train.train() runs it; threads 0 = one per core (fast/parallel.py)."""
    retain_freed_memory()              # as train.train() does; process-wide, so PyTorch gets it too
    cfg = model.GPTConfig(**SHAPES, sparsity=sparsity)
    params = {k: backend.asarray(v) for k, v in model.init_params(cfg, seed=seed).items()}
    opt = AdamW(params, 1e-3, (0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    sync = _sync(device)
    threads = 1 if device == "gpu" else (threads or parallel.auto_threads(sum(int(p.size) for p in params.values())))

    def step():
        idx = rng.integers(0, cfg.vocab_size, (BATCH, cfg.block_size + 1))
        x, y = backend.asarray(idx[:, :-1]), backend.asarray(idx[:, 1:])
        _, grads, _ = parallel.forward_backward(params, cfg, x, y, FAST, threads)
        clip_grad_norm(grads, 1.0)
        opt.step(params, grads, 1e-3)
        sync()
    return step


def _sync(device):
    if device == "gpu":
        import cupy
        return cupy.cuda.Device().synchronize
    return lambda: None


# ----------------------------------------------------------------------------------------
# PyTorch, the same equations


def torch_stepper(sparsity, device, seed=0):
    import torch
    dev = "cuda" if device == "gpu" else "cpu"
    cfg = model.GPTConfig(**SHAPES, sparsity=sparsity)
    P = {k: torch.tensor(backend.to_numpy(v), device=dev, requires_grad=True)
         for k, v in model.init_params(cfg, seed=seed).items()}
    decay = [p for k, p in P.items() if not model.is_norm(k)]
    no_decay = [p for k, p in P.items() if model.is_norm(k)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    C, H, T = cfg.n_embd, cfg.n_head, cfg.block_size
    hs = C // H
    K = {}
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, hs // 2, dtype=torch.float64, device=dev) * 2.0 / hs))
    ang = torch.arange(T, dtype=torch.float64, device=dev)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()

    def sparsify(x):
        if sparsity == 0:
            return x
        D = x.shape[-1]
        k = K.setdefault(D, D - math.floor(sparsity * D + 0.5))
        idx = x.detach().abs().topk(k, dim=-1).indices
        mask = torch.zeros_like(x).scatter_(-1, idx, 1.0)
        return x + (x * mask - x).detach()                   # straight-through estimator

    def rms(x, g):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * g

    def rope(x):
        x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)

    def forward(idx, tgt):
        B = idx.shape[0]
        x = P["wte"][idx]
        for l in range(cfg.n_layer):
            p = f"h.{l}."
            h = sparsify(rms(x, P[p + "attn_norm"]))
            q, k, v = ((h @ P[p + n].T).view(B, T, H, hs).transpose(1, 2) for n in ("attn.wq", "attn.wk", "attn.wv"))
            q, k = rope(q), rope(k)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
            a = torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v
            x = x + sparsify(a.transpose(1, 2).reshape(B, T, C)) @ P[p + "attn.wo"].T
            h = sparsify(rms(x, P[p + "ffn_norm"]))
            m = (h @ P[p + "ffn.w_up"].T) * torch.relu(h @ P[p + "ffn.w_gate"].T) ** 2
            x = x + sparsify(m) @ P[p + "ffn.w_down"].T
        logits = rms(x, P["norm_f"]) @ P["lm_head"].T
        return torch.nn.functional.cross_entropy(logits.view(B * T, -1), tgt.reshape(-1))

    rng = np.random.default_rng(seed)

    def step():
        idx = torch.from_numpy(rng.integers(0, cfg.vocab_size, (BATCH, T + 1))).to(dev)
        loss = forward(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(P.values(), 1.0)
        opt.step()
        if dev == "cuda":
            torch.cuda.synchronize()
    return step


# ----------------------------------------------------------------------------------------


VARIANTS = {                                   # name: (implementation, sparsity, threads)
    "minisparse dense": ("minisparse", 0.0, 0),
    "minisparse Q-Sparse 50%": ("minisparse", 0.5, 0),
    "minisparse dense, --threads 1": ("minisparse", 0.0, 1),
    "pytorch dense": ("torch", 0.0, 0),
    "pytorch Q-Sparse 50%": ("torch", 0.5, 0),
}


def make(name, device):
    kind, s, threads = VARIANTS[name]
    if kind == "minisparse":
        return minisparse_stepper(s, device, threads=threads)
    return torch_stepper(s, device)


def peak_rss_child(name, device, steps, threads):
    """Train `steps` steps of one variant in a fresh process; return its peak RSS in MB."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r});"
            "from benchmarks import train_speed as b; from minisparse import backend;"
            f"backend.set_device({device!r});"
            + (f"import torch; torch.set_num_threads({threads});" if VARIANTS[name][0] == "torch" else "")
            + f"s = b.make({name!r}, {device!r})\nfor _ in range({steps}): s()\n"
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0        # VmHWM is in kB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--block", type=int, default=5, help="steps of one variant before switching to the next")
    p.add_argument("--pause", type=float, default=0.5, help="seconds of rest before each block")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OPENBLAS_NUM_THREADS", os.cpu_count())),
                   help="PyTorch's intra-op threads (match NumPy's BLAS threads)")
    p.add_argument("--mem_steps", type=int, default=20, help="steps per fresh process for peak memory; 0 = skip")
    p.add_argument("--no_torch", action="store_true")
    args = p.parse_args(argv)
    backend.set_device(args.device)
    names = list(VARIANTS)
    if args.device == "gpu":                   # one thread there anyway: the same run as "minisparse dense"
        names.remove("minisparse dense, --threads 1")
    try:
        if args.no_torch:
            raise ImportError
        import torch
        torch.set_num_threads(args.threads)
        tinfo = f"torch {torch.__version__}, {torch.get_num_threads()} threads, eager (no compile)"
    except ImportError:
        names = [n for n in names if VARIANTS[n][0] == "minisparse"]
        tinfo = "PyTorch not installed: minisparse only"
    print("machine:", describe(args.device))
    print("reference:", tinfo)
    print("command: python benchmarks/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"shapes: {SHAPES}, batch {BATCH}, float32; {args.steps} timed steps each, alternating")
    steppers = {n: make(n, args.device) for n in names}
    for _ in range(args.warmup):
        for n in names:
            steppers[n]()
    # Alternate in blocks of --block steps with a pause between blocks: after a call, BLAS and
    # OpenMP worker threads spin-wait for a while, and a variant
    # started at once would share the cores with the previous one's spinning threads.
    times = {n: [] for n in names}
    for _ in range(-(-args.steps // args.block)):
        for n in names:
            time.sleep(args.pause)
            for _ in range(args.block):
                t0 = time.perf_counter()
                steppers[n]()
                times[n].append(time.perf_counter() - t0)
    med = {n: 1e3 * float(np.median(times[n])) for n in names}
    mem = {}
    if args.mem_steps:
        for n in names:
            mem[n] = peak_rss_child(n, args.device, args.mem_steps, args.threads)
    print(f"\n{'variant':>30} {'median ms/step':>15} {'peak RSS MB':>12}")
    for n in names:
        print(f"{n:>30} {med[n]:15.2f} {mem.get(n, float('nan')):12.0f}")
    if "pytorch dense" in med:
        print(f"\nratio minisparse dense / pytorch dense: {med['minisparse dense'] / med['pytorch dense']:.2f}")
        if mem:
            print(f"peak memory minisparse dense / pytorch dense: "
                  f"{mem['minisparse dense'] / mem['pytorch dense']:.2f}")
    print(f"ratio minisparse Q-Sparse 50% / minisparse dense: "
          f"{med['minisparse Q-Sparse 50%'] / med['minisparse dense']:.2f}")
    print("json:", json.dumps({"ms": med, "peak_rss_mb": mem}))


if __name__ == "__main__":
    main()
