"""The precision a program runs a model in: generate.py and evaluate.py --dtype.

Top-K is discontinuous: in float32 a channel whose |x| nearly ties the K-th largest of its row can
be kept by one summation order and dropped by another, and the change spreads to every later layer,
so two correct implementations, or two machines, can print different greedy text from a sparse
pretrained model (docs/qsparse.md, Sec. 8). Three precisions:

    float32   every array float32: as training writes the checkpoint, and the fastest
    float64   every array float64: the ground truth an audit compares against; twice the memory,
              and a decode reads twice the bytes
    mixed     the projections' weights float32, as stored; every other array float64, so that the
              residual stream, the norms, every projection's input and its sums, the key/value
              cache and the head run in float64. Where the weights are float32 numbers (a
              float32 checkpoint, SmolLM2's GGUF file), this computes what float64 computes up to
              float64's own rounding, while a decode streams the same float32 projection weights.

What mixed costs and buys, measured: benchmarks/precision_remedy.py (RESULTS.md 19).
"""

import numpy as np

from .backend import array_module
from .model import SITE_WEIGHTS

DTYPES = ("float32", "float64", "mixed")


def load_dtype(name):
    """The dtype to read a model's weights in for --dtype `name` (mixed: float32, then with_precision)."""
    return np.float64 if name == "float64" else np.float32


def with_precision(params, cfg, name):
    """params for --dtype `name`: as loaded, except for mixed, where every array but the projections'
    weights becomes float64 (a new dict; the projections' arrays are shared)."""
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {DTYPES}")
    if name != "mixed":
        return params
    proj = {f"h.{l}.{n}" for l in range(cfg.n_layer) for names in SITE_WEIGHTS.values() for n in names}
    xp = array_module(params["wte"])
    return {k: v if k in proj else xp.asarray(v, dtype=np.float64) for k, v in params.items()}
