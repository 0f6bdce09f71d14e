"""Checkpoints: one .npz file, written atomically.

Format (format 1), a NumPy .npz archive (np.load reads it; no pickle):
    "param/<name>"    every model parameter, float32, by its name in model.param_shapes
    "adam_m/<name>"   AdamW's first moment   (training checkpoints)
    "adam_v/<name>"   AdamW's second moment  (training checkpoints)
    "meta.json"       a uint8 array holding UTF-8 JSON: {"format": 1, "model": GPTConfig,
                      "train": TrainConfig, "iter": next step to run, "adam_t": steps taken,
                      "rng": the batch generator's state, "tokenizer": the tokenizer, ...}

Atomic: the archive is written to "<path>.tmp", flushed to disk, then renamed over
<path> (os.replace is atomic on POSIX and Windows), so a kill during a save leaves the
previous checkpoint whole.
"""

import json
import os
import zipfile

import numpy as np

from .backend import to_numpy
from .errors import UsageError

FORMAT = 1


def save_checkpoint(path, params, meta, opt_state=None):
    arrays = {f"param/{k}": to_numpy(v) for k, v in params.items()}
    if opt_state is not None:
        arrays.update({f"adam_m/{k}": to_numpy(v) for k, v in opt_state["m"].items()})
        arrays.update({f"adam_v/{k}": to_numpy(v) for k, v in opt_state["v"].items()})
        meta = {**meta, "adam_t": opt_state["t"]}
    meta = {"format": FORMAT, **meta}
    arrays["meta.json"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """-> (params, opt_state or None, meta), arrays as NumPy. Missing or corrupt files are UsageErrors."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist: train a model first (python train_tiny.py) "
                         "or give the out_dir of a finished run.")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):       # a bare .npy array renamed to .npz
            raise ValueError("not an .npz archive")
        with z:
            meta = json.loads(bytes(z["meta.json"]).decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("meta.json is not a JSON object")
            params, m, v = {}, {}, {}
            for key in z.files:
                kind, _, name = key.partition("/")
                if kind == "param":
                    params[name] = z[key]
                elif kind == "adam_m":
                    m[name] = z[key]
                elif kind == "adam_v":
                    v[name] = z[key]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise UsageError(f"checkpoint {path!r} is corrupt or not a minisparse checkpoint ({e.__class__.__name__}): "
                         "delete it, or point to another run.") from None
    if meta.get("format") != FORMAT or "model" not in meta:
        raise UsageError(f"checkpoint {path!r} has format {meta.get('format')!r}; this version reads format {FORMAT}.")
    opt_state = {"t": meta.get("adam_t", 0), "m": m, "v": v} if m else None
    return params, opt_state, meta


def check_params(params, shapes, path):
    """Raise UsageError unless params have exactly the names and shapes the config expects."""
    for name, shape in shapes.items():
        if name not in params or tuple(params[name].shape) != tuple(shape):
            got = tuple(params[name].shape) if name in params else "missing"
            raise UsageError(f"checkpoint {path!r} does not fit this model: parameter {name!r} is {got}, "
                             f"the configuration needs {tuple(shape)}.")
    extra = set(params) - set(shapes)
    if extra:
        raise UsageError(f"checkpoint {path!r} does not fit this model: it has extra parameters {sorted(extra)[:3]}.")
