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

import functools
import math
from typing import Optional

import torch
from torch import nn

from megacore import _C  # loads the extension: registers the ops
from megacore.ops.rotary import rotary_tables
from megacore.parallel import state
from megacore.parallel.collectives import _world_size
from megacore.parallel.layers import split_weight
from megacore.parallel.placement import place
from megacore.transformer.config import TransformerConfig

_lib = torch.ops.megacore
_spec = _C.transformer_layer_spec()  # cpp/transformer/config.h: the one definition of the ops' arguments and slots

# The parameters' module names, in the ops' schema order (the C++ table's), and their schema argument names.
PARAM_NAMES = tuple(name for _, name, _ in _spec["params"])
PARAM_ARGS = tuple(arg for arg, _, _ in _spec["params"])
_N_PARAMS = len(PARAM_NAMES)
# The saved-for-backward slots of the forward op, in order.
SAVED_SLOTS = tuple(_spec["saved"])
# The configuration's fields (the op's `config` string), in canonical order.
CONFIG_FIELDS = tuple(name for name, _ in _spec["config_fields"])
DROPOUT_SITES = dict(_spec["dropout_sites"])  # site name -> number, for dropout_seed
# What each output of transformer_layer_backward is the gradient of: "hidden", the parameters, then the inputs.
_GRAD_INDEX = {name: i for i, name in enumerate(_spec["grads"])}


def dropout_seed(seed: int, site: int, rank: int) -> int:
    """The Philox seed of one dropout site, as the C++ layer derives it (one definition, in C++):
    ``seed + (site * 65536 + rank) * 0x9E3779B97F4A7C15`` modulo 2**64, as a signed int64. Sites
    (``DROPOUT_SITES``): 0 attention probabilities and 3 cross-attention probabilities (rank = tensor-parallel
    rank), 1, 2 and 4 the residual dropouts after attention, MLP and cross-attention (rank = tensor-parallel rank
    under sequence parallelism, else 0)."""
    return _C.transformer_layer_dropout_seed(int(seed), int(site), int(rank))


@functools.lru_cache(maxsize=1024)
def _canonical(fields: tuple) -> str:
    return _C.transformer_layer_config([(k, "none" if v is None else str(v)) for k, v in fields])


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its import of ``torch._dynamo`` (1.5 s of every
    process's start, every spawned test worker's included): the decorator only sets this attribute, which dynamo
    reads when it traces a call (tests/transformer/test_layer.py pins that it still does)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result  # torch.compile calls it while tracing and keeps the string
def op_config(config: TransformerConfig, group_name: str = "", training: bool = True) -> str:
    """The ``config`` string the layer ops take for ``config`` (checked by the C++ parser, which also caches
    what it parsed per string). Raises ValueError naming the field for a value the ops reject."""
    return _canonical((
        ("num_heads", config.num_attention_heads),
        ("head_dim", config.kv_channels),
        ("normalization", config.normalization),
        ("norm_eps", repr(float(config.norm_epsilon))),
        ("pre_norm", config.pre_norm),
        ("mask_kind", config.attention_mask_type),
        ("window", config.window_size),
        ("activation", config.activation),
        ("attention_dropout", repr(float(config.attention_dropout))),
        ("hidden_dropout", repr(float(config.hidden_dropout))),
        ("sequence_parallel", config.sequence_parallel),
        ("recompute_attention", config.recompute_core_attention),
        ("attention_backend", config.attention_backend),
        ("softmax_scale", None if config.softmax_scale is None else repr(float(config.softmax_scale))),
        ("attention_bias", config.attention_bias),
        ("cross_attention", config.cross_attention),
        ("overlap_tp_comm", config.overlap_tp_comm),
        ("group_name", group_name),
        ("training", training),
    ))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _head_dim(config: str, hidden_size: int) -> int:
    """The op config's head width: its ``head_dim`` field, else ``hidden_size / num_heads`` (config.cpp's dims_of)."""
    head_dim = _config_field(config, "head_dim")
    return hidden_size // int(_config_field(config, "num_heads")) if head_dim == "none" else int(head_dim)


def uses_flash(config: str, hidden: torch.Tensor) -> bool:
    """Whether the C++ layer runs PyTorch's flash kernel for the op config string ``config`` and this input (the
    C++ rule, asked of C++)."""
    return _C.transformer_layer_uses_flash(config, hidden.device.type, _dtype_name(hidden.dtype),
                                           _head_dim(config, hidden.shape[-1]))


def _config_field(config: str, name: str) -> str:
    return dict(item.split("=", 1) for item in config.split(";"))[name]


def transformer_layer(
    hidden: torch.Tensor,
    params: dict[str, Optional[torch.Tensor]],
    config: TransformerConfig,
    attention_mask: Optional[torch.Tensor] = None,
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    seed: Optional[torch.Tensor] = None,
    group_name: str = "",
    training: bool = True,
    attention_bias: Optional[torch.Tensor] = None,
    memory: Optional[torch.Tensor] = None,
    memory_mask: Optional[torch.Tensor] = None,
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
        attention_bias: with ``config.attention_bias``, added to the self-attention scores (after the scale):
            ``[b or 1, heads / tp, s, s]`` (this rank's heads); differentiable.
        memory: with ``config.cross_attention``, the encoder's output ``[m, b, h]`` (``[m / tp, b, h]`` with
            sequence parallelism); differentiable.
        memory_mask: bool ``[b or 1, 1, s or 1, m]``, True = masked out (the memory's padding), or None.
    Returns: the output, ``hidden``'s shape and dtype.
    Raises ValueError / TypeError naming ``megacore.transformer_layer`` and the argument on bad input.
    """
    if seed is None:  # on CPU even under `with torch.device(...)`: the op reads it on the host
        if training and (config.hidden_dropout > 0 or config.attention_dropout > 0):
            seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64, device="cpu")
        else:  # no dropout: draw nothing, so the default generator's stream does not depend on where layers run
            seed = torch.zeros(1, dtype=torch.int64, device="cpu")
    cos, sin = rotary if rotary is not None else (None, None)
    out, _ = _lib.transformer_layer(hidden, *(params.get(n) for n in PARAM_NAMES), attention_mask, cos, sin,
                                    attention_bias, memory, memory_mask, seed, op_config(config, group_name, training))
    return out


def transformer_layer_decode(
    hidden: torch.Tensor,
    params: dict[str, Optional[torch.Tensor]],
    config: TransformerConfig,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: int,
    attention_mask: Optional[torch.Tensor] = None,
    rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    group_name: str = "",
    attention_bias: Optional[torch.Tensor] = None,
    memory: Optional[torch.Tensor] = None,
    memory_mask: Optional[torch.Tensor] = None,
    cross_key_cache: Optional[torch.Tensor] = None,
    cross_value_cache: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The same layer over new tokens with a key/value cache (prefill of a prompt, or decoding steps), in C++.

    Args:
        hidden: ``[n, b, h]``, the new tokens at positions ``[position, position + n)`` (never sequence-split).
        key_cache, value_cache: ``[b, heads / tp, capacity, head_dim]`` of the parameters' dtype, contiguous;
            the new tokens' keys and values are written at ``[position, position + n)`` (in place) and attention
            runs over ``[0, position + n)``.
        attention_mask: with ``attention_mask_type='padding'``, bool ``[b or 1, 1, n or 1, position + n]``.
        rotary: ``(cos, sin)`` of the new positions, each ``[n, rotary_dim]``, or None.
        attention_bias: with ``config.attention_bias``, ``[b or 1, heads / tp, n, position + n]``.
        memory, memory_mask, cross_key_cache, cross_value_cache: with ``config.cross_attention``: the caches
            ``[b, heads / tp, m, head_dim]`` of the memory's keys and values; with ``memory [m, b, h]`` they are
            computed and written (once per sequence), without they are read. ``memory_mask`` bool
            ``[b or 1, 1, n or 1, m]``.
    Returns: ``[n, b, h]``. No dropout; no autograd.
    Raises ValueError naming ``megacore.transformer_layer_decode`` and the argument for bad input (e.g. a cache
    too short for ``position + n``).
    """
    cos, sin = rotary if rotary is not None else (None, None)
    return _lib.transformer_layer_decode(hidden, *(params.get(n) for n in PARAM_NAMES), attention_mask, cos, sin,
                                         attention_bias, memory, memory_mask, key_cache, value_cache, cross_key_cache,
                                         cross_value_cache, position, op_config(config, group_name, False))


# ---- fake kernels and autograd -------------------------------------------------------------------------------


@torch.library.register_fake("megacore::transformer_layer")
def _transformer_layer_fake(hidden, *rest):
    params, memory, config = rest[:_N_PARAMS], rest[_N_PARAMS + 4], rest[-1]
    group_name = _config_field(config, "group_name")
    tp = _world_size("transformer_layer", group_name) if group_name else 1
    s_local, b, h = hidden.shape
    fc1_rows = params[PARAM_NAMES.index("mlp.fc1.weight")].shape[0]
    shapes = _C.transformer_layer_saved_shapes(config, hidden.device.type, _dtype_name(hidden.dtype), s_local, b, h,
                                               fc1_rows, tp, memory.shape[0] if memory is not None else 0)
    saved = [hidden.new_empty(shape, dtype=getattr(torch, dtype)) if shape is not None else None
             for shape, dtype in shapes]
    if any(t is None for t in saved):  # CUDA flash: its lse and Philox state are the aten kernel's own tensors
        heads, d = int(_config_field(config, "num_heads")) // tp, _head_dim(config, h)
        s = s_local * tp if _config_field(config, "sequence_parallel") == "true" else s_local
        q = hidden.new_empty((b, heads, s, d))
        p = float(_config_field(config, "attention_dropout")) if _config_field(config, "training") == "true" else 0.0
        r = torch.ops.aten._scaled_dot_product_flash_attention(q, q, q, p, _config_field(config, "mask_kind") == "causal",
                                                               False, scale=1.0 / math.sqrt(d))
        flash = {"lse": r[1], "rng_state": r[6], "rng_unused": r[7]}
        saved = [t if t is not None else (flash[name] if flash[name] is not None else hidden.new_empty((0,)))
                 for name, t in zip(SAVED_SLOTS, saved)]
    return hidden.new_empty(hidden.shape), saved


@torch.library.register_fake("megacore::transformer_layer_backward")
def _transformer_layer_backward_fake(grad_out, hidden, *rest):
    params, (bias, memory) = rest[:_N_PARAMS], rest[_N_PARAMS + 3:_N_PARAMS + 5]
    return [torch.empty_like(hidden, memory_format=torch.contiguous_format)] + [
        torch.empty_like(p, memory_format=torch.contiguous_format) if p is not None else hidden.new_empty((0,))
        for p in (*params, bias, memory)
    ]


@torch.library.register_fake("megacore::transformer_layer_decode")
def _transformer_layer_decode_fake(hidden, *rest):
    return hidden.new_empty(hidden.shape)


_N_EXTRAS = 7  # attention_mask, rotary_cos, rotary_sin, attention_bias, memory, memory_mask, seed


def _setup_context(ctx, inputs, output):
    hidden, rest = inputs[0], inputs[1:]
    params, extras, config = rest[:_N_PARAMS], rest[_N_PARAMS:_N_PARAMS + _N_EXTRAS], rest[-1]
    _, saved = output
    # The saved slots are outputs only so that backward gets them: no gradient flows into them, and
    # autograd must not materialize zero gradients of their (large) shapes on every backward.
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, *params, *extras, *saved)
    ctx.config = config
    ctx.has_param = [p is not None for p in params]
    ctx.has_bias, ctx.has_memory = extras[3] is not None, extras[4] is not None


def _backward(ctx, grad_out, _grad_saved):
    t = ctx.saved_tensors
    if grad_out is None:  # the output reached the loss only through paths with no gradient
        return (None,) * (1 + _N_PARAMS + _N_EXTRAS + 1)
    hidden, params, extras = t[0], t[1:1 + _N_PARAMS], t[1 + _N_PARAMS:1 + _N_PARAMS + _N_EXTRAS]
    saved = list(t[1 + _N_PARAMS + _N_EXTRAS:])
    # [grad_hidden, one per parameter in schema order, grad_attention_bias, grad_memory]: the op's output order
    grads = _lib.transformer_layer_backward(grad_out, hidden, *params, *extras, saved, ctx.config)
    param_grads = [grads[_GRAD_INDEX[name]] if has else None for name, has in zip(PARAM_NAMES, ctx.has_param)]
    g_bias = grads[_GRAD_INDEX["attention_bias"]] if ctx.has_bias else None
    g_memory = grads[_GRAD_INDEX["memory"]] if ctx.has_memory else None
    return (grads[_GRAD_INDEX["hidden"]], *param_grads, None, None, None, g_bias, g_memory, None, None, None)


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
                 weight_dim: Optional[int] = None, bias_dim: Optional[int] = None, sequence_parallel: bool = False,
                 chunks: int = 1):
        super().__init__()
        self.weight = weight
        self.bias = bias
        for name, dim in (("weight", weight_dim), ("bias", bias_dim)):
            if config.tensor_parallel:
                place(self, name, dim, sequence_parallel and dim is None, chunks if dim is not None else 1)


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

        def column(out_features: int, std: float, chunks: int = 1):  # [out, in] split along out (each chunk)
            master = _master(out_features, h, std)
            weight = torch.cat([split_weight(c, 0, rank, world) for c in master.chunk(chunks, 0)], 0)
            return _Params(_parameter(weight, config, device),
                           _parameter(torch.zeros(out_features // world), config, device) if bias else None,
                           config, 0, 0, chunks=chunks)

        def row(in_features: int, std: float):  # [h, in] split along in; the bias is replicated
            weight = _parameter(split_weight(_master(h, in_features, std), 1, rank, world), config, device)
            return _Params(weight, _parameter(torch.zeros(h), config, device) if bias else None, config, 1,
                           sequence_parallel=sp)

        self.attention_norm = norm()
        self.attention = nn.Module()
        self.attention.qkv = column(3 * heads * d, config.init_method_std)
        self.attention.proj = row(heads * d, config.output_init_std)
        if config.cross_attention:  # queries from this layer, keys and values from the memory
            self.cross_attention_norm = norm()
            self.cross_attention = nn.Module()
            self.cross_attention.q = column(heads * d, config.init_method_std)
            self.cross_attention.kv = column(2 * heads * d, config.init_method_std)
            self.cross_attention.proj = row(heads * d, config.output_init_std)
        self.mlp_norm = norm()
        self.mlp = nn.Module()
        # gated: fc1 = [gate; up], each half split over the ranks (a rank holds [its gate rows; its up rows])
        self.mlp.fc1 = column(2 * f, config.init_method_std, chunks=2) if config.gated else \
            column(f, config.init_method_std)
        self.mlp.fc2 = row(f, config.output_init_std)
        self._rotary_cache: dict = {}

    def layer_params(self) -> dict[str, Optional[torch.Tensor]]:
        """The parameters by the C++ op's names (``PARAM_NAMES``), None for absent ones. Read on every call
        (a loader may have replaced a Parameter), by walking the submodules directly: ``get_parameter`` by name
        cost a decoding step over a millisecond for gpt2-small's 12 layers."""
        params = {}
        for name, (path, attr) in _PARAM_PATHS.items():
            owner: Optional[nn.Module] = self
            for part in path:
                owner = owner._modules.get(part)
                if owner is None:  # e.g. cross_attention.* in a layer without cross-attention
                    break
            params[name] = None if owner is None else getattr(owner, attr, None)
        return params

    @property
    def local_heads(self) -> int:
        """The attention heads this rank holds (``heads / tp``)."""
        return self.attention.qkv.weight.shape[0] // (3 * self.config.head_dim)

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

    def cache_shape(self, batch: int, capacity: int) -> tuple[int, int, int, int]:
        """The shape of this layer's key (and value) cache: ``[batch, heads / tp, capacity, head_dim]`` (a
        cross-attention cache: capacity = the memory's length)."""
        return batch, self.local_heads, capacity, self.config.head_dim

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                kv_cache: Optional[tuple] = None, position: int = 0, attention_bias: Optional[torch.Tensor] = None,
                memory: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``hidden_states [s, b, h]`` -> ``[s, b, h]``.

        ``attention_bias`` (``config.attention_bias``): ``[b or 1, heads / tp, s, s]`` added to the self-attention
        scores. ``memory [m, b, h]`` and ``memory_mask`` (bool ``[b or 1, 1, s or 1, m]``, True = masked out):
        cross-attention's (``config.cross_attention``).

        Decoding: with ``kv_cache=(keys, values)`` (each :meth:`cache_shape`; a cross-attention layer adds
        ``cross_keys, cross_values`` of the memory's length), the tokens are the new ones at
        ``[position, position + s)`` of a sequence being decoded: their keys and values are written into the
        cache and attention covers ``[0, position + s)`` (no dropout, no autograd, never sequence-split; see
        ``transformer_layer_decode``). Pass ``memory`` on the first call only: its keys and values are cached."""
        if kv_cache is not None:
            # the table for the cache's capacity (fixed for a sequence, so torch.compile keeps `position` symbolic),
            # the new positions' rows of it
            rotary = self.rotary_tables(kv_cache[0].shape[2], hidden_states.device)
            if rotary is not None:
                rotary = tuple(t[position:position + hidden_states.shape[0]] for t in rotary)
            cross = tuple(kv_cache[2:4]) if len(kv_cache) == 4 else (None, None)
            return transformer_layer_decode(hidden_states, self.layer_params(), self.config, kv_cache[0], kv_cache[1],
                                            position, attention_mask, rotary, group_name=self.group_name,
                                            attention_bias=attention_bias, memory=memory, memory_mask=memory_mask,
                                            cross_key_cache=cross[0], cross_value_cache=cross[1])
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
                                 group_name=self.group_name, training=self.training, attention_bias=attention_bias,
                                 memory=memory, memory_mask=memory_mask)

    def extra_repr(self) -> str:
        c = self.config
        return (f"hidden={c.hidden_size}, heads={c.num_attention_heads}, ffn={c.ffn_hidden_size}, "
                f"{'pre' if c.pre_norm else 'post'}-{c.normalization}, mask={c.attention_mask_type}, "
                f"tensor_parallel={c.tensor_parallel}, sequence_parallel={c.sequence_parallel}")


# PARAM_NAMES as (submodule path, attribute): "attention.qkv.weight" -> (("attention", "qkv"), "weight")
_PARAM_PATHS = {name: (tuple(name.split(".")[:-1]), name.split(".")[-1]) for name in PARAM_NAMES}


__all__ = ["CONFIG_FIELDS", "PARAM_NAMES", "SAVED_SLOTS", "TransformerLayer", "dropout_seed", "op_config",
           "transformer_layer", "transformer_layer_decode", "uses_flash"]
