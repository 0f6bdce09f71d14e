"""Fine-tune an exported minisparse model in PyTorch with DistributedDataParallel, and check it.

    torchrun --standalone --nproc_per_node 2 scale/ddp_finetune.py                    # self-contained (CI)
    torchrun --standalone --nproc_per_node 2 scale/ddp_finetune.py --hf_dir hf-tiny --steps 200

The path it walks is the one docs/beyond_laptop.md describes: a Hugging Face Llama checkpoint
(export.py --to, or built here) is loaded by transformers' LlamaForCausalLM, made Q-Sparse again by
minisparse.export.install_qsparse_hooks (top-K at every projection input, straight-through
gradients), wrapped in DistributedDataParallel and trained, each process on its own shard of the
corpus. Without --hf_dir nothing is trained beforehand: rank 0 builds a tiny random minisparse model
(2 layers, 64 channels, char tokenizer on the built-in pydoc corpus) and exports it to a temporary
folder, so that CI needs no run, no network and no GPU.

It then checks three things, and exits 1 with one sentence per failed check:
  (a) the loss falls: the mean of the last 5 steps is below the first 5's by --min_drop (a fraction);
  (b) the ranks agree: every rank's parameters equal rank 0's within 1e-6 relative after training
      (DDP's all-reduce of the gradients is what keeps them equal; nothing else syncs them);
  (c) the model is sparse: the fraction of zeros measured at each site's projection inputs, during
      the training steps themselves, is at least the configured sparsity minus 0.01.
Rank 0 prints the loss, the agreement and the sparsity per site, then "ok".

CPU processes talk over gloo; on GPUs the same script would use nccl and one device per rank.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)                       # minisparse is imported from the checkout, not installed

AGREE_TOL = 1e-6                               # relative: max |theta_r - theta_0| / max |theta_0|
SPARSITY_TOL = 0.01                            # measured zeros may fall this far below the configured share
WINDOW = 5                                     # steps averaged at each end for the loss check
RANK = int(os.environ.get("RANK", "0"))        # set by torchrun; known before the process group exists


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported once (by rank 0), not once per process."""

    def error(self, message):
        if RANK == 0:
            super().error(message)             # usage, one sentence, exit 2
        sys.exit(2)


def build_parser():
    p = Parser(description="Fine-tune an exported minisparse model under torchrun with DDP (gloo) and check "
                           "that the loss falls, the ranks agree and the projection inputs are sparse.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hf_dir", default="", help="a Hugging Face checkpoint written by export.py --to; "
                                                "empty: build a tiny random minisparse model and export it")
    p.add_argument("--data", default="pydoc", help="the corpus: 'pydoc', 'shakespeare' or a UTF-8 text file")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--batch_size", type=int, default=8, help="windows per step on each rank")
    p.add_argument("--block_size", type=int, default=64, help="tokens per window (at most the model's context)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--min_drop", type=float, default=0.1,
                   help="check (a): the last 5 steps' mean loss must be below (1 - min_drop) x the first 5's")
    p.add_argument("--seed", type=int, default=0, help="the tiny model's init and each rank's batches (+ rank)")
    return p


def check_args(p, args):
    if args.steps < 2 * WINDOW:
        p.error(f"--steps {args.steps} is too few: the loss check compares the first and last {WINDOW} steps, "
                f"so give at least {2 * WINDOW}.")
    for name in ("batch_size", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)} is not allowed: it must be at least 1.")
    if not args.lr > 0:
        p.error(f"--lr {args.lr} is not allowed: it must be > 0.")
    if not 0 <= args.min_drop < 1:
        p.error(f"--min_drop {args.min_drop} is not allowed: it must be in [0, 1).")
    if args.hf_dir and not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        p.error(f"--hf_dir {args.hf_dir!r} holds no config.json: give a folder written by export.py --to.")
    if "WORLD_SIZE" not in os.environ:
        p.error("this script runs under torchrun: torchrun --standalone --nproc_per_node 2 scale/ddp_finetune.py.")
    if int(os.environ["WORLD_SIZE"]) < 2:
        p.error("--nproc_per_node 1 leaves nothing to check: the ranks' agreement needs at least 2 processes.")


def say(*a):
    if RANK == 0:
        print(*a, flush=True)


def export_tiny_model(to, seed):
    """A random minisparse model (no training) as a Hugging Face checkpoint in `to`: minisparse's own
    config and init, its char tokenizer on pydoc, written by export_hf as export.py would."""
    from minisparse import export, model
    from minisparse.data import load_text, train_tokenizer
    tok = train_tokenizer(load_text("pydoc"), "char")
    cfg = model.GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64,
                          sparsity=0.5)                       # ReLU2-GLU, top-K 50% at all four sites
    return export.export_hf(model.init_params(cfg, seed=seed), cfg, tok, to, source="scale/ddp_finetune.py")


def shard(ids, rank, world):
    """Rank r's contiguous 1/world of the tokens: the ranks never draw the same window, as each
    worker of a data-parallel run reads its own part of the data."""
    n = len(ids) // world
    return ids[rank * n:(rank + 1) * n]


def measure_site_zeros(hf, sites, counts):
    """A forward hook on every hooked projection: it sees the input the projection actually
    multiplied (after install_qsparse_hooks' pre-hook replaced it) and adds its zeros and size
    to counts[site]. Independent of the hooks it measures: it reads values, not settings."""
    import torch

    def make(site):
        def hook(module, args, out):
            x = args[0].detach()
            counts[site] += torch.tensor([(x == 0).sum().item(), x.numel()], dtype=torch.float64)
        return hook

    for layer in hf.model.layers:
        for site, paths in sites.items():
            for path in paths:
                layer.get_submodule(path).register_forward_hook(make(site))


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)

    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import transformers
    from torch.nn.parallel import DistributedDataParallel as DDP

    from minisparse.data import load_text
    from minisparse.errors import UsageError
    from minisparse.export import install_qsparse_hooks

    t0 = time.time()
    torch.set_num_threads(1)                   # one core per process: the ranks must not fight over cores
    transformers.logging.set_verbosity_error()   # the log is this script's lines, not the loader's
    transformers.logging.disable_progress_bar()
    dist.init_process_group("gloo")            # reads RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = None
    try:
        # 1. the checkpoint: rank 0 writes it once, every rank loads the same files (one machine here:
        # across machines --hf_dir must be on storage they share)
        hf_dir = [args.hf_dir]
        if not args.hf_dir and rank == 0:
            tmp = tempfile.mkdtemp(prefix="ddp_finetune-")
            hf_dir = [export_tiny_model(os.path.join(tmp, "hf"), args.seed)]
        dist.broadcast_object_list(hf_dir, src=0)
        hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir[0], dtype=torch.float32)
        qs = getattr(hf.config, "qsparse", None)
        if qs is None:
            raise UsageError(f"--hf_dir {hf_dir[0]!r} has no \"qsparse\" settings in its config.json: "
                             "it was not written by minisparse's export.py.")
        tok = transformers.AutoTokenizer.from_pretrained(hf_dir[0])
        T = min(args.block_size, hf.config.max_position_embeddings)

        # 2. sparse again: the pre-hooks replace each projection's input by its top-K (STE backward);
        # then the measuring hooks, which run after them and see what the projection multiplies
        install_qsparse_hooks(hf)
        counts = {site: torch.zeros(2, dtype=torch.float64) for site in qs["sites"]}
        measure_site_zeros(hf, qs["sites"], counts)

        # 3. DDP: broadcasts rank 0's parameters at construction, then all-reduces (averages) the
        # gradients in backward, so that every rank takes the same optimizer step
        ddp = DDP(hf)
        opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.0)

        # 4. the data: every rank tokenizes the corpus, then keeps its own shard
        ids = np.asarray(tok(load_text(args.data))["input_ids"], dtype=np.int64)
        mine = shard(ids, rank, world)
        if len(mine) < T + 1:
            raise UsageError(f"each rank's shard of --data {args.data!r} has {len(mine)} tokens, fewer than "
                             f"block_size + 1 = {T + 1}: use a longer corpus or a smaller --block_size.")
        rng = np.random.default_rng(args.seed + rank)
        V = hf.config.vocab_size

        losses = []
        for _ in range(args.steps):
            starts = rng.integers(0, len(mine) - T, size=args.batch_size)
            win = torch.from_numpy(mine[starts[:, None] + np.arange(T + 1)])        # (B, T + 1)
            x, y = win[:, :-1], win[:, 1:]                                          # next-token targets
            logits = ddp(input_ids=x).logits                                        # (B, T, V)
            loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()                                 # DDP all-reduces the gradients here
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
            opt.step()
            mean = loss.detach().clone()
            dist.all_reduce(mean)                           # the loss over all ranks' batches, for the log
            losses.append(mean.item() / world)

        # (b) agreement: every rank against rank 0's parameter vector, the worst rank reported
        flat = torch.cat([q.detach().reshape(-1) for q in hf.parameters()]).double()
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        gap = torch.tensor([((flat - ref).abs().max() / ref.abs().max()).item()], dtype=torch.float64)
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        # (c) zeros over every rank's steps
        for c in counts.values():
            dist.all_reduce(c)
        dist.barrier()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    first, last = sum(losses[:WINDOW]) / WINDOW, sum(losses[-WINDOW:]) / WINDOW
    measured = {site: (c[0] / c[1]).item() for site, c in counts.items()}
    configured = {site: 1 - qs["kept"][site] / qs["inputs"][site] for site in counts}
    source = args.hf_dir or "a tiny random minisparse model, exported"
    say(f"ddp_finetune: {world} ranks (gloo), {source}: {hf.config.num_hidden_layers} layers, "
        f"{hf.config.hidden_size} channels, vocab {V}; {args.steps} steps of {args.batch_size} x {T} tokens per rank")
    say(f"loss: step 1 {losses[0]:.3f}, step {args.steps} {losses[-1]:.3f}; "
        f"mean of the first {WINDOW} {first:.3f}, of the last {WINDOW} {last:.3f}")
    say(f"ranks agree: max |params_r - params_0| / max |params_0| = {gap.item():.3g} over "
        f"{flat.numel()} parameters (tolerance {AGREE_TOL:g})")
    say("zeros at the projection inputs, measured / configured:")
    for site in counts:
        say(f"  {site:8s} {measured[site]:.3f} / {configured[site]:.3f}   ({', '.join(qs['sites'][site])})")

    failed = []
    if not last < (1 - args.min_drop) * first:
        failed.append(f"the loss did not fall: the last {WINDOW} steps' mean {last:.3f} is not below "
                      f"{1 - args.min_drop:g} x the first {WINDOW} steps' mean {first:.3f}.")
    if not gap.item() <= AGREE_TOL:
        failed.append(f"the ranks disagree after training: parameters differ from rank 0's by {gap.item():.3g} "
                      f"relative (tolerance {AGREE_TOL:g}), so the gradients were not synchronized.")
    short = [s for s in counts if measured[s] < configured[s] - SPARSITY_TOL]
    if short:
        failed.append("the projection inputs are not sparse: " + ", ".join(
            f"{s} has {measured[s]:.3f} zeros, configured {configured[s]:.3f}" for s in short)
            + f" (tolerance {SPARSITY_TOL}), so the Q-Sparse hooks did not act.")
    for f in failed:
        if rank == 0:
            print("ddp_finetune.py: " + f, file=sys.stderr, flush=True)
    if not failed:
        say(f"ok ({time.time() - t0:.1f} s)")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:                     # a UsageError: one sentence, exit 2, as the other programs
        from minisparse.errors import UsageError
        if not isinstance(e, UsageError):
            raise
        if RANK == 0:
            print(f"ddp_finetune.py: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
