"""megacore's fused ops: the public functional API over ``torch.ops.megacore.*``.

Each op is a real torch custom op (CPU and CUDA kernels in C++/CUDA, a fake kernel for torch.compile,
autograd whose backward is itself an op). ``megacore.ops.reference`` holds the pure-PyTorch
definitions the tests compare against.
"""

from megacore.ops import reference
from megacore.ops.activation import bias_gated, bias_gelu, bias_relu
from megacore.ops.cross_entropy import (
    cross_entropy,
    cross_entropy_backward,
    vocab_parallel_cross_entropy_stats,
)
from megacore.ops.dropout import bias_dropout_add
from megacore.ops.linear import SKINNY_LINEAR_MAX_ROWS, linear
from megacore.ops.norm import layer_norm, rms_norm
from megacore.ops.rotary import apply_rotary_emb, rotary_tables
from megacore.ops.softmax import scaled_bias_softmax, scaled_causal_softmax, scaled_masked_softmax

__all__ = [
    "SKINNY_LINEAR_MAX_ROWS",
    "apply_rotary_emb",
    "bias_dropout_add",
    "bias_gated",
    "bias_gelu",
    "bias_relu",
    "cross_entropy",
    "cross_entropy_backward",
    "layer_norm",
    "linear",
    "reference",
    "rms_norm",
    "rotary_tables",
    "scaled_bias_softmax",
    "scaled_causal_softmax",
    "scaled_masked_softmax",
    "vocab_parallel_cross_entropy_stats",
]
