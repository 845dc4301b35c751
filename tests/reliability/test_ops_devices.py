"""Every megacore op rejects tensor arguments on different devices, naming the op and the argument.

One meta tensor among CPU ones used to select the op's Meta (fake) kernel, which returned uninitialized
CPU memory; a CPU TransformerLayer with one parameter left on meta returned NaN. The check runs in C++
before a kernel is chosen (ops::define_op, cpp/common/library.cpp), for every op; the ops covered here are read from the
dispatcher, so a new op with two or more tensor arguments fails test_every_op_has_an_example until it
gets one. The collectives (all_reduce, tp_copy, ...) take one tensor and a group name: nothing to mix.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import megacore
from megacore.transformer import TransformerConfig, TransformerLayer, transformer_layer
from megacore.transformer.layer import PARAM_NAMES, op_config

# (the device every argument is on, the device one argument is moved to)
PLACEMENTS = [("cpu", "meta")] + ([("cuda", "meta"), ("cuda", "cpu")] if torch.cuda.is_available() else [])


def _is_tensor_type(t) -> bool:
    """Tensor, Tensor? or Tensor[] (also Tensor?[])."""
    while isinstance(t, (torch._C.OptionalType, torch._C.ListType)):
        t = t.getElementType()
    return isinstance(t, torch._C.TensorType)


def _schema(op: str):
    return torch._C._get_schema(f"megacore::{op}", "")


def _tensor_args(op: str) -> list[str]:
    return [a.name for a in _schema(op).arguments if _is_tensor_type(a.type)]


def _registered_ops() -> list[str]:
    return sorted(n.removeprefix("megacore::") for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("megacore::"))


MULTI_TENSOR_OPS = [op for op in _registered_ops() if len(_tensor_args(op)) >= 2]


# ---- one valid call of each op, by schema argument name ----------------------------------------------------


def _seed():
    return torch.tensor([1234], dtype=torch.int64)  # a host value: on CPU whatever the device


def _layer_config() -> TransformerConfig:
    # Every optional tensor present: layernorm (norm biases), biases, a padding mask, RoPE.
    return TransformerConfig(hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, attention_mask_type="padding",
                             position_embedding_type="rope", hidden_dropout=0.0, attention_dropout=0.0,
                             cross_attention=True, attention_bias=True)


def _layer_forward_args(device) -> dict:
    torch.manual_seed(0)
    config = _layer_config()
    layer = TransformerLayer(config, device=device)
    seq, batch = 5, 2
    op_param_names = [a.name for a in _schema("transformer_layer").arguments][1:1 + len(PARAM_NAMES)]
    cos, sin = layer.rotary_tables(seq, device)
    return dict(hidden=torch.randn(seq, batch, 16, device=device),
                **dict(zip(op_param_names, layer.layer_params().values())),
                attention_mask=torch.zeros(batch, 1, 1, seq, dtype=torch.bool, device=device),
                rotary_cos=cos, rotary_sin=sin, attention_bias=torch.randn(1, 2, seq, seq, device=device),
                memory=torch.randn(4, batch, 16, device=device),
                memory_mask=torch.zeros(batch, 1, 1, 4, dtype=torch.bool, device=device), seed=_seed(),
                config=op_config(config, "", True))


def _layer_backward_args(device) -> dict:
    args = _layer_forward_args(device)
    out, saved = _call("transformer_layer", args)
    return dict(args, grad_out=torch.randn_like(out), saved=saved)


def _layer_decode_args(device) -> dict:
    args = _layer_forward_args(device)
    del args["seed"]
    new, position, batch = 2, 3, 2
    cache = dict(size=(batch, 2, 8, 8), device=device)
    return dict(args, hidden=args["hidden"][:new], rotary_cos=args["rotary_cos"][position:position + new],
                rotary_sin=args["rotary_sin"][position:position + new],
                attention_mask=torch.zeros(batch, 1, 1, position + new, dtype=torch.bool, device=device),
                attention_bias=torch.randn(1, 2, new, position + new, device=device),
                key_cache=torch.zeros(**cache), value_cache=torch.zeros(**cache),
                cross_key_cache=torch.zeros(batch, 2, 4, 8, device=device),
                cross_value_cache=torch.zeros(batch, 2, 4, 8, device=device), position=position,
                config=op_config(_layer_config(), "", False))


def _examples(device) -> dict:
    """op -> a function giving its arguments by name, every tensor on `device` (seed on CPU)."""
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)

    def probs():
        return torch.softmax(t(2, 3, 4, 4), -1)

    def target():
        return torch.tensor([1, 0, 9, -100], device=device)

    return {
        "bias_gelu": lambda: dict(x=t(4, 8), bias=t(8), approximate="tanh"),
        "bias_gelu_backward": lambda: dict(grad_out=t(4, 8), x=t(4, 8), bias=t(8), approximate="tanh"),
        "bias_relu": lambda: dict(x=t(4, 8), bias=t(8)),
        "bias_relu_backward": lambda: dict(grad_out=t(4, 8), x=t(4, 8), bias=t(8)),
        "bias_gated": lambda: dict(x=t(4, 8), bias=t(8), activation="swiglu"),
        "bias_gated_backward": lambda: dict(grad_out=t(4, 4), x=t(4, 8), bias=t(8), activation="swiglu"),
        "bias_dropout_add": lambda: dict(x=t(4, 8), bias=t(8), residual=t(4, 8), p=0.5, seed=_seed()),
        "bias_dropout_add_backward": lambda: dict(grad_out=t(4, 8), p=0.5, seed=_seed(), has_bias=True),
        "layer_norm": lambda: dict(x=t(4, 8), weight=t(8), bias=t(8), eps=1e-5),
        "layer_norm_backward": lambda: dict(grad_out=t(4, 8), x=t(4, 8), weight=t(8), mean=t(4), rstd=t(4).abs(),
                                            has_bias=True),
        "rms_norm": lambda: dict(x=t(4, 8), weight=t(8), eps=1e-5),
        "rms_norm_backward": lambda: dict(grad_out=t(4, 8), x=t(4, 8), weight=t(8), rstd=t(4).abs()),
        "scaled_masked_softmax": lambda: dict(scores=t(2, 3, 4, 4), mask=t(2, 1, 4, 4) > 0, scale=0.5),
        "scaled_softmax_backward": lambda: dict(grad_out=t(2, 3, 4, 4), probs=probs(), scale=0.5),
        "scaled_bias_softmax": lambda: dict(scores=t(2, 3, 4, 4), bias=t(1, 3, 4, 4), mask=t(2, 1, 4, 4) > 0, scale=0.5,
                                            causal=True, window=2),
        "scaled_bias_softmax_backward": lambda: dict(grad_out=t(2, 3, 4, 4), probs=probs(), scale=0.5,
                                                     bias_shape=[1, 3, 4, 4]),
        "linear": lambda: dict(input=t(3, 8), weight=t(5, 8), bias=t(5)),
        "apply_rotary_emb": lambda: dict(x=t(4, 2, 8), cos=t(4, 8), sin=t(4, 8)),
        "apply_rotary_emb_backward": lambda: dict(grad_out=t(4, 2, 8), cos=t(4, 8), sin=t(4, 8)),
        "cross_entropy": lambda: dict(logits=t(4, 10), target=target(), ignore_index=-100),
        "cross_entropy_backward": lambda: dict(grad_loss=t(4), logits=t(4, 10), target=target(), lse=t(4),
                                               vocab_start=0, ignore_index=-100),
        "vocab_parallel_cross_entropy_stats": lambda: dict(logits=t(4, 10), target=target(), vocab_start=0,
                                                           ignore_index=-100),
        "transformer_layer": lambda: _layer_forward_args(device),
        "transformer_layer_backward": lambda: _layer_backward_args(device),
        "transformer_layer_decode": lambda: _layer_decode_args(device),
    }


def _call(op: str, args: dict):
    return getattr(torch.ops.megacore, op)(*(args[a.name] for a in _schema(op).arguments))


def _moved(value, device):
    if isinstance(value, (list, tuple)):  # Tensor[], or an int[] (a shape) that stays as it is
        return [v.to(device) if isinstance(v, torch.Tensor) else v for v in value]
    return value.to(device)


def _cases():
    """Every tensor argument of every op, moved; but not the one tensor next to the seed (a seed is a host
    value, so bias_dropout_add_backward with grad_out on meta is a meta call, and that is fine)."""
    def mixes(op, arg):
        return arg == "seed" or len([a for a in _tensor_args(op) if a != "seed"]) >= 2

    return [(op, arg, home, stray) for op in MULTI_TENSOR_OPS for arg in _tensor_args(op) if mixes(op, arg)
            for home, stray in PLACEMENTS if not (arg == "seed" and stray == "cpu")]


# ---- the specification -------------------------------------------------------------------------------------


def test_every_op_has_an_example():
    missing = sorted(set(MULTI_TENSOR_OPS) - set(_examples("cpu")))
    assert not missing, f"ops with two or more tensor arguments and no example call here: {missing}"


@pytest.mark.parametrize("home", sorted({h for h, _ in PLACEMENTS}))
@pytest.mark.parametrize("op", MULTI_TENSOR_OPS)
def test_example_runs_with_every_tensor_on_one_device(op, home):
    # So that the errors below come from the device check, not from a bad example.
    _call(op, _examples(home)[op]())


@pytest.mark.parametrize("op,arg,home,stray", _cases(), ids=lambda v: str(v))
def test_one_tensor_on_another_device_is_an_error_naming_the_op_and_the_argument(op, arg, home, stray):
    args = _examples(home)[op]()
    args[arg] = _moved(args[arg], stray)
    # The first tensor moved: the message names the next one and says "(the device of <first>)".
    with pytest.raises(ValueError, match=rf"^megacore\.{op}: .*\b{arg}\b"):
        _call(op, args)


@pytest.mark.parametrize("op", MULTI_TENSOR_OPS)
def test_every_tensor_on_meta_still_runs_the_fake_kernel(op):
    # The shape-only path (meta tensors, torch.compile's fake kernels) keeps working; the seed stays on CPU.
    args = {k: (_moved(v, "meta") if k != "seed" and (isinstance(v, (torch.Tensor, list))) else v)
            for k, v in _examples("cpu")[op]().items()}
    out = _call(op, args)
    for t in out if isinstance(out, (list, tuple)) else [out]:
        for u in t if isinstance(t, (list, tuple)) else [t]:
            assert u.device.type == "meta"


def test_the_issue_example_bias_gelu_with_a_meta_bias():
    with pytest.raises(ValueError, match=re.escape("megacore.bias_gelu: bias is on meta, expected cpu "
                                                   "(the device of x)")):
        megacore.ops.bias_gelu(torch.randn(4, 8), torch.empty(8, device="meta"))


def test_a_meta_seed_next_to_cpu_tensors_is_an_error():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=re.escape("megacore.bias_dropout_add: seed is on meta, expected cpu")):
        torch.ops.megacore.bias_dropout_add(x, None, x, 0.5, _seed().to("meta"))


# ---- the transformer layer module --------------------------------------------------------------------------


def _small_layer(device=None) -> TransformerLayer:
    torch.manual_seed(0)
    return TransformerLayer(TransformerConfig(hidden_size=16, num_attention_heads=2, ffn_hidden_size=32),
                            device=device)


def test_layer_on_meta_called_with_a_cpu_input_is_an_error():
    layer = _small_layer("meta")
    with pytest.raises(ValueError, match=re.escape("megacore.transformer.TransformerLayer: parameter "
                                                   "attention_norm.weight is on meta, expected cpu")):
        layer(torch.randn(5, 2, 16))


def test_cpu_layer_with_one_parameter_left_on_meta_is_an_error_naming_it():
    layer = _small_layer()
    layer.mlp.fc2.weight = nn.Parameter(torch.empty_like(layer.mlp.fc2.weight, device="meta"))
    with pytest.raises(ValueError, match=re.escape("parameter mlp.fc2.weight is on meta, expected cpu")):
        layer(torch.randn(5, 2, 16))


def test_functional_layer_with_a_meta_parameter_is_rejected_by_the_op():
    layer = _small_layer()
    params = dict(layer.layer_params(), **{"mlp.fc2.weight": layer.mlp.fc2.weight.to("meta")})
    with pytest.raises(ValueError, match=re.escape("megacore.transformer_layer: fc2_weight is on meta, "
                                                   "expected cpu (the device of hidden)")):
        transformer_layer(torch.randn(5, 2, 16), params, layer.config)


def test_layer_on_meta_called_with_a_meta_input_gives_meta_output():
    layer = _small_layer("meta")
    with torch.device("meta"):  # the seed the layer draws stays on CPU
        out = layer(torch.empty(5, 2, 16))
    assert out.device.type == "meta" and out.shape == (5, 2, 16)
