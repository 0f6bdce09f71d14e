"""How long generate.py takes to start, with numba's cache warm, in checkouts taking turns.

    env -u OPENBLAS_CORETYPE python benchmarks/startup.py --checkouts OLD,NEW --out_dir RUN --rounds 3

Each round runs, in each checkout in turn, `python generate.py --out_dir RUN --max_new_tokens 8
--temperature 0` (and the same with --init_from smollm2 --raw --sparsity 0.5 where --smollm2 is
given) as a fresh process, after one untimed run per checkout that fills numba's cache, and prints
the wall time of the whole process: what a user waits for. The decode of 8 tokens is a small part of
it. RUN must be a train_tiny.py run both checkouts can load.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.machine import describe, revision  # noqa: E402


def wall(checkout, argv):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "generate.py", *argv], cwd=checkout, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"generate.py failed in {checkout}: {r.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkouts", required=True, help="comma-separated checkout folders")
    p.add_argument("--out_dir", required=True, help="a train_tiny.py run")
    p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M at top-K 0.5")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    checkouts = args.checkouts.split(",")
    print("machine:", describe())
    print("command: python benchmarks/startup.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("OPENBLAS_CORETYPE:", os.environ.get("OPENBLAS_CORETYPE", "(unset)"))
    for c in checkouts:
        rev, edited = revision(c)
        print(f"checkout {os.path.basename(os.path.abspath(c))}: git {rev}{' (+ uncommitted changes)' if edited else ''}")
    cases = [("tiny run", ["--out_dir", os.path.abspath(args.out_dir), "--max_new_tokens", "8", "--temperature", "0"])]
    if args.smollm2:
        cases.append(("SmolLM2 S=0.5", ["--init_from", "smollm2", "--raw", "--prompt", "The capital of France is",
                                        "--sparsity", "0.5", "--max_new_tokens", "8", "--temperature", "0"]))
    for name, a in cases:
        for c in checkouts:
            wall(c, a)                               # fills numba's cache for this checkout
        times = {c: [] for c in checkouts}
        for _ in range(args.rounds):
            for c in checkouts:
                times[c].append(wall(c, a))
        for c in checkouts:
            print(f"{name:>14}, {os.path.basename(os.path.abspath(c)):>8}: median {statistics.median(times[c]):6.2f} s; "
                  f"rounds {', '.join(f'{t:.2f}' for t in times[c])}")


if __name__ == "__main__":
    main()
