"""Where the GPU decode's time goes, at D = 4096, O = 12288 (a fused q/k/v projection): needs CuPy.

    python benchmarks/gpu_select_breakdown.py

- device time (a CUDA graph of 20 calls, replayed) of an empty kernel, of fast/rowsparse.cu's
  topk_select alone (compiled for 4 and for 16 entries a thread; K = D skips the radix select),
  and of selection + product against the product alone with the indices given;
- the same by decode_speed.gpu_ms (calls queued behind a spin kernel), and cuBLAS's dense product;
- Python's time per call (host microseconds) of an allocation, a launch, and a whole projection.
Log: benchmarks/logs/gpu_select.txt.
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.decode_speed import gpu_ms  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from minisparse.fast import rowsparse  # noqa: E402
from minisparse.fast.topk import topk_nonzero  # noqa: E402
from minisparse.topk import kept_count  # noqa: E402


def graph_ms(f, repeats=10, calls=20):
    """Device time of one f(i) in ms: f(0) .. f(calls-1) captured in a CUDA graph (CuPy cannot capture
    cuBLAS, so the dense product is timed by gpu_ms instead), the median replay / calls."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        f(0)
        s.synchronize()
        s.begin_capture()
        for i in range(calls):
            f(i)
        g = s.end_capture()
        g.launch(s)
        a, b = cp.cuda.Event(), cp.cuda.Event()
        ts = []
        for _ in range(repeats):
            a.record(s)
            g.launch(s)
            b.record(s)
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b) / calls)
    return float(np.median(ts))


def host_us(f, n=300):
    """Python's time per call of f in microseconds (the GPU keeps up or queues)."""
    f()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t = time.perf_counter() - t0
    cp.cuda.Device().synchronize()
    return t / n * 1e6


def main():
    print("machine:", describe("gpu"))
    print("command: python benchmarks/gpu_select_breakdown.py")
    empty = cp.RawKernel('extern "C" __global__ void e(int a) {}', "e")
    D, O = 4096, 3 * 4096
    rng = np.random.default_rng(0)
    W = cp.asarray(rng.standard_normal((O, D), dtype=np.float32))
    Ws = [W, W.copy(), W.copy()]                              # 3 x 201 MB: past the 60 MB L2
    Wts = [cp.ascontiguousarray(w.T) for w in Ws]
    x = cp.asarray(rng.standard_normal(D, dtype=np.float32))
    idx, vals = cp.empty(D, cp.int64), cp.empty(D, cp.float32)
    n, y = cp.empty((), cp.int32), cp.empty(O, cp.float32)
    print("graph us: empty kernel %.2f, memset y %.2f" % (
        1e3 * graph_ms(lambda i: empty((1,), (32,), (np.int32(0),))), 1e3 * graph_ms(lambda i: y.fill(0))))
    for P in (4, 16):
        kern = rowsparse._cuda_kernel("topk_select", 8, P)
        for K in (D, D // 2, D // 4):
            t0 = graph_ms(lambda i: kern((1,), (1024,), (x, np.int32(D), np.int32(K), idx, vals, n, y, np.int32(0))))
            t1 = graph_ms(lambda i: kern((1,), (1024,), (x, np.int32(D), np.int32(K), idx, vals, n, y, np.int32(O))))
            print(f"select {P}/thread K {K}: O=0 {1e3 * t0:.2f} us, O={O} {1e3 * t1:.2f} us")
    for S in (0.5, 0.75):
        K = kept_count(D, S)
        i_ = topk_nonzero(x, K)
        v_ = x[i_]
        g = graph_ms(lambda i: rowsparse.topk_rows_matvec_cuda(x, K, Wts[i % 3]))
        sp = gpu_ms(lambda i: rowsparse.topk_rows_matvec_cuda(x, K, Wts[i % 3]), 10)
        print(f"S {S}: select+kernel graph {g:.4f} ms, spin-timed {sp:.4f} ms")
        kg = graph_ms(lambda i: rowsparse.rows_matvec_cuda(v_, i_, Wts[i % 3]))
        ks = gpu_ms(lambda i: rowsparse.rows_matvec_cuda(v_, i_, Wts[i % 3]), 10)
        print(f"S {S}: kernel only graph {kg:.4f}, spin {ks:.4f}")
    print(f"dense cuBLAS spin-timed {gpu_ms(lambda i: x[None] @ Ws[i % 3].T, 10):.4f} ms")
    sel = rowsparse._cuda_kernel("topk_select", 8, 4)
    print("host us per call: cp.empty %.1f, select launch %.1f, n + 0 %.1f, topk_rows_matvec_cuda %.1f, x@W.T %.1f" % (
        host_us(lambda: cp.empty(D, cp.int64)),
        host_us(lambda: sel((1,), (1024,), (x, np.int32(D), np.int32(D // 2), idx, vals, n, y, np.int32(O)))),
        host_us(lambda: n + 0), host_us(lambda: rowsparse.topk_rows_matvec_cuda(x, D // 2, Wts[0])),
        host_us(lambda: x[None] @ Ws[0].T)))


if __name__ == "__main__":
    main()
