"""One line naming the machine a benchmark ran on: CPU model, cores, library versions, threads."""

import os
import platform
import subprocess
import sys


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device="cpu"):
    import numpy as np
    parts = [f"{cpu_name()}, {os.cpu_count()} cores", f"numpy {np.__version__}"]
    try:
        from threadpoolctl import threadpool_info
        blas = [f"{i['internal_api']} {i.get('version')} ({i['num_threads']} threads)"
                for i in threadpool_info() if i["user_api"] == "blas"]
        parts += blas
    except ImportError:
        pass
    numba = sys.modules.get("numba")                   # named only where the benchmark loaded it
    if numba is not None:
        parts.append(f"numba {numba.__version__} ({numba.get_num_threads()} threads)")
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(var):
            parts.append(f"{var}={os.environ[var]}")
    if device == "gpu":
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        parts.append(f"GPU {props['name'].decode()}, cupy {cupy.__version__}")
    return "; ".join(parts)


def revision(tree):
    """(the short git revision of the checkout at `tree`, '' outside one; whether its tracked files
    have uncommitted changes), for a benchmark's log."""
    git = ["git", "-C", tree]
    try:
        rev = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        edited = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip()
    except OSError:                                    # no git on this machine
        return "", False
    return rev, bool(rev and edited)


def last_level_cache_mb(device="cpu"):
    """The largest cache the weights could sit in, in MB: the CPU's last level (Linux sysfs; 32 if
    unknown) or the GPU's L2."""
    if device == "gpu":
        import cupy
        return cupy.cuda.runtime.getDeviceProperties(0)["l2CacheSize"] / 2**20
    best = 32.0
    base = "/sys/devices/system/cpu/cpu0/cache"
    for index in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, index, "size")) as f:
                size = f.read().strip()                       # e.g. "307200K"
            scale = {"K": 2**-10, "M": 1.0, "G": 2**10}.get(size[-1], 2**-20)
            best = max(best, float(size.rstrip("KMG")) * scale)
        except (OSError, ValueError, IndexError):             # not a cache folder, or unreadable
            continue
    return best
