"""Execute every lesson notebook top to bottom, as CI does, and check its pairing.

    python lessons/run_all.py            # all lessons
    python lessons/run_all.py 03 05      # only those whose names start with 03 or 05

For each lessons/NN_*.py (jupytext percent format, the file reviewers diff) this checks
that the paired NN_*.ipynb holds exactly the same cells, then executes the notebook in a
fresh kernel from the lessons/ folder (nothing is written back). A lesson that raises, or
whose .py and .ipynb have drifted apart, makes the exit status 1. The time of each is
printed; every lesson should take under 2 minutes on a 2-core CPU.
"""

import glob
import os
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUDGET_S = 120


def cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def main(prefixes):
    os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
    os.environ.setdefault("MPLBACKEND", "Agg")
    failed = []
    for py in sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.py"))):
        name = os.path.basename(py)[:-3]
        if prefixes and not name.startswith(tuple(prefixes)):
            continue
        ipynb = py[:-3] + ".ipynb"
        if not os.path.exists(ipynb):
            print(f"FAIL {name}: {os.path.basename(ipynb)} is missing (jupytext --to ipynb {name}.py)")
            failed.append(name)
            continue
        nb = nbformat.read(ipynb, as_version=4)
        if cells(jupytext.read(py)) != cells(nb):
            print(f"FAIL {name}: the .py and .ipynb differ; re-pair them with: jupytext --sync lessons/{name}.py")
            failed.append(name)
            continue
        t0 = time.perf_counter()
        try:
            NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
        except Exception as e:  # a failing cell: nbclient's CellExecutionError carries the traceback
            print(f"FAIL {name}: {e}")
            failed.append(name)
            continue
        dt = time.perf_counter() - t0
        note = "" if dt <= BUDGET_S else f"  (over the {BUDGET_S} s budget)"
        print(f"ok   {name}: {dt:.1f} s{note}", flush=True)
    if failed:
        print(f"{len(failed)} lesson(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
