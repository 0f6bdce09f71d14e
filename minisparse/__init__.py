"""minisparse: Q-Sparse (top-K activation sparsity with straight-through gradients) in a small
GPT, in NumPy or CuPy, with every backward pass written by hand.

The reference core, one file per concept; each opens with the equation it implements:
    topk.py       top-K sparsification and the straight-through estimator (Eq. 2-3, 12-13)
    nm.py         Block Q-Sparse, N:M structured sparsity
    linear.py     the sparsified projection y = sparsify(x) W^T
    relu2.py      squared ReLU and the ReLU2-GLU (Eq. 11);   swiglu.py  SwiGLU
    norm.py       RMSNorm;  rope.py  rotary embeddings;  attention.py  causal attention
    embedding.py  token embedding;  loss.py  softmax cross-entropy (targets of -1 not counted)
    model.py      the GPT: parameters, forward (training and decoding), backward, N_a;  config.py  GPTConfig
    decode.py     decoding with a key/value cache;  sampling.py  temperature and top-k sampling
    rowsparse.py  the row-sparse product, where the saving of sparsity is real
    quant.py      INT8 inputs and ternary weights (Eq. 4-10);  ternary.py  their 2-bit packed decode
    optimizer.py  AdamW and gradient clipping;  schedule.py  warmup + cosine learning rate
    scaling.py    the scaling law L(N, S) and the optimal sparsity
The programs' plumbing: train.py (the step and the loop; run.py: TrainConfig and a run's set-up;
batches.py: text or SFT batches; checkpoint.py, data.py; sft.py: finetuning's examples, chat template
and masked batches), evaluate.py and allocation.py (quality against dense), export.py and
export_gguf.py (Hugging Face, llama.cpp), pretrained.py (GGUF),
flags.py (command-line flags from the configs), backend.py (NumPy or CuPy), gradcheck.py.

fast/ holds the faster variants, each equal to a reference above (fast/__init__.py).
"""

from .errors import UsageError  # noqa: F401
