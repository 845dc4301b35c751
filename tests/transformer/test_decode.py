"""The C++ layer's decoding op (``megacore::transformer_layer_decode``): the same block as training, over new
tokens with a key/value cache. A chunk of tokens decoded after a cache holding the positions before it gives the
training forward's output at those positions over the sequence up to the chunk's end, for every mask kind,
pre/post-LN, RMSNorm, RoPE and sliding windows; and what Python knows of the ops (saved shapes, flash rule,
dropout seeds) is what C++ does."""

from __future__ import annotations

import pytest
import torch

from megacore import _C
from megacore.transformer import TransformerConfig, TransformerLayer
from megacore.transformer.layer import (DROPOUT_SITES, SAVED_SLOTS, dropout_seed, op_config, transformer_layer_decode,
                                        uses_flash)
from tests.transformer.utils import make_extras, make_mask

VARIANTS = {
    "causal": dict(attention_mask_type="causal"),
    "padding": dict(attention_mask_type="padding"),
    "sliding_window": dict(attention_mask_type="sliding_window", window_size=3),
    "no_mask": dict(attention_mask_type="none"),
    "rope_rmsnorm_nobias": dict(position_embedding_type="rope", rotary_percent=0.5, normalization="rmsnorm",
                                add_bias_linear=False, activation="gelu_tanh"),
    "rope_sliding_fused": dict(position_embedding_type="rope", attention_mask_type="sliding_window", window_size=4,
                               attention_backend="fused_softmax"),
    "t5_decoder": dict(attention_bias=True, cross_attention=True, softmax_scale=1.0, normalization="rmsnorm",
                       add_bias_linear=False),
    "cross_padding_bias": dict(attention_bias=True, cross_attention=True, attention_mask_type="padding"),
    "wide_heads_rope": dict(kv_channels=20, position_embedding_type="rope"),  # 4 heads of 20 in a 48-wide layer
}
DTYPES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0.0}


def _layer(dtype=torch.float32, **kw) -> TransformerLayer:
    torch.manual_seed(0)
    base = dict(hidden_size=48, num_attention_heads=4, ffn_hidden_size=72, params_dtype=dtype, hidden_dropout=0.1,
                attention_dropout=0.1)
    return TransformerLayer(TransformerConfig(**{**base, **kw})).eval()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoding_in_chunks_equals_the_training_forward(variant, pre_norm, dtype):
    layer = _layer(dtype, pre_norm=pre_norm, **VARIANTS[variant])
    s, b = 9, 3
    x = torch.randn(s, b, 48, dtype=dtype)
    full_mask = make_mask(layer.config, b, s)  # [b, 1, 1, s] for padding, else None
    extras = make_extras(layer.config, b, s)  # the bias [1, heads, s, s]; the memory [5, b, h] and its mask
    bias = extras.pop("attention_bias", None)
    cache = [torch.zeros(layer.cache_shape(b, s + 2), dtype=dtype) for _ in range(2)]
    if layer.config.cross_attention:
        cache += [torch.zeros(layer.cache_shape(b, 5), dtype=dtype) for _ in range(2)]
    position = 0
    for end in (4, 5, 7, 8, 9):  # a prompt, then one-token steps and chunks
        with torch.no_grad():
            mask = None if full_mask is None else full_mask[..., :end]
            whole_bias = None if bias is None else bias[..., :end, :end]
            expected = layer(x[:end], mask, attention_bias=whole_bias, **extras)[position:end]
            step_extras = dict(extras, memory=extras["memory"] if position == 0 else None) if extras else {}
            got = layer(x[position:end], mask, kv_cache=tuple(cache), position=position,
                        attention_bias=None if bias is None else bias[..., position:end, :end], **step_extras)
        if dtype == torch.bfloat16:  # the same ops on the same numbers, in another grouping of the GEMMs
            torch.testing.assert_close(got, expected, atol=4e-2, rtol=0)
        else:
            torch.testing.assert_close(got, expected, atol=DTYPES[dtype], rtol=0, msg=lambda m: f"to {end}: {m}")
        position = end


def test_decoding_writes_the_new_keys_and_values_and_nothing_else():
    layer = _layer()
    keys = torch.full(layer.cache_shape(2, 6), 7.0)
    values = torch.full_like(keys, 7.0)
    with torch.no_grad():
        layer(torch.randn(2, 2, 48), kv_cache=(keys, values), position=1)
    assert (keys[:, :, 0] == 7).all() and (keys[:, :, 3:] == 7).all() and (values[:, :, 3:] == 7).all()
    assert not (keys[:, :, 1:3] == 7).any() and not (values[:, :, 1:3] == 7).any()


def test_decode_op_errors_name_the_op_and_argument():
    layer = _layer()
    x = torch.randn(2, 2, 48)
    keys = torch.zeros(layer.cache_shape(2, 4))
    with pytest.raises(ValueError, match=r"megacore.transformer_layer_decode: the cache holds 4 positions; "
                                         r"position=3 \+ 2 new tokens need 5"):
        layer(x, kv_cache=(keys, keys.clone()), position=3)
    with pytest.raises(ValueError, match=r"megacore.transformer_layer_decode: position=-1 must be >= 0"):
        layer(x, kv_cache=(keys, keys.clone()), position=-1)
    with pytest.raises(ValueError, match=r"megacore.transformer_layer_decode: key_cache has shape \[2, 2, 4, 12\], "
                                         r"expected a contiguous \[batch=2, heads / tp=4, capacity, head_dim=12\]"):
        layer(x, kv_cache=(torch.zeros(2, 2, 4, 12), keys), position=0)
    with pytest.raises(TypeError, match=r"megacore.transformer_layer_decode: value_cache has dtype Double"):
        layer(x, kv_cache=(keys, keys.double()), position=0)
    padded = _layer(attention_mask_type="padding")
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 1, 1, 2\], expected \[batch or 1, 1, "
                                         r"queries or 1, keys\] = \[2, 1, 2, 3\]"):
        padded(x, torch.zeros(2, 1, 1, 2, dtype=torch.bool), kv_cache=(keys, keys.clone()), position=1)


def test_decode_opcheck_and_compile():
    layer = _layer(position_embedding_type="rope", attention_mask_type="padding")
    x = torch.randn(2, 2, 48)
    cos, sin = (t[3:5] for t in layer.rotary_tables(5, x.device))
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 0] = True
    params = [p.detach() if p is not None else None for p in layer.layer_params().values()]  # inference: no autograd
    args = (x, *params, mask, cos, sin, None, None, None, torch.zeros(layer.cache_shape(2, 6)),
            torch.zeros(layer.cache_shape(2, 6)), None, None, 3, op_config(layer.config, "", False))
    torch.library.opcheck(torch.ops.megacore.transformer_layer_decode.default, args)
    with pytest.raises(RuntimeError, match="derivative for megacore::transformer_layer_decode is not implemented"):
        out = torch.ops.megacore.transformer_layer_decode(x, *layer.layer_params().values(), *args[1 + len(params):])
        out.sum().backward()

    def step(x, keys, values):
        return layer(x, mask, kv_cache=(keys, values), position=3)

    k1, v1 = torch.randn(layer.cache_shape(2, 6)), torch.randn(layer.cache_shape(2, 6))
    k2, v2 = k1.clone(), v1.clone()
    with torch.no_grad():
        eager = step(x, k1, v1)
        compiled = torch.compile(step, fullgraph=True)(x, k2, v2)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(k2, k1)
    torch.testing.assert_close(v2, v1)


# ---- what Python reads from C++ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(), dict(attention_dropout=0.0), dict(attention_mask_type="padding"),
                                dict(recompute_core_attention=True), dict(pre_norm=False, normalization="rmsnorm"),
                                dict(attention_dropout=0.0, attention_backend="fused_softmax")])
def test_saved_slots_have_the_shapes_the_spec_gives(kw):
    layer = _layer(**kw).train()
    x = torch.randn(5, 2, 48)
    config = op_config(layer.config, "", True)
    _, slots = torch.ops.megacore.transformer_layer(x, *layer.layer_params().values(), make_mask(layer.config, 2, 5),
                                                    None, None, None, None, None, torch.tensor([3]), config)
    spec = _C.transformer_layer_saved_shapes(config, "cpu", "float32", 5, 2, 48, 72, 1)
    assert len(slots) == len(spec) == len(SAVED_SLOTS)
    for name, slot, (shape, dtype) in zip(SAVED_SLOTS, slots, spec):
        assert (list(slot.shape), str(slot.dtype)) == (shape, "torch." + dtype), name
    probs = dict(zip(SAVED_SLOTS, slots))["probs"]
    assert (probs.numel() == 0) == (uses_flash(config, x) or layer.config.recompute_core_attention)


def test_flash_rule_and_dropout_seeds_come_from_cpp():
    config = op_config(_layer(attention_dropout=0.0).config)
    assert uses_flash(config, torch.randn(4, 2, 48))
    assert not uses_flash(op_config(_layer().config), torch.randn(4, 2, 48))  # CPU flash has no dropout
    assert not uses_flash(op_config(_layer(attention_mask_type="padding").config), torch.randn(4, 2, 48))
    assert DROPOUT_SITES == {"attention": 0, "after_attention": 1, "after_mlp": 2, "cross_attention": 3,
                             "after_cross_attention": 4}
    # the documented derivation, checked independently here
    for seed, site, rank in [(0, 0, 0), (5, 1, 3), (-(2**63), 2, 1), (2**63 - 1, 0, 7)]:
        mixed = (seed + (site * 65536 + rank) * 0x9E3779B97F4A7C15) % 2**64
        assert dropout_seed(seed, site, rank) == (mixed - 2**64 if mixed >= 2**63 else mixed)


@pytest.mark.parametrize("fields, text", [
    ([("num_heads", "4"), ("colour", "red")], "unknown field 'colour'"),
    ([("normalization", "layernorm")], "field 'num_heads' is required"),
    ([("num_heads", "4"), ("mask_kind", "diagonal")], "mask_kind 'diagonal' is not one of causal, sliding_window"),
    ([("num_heads", "four")], "num_heads=four is not an integer"),
    ([("num_heads", "4"), ("norm_eps", "nan")], "norm_eps=nan is not a finite number"),
    ([("num_heads", "4"), ("mask_kind", "sliding_window")], "window must be given exactly when mask_kind"),
    ([("num_heads", "4"), ("pre_norm", "maybe")], "pre_norm=maybe is not a bool"),
    ([("num_heads", "4"), ("head_dim", "0")], "head_dim=0 must be >= 1"),
])
def test_config_strings_are_checked_once_with_clear_errors(fields, text):
    with pytest.raises(ValueError, match=text):
        _C.transformer_layer_config(fields)


def test_decode_function_matches_module():
    layer = _layer(position_embedding_type="rope")
    x = torch.randn(3, 2, 48)
    k1, v1 = torch.zeros(layer.cache_shape(2, 4)), torch.zeros(layer.cache_shape(2, 4))
    with torch.no_grad():
        a = layer(x, kv_cache=(k1, v1), position=0)
        b = transformer_layer_decode(x, layer.layer_params(), layer.config, torch.zeros_like(k1), torch.zeros_like(v1),
                                     0, rotary=layer.rotary_tables(3, x.device))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
