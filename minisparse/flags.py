"""Command-line flags made from configuration dataclasses: one place for a setting's name,
default and help.

A field declared with `option(default, "help")` becomes the flag `--name`, of the field's type:

    n_layer: int = option(4, "number of Transformer blocks")        ->  --n_layer 4

A bool field becomes a pair, `--name` (True) and `--no_name` (False). A field whose values are
written differently on the command line names its parser, applied by `given_values` (so that a
bad value raises UsageError, one sentence, not argparse's usage text): option(None, "...", parse=parse_nm).
"""

import argparse
from dataclasses import field, fields

from .errors import UsageError


def option(default, help, parse=None):
    """A dataclass field with its default, its flag's help and optionally its flag's parser."""
    return field(default=default, metadata={"help": help, "parse": parse})


def parse_nm(text):
    """'16:32' -> (16, 32), the KEEP:BLOCK of Block Q-Sparse; '' -> None."""
    if text in ("", None):
        return None
    try:
        keep, block = (int(s) for s in text.split(":"))
    except ValueError:
        raise UsageError(f"--nm {text!r} is not allowed: write KEEP:BLOCK with whole numbers, "
                         "e.g. 16:32 keeps 16 of every 32 channels.") from None
    return keep, block


def add_flags(parser, cls, skip=()):
    """Add a flag for every field of the dataclass `cls` (but those in `skip`) to an
    argparse group or parser, its help showing the field's default. Unset flags
    are left out of the parsed namespace (argparse.SUPPRESS), so a caller knows which the user gave."""
    for f in fields(cls):
        if f.name in skip:
            continue
        help_text, parse = f.metadata["help"], f.metadata.get("parse")
        default = f.default
        if f.type in (bool, "bool"):
            parser.add_argument(f"--{f.name}", action="store_true", default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {'on' if default else 'off'})")
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS if not default else f"turn off --{f.name}")
        else:
            kind = str if parse else {"int": int, "float": float, "str": str}.get(f.type, f.type)
            shown = ":".join(map(str, default)) if isinstance(default, tuple) else default
            parser.add_argument(f"--{f.name}", type=kind, default=argparse.SUPPRESS,
                                help=f"{help_text} (default: {shown!r})")


def add_dtype_flag(parser):
    """--dtype, the precision a program runs a model in (generate.py, evaluate.py)."""
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "mixed"),
                        help="the precision the model runs in, fast paths included. Top-K is discontinuous: in "
                             "float32 a near-tie at the K-th largest |x| can flip with the summation order, so "
                             "two correct implementations (or machines) may print different text; float64 is "
                             "the ground truth to audit against (docs/qsparse.md, Sec. 8). mixed: the "
                             "projections' weights float32 as stored, everything else float64, which computes "
                             "what float64 does where the weights are float32 numbers (minisparse/precision.py)")


def given_values(cls, given):
    """{field: value} for the fields of `cls` among the parsed flags `given` (a dict), each through
    its field's parser if it names one."""
    out = {}
    for f in fields(cls):
        if f.name in given:
            parse = f.metadata.get("parse")
            out[f.name] = parse(given[f.name]) if parse else given[f.name]
    return out


def add_channel_order_flag(parser):
    """--channel_order, an order file of reorder.py (generate.py, export.py)."""
    parser.add_argument("--channel_order", default="",
                        help="store the model's channels in this order (a file reorder.py wrote): the same model, "
                             "with top-K's selected rows in longer runs (minisparse/channel_order.py)")
