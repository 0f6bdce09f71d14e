"""The array backend: NumPy by default, CuPy only when asked, the same results on both.

The CuPy cases run the model's forward and backward on the GPU and compare them with
NumPy in float64; they are skipped when CuPy or a CUDA device is missing."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import has_gpu
from minisparse import backend, model
from minisparse.fast import FAST
from minisparse.errors import UsageError
from minisparse.optimizer import AdamW

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def test_nothing_imports_cupy_on_the_cpu():
    code = ("import sys, numpy as np; from minisparse import model, train, sampling, decode;"
            "cfg = model.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8);"
            "p = model.init_params(cfg); idx = np.zeros((1, 4), dtype=np.int64);"
            "_, l, c = model.forward(p, cfg, idx, idx); model.backward(p, cfg, c);"
            "assert 'cupy' not in sys.modules, 'cupy was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})


def test_unknown_device_is_a_usage_error():
    with pytest.raises(UsageError, match="'tpu'"):
        backend.set_device("tpu")
    assert backend.get_device() == "cpu"


@pytest.mark.skipif(has_gpu(), reason="a GPU is present")
def test_gpu_without_cupy_or_device_is_one_sentence():
    with pytest.raises(UsageError, match="CuPy") as e:
        backend.set_device("gpu")
    assert "\n" not in str(e.value)
    assert backend.get_device() == "cpu"                  # a failed switch leaves the CPU in place


def device_from_env(value):
    env = {**os.environ, "MINISPARSE_DEVICE": value, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-c", "from minisparse import backend; print(backend.get_device())"],
                          env=env, capture_output=True, text=True, cwd=ROOT)


def test_environment_variable_chooses_the_device():
    assert device_from_env("cpu").stdout.strip() == "cpu"
    bad = device_from_env("tpu")
    assert bad.returncode != 0 and "device 'tpu' is not known" in bad.stderr


def test_training_steps_are_bit_for_bit_repeatable():
    def run():
        cfg = model.GPTConfig(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16, sparsity=0.5)
        params = model.init_params(cfg, seed=4)
        opt = AdamW(params, 1e-2)
        rng = np.random.default_rng(11)
        losses = []
        for _ in range(5):
            idx = rng.integers(0, 17, (3, 9))
            _, loss, caches = model.forward(params, cfg, idx[:, :-1], idx[:, 1:])
            opt.step(params, model.backward(params, cfg, caches))
            losses.append(float(loss))
        return losses, params
    (l1, p1), (l2, p2) = run(), run()
    assert l1 == l2
    assert all(np.array_equal(p1[k], p2[k]) for k in p1)


@pytest.mark.parametrize("sparsity,nm,extra", [
    (0.0, None, {}), (0.5, None, {}), (0.0, (2, 4), {}),
    (0.5, None, dict(n_head=4, n_kv_head=2, tie_embeddings=True, rope_layout="pairs", activation="swiglu"))])
@pytest.mark.parametrize("ops", [model.REFERENCE, FAST], ids=lambda o: o.name)
@pytest.mark.skipif(not has_gpu(), reason="needs CuPy and a CUDA device")
def test_cupy_matches_numpy(sparsity, nm, extra, ops):
    """The reference ops and the fast ops, each on CuPy against the same ops on NumPy."""
    import cupy
    shape = dict(vocab_size=17, block_size=8, n_layer=2, n_head=2, n_embd=16)
    cfg = model.GPTConfig(**{**shape, **extra}, sparsity=sparsity, nm=nm)
    params = model.init_params(cfg, seed=1, dtype=np.float64)           # NumPy (the default device)
    idx = np.random.default_rng(2).integers(0, 17, (3, 9))
    logits, loss, caches = model.forward(params, cfg, idx[:, :-1], idx[:, 1:], ops)
    grads = model.backward(params, cfg, caches)
    gparams = {k: cupy.asarray(v) for k, v in params.items()}
    glogits, gloss, gcaches = model.forward(gparams, cfg, cupy.asarray(idx[:, :-1]), cupy.asarray(idx[:, 1:]), ops)
    ggrads = model.backward(gparams, cfg, gcaches)
    np.testing.assert_allclose(cupy.asnumpy(glogits), logits, rtol=1e-10, atol=1e-12)
    assert float(gloss) == pytest.approx(float(loss), rel=1e-12)
    for k in grads:
        np.testing.assert_allclose(cupy.asnumpy(ggrads[k]), grads[k], rtol=1e-8, atol=1e-12, err_msg=k)
