"""minisparse: Q-Sparse (top-K activation sparsity with straight-through gradients) in a small
GPT, in NumPy or CuPy, with every backward pass written by hand.

One file per concept; each opens with the equation it implements:
    backend.py    NumPy or CuPy, chosen in one place
    topk.py       top-K sparsification and the straight-through estimator (Eq. 2-3, 12-13)
    nm.py         Block Q-Sparse, N:M structured sparsity
    linear.py     the sparsified projection y = sparsify(x) W^T
    relu2.py      squared ReLU and the ReLU2-GLU (Eq. 11);   swiglu.py  SwiGLU
    norm.py       RMSNorm;  rope.py  rotary embeddings;  attention.py  causal attention
    embedding.py  token embedding;  loss.py  softmax cross-entropy
    model.py      the GPT: config, parameters, forward, backward, measured sparsity, N_a
    optimizer.py  AdamW and gradient clipping;  schedule.py  warmup + cosine learning rate
    parallel.py   the batch split over CPU threads, their gradients summed
"""

from .errors import UsageError  # noqa: F401
