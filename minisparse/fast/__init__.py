"""The fast paths: faster functions with the signatures of the reference core's, each tested equal
to the function it replaces. The programs use them; a reader can leave them out entirely
(`train_tiny.py --reference`, `generate.py --reference`) and step through the core alone.

    FAST                   model.Ops with the faster ops below: model.forward(..., ops=FAST)
    topk.py                top-K from one sort, no tie-break where none can matter   (topk.py)
    rope.py                RoPE's rotation as whole-vector products                   (rope.py)
    norm.py                RMSNorm with fused reductions                              (norm.py)
    embedding.py           the embedding's scatter-add by sorting                     (embedding.py)
    parallel.py            a training step's batch split over CPU threads   (model.forward_backward)
    workers.py             the same split, every part but the first in a worker process  (parallel.py)
    rowsparse.py, .cu      row-sparse kernels: chunked NumPy, numba, CUDA             (rowsparse.py)
    ternary.py             the 2-bit packed ternary product, numba   (ternary.ternary_rows_matvec, _sparse_matvec)
    decode.py              DecodeWeights: which projections decode row-sparse, and how (decode.py)
    step.py                one token's whole decode step compiled with numba       (decode.decode_forward)
    runtime.py             malloc and BLAS-thread settings (no numbers change)

tests/test_fast.py checks each op against its reference; tests/test_rowsparse.py and
tests/test_ternary.py the kernels; tests/test_step.py the compiled decode step.
"""

from ..model import Ops
from . import embedding, norm, rope, topk

FAST = Ops("fast", sparsify=topk.sparsify, rotate=rope.rotate, rmsnorm_forward=norm.rmsnorm_forward,
           rmsnorm_backward=norm.rmsnorm_backward, embedding_backward=embedding.embedding_backward)
