"""Training-step speed: minisparse (NumPy or CuPy, hand-written backward) against PyTorch, same model.

    python benchmarks/train_speed.py                    # CPU; PyTorch too where it is installed
    python benchmarks/train_speed.py --device gpu       # CuPy against PyTorch on CUDA
    python benchmarks/train_speed.py --whole --nanogpt DIR   # whole runs: minisparse against nanoGPT

The shapes are nanoGPT's baby character config: 4 layers, 4 heads, 128 channels, block 64,
batch 12, vocabulary 96 (the built-in corpus's). One step = forward + backward + gradient
clipping + AdamW, in float32. The PyTorch model below has the same equations (RMSNorm,
rotate-half RoPE, causal attention, ReLU2-GLU, top-K with the straight-through estimator,
untied head), eager mode, no torch.compile, the same thread count as NumPy's BLAS.
minisparse steps as train.train() does: on the CPU the batch is split into one part per core,
each run with BLAS at one thread, the first in this process and the others in worker processes
(minisparse/fast/workers.py). The row "threads" splits it over threads of this process instead
(minisparse/fast/parallel.py), and "--threads 1" is the plain path, one part with BLAS over all
cores.

After a warm-up the variants are timed in alternation, in blocks of --block steps (A A A B B B
C C C A A A ...), so a change in the machine's load hits all of them alike; each gets the
median over --steps steps. Peak memory
is measured separately: each variant trains --mem_steps steps in a fresh process, and
the process's peak resident set (VmHWM in /proc/self/status, Linux) plus those of its worker
processes is reported: the most the variant can hold at once.

--whole times what a user waits for: a whole `train_tiny.py` run, start to finish (Python's start,
the data, the steps, every evaluation and checkpoint), of nanoGPT's baby configuration (WHOLE_FLAGS:
2000 steps, evaluation every 250 steps on 20 batches per split, lr 1e-3 -> 1e-4, warmup 100), dense
and at 50% top-K, each in its own process; the wall time, the final val loss and the peak RSS
of the run's process plus those of its worker processes. --nanogpt DIR adds nanoGPT itself (a checkout of github.com/karpathy/nanoGPT, none
of it part of this project) with the same configuration, the README's CPU command
(`--device=cpu --compile=False`): its char data is written into DIR/data/ from the same text,
tokenizer and train/val split that minisparse uses, so both train on the same tokens. --also DIR
runs the minisparse variants from another checkout too (an older revision: before and after in
one run). The variants take turns, --rounds times; the medians and the ratios are printed, and
the load average before every run, since a shared machine's load moves the times.
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

from benchmarks.machine import describe, revision  # noqa: E402
from minisparse import backend, model  # noqa: E402
from minisparse.fast import FAST, parallel  # noqa: E402
from minisparse.fast.workers import Workers  # noqa: E402
from minisparse.fast.runtime import retain_freed_memory  # noqa: E402
from minisparse.optimizer import AdamW, clip_grad_norm  # noqa: E402

SHAPES = dict(vocab_size=96, block_size=64, n_layer=4, n_head=4, n_embd=128)
BATCH = 12


# ----------------------------------------------------------------------------------------
# minisparse


def minisparse_stepper(sparsity, device, seed=0, threads=0, processes=True):
    """One training step as train.train() runs it; threads 0 = one part per core, the parts after the
    first in worker processes (fast/workers.py), or with processes=False in threads (fast/parallel.py).
    The step's close() ends the workers."""
    retain_freed_memory()              # as train.train() does; process-wide, so PyTorch gets it too
    cfg = model.GPTConfig(**SHAPES, sparsity=sparsity)
    params = {k: backend.asarray(v) for k, v in model.init_params(cfg, seed=seed).items()}
    opt = AdamW(params, 1e-3, (0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(seed)
    sync = _sync(device)
    threads = 1 if device == "gpu" else (threads or parallel.auto_threads(sum(int(p.size) for p in params.values())))

    workers = Workers(params, cfg, threads, opt) if processes and threads > 1 and device == "cpu" else None

    def step():
        idx = rng.integers(0, cfg.vocab_size, (BATCH, cfg.block_size + 1))
        x, y = backend.asarray(idx[:, :-1]), backend.asarray(idx[:, 1:])
        if workers is not None:
            _, grads, _ = workers.forward_backward(params, cfg, x, y, FAST)
        else:
            _, grads, _ = parallel.forward_backward(params, cfg, x, y, FAST, threads)
        clip_grad_norm(grads, 1.0)
        if workers is not None:
            workers.optimizer_step(opt, params, grads, 1e-3)
        else:
            opt.step(params, grads, 1e-3)
        sync()
    step.close = workers.close if workers is not None else (lambda: None)
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


VARIANTS = {                                   # name: (implementation, sparsity, threads, processes)
    "minisparse dense": ("minisparse", 0.0, 0, True),
    "minisparse Q-Sparse 50%": ("minisparse", 0.5, 0, True),
    "minisparse dense, threads": ("minisparse", 0.0, 0, False),
    "minisparse Q-Sparse 50%, threads": ("minisparse", 0.5, 0, False),
    "minisparse dense, --threads 1": ("minisparse", 0.0, 1, False),
    "pytorch dense": ("torch", 0.0, 0, False),
    "pytorch Q-Sparse 50%": ("torch", 0.5, 0, False),
}


def make(name, device):
    kind, s, threads, processes = VARIANTS[name]
    if kind == "minisparse":
        return minisparse_stepper(s, device, threads=threads, processes=processes)
    step = torch_stepper(s, device)
    step.close = lambda: None
    return step


def peak_rss_child(name, device, steps, threads):
    """Train `steps` steps of one variant in a fresh process; return its peak RSS in MB."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r});"
            "from benchmarks import train_speed as b; from minisparse import backend;"
            f"backend.set_device({device!r});"
            + (f"import torch; torch.set_num_threads({threads});" if VARIANTS[name][0] == "torch" else "")
            + f"s = b.make({name!r}, {device!r})\nfor _ in range({steps}): s()\n"
            "import os\nprint(sum(b.vmhwm_kb(p) for p in [os.getpid()] + b.descendants(os.getpid())))\ns.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0        # VmHWM is in kB


# ----------------------------------------------------------------------------------------
# whole runs: train_tiny.py against nanoGPT's train.py


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHOLE_FLAGS = dict(batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128, max_iters=2000,
                   eval_interval=250, eval_iters=20, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100)


def prepare_nanogpt_data(nanogpt_dir, data):
    """Write nanoGPT's char dataset (train.bin, val.bin: uint16 ids; meta.pkl: vocab_size) for the
    corpus `data` into nanogpt_dir/data/minisparse_<data>/, from minisparse's own char tokenizer and
    split. Returns the dataset's name."""
    import pickle
    from minisparse.data import load_text, split_ids, train_tokenizer
    text = load_text(data)
    tok = train_tokenizer(text, "char")
    train_ids, val_ids = split_ids(tok.encode(text))
    name = "minisparse_" + "".join(c if c.isalnum() else "_" for c in os.path.basename(data))
    folder = os.path.join(nanogpt_dir, "data", name)
    os.makedirs(folder, exist_ok=True)
    for split, ids in (("train", train_ids), ("val", val_ids)):
        ids.astype(np.uint16).tofile(os.path.join(folder, split + ".bin"))
    with open(os.path.join(folder, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": tok.vocab_size}, f)
    return name


def whole_commands(args, out_root):
    """{variant: (argv, cwd)} for the whole-run variants."""
    f = {**WHOLE_FLAGS, "max_iters": args.whole_iters}
    cmds = {}
    if args.nanogpt:
        dataset = prepare_nanogpt_data(args.nanogpt, args.data)
        cmds["nanoGPT"] = ([sys.executable, "train.py", "config/train_shakespeare_char.py", f"--dataset={dataset}",
                            "--device=cpu", "--compile=False", "--log_interval=1", "--dropout=0.0",
                            f"--lr_decay_iters={f['max_iters']}", f"--out_dir={os.path.join(out_root, 'nanogpt')}"]
                           + [f"--{k}={v}" for k, v in f.items()], args.nanogpt)
    for label, tree in [("", ROOT)] + [(f" @{_short_rev(d)}", d) for d in args.also]:
        for name, s in (("minisparse dense", 0.0), ("minisparse Q-Sparse 50%", 0.5)):
            out = os.path.join(out_root, f"{name}{label}".replace(" ", "_").replace("%", "").replace("@", ""))
            cmds[name + label] = ([sys.executable, "train_tiny.py", "--data", args.data, "--sparsity", str(s),
                                   "--out_dir", out] + [a for k, v in f.items() for a in (f"--{k}", str(v))], tree)
    return cmds


def _short_rev(tree):
    out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or os.path.basename(os.path.abspath(tree))


def final_val_loss(output):
    """The last val loss a run printed: nanoGPT's "step N: train loss a, val loss b", minisparse's
    "iter N: train loss a, val loss b"."""
    import re
    found = re.findall(r"val loss (\d+\.\d+)", output)
    return float(found[-1]) if found else float("nan")


# Runs a script as `python script args` would, then prints the process's peak RSS. Not the child's
# ru_maxrss: Linux carries the parent's peak across fork and exec into it, and this process has
# PyTorch loaded.
PEAK_RSS = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('peak RSS kB', [l.split()[1] for l in open('/proc/self/status')"
            " if l.startswith('VmHWM')][0]))\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def vmhwm_kb(pid):
    """A process's peak resident set so far, kB (Linux /proc), or 0 where it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(l.split()[1] for l in f if l.startswith("VmHWM")))
    except (OSError, StopIteration):
        return 0


def descendants(pid):
    """The processes started by pid, and by them, ... (Linux /proc)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def run_whole(argv, cwd):
    """Run one whole training in a fresh process: (wall seconds, final val loss, peak RSS MB). The peak
    RSS is the process's own plus that of each process it started (train.py's workers, read every
    half second while they run): the most memory the run can have held at once."""
    import re
    import threading
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    t0 = time.perf_counter()
    p = subprocess.Popen([argv[0], "-c", PEAK_RSS] + argv[1:], cwd=cwd, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks, done = {}, threading.Event()

    def watch():
        while not done.wait(0.5):
            for pid in descendants(p.pid):
                peaks[pid] = max(peaks.get(pid, 0), vmhwm_kb(pid))
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out = p.communicate()[0]
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed in {cwd}:\n{out[-3000:]}")
    main = int(re.findall(r"peak RSS kB (\d+)", out)[-1])
    return wall, final_val_loss(out), (main + sum(peaks.values())) / 1024


def whole_main(args, argv):
    import tempfile
    print("machine:", describe())
    try:
        import torch
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads by default)")
    except ImportError:
        print("PyTorch not installed")
    def shown(text):                           # the log names no path of this machine
        for path, name in ((out_root, "TMPDIR"), (args.nanogpt, "NANOGPT_DIR"),
                           *((d, f"CHECKOUT_{i}") for i, d in enumerate(args.also)), (ROOT, "this checkout")):
            if path:
                text = text.replace(os.path.abspath(path), name).replace(path, name)
        return text

    out_root = ""
    print(shown("command: python benchmarks/train_speed.py " + " ".join(argv)))
    rev, edited = revision(ROOT)
    print(f"this checkout: revision {rev or 'unknown (not a git checkout)'}"
          + (", with uncommitted changes" if edited else ""))
    print(f"flags: {({**WHOLE_FLAGS, 'max_iters': args.whole_iters})}, data {args.data!r}; "
          f"{args.rounds} round(s), the variants in turn; OPENBLAS_CORETYPE unset for the runs")
    results = {}
    with tempfile.TemporaryDirectory() as out_root:
        cmds = whole_commands(args, out_root)
        for name, (cmd, cwd) in cmds.items():
            print(shown(f"{name}: (in {'the nanoGPT checkout' if cwd == args.nanogpt else cwd}) {' '.join(cmd[1:])}"))
        for r in range(args.rounds):
            for name, (cmd, cwd) in cmds.items():
                load = os.getloadavg()
                wall, loss, rss = run_whole(cmd, cwd)
                results.setdefault(name, []).append((wall, loss, rss))
                print(f"round {r + 1} {name}: {wall:.1f} s, val loss {loss:.4f}, peak RSS {rss:.0f} MB "
                      f"(load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})", flush=True)
    med = {n: [float(np.median([x[i] for x in v])) for i in range(3)] for n, v in results.items()}
    print(f"\n{'variant':>32} {'median wall s':>14} {'val loss':>9} {'peak RSS MB':>12}")
    for n, (wall, loss, rss) in med.items():
        print(f"{n:>32} {wall:14.1f} {loss:9.4f} {rss:12.0f}")
    for n in med:
        if n.startswith("minisparse") and "nanoGPT" in med:
            print(f"ratio {n} / nanoGPT: {med[n][0] / med['nanoGPT'][0]:.2f}")
    for n in med:
        if "Q-Sparse" in n:
            dense = n.replace("Q-Sparse 50%", "dense")
            print(f"ratio {n} / {dense}: {med[n][0] / med[dense][0]:.2f}")
    print("json:", json.dumps({"runs": results, "median": med}))


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
    p.add_argument("--whole", action="store_true", help="time whole train_tiny.py runs (see above)")
    p.add_argument("--whole_iters", type=int, default=WHOLE_FLAGS["max_iters"], help="--whole: training steps")
    p.add_argument("--rounds", type=int, default=1, help="--whole: runs of each variant, in turn")
    p.add_argument("--data", default="pydoc", help="--whole: the corpus (train_tiny.py's --data)")
    p.add_argument("--nanogpt", default="", help="--whole: a nanoGPT checkout, to run it too")
    p.add_argument("--also", action="append", default=[], help="--whole: another minisparse checkout to run too")
    args = p.parse_args(argv)
    if args.whole:
        return whole_main(args, argv if argv is not None else sys.argv[1:])
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
    for n in names:
        steppers[n].close()
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
