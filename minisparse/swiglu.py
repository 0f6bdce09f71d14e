"""SwiGLU (Shazeer 2020), the FFN activation of LLaMA and Mistral: the alternative to ReLU2-GLU.

    silu(z) = z * sigmoid(z)
    h = up * silu(gate)           up, gate, h: (B, T, Hd)

Q-Sparse keeps a pretrained model's own activation when continue-training (Sec. 3),
so SwiGLU models are sparsified by top-K alone. Backward, with s = sigmoid(gate):

    dup   = dh * silu(gate)
    dgate = dh * up * s * (1 + gate * (1 - s))
"""

from .backend import array_module


def swiglu_forward(up, gate):
    xp = array_module(up)
    s = 1.0 / (1.0 + xp.exp(-gate))                            # (B, T, Hd) sigmoid
    silu = gate * s
    return up * silu, (up, gate, s)      # silu is remade in backward: one product, one array less to keep


def swiglu_backward(dh, cache):
    up, gate, s = cache
    silu = gate * s
    dup = dh * silu
    dgate = dh * up * (s * (1 + gate * (1 - s)))
    return dup, dgate
