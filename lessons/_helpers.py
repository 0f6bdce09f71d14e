"""Small helpers that several lessons share, kept here once instead of copied into each notebook.

    repo_path(*parts)       a path inside the repository, wherever the lesson was started from
    ema(values)             the smoothed training-loss curves of lessons 05 and 06
    final_val_loss(...)     the shared final evaluation of a saved run (lessons 05 and 06)
    machine()               one line naming the machine a timing ran on (lesson 07)
    last_level_cache_mb()   the CPU's largest cache, which decides whether weights come from memory

A lesson imports them with `from _helpers import ...`: the notebooks run in lessons/, and
`python lessons/NN_name.py` puts lessons/ first on sys.path, so both find this file.
"""

import importlib.util
import os

import numpy as np

LESSONS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(LESSONS)


def repo_path(*parts):
    """The path of parts inside the repository, from this file's place, not from the working
    directory: a lesson that reads a committed file works from the repository root and from lessons/."""
    return os.path.join(REPO, *parts)


def ema(values, alpha=0.05):
    """Exponential moving average, debiased at the start like Adam's moments."""
    out, s = [], 0.0
    for i, v in enumerate(values):
        s = (1 - alpha) * s + alpha * v
        out.append(s / (1 - (1 - alpha) ** (i + 1)))
    return np.array(out)


def final_val_loss(run_dir, text, eval_iters=50, batch_size=8, seed=0):
    """(mean, standard error) of a saved run's loss over `eval_iters` validation batches of `text`.

    The batches come from the generator `train.estimate_loss` uses for "val" at step 0 of a
    TrainConfig with this seed, so every run is scored on the same batches and the batches'
    difficulty cancels in the differences between runs. The loop is estimate_loss keeping each
    batch's loss (for the standard error); the mean is checked against estimate_loss itself."""
    from minisparse import backend, model
    from minisparse.data import get_batch, split_ids
    from minisparse.train import TrainConfig, estimate_loss, load_run

    params, _, cfg, tok, _ = load_run(run_dir)
    _, val_ids = split_ids(tok.encode(text))
    rng = np.random.default_rng([seed, 0, 1])               # estimate_loss's generator for "val" at it = 0
    losses = []
    for _ in range(eval_iters):
        x, y = get_batch(val_ids, cfg.block_size, batch_size, rng)
        losses.append(float(model.forward(params, cfg, backend.asarray(x), backend.asarray(y))[1]))
    mean, se = float(np.mean(losses)), float(np.std(losses, ddof=1) / np.sqrt(len(losses)))
    tc = TrainConfig(seed=seed, batch_size=batch_size, eval_iters=eval_iters)
    np.testing.assert_allclose(mean, estimate_loss(params, cfg, {"val": val_ids}, tc, 0)["val"], rtol=1e-12)
    return mean, se


def _benchmarks_machine():
    """benchmarks/machine.py, loaded from its file (benchmarks/ is not an installed package)."""
    spec = importlib.util.spec_from_file_location("_benchmarks_machine", repo_path("benchmarks", "machine.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine():
    """benchmarks/machine.py's line for this machine: CPU, cores, numpy, BLAS threads, and numba
    with its threads where the lesson has imported it."""
    return _benchmarks_machine().describe()


def last_level_cache_mb():
    """The CPU's largest cache in MB, as benchmarks/machine.py reads it (32 where unknown)."""
    return _benchmarks_machine().last_level_cache_mb()
