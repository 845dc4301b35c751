"""The transformer layer: forward and backward in C++ (``torch.ops.megacore.transformer_layer`` and
``transformer_layer_backward``, cpp/transformer/layer.cpp), wrapped here with autograd, a fake kernel for
torch.compile, and the ``TransformerLayer`` module that owns the parameters.

Parameters (this rank's shards with tensor parallelism over ``tp`` ranks; ``np = heads / tp``, ``d`` =
head_dim, ``f`` = ffn_hidden_size):

===============================  ====================  ==============================================
parameter                        shape (this rank)     role
===============================  ====================  ==============================================
``attention_norm.weight/bias``   ``[h]``               pre-LN: norm of the input; post-LN: after attention
``attention.qkv.weight/bias``    ``[np * 3 * d, h]``   column-parallel; rows (head, {q, k, v}, d)
``attention.proj.weight``        ``[h, np * d]``       row-parallel (bias ``[h]`` replicated)
``mlp_norm.weight/bias``         ``[h]``               pre-LN: norm of the MLP input; post-LN: after it
``mlp.fc1.weight/bias``          ``[f / tp, h]``       column-parallel
``mlp.fc2.weight``               ``[h, f / tp]``       row-parallel (bias ``[h]`` replicated)
===============================  ====================  ==============================================

rmsnorm has no norm biases; ``add_bias_linear=False`` drops the four GEMM biases.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

import megacore  # noqa: F401  (loads megacore._C: registers the ops)
from megacore.ops.rotary import rotary_tables
from megacore.parallel import state
from megacore.parallel.collectives import _world_size
from megacore.parallel.layers import split_weight
from megacore.parallel.placement import place
from megacore.transformer.config import TransformerConfig

_lib = torch.ops.megacore

PARAM_NAMES = (
    "attention_norm.weight",
    "attention_norm.bias",
    "attention.qkv.weight",
    "attention.qkv.bias",
    "attention.proj.weight",
    "attention.proj.bias",
    "mlp_norm.weight",
    "mlp_norm.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
_N_PARAMS = len(PARAM_NAMES)
# The schema's scalar arguments, in schema order.
CONFIG_NAMES = (
    "num_heads", "normalization", "norm_eps", "pre_norm", "mask_kind", "window", "activation", "attention_dropout",
    "hidden_dropout", "sequence_parallel", "recompute_attention", "attention_backend", "group_name", "training",
)
_N_CONFIG = len(CONFIG_NAMES)

# The saved-for-backward slots of the forward op, in cpp/transformer/layer.cpp's order.
SAVED_SLOTS = (
    "norm1_mean", "norm1_rstd", "attn_in", "q", "k", "v", "probs", "probs_dropped", "context", "lse", "rng_state",
    "rng_unused", "res1", "norm2_mean", "norm2_rstd", "mlp_in", "fc1_out", "gelu_out", "res2",
)


def dropout_seed(seed: int, site: int, rank: int) -> int:
    """The Philox seed of one dropout site, as the C++ layer derives it: ``seed + (site * 65536 + rank)
    * 0x9E3779B97F4A7C15`` modulo 2**64, as a signed int64. Sites: 0 attention probabilities (rank =
    tensor-parallel rank), 1 and 2 the residual dropouts after attention and MLP (rank = tensor-parallel
    rank under sequence parallelism, else 0)."""
    mixed = (seed + (site * 65536 + rank) * 0x9E3779B97F4A7C15) % 2**64
    return mixed - 2**64 if mixed >= 2**63 else mixed


def uses_flash(config_args: dict, hidden: torch.Tensor) -> bool:
    """Whether the C++ layer runs PyTorch's flash kernel for these arguments (the rule of
    cpp/transformer/layer.cpp's ``use_flash``)."""
    if config_args["attention_backend"] == "fused_softmax":
        return False
    if config_args["mask_kind"] not in ("causal", "none"):
        return False
    if hidden.device.type == "cpu":
        return not (config_args["training"] and config_args["attention_dropout"] > 0)
    if hidden.device.type == "cuda":
        d = hidden.shape[-1] // config_args["num_heads"]
        return hidden.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
    return False


def _config_args(config: TransformerConfig, group_name: str, training: bool) -> dict:
    """The op's scalar arguments, by schema name, in schema order (``CONFIG_NAMES``)."""
    args = dict(
        num_heads=config.num_attention_heads,
        normalization=config.normalization,
        norm_eps=float(config.norm_epsilon),
        pre_norm=config.pre_norm,
        mask_kind=config.attention_mask_type,
        window=config.window_size,
        activation=config.activation,
        attention_dropout=float(config.attention_dropout),
        hidden_dropout=float(config.hidden_dropout),
        sequence_parallel=config.sequence_parallel,
        recompute_attention=config.recompute_core_attention,
        attention_backend=config.attention_backend,
        group_name=group_name,
        training=training,
    )
    assert tuple(args) == CONFIG_NAMES
    return args


def transformer_layer(
    hidden: torch.Tensor,
    params: dict[str, Optional[torch.Tensor]],
    config: TransformerConfig,
    attention_mask: Optional[torch.Tensor] = None,
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    seed: Optional[torch.Tensor] = None,
    group_name: str = "",
    training: bool = True,
) -> torch.Tensor:
    """One transformer layer, forward in C++ (differentiable; backward in C++ too).

    Args:
        hidden: ``[s, b, h]`` (``[s / tp, b, h]`` with sequence parallelism).
        params: this rank's parameters by the names in ``PARAM_NAMES`` (absent or None = no such
            parameter).
        attention_mask: bool ``[b or 1, 1, s or 1, s]``, True = masked out; only with
            ``attention_mask_type='padding'``.
        rotary: ``(cos, sin)``, each ``[s, rotary_dim]`` (full sequence), or None for no RoPE.
        seed: int64 CPU tensor of one element seeding every dropout mask (see :func:`dropout_seed`);
            None draws one from torch's default CPU generator when there is dropout (nothing is drawn
            without: under pipeline parallelism the stages then draw what one process would, e.g. ELECTRA's
            samples).
        group_name: the tensor-parallel group's ``group_name``; "" for none.
        training: False turns dropout off.
    Returns: the output, ``hidden``'s shape and dtype.
    Raises ValueError / TypeError naming ``megacore.transformer_layer`` and the argument on bad input.
    """
    if seed is None:  # on CPU even under `with torch.device(...)`: the op reads it on the host
        if training and (config.hidden_dropout > 0 or config.attention_dropout > 0):
            seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device="cpu")
        else:  # no dropout: draw nothing, so the default generator's stream does not depend on where layers run
            seed = torch.zeros(1, dtype=torch.int64, device="cpu")
    cos, sin = rotary if rotary is not None else (None, None)
    args = _config_args(config, group_name, training)
    out, _ = _lib.transformer_layer(hidden, *(params.get(n) for n in PARAM_NAMES), attention_mask, cos, sin, seed,
                                    *args.values())
    return out


# ---- fake kernel and autograd --------------------------------------------------------------------------


@torch.library.register_fake("megacore::transformer_layer")
def _transformer_layer_fake(hidden, *rest):
    params, (mask, cos, sin, seed), config = rest[:_N_PARAMS], rest[_N_PARAMS:_N_PARAMS + 4], rest[_N_PARAMS + 4:]
    args = dict(zip(CONFIG_NAMES, config))
    tp = _world_size("transformer_layer", args["group_name"]) if args["group_name"] else 1
    s_local, b, h = hidden.shape
    s = s_local * tp if args["sequence_parallel"] else s_local
    heads, d = args["num_heads"] // tp, h // args["num_heads"]
    f = params[8].shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # Every slot a tensor of its own (an op's outputs may not alias each other).
    def empty():
        return hidden.new_empty((0,))

    def stats():
        return hidden.new_empty((s_local, b), dtype=acc)

    def mean():
        return stats() if args["normalization"] == "layernorm" else hidden.new_empty((0,), dtype=acc)

    def like_hidden():
        return hidden.new_empty(hidden.shape)

    qkv = [hidden.new_empty((b, heads, s, d)) for _ in range(3)]
    flash = uses_flash(args, hidden)
    saved = {name: empty() for name in SAVED_SLOTS}
    saved.update(
        norm1_mean=mean(), norm1_rstd=stats(), attn_in=like_hidden() if args["pre_norm"] else empty(),
        q=qkv[0], k=qkv[1], v=qkv[2], context=hidden.new_empty((s, b, heads * d)), res1=like_hidden(),
        norm2_mean=mean(), norm2_rstd=stats(), mlp_in=like_hidden(),
        fc1_out=hidden.new_empty((s, b, f)), gelu_out=hidden.new_empty((s, b, f)),
        res2=empty() if args["pre_norm"] else like_hidden(),
    )
    scale = 1.0 / math.sqrt(d)
    causal = args["mask_kind"] == "causal"
    if flash and hidden.device.type == "cpu":
        saved["lse"] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*qkv, 0.0, causal, scale=scale)[1]
    elif flash:
        p = args["attention_dropout"] if args["training"] else 0.0
        r = torch.ops.aten._scaled_dot_product_flash_attention(*qkv, p, causal, False, scale=scale)
        saved["lse"] = r[1]
        if r[6] is not None:
            saved["rng_state"] = r[6]
        if r[7] is not None:
            saved["rng_unused"] = r[7]
    elif not args["recompute_attention"]:
        saved["probs"] = hidden.new_empty((b, heads, s, s))
        if args["training"] and args["attention_dropout"] > 0:
            saved["probs_dropped"] = hidden.new_empty((b, heads, s, s))
    return hidden.new_empty(hidden.shape), list(saved.values())


@torch.library.register_fake("megacore::transformer_layer_backward")
def _transformer_layer_backward_fake(grad_out, hidden, *rest):
    params = rest[:_N_PARAMS]
    return [torch.empty_like(hidden, memory_format=torch.contiguous_format)] + [
        torch.empty_like(p, memory_format=torch.contiguous_format) if p is not None else hidden.new_empty((0,))
        for p in params
    ]


def _setup_context(ctx, inputs, output):
    hidden, rest = inputs[0], inputs[1:]
    params, extras, config = rest[:_N_PARAMS], rest[_N_PARAMS:_N_PARAMS + 4], rest[_N_PARAMS + 4:]
    _, saved = output
    # The saved slots are outputs only so that backward gets them: no gradient flows into them, and
    # autograd must not materialize zero gradients of their (large) shapes on every backward.
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, *params, *extras, *saved)
    ctx.config = config
    ctx.has_param = [p is not None for p in params]


def _backward(ctx, grad_out, _grad_saved):
    t = ctx.saved_tensors
    if grad_out is None:  # the output reached the loss only through paths with no gradient
        return (None,) * (1 + _N_PARAMS + 4 + _N_CONFIG)
    hidden, params, (mask, cos, sin, seed) = t[0], t[1:1 + _N_PARAMS], t[1 + _N_PARAMS:5 + _N_PARAMS]
    saved = list(t[5 + _N_PARAMS:])
    grads = _lib.transformer_layer_backward(grad_out, hidden, *params, mask, cos, sin, seed, saved, *ctx.config)
    param_grads = [g if has else None for g, has in zip(grads[1:], ctx.has_param)]
    return (grads[0], *param_grads, None, None, None, None) + (None,) * _N_CONFIG


torch.library.register_autograd("megacore::transformer_layer", _backward, setup_context=_setup_context)


# ---- the module --------------------------------------------------------------------------------------------


def _tensor_parallel(config: TransformerConfig) -> tuple[str, int, int]:
    """(group_name, rank, world_size) of the layer's tensor-parallel group; ("", 0, 1) without one."""
    if not config.tensor_parallel:
        return "", 0, 1
    s = state.require_tensor_parallel("megacore.transformer.TransformerLayer",
                                      {"num_attention_heads": config.num_attention_heads,
                                       "ffn_hidden_size": config.ffn_hidden_size}, config_flag=True)
    return s.tensor_parallel_group_name, s.tensor_parallel_rank, s.tensor_parallel_size


def _parameter(value: torch.Tensor, config: TransformerConfig, device) -> nn.Parameter:
    return nn.Parameter(value.to(device=device, dtype=config.params_dtype))


def _master(rows: int, cols: int, std: float) -> torch.Tensor:
    """A full master weight: fp32 on CPU, normal(0, std) from torch's default generator."""
    return torch.empty(rows, cols, dtype=torch.float32).normal_(0.0, std)


class _Params(nn.Module):
    """A named group of parameters (``weight``, optional ``bias``); the C++ layer does the computing. Each declares
    its placement (``megacore.parallel.placement.place``): ``dims`` per name (None: replicated), and
    ``sequence_parallel`` for replicated ones whose gradient the layer sums over the group itself."""

    def __init__(self, weight: Optional[nn.Parameter], bias: Optional[nn.Parameter], config: TransformerConfig,
                 weight_dim: Optional[int] = None, bias_dim: Optional[int] = None, sequence_parallel: bool = False):
        super().__init__()
        self.weight = weight
        self.bias = bias
        for name, dim in (("weight", weight_dim), ("bias", bias_dim)):
            if config.tensor_parallel:
                place(self, name, dim, sequence_parallel and dim is None)


class TransformerLayer(nn.Module):
    """A Megatron transformer layer whose forward and backward run in C++ as torch ops.

    ``forward(hidden_states [s, b, h], attention_mask=None) -> [s, b, h]`` (``[s / tp, b, h]`` in and
    out with sequence parallelism), dtype ``config.params_dtype``. ``attention_mask`` is bool
    ``[b or 1, 1, s or 1, s]`` (True = masked out) and is taken only with
    ``attention_mask_type='padding'``. Dropout follows ``self.training``; its masks are Philox streams
    of a seed drawn from torch's default CPU generator each call, so ``torch.manual_seed`` makes runs
    repeatable (under tensor parallelism every rank must draw the same seed: seed them alike).

    Initialization: every rank draws the full master weights (fp32, CPU, normal(0, init_method_std),
    the output projections with ``init_method_std / sqrt(2 * num_layers)``) in a fixed order and keeps
    its shard, so tensor-parallel size N builds the layer size 1 builds from the same seed.

    Raises RuntimeError with ``tensor_parallel=True`` before ``initialize_model_parallel``, ValueError
    when the heads or the FFN size do not divide by the tensor-parallel size.
    """

    def __init__(self, config: TransformerConfig, device=None):
        super().__init__()
        self.config = config
        self.group_name, rank, world = _tensor_parallel(config)
        h, f, heads, d = config.hidden_size, config.ffn_hidden_size, config.num_attention_heads, config.head_dim
        bias, sp = config.add_bias_linear, config.sequence_parallel

        def norm():
            weight = _parameter(torch.ones(h), config, device)
            has_bias = config.normalization == "layernorm"
            return _Params(weight, _parameter(torch.zeros(h), config, device) if has_bias else None, config,
                           sequence_parallel=sp)

        def column(out_features: int, std: float):  # [out, in] split along out
            weight = _parameter(split_weight(_master(out_features, h, std), 0, rank, world), config, device)
            return _Params(weight, _parameter(torch.zeros(out_features // world), config, device) if bias else None,
                           config, 0, 0)

        def row(in_features: int, std: float):  # [h, in] split along in; the bias is replicated
            weight = _parameter(split_weight(_master(h, in_features, std), 1, rank, world), config, device)
            return _Params(weight, _parameter(torch.zeros(h), config, device) if bias else None, config, 1,
                           sequence_parallel=sp)

        self.attention_norm = norm()
        self.attention = nn.Module()
        self.attention.qkv = column(3 * heads * d, config.init_method_std)
        self.attention.proj = row(heads * d, config.output_init_std)
        self.mlp_norm = norm()
        self.mlp = nn.Module()
        self.mlp.fc1 = column(f, config.init_method_std)
        self.mlp.fc2 = row(f, config.output_init_std)
        self._rotary_cache: dict = {}

    def layer_params(self) -> dict[str, Optional[torch.Tensor]]:
        """The parameters by the C++ op's names (``PARAM_NAMES``), None for absent ones."""
        return {name: self.get_parameter(name) if _has(self, name) else None for name in PARAM_NAMES}

    def rotary_tables(self, seq_len: int, device) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """RoPE's ``(cos, sin)`` ``[seq_len, rotary_dim]`` in fp32 (cached), or None without RoPE."""
        if self.config.rotary_dim == 0:
            return None
        key = (seq_len, str(device))
        if key not in self._rotary_cache:
            self._rotary_cache[key] = rotary_tables(seq_len, self.config.rotary_dim, self.config.rotary_base,
                                                    device=device)
        return self._rotary_cache[key]

    def full_seq_len(self, hidden_states: torch.Tensor) -> int:
        tp = _world_size("TransformerLayer", self.group_name) if self.config.sequence_parallel else 1
        return hidden_states.shape[0] * tp

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if hidden_states.dim() != 3:
            raise ValueError(f"megacore.transformer.TransformerLayer: hidden_states has shape "
                             f"{list(hidden_states.shape)}, expected [seq, batch, hidden]")
        params = self.layer_params()
        # The op rejects this too (megacore.transformer_layer: <param> is on ...); here it can say which
        # side to move, in the module's terms.
        for name, p in params.items():
            if p is not None and p.device != hidden_states.device:
                raise ValueError(f"megacore.transformer.TransformerLayer: parameter {name} is on {p.device}, "
                                 f"expected {hidden_states.device} (the device of hidden_states); move the layer "
                                 f"(layer.to(device)) or the input to one device")
        rotary = self.rotary_tables(self.full_seq_len(hidden_states), hidden_states.device)
        return transformer_layer(hidden_states, params, self.config, attention_mask, rotary,
                                 group_name=self.group_name, training=self.training)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={c.hidden_size}, heads={c.num_attention_heads}, ffn={c.ffn_hidden_size}, "
                f"{'pre' if c.pre_norm else 'post'}-{c.normalization}, mask={c.attention_mask_type}, "
                f"tensor_parallel={c.tensor_parallel}, sequence_parallel={c.sequence_parallel}")


def _has(module: nn.Module, name: str) -> bool:
    owner, _, attr = name.rpartition(".")
    return getattr(module.get_submodule(owner), attr) is not None


__all__ = ["PARAM_NAMES", "SAVED_SLOTS", "TransformerLayer", "dropout_seed", "transformer_layer", "uses_flash"]
