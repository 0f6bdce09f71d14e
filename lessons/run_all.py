"""Execute every lesson notebook top to bottom, as CI does, and check its pairing.

    python lessons/run_all.py                # all lessons: check and run, write nothing
    python lessons/run_all.py 03 05          # only those whose names start with 03 or 05
    python lessons/run_all.py --write        # also write each executed notebook back, with outputs
    python lessons/run_all.py --write 07     # regenerate one lesson's committed notebook

For each lessons/NN_*.py (jupytext percent format, the file reviewers diff) this checks
that the paired NN_*.ipynb holds exactly the same cells (their sources: outputs do not
count), then executes the notebook in a fresh kernel from the lessons/ folder. Without
--write nothing is written. With --write a notebook that ran without error is written back
to its .ipynb with its outputs, so that the committed notebooks can be read without running
them; its metadata is kept minimal (kernelspec and jupytext's pairing, no execution
timestamps) and its cell ids are made from the cells' sources, so that regenerating a
lesson changes only what its cells print. A lesson that raises, or whose .py and .ipynb
have drifted apart, makes the exit status 1 (and is not written). The time of each is
printed; every lesson should take under 2 minutes on a 2-core CPU.

minisparse must be installed (pip install -r requirements-lessons.txt from the repository
root installs it in editable mode), as for opening the notebooks in Jupyter.
"""

import argparse
import glob
import hashlib
import os
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))
BUDGET_S = 120
# Agg draws nothing into a notebook; the inline backend (Jupyter's default) stores each figure
# as a PNG output, which --write needs. Both run without a display.
INLINE = "module://matplotlib_inline.backend_inline"
KEPT_METADATA = ("kernelspec", "jupytext")


def cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def stable_ids(nb):
    """Cell ids from each cell's type and source (a counter tells identical cells apart), in place
    of the random ids jupytext makes, so that a regenerated notebook keeps its ids."""
    seen = {}
    for c in nb.cells:
        h = hashlib.sha1(f"{c.cell_type}\n{c.source}".encode()).hexdigest()[:8]
        seen[h] = seen.get(h, -1) + 1
        c.id = h if seen[h] == 0 else f"{h}-{seen[h]}"


def minimal_metadata(nb):
    """Keep only the notebook metadata that opening and pairing need; drop what executing adds."""
    nb.metadata = nbformat.from_dict({k: nb.metadata[k] for k in KEPT_METADATA if k in nb.metadata})
    for c in nb.cells:
        c.metadata.pop("execution", None)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prefixes", nargs="*", help="run only the lessons whose names start with one of these")
    ap.add_argument("--write", action="store_true",
                    help="write each executed notebook back to its .ipynb, with its outputs")
    args = ap.parse_args(argv)
    # minisparse is imported as installed (pip install -e .), not from a path set here
    os.environ["MPLBACKEND"] = INLINE if args.write else os.environ.get("MPLBACKEND", "Agg")
    failed = []
    for py in sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.py"))):
        name = os.path.basename(py)[:-3]
        if args.prefixes and not name.startswith(tuple(args.prefixes)):
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
            NotebookClient(nb, timeout=600, kernel_name="python3", record_timing=False,
                           resources={"metadata": {"path": HERE}}).execute()
        except Exception as e:  # a failing cell: nbclient's CellExecutionError carries the traceback
            print(f"FAIL {name}: {e}")
            failed.append(name)
            continue
        dt = time.perf_counter() - t0
        note = "" if dt <= BUDGET_S else f"  (over the {BUDGET_S} s budget)"
        if args.write:
            minimal_metadata(nb)
            stable_ids(nb)
            nbformat.write(nb, ipynb)
            note += "  (written)"
        print(f"ok   {name}: {dt:.1f} s{note}", flush=True)
    if failed:
        print(f"{len(failed)} lesson(s) failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
