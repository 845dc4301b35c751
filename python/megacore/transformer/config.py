"""The transformer layer's configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

_NAME = "megacore.transformer.TransformerConfig"

NORMALIZATIONS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "geglu", "geglu_erf", "swiglu", "reglu")
GATED_ACTIVATIONS = ("geglu", "geglu_erf", "swiglu", "reglu")
POSITION_EMBEDDINGS = ("learned_absolute", "rope", "none")
MASK_KINDS = ("causal", "padding", "sliding_window", "none")
ATTENTION_BACKENDS = ("auto", "fused_softmax", "flash")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class TransformerConfig:
    """Everything that shapes one transformer layer (Megatron-LM's ``TransformerConfig``, trimmed).

    Attributes:
        hidden_size, num_attention_heads: without ``kv_channels``, ``hidden_size`` must divide by
            ``num_attention_heads`` (head_dim = hidden_size / num_attention_heads).
        kv_channels: each head's width (Megatron's name; T5's ``d_kv``), when it is not hidden_size / heads: the
            attention then works in ``num_attention_heads * kv_channels`` features (T5 v1.1-small: hidden 512, 6
            heads of 64). None: hidden_size / num_attention_heads.
        ffn_hidden_size: the MLP's inner size; None means ``4 * hidden_size``.
        normalization: ``"layernorm"`` (weight and bias) or ``"rmsnorm"`` (weight only).
        norm_epsilon: the norms' epsilon.
        pre_norm: True for pre-LN (GPT: norm -> block -> residual add), False for post-LN
            (BERT: block -> residual add -> norm).
        hidden_dropout: dropout on each block's output before the residual add.
        attention_dropout: dropout on the attention probabilities.
        activation: the MLP's: ``"gelu"`` (exact, erf), ``"gelu_tanh"`` (the tanh approximation), ``"relu"``
            (T5), or a gated one on fc1's two halves ``[gate; up]`` (fc1 is then ``2 * ffn_hidden_size`` wide):
            ``"geglu"`` (gelu_tanh(gate) * up, T5 v1.1), ``"geglu_erf"``, ``"swiglu"`` (silu, LLaMA),
            ``"reglu"``.
        position_embedding_type: ``"rope"`` applies rotary embeddings to q and k inside the layer;
            ``"learned_absolute"`` and ``"none"`` leave positions to the model's embedding.
        rotary_percent, rotary_base: the fraction of head_dim rotated, and RoPE's base.
        attention_mask_type: ``"causal"``, ``"sliding_window"`` (causal, each query sees the last
            ``window_size`` keys, itself included), ``"padding"`` (a bool mask passed to forward,
            True = masked out) or ``"none"``.
        add_bias_linear: biases on the four GEMMs.
        params_dtype: the parameters' (and activations') dtype: float32, bfloat16, float16 or float64.
        tensor_parallel: shard the layer over megacore.parallel's tensor-parallel group
            (``initialize_model_parallel`` first); False builds a whole, single-process layer.
        sequence_parallel: keep activations outside the tensor-parallel region split along the
            sequence (needs ``tensor_parallel``); the layer's input and output are ``[s / tp, b, h]``.
        recompute_core_attention: selective recomputation: do not keep the attention probabilities
            for backward, recompute them from q and k.
        attention_backend: ``"fused_softmax"`` (GEMM + megacore's fused masked softmax, every mask),
            ``"flash"`` (PyTorch's flash kernel: causal or no mask; on CPU without attention dropout,
            on CUDA in fp16/bf16) or ``"auto"`` (flash where it applies, else fused_softmax).
        softmax_scale: multiplies the attention scores before the softmax; None: ``1 / sqrt(head_dim)``
            (T5 uses 1.0).
        attention_bias: the layer's forward takes an additive bias on the self-attention scores
            (``[b or 1, heads, s, s]``: T5's relative-position bias, ALiBi); flash attention is then not used.
        cross_attention: a decoder layer: self-attention, then attention from the layer's queries to an
            encoder's ``memory`` (forward's argument, with its padding mask), then the MLP.
        overlap_tp_comm: in backward, run the tensor-parallel all-reduce (reduce-scatter under sequence
            parallelism) of each column-parallel GEMM's input gradient while its weight gradient computes.
        init_method_std: weights are drawn from normal(0, init_method_std); the two output
            projections use ``init_method_std / sqrt(2 * num_layers)`` (Megatron's scaled init).
        num_layers: the model's depth, for that scaling.
    Raises ValueError (TypeError for a wrong type) naming the field when a value is invalid.
    """

    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None
    kv_channels: Optional[int] = None
    normalization: str = "layernorm"
    norm_epsilon: float = 1e-5
    pre_norm: bool = True
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    position_embedding_type: str = "learned_absolute"
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    attention_mask_type: str = "causal"
    window_size: Optional[int] = None
    add_bias_linear: bool = True
    params_dtype: torch.dtype = torch.float32
    tensor_parallel: bool = False
    sequence_parallel: bool = False
    recompute_core_attention: bool = False
    attention_backend: str = "auto"
    softmax_scale: Optional[float] = None
    attention_bias: bool = False
    cross_attention: bool = False
    overlap_tp_comm: bool = True
    init_method_std: float = 0.02
    num_layers: int = 1

    def __post_init__(self):
        for name in ("hidden_size", "num_attention_heads", "num_layers"):
            _positive_int(name, getattr(self, name))
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        _positive_int("ffn_hidden_size", self.ffn_hidden_size)
        if self.kv_channels is not None:
            _positive_int("kv_channels", self.kv_channels)
        elif self.hidden_size % self.num_attention_heads:
            raise ValueError(f"{_NAME}: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads} (set kv_channels for heads of "
                             "another width)")
        _one_of("normalization", self.normalization, NORMALIZATIONS)
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDINGS)
        _one_of("attention_mask_type", self.attention_mask_type, MASK_KINDS)
        _one_of("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        if self.params_dtype not in DTYPES:
            raise TypeError(f"{_NAME}: params_dtype={self.params_dtype} is not one of {', '.join(map(str, DTYPES))}")
        if not self.norm_epsilon > 0:
            raise ValueError(f"{_NAME}: norm_epsilon={self.norm_epsilon} must be > 0")
        for name in ("hidden_dropout", "attention_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{_NAME}: {name}={p} must be in [0, 1)")
        if (self.attention_mask_type == "sliding_window") != (self.window_size is not None):
            raise ValueError(f"{_NAME}: window_size must be set exactly when attention_mask_type is "
                             f"'sliding_window' (got attention_mask_type={self.attention_mask_type!r}, "
                             f"window_size={self.window_size})")
        if self.window_size is not None:
            _positive_int("window_size", self.window_size)
        if self.sequence_parallel and not self.tensor_parallel:
            raise ValueError(f"{_NAME}: sequence_parallel=True needs tensor_parallel=True")
        if self.position_embedding_type == "rope":
            if not 0.0 < self.rotary_percent <= 1.0:
                raise ValueError(f"{_NAME}: rotary_percent={self.rotary_percent} must be in (0, 1]")
            if self.rotary_dim < 2:
                raise ValueError(f"{_NAME}: rotary_percent={self.rotary_percent} of head_dim={self.head_dim} "
                                 "rotates fewer than 2 features")
        if self.softmax_scale is not None and not (isinstance(self.softmax_scale, (int, float))
                                                   and self.softmax_scale > 0):
            raise ValueError(f"{_NAME}: softmax_scale={self.softmax_scale!r} must be None or > 0")
        if self.attention_bias and self.attention_backend == "flash":
            raise ValueError(f"{_NAME}: attention_backend='flash' takes no attention_bias")
        if not self.init_method_std > 0:
            raise ValueError(f"{_NAME}: init_method_std={self.init_method_std} must be > 0")

    @property
    def head_dim(self) -> int:
        return self.kv_channels if self.kv_channels is not None else self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Features of each head rotated by RoPE (even), 0 without RoPE."""
        if self.position_embedding_type != "rope":
            return 0
        return int(self.head_dim * self.rotary_percent) // 2 * 2

    @property
    def gated(self) -> bool:
        """A gated MLP: fc1 computes ``[gate; up]``, ``2 * ffn_hidden_size`` wide."""
        return self.activation in GATED_ACTIVATIONS

    @property
    def output_init_std(self) -> float:
        return self.init_method_std / (2.0 * self.num_layers) ** 0.5


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{_NAME}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{_NAME}: {name}={value} must be >= 1")


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{_NAME}: {name}={value!r} is not one of {', '.join(choices)}")
