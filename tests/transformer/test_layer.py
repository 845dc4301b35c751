"""The C++ transformer layer (megacore.transformer) against its Python reference composition and against a
plain PyTorch block, in one process. The tensor-parallel cases are in tests/parallel/test_transformer_layer.py."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megacore.transformer import PARAM_NAMES, TransformerConfig, TransformerLayer, transformer_layer
from megacore.transformer.layer import SAVED_SLOTS, op_config
from megacore.transformer.reference import transformer_layer_reference
from tests.ops.utils import compile_fullgraph
from tests.transformer.utils import assert_layer_close, make_extras, make_mask, run_layer, run_reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
dtype_ids = lambda d: str(d).removeprefix("torch.")  # noqa: E731

VARIANTS = {
    "causal": dict(attention_mask_type="causal"),
    "padding": dict(attention_mask_type="padding"),
    "sliding_window": dict(attention_mask_type="sliding_window", window_size=3),
    "no_mask": dict(attention_mask_type="none"),
    "rope_rmsnorm_nobias": dict(position_embedding_type="rope", rotary_percent=0.5, normalization="rmsnorm",
                                add_bias_linear=False, activation="gelu_tanh"),
    # T5's encoder layer: a learned relative-position bias on padded attention, no scaling, RMSNorm, no biases, ReLU
    "t5_encoder": dict(attention_mask_type="padding", attention_bias=True, softmax_scale=1.0, normalization="rmsnorm",
                       add_bias_linear=False, activation="relu"),
    # T5 v1.1's decoder layer: causal self-attention with the bias, cross-attention to a padded memory, GeGLU
    "t5v11_decoder": dict(attention_bias=True, cross_attention=True, softmax_scale=1.0, normalization="rmsnorm",
                          add_bias_linear=False, activation="geglu"),
    "cross_swiglu_window": dict(cross_attention=True, activation="swiglu", attention_mask_type="sliding_window",
                                window_size=3),
    "alibi_reglu_no_mask": dict(attention_bias=True, attention_mask_type="none", activation="reglu"),
    "geglu_erf_rope": dict(activation="geglu_erf", position_embedding_type="rope"),
    # heads narrower than hidden / heads (T5 v1.1-small: 512 wide, 6 heads of 64): 4 heads of 8 in a 48-wide layer
    "narrow_heads_t5v11": dict(kv_channels=8, attention_bias=True, cross_attention=True, softmax_scale=1.0,
                               normalization="rmsnorm", add_bias_linear=False, activation="geglu"),
}


def _config(dtype, **kw) -> TransformerConfig:
    base = dict(hidden_size=48, num_attention_heads=4, ffn_hidden_size=72, params_dtype=dtype,
                hidden_dropout=0.1, attention_dropout=0.1)
    base.update(kw)
    return TransformerConfig(**base)


def _on(device, layer, x, mask):
    """The layer, input and mask moved to ``device`` (built on CPU from the seed, so every device starts
    from the same weights)."""
    return layer.to(device), x.to(device), None if mask is None else mask.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_matches_reference(variant, pre_norm, dtype, device):
    """The C++ layer against the reference on each device; on CUDA also against the CPU run from the same
    seeds (the Philox dropout masks are the same function of the seed on both)."""
    torch.manual_seed(0)
    config = _config(dtype, pre_norm=pre_norm, **VARIANTS[variant])
    cpu_layer = TransformerLayer(config)
    x_cpu = torch.randn(11, 3, 48).to(dtype)
    mask_cpu = make_mask(config, 3, 11)
    extras_cpu = make_extras(config, 3, 11)
    layer, x, mask = _on(device, cpu_layer, x_cpu, mask_cpu)  # (moves cpu_layer itself)
    extras = {k: v.to(device) for k, v in extras_cpu.items()}
    out, grads = run_layer(layer, x, mask, seed=123, extras=extras)
    ref_out, ref_grads = run_reference(layer, x, mask, seed=123, extras=extras)
    assert_layer_close(out, grads, ref_out, ref_grads, dtype)
    if device != "cpu":
        cpu_out, cpu_grads = run_layer(_copy_layer(layer, config), x_cpu, mask_cpu, seed=123, extras=extras_cpu)
        assert_layer_close(out.cpu(), [g.cpu() for g in grads], cpu_out, cpu_grads, dtype)


def _copy_layer(layer, config):
    """A CPU copy of ``layer`` with the same weights."""
    copy = TransformerLayer(config)
    copy.load_state_dict({k: v.cpu() for k, v in layer.state_dict().items()})
    return copy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_ids)
@pytest.mark.parametrize("mask_kind", ["causal", "none"])
def test_flash_backend_matches_fused_softmax(mask_kind, dtype, device):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("CUDA flash attention takes fp16/bf16 only (forcing it in fp32 is an error, tested below)")
    torch.manual_seed(0)
    config = _config(dtype, attention_mask_type=mask_kind, attention_dropout=0.0, attention_backend="flash")
    flash = TransformerLayer(config)
    fused = TransformerLayer(_config(dtype, attention_mask_type=mask_kind, attention_dropout=0.0,
                                     attention_backend="fused_softmax"))
    fused.load_state_dict(flash.state_dict())
    flash, fused = flash.to(device), fused.to(device)
    x = torch.randn(13, 2, 48).to(dtype).to(device)
    out, grads = run_layer(flash, x, None, seed=5)
    ref_out, ref_grads = run_layer(fused, x, None, seed=5)
    assert_layer_close(out, grads, ref_out, ref_grads, dtype)


def test_auto_backend_picks_flash_only_where_it_applies():
    """auto = flash for causal/no mask without attention dropout on CPU; fused softmax otherwise
    (seen through the saved slots: flash keeps the logsumexp, the fused path the probabilities)."""
    x = torch.randn(6, 2, 48)

    def saved(**kw):
        config = _config(torch.float32, **kw)
        layer = TransformerLayer(config)
        args = op_config(config, "", True)
        _, slots = torch.ops.megacore.transformer_layer(
            x, *layer.layer_params().values(), make_mask(config, 2, 6), None, None, None, None, None, torch.tensor([1]), args)
        return dict(zip(SAVED_SLOTS, slots))

    flash = saved(attention_dropout=0.0)
    assert flash["lse"].shape == (2, 4, 6) and flash["probs"].numel() == 0
    fused = saved(attention_dropout=0.1)
    assert fused["lse"].numel() == 0 and fused["probs"].shape == (2, 4, 6, 6)
    padded = saved(attention_dropout=0.0, attention_mask_type="padding")
    assert padded["probs"].shape == (2, 4, 6, 6)


def test_selective_recompute_keeps_no_probabilities_and_changes_nothing():
    torch.manual_seed(0)
    plain = TransformerLayer(_config(torch.float32))
    recompute = TransformerLayer(_config(torch.float32, recompute_core_attention=True))
    recompute.load_state_dict(plain.state_dict())
    x = torch.randn(9, 2, 48)
    out, grads = run_layer(plain, x, None, seed=9)
    out_r, grads_r = run_layer(recompute, x, None, seed=9)
    torch.testing.assert_close(out_r, out, atol=0, rtol=0)
    for a, b in zip(grads_r, grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    args = op_config(recompute.config, "", True)
    _, slots = torch.ops.megacore.transformer_layer(x, *recompute.layer_params().values(), None, None, None,
                                                    None, None, None, torch.tensor([9]), args)
    assert dict(zip(SAVED_SLOTS, slots))["probs"].numel() == 0


def test_reference_matches_a_plain_pytorch_block():
    """The reference itself, without dropout, against a block written with torch.nn.functional only
    (layer_norm, scaled_dot_product_attention, gelu): the reference is the specification the C++ layer
    is held to, so it is checked independently of megacore's ops."""
    torch.manual_seed(0)
    for pre_norm in (True, False):
        config = _config(torch.float64, pre_norm=pre_norm, hidden_dropout=0.0, attention_dropout=0.0,
                         position_embedding_type="rope")
        layer = TransformerLayer(config)
        p = {n: t.detach() if t is not None else None for n, t in layer.layer_params().items()}
        for n in ("attention.qkv.bias", "attention.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias"):
            p[n] = torch.randn_like(p[n]) * 0.1  # zeros would hide a misplaced bias
        x = torch.randn(10, 2, 48, dtype=torch.float64)
        cos, sin = layer.rotary_tables(10, x.device)
        ref = transformer_layer_reference(x, p, config, None, (cos, sin), seed=0)

        def ln(t, name):
            return F.layer_norm(t, (48,), p[name + ".weight"], p[name + ".bias"], config.norm_epsilon)

        def rope(t):  # [s, b, heads, d], rotate-half
            r = cos.shape[1]
            t1, t2 = t[..., : r // 2], t[..., r // 2: r]
            rot = torch.cat([-t2, t1], -1)
            c, s_ = cos[:, None, None, :].double(), sin[:, None, None, :].double()
            return torch.cat([t[..., :r] * c + rot * s_, t[..., r:]], -1)

        def attention(t):
            qkv = F.linear(t, p["attention.qkv.weight"], p["attention.qkv.bias"]).view(10, 2, 4, 3, 12)
            q, k, v = rope(qkv[..., 0, :]), rope(qkv[..., 1, :]), qkv[..., 2, :]
            q, k, v = (u.permute(1, 2, 0, 3) for u in (q, k, v))
            ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3).reshape(10, 2, 48)
            return F.linear(ctx, p["attention.proj.weight"], p["attention.proj.bias"])

        def mlp(t):
            return F.linear(F.gelu(F.linear(t, p["mlp.fc1.weight"], p["mlp.fc1.bias"])),
                            p["mlp.fc2.weight"], p["mlp.fc2.bias"])

        if pre_norm:
            h = x + attention(ln(x, "attention_norm"))
            expected = h + mlp(ln(h, "mlp_norm"))
        else:
            h = ln(x + attention(x), "attention_norm")
            expected = ln(h + mlp(h), "mlp_norm")
        torch.testing.assert_close(ref, expected, atol=1e-10, rtol=1e-10)


def test_benchmark_eager_block_is_the_same_layer():
    """benchmarks/layer.py compares megacore with an eager block holding the same weights: check it
    computes the same function (dropout off), so the benchmark compares like with like."""
    from megacore.benchmarks.layer import EagerBlock

    torch.manual_seed(0)
    layer = TransformerLayer(_config(torch.float32)).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # non-trivial biases and norm weights
    block = EagerBlock(layer).eval()
    x = torch.randn(9, 2, 48)
    torch.testing.assert_close(block(x.transpose(0, 1)).transpose(0, 1), layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(pre_norm=True, attention_mask_type="padding"),
    dict(pre_norm=False, position_embedding_type="rope", attention_mask_type="sliding_window", window_size=2,
         recompute_core_attention=True),
    # the new pieces: the attention bias's and the memory's gradients, cross-attention, gated and ReLU MLPs
    dict(pre_norm=True, attention_bias=True, cross_attention=True, activation="swiglu", softmax_scale=0.7),
    dict(pre_norm=False, attention_bias=True, cross_attention=True, activation="relu", attention_mask_type="padding",
         normalization="rmsnorm", recompute_core_attention=True),
    dict(pre_norm=True, cross_attention=True, activation="geglu", attention_mask_type="none"),
    dict(kv_channels=3, attention_bias=True, cross_attention=True, softmax_scale=1.0, normalization="rmsnorm",
         add_bias_linear=False),  # 2 heads of 3 in an 8-wide layer
], ids=["padding", "post_ln_rope_window", "bias_cross_swiglu", "post_ln_t5_relu", "cross_geglu", "narrow_heads"])
def test_gradcheck_float64(kw):
    torch.manual_seed(0)
    config = TransformerConfig(hidden_size=8, num_attention_heads=2, ffn_hidden_size=12, params_dtype=torch.float64,
                               **kw)
    layer = TransformerLayer(config)
    x = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    mask = make_mask(config, 2, 5)
    extras = make_extras(config, 2, 5, memory_len=3)
    leaves = {k: v.requires_grad_() for k, v in extras.items() if k != "memory_mask"}
    params = layer.layer_params()
    names = [n for n in PARAM_NAMES if params[n] is not None]

    def f(x, *ps):  # dropout on: the fixed seed makes it a fixed linear map
        given = dict(zip(list(leaves), ps[len(names):]))
        return transformer_layer(x, dict(zip(names, ps[:len(names)])), config, mask, layer.rotary_tables(5, x.device),
                                 torch.tensor([7]), memory_mask=extras.get("memory_mask"), **given)

    assert torch.autograd.gradcheck(f, (x, *[params[n] for n in names], *leaves.values()))


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre_ln", "post_ln"])
@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
def test_opcheck(pre_norm, decoder):
    """Also a decoder layer: an attention bias, cross-attention to a padded memory, a gated MLP, heads of 20 in a
    48-wide layer."""
    torch.manual_seed(0)
    extra = dict(attention_bias=True, cross_attention=True, activation="geglu", kv_channels=20) if decoder else {}
    config = _config(torch.float32, pre_norm=pre_norm, position_embedding_type="rope", attention_mask_type="padding",
                     **extra)
    layer = TransformerLayer(config)
    x = torch.randn(7, 2, 48, requires_grad=True)
    extras = {k: v.requires_grad_(k != "memory_mask") for k, v in make_extras(config, 2, 7).items()}
    args = (x, *layer.layer_params().values(), make_mask(config, 2, 7), *layer.rotary_tables(7, x.device),
            extras.get("attention_bias"), extras.get("memory"), extras.get("memory_mask"), torch.tensor([3]),
            op_config(config, "", True))
    torch.library.opcheck(torch.ops.megacore.transformer_layer.default, args)


@pytest.mark.parametrize("decoder", [False, True], ids=["gpt", "t5_decoder"])
def test_torch_compile_fullgraph_forward_and_backward(decoder):
    torch.manual_seed(0)
    extra = dict(attention_bias=True, cross_attention=True, activation="swiglu", softmax_scale=1.0) if decoder else {}
    layer = TransformerLayer(_config(torch.float32, position_embedding_type="rope", **extra))
    x = torch.randn(8, 2, 48)
    seed = torch.tensor([11])
    extras = make_extras(layer.config, 2, 8)

    def step(x, bias, memory):
        return transformer_layer(x, layer.layer_params(), layer.config, None, layer.rotary_tables(8, x.device), seed,
                                 attention_bias=bias, memory=memory, memory_mask=extras.get("memory_mask"))

    def leaves():
        return [t.clone().requires_grad_() if t is not None else None
                for t in (x, extras.get("attention_bias"), extras.get("memory"))]

    a, b = leaves(), leaves()
    eager, compiled = step(*a), compile_fullgraph(step)(*b)
    torch.testing.assert_close(compiled, eager)
    g = torch.randn_like(eager)
    wrt_a, wrt_b = [t for t in a if t is not None], [t for t in b if t is not None]
    for got, want in zip(torch.autograd.grad(compiled, wrt_b, g), torch.autograd.grad(eager, wrt_a, g)):
        torch.testing.assert_close(got, want)


def test_op_config_is_a_constant_for_torch_compile_without_importing_dynamo():
    """layer.py marks op_config as torch.compiler.assume_constant_result does, without importing torch._dynamo
    at start-up (1.5 s of every process, every spawned worker's): the decorator must still be only that."""
    assert getattr(torch.compiler.assume_constant_result(lambda: 0), "_dynamo_marked_constant", False)
    assert op_config._dynamo_marked_constant is True
    code = ("import sys, megacore.training, megacore.models, megacore.parallel, megacore.data, megacore.cli; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_eval_mode_has_no_dropout():
    torch.manual_seed(0)
    layer = TransformerLayer(_config(torch.float32, hidden_dropout=0.5, attention_dropout=0.5)).eval()
    x = torch.randn(6, 2, 48)
    torch.testing.assert_close(layer(x), layer(x), atol=0, rtol=0)
    ref = transformer_layer_reference(x, layer.layer_params(), layer.config, training=False)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # fresh dropout masks each call


def test_output_projection_init_is_scaled():
    torch.manual_seed(0)
    layer = TransformerLayer(TransformerConfig(hidden_size=256, num_attention_heads=4, num_layers=8))
    std = layer.attention.qkv.weight.std().item()
    proj_std = layer.attention.proj.weight.std().item()
    assert abs(std - 0.02) < 0.001
    assert abs(proj_std - 0.02 / math.sqrt(16)) < 0.0005


def test_module_names_and_shapes():
    layer = TransformerLayer(_config(torch.float32))
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {
        "attention_norm.weight": (48,), "attention_norm.bias": (48,),
        "attention.qkv.weight": (144, 48), "attention.qkv.bias": (144,),
        "attention.proj.weight": (48, 48), "attention.proj.bias": (48,),
        "mlp_norm.weight": (48,), "mlp_norm.bias": (48,),
        "mlp.fc1.weight": (72, 48), "mlp.fc1.bias": (72,),
        "mlp.fc2.weight": (48, 72), "mlp.fc2.bias": (48,),
    }
    rms = TransformerLayer(_config(torch.float32, normalization="rmsnorm", add_bias_linear=False))
    assert sorted(n for n, _ in rms.named_parameters()) == sorted(
        ["attention_norm.weight", "attention.qkv.weight", "attention.proj.weight", "mlp_norm.weight",
         "mlp.fc1.weight", "mlp.fc2.weight"])


# ---- errors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, error, text",
    [
        (dict(hidden_size=50), ValueError, "hidden_size=50 is not divisible by num_attention_heads=4 (set kv_channels"),
        (dict(kv_channels=0), ValueError, "kv_channels=0 must be >= 1"),
        (dict(normalization="batchnorm"), ValueError, "normalization='batchnorm' is not one of layernorm, rmsnorm"),
        (dict(attention_mask_type="sliding_window"), ValueError, "window_size must be set exactly when"),
        (dict(window_size=4), ValueError, "window_size must be set exactly when"),
        (dict(hidden_dropout=1.0), ValueError, "hidden_dropout=1.0 must be in [0, 1)"),
        (dict(sequence_parallel=True), ValueError, "sequence_parallel=True needs tensor_parallel=True"),
        (dict(params_dtype=torch.int32), TypeError, "params_dtype=torch.int32 is not one of"),
        (dict(num_attention_heads=0), ValueError, "num_attention_heads=0 must be >= 1"),
        (dict(attention_backend="xformers"), ValueError, "attention_backend='xformers' is not one of"),
    ],
)
def test_config_errors(kw, error, text):
    base = dict(hidden_size=48, num_attention_heads=4)
    base.update(kw)
    with pytest.raises(error, match="megacore.transformer.TransformerConfig: " + _escape(text)):
        TransformerConfig(**base)


def test_tensor_parallel_layer_before_initialization():
    with pytest.raises(RuntimeError, match="TransformerLayer: tensor_parallel=True but model parallel is not initialized"):
        TransformerLayer(_config(torch.float32, tensor_parallel=True))


def test_bad_inputs_name_the_op_and_argument():
    layer = TransformerLayer(_config(torch.float32))
    x = torch.randn(6, 2, 48)
    with pytest.raises(ValueError, match="TransformerLayer: hidden_states has shape \\[6, 48\\], expected \\[seq, batch, hidden\\]"):
        layer(x[:, 0])
    with pytest.raises(ValueError, match="megacore.transformer_layer: attention_mask is only taken with mask_kind 'padding'"):
        layer(x, torch.zeros(2, 1, 1, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"megacore.transformer_layer: attention_norm_weight has dtype Float, expected Double \(the dtype of hidden\)"):
        layer(x.double())  # parameters are fp32: mismatched dtypes are a TypeError
    with pytest.raises(ValueError, match="megacore.transformer_layer: hidden size 42 is not divisible by num_heads=4"):
        layer(torch.randn(6, 2, 42))
    padded = TransformerLayer(_config(torch.float32, attention_mask_type="padding"))
    with pytest.raises(ValueError, match="mask_kind 'padding' needs attention_mask"):
        padded(x)
    with pytest.raises(ValueError, match="attention_mask has shape \\[2, 1, 1, 5\\], expected \\[batch or 1, 1, queries or 1, keys\\] = \\[2, 1, 6, 6\\]"):
        padded(x, torch.zeros(2, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask has dtype Float, expected Bool"):
        padded(x, torch.zeros(2, 1, 1, 6))
    forced = TransformerLayer(_config(torch.float32, attention_mask_type="padding", attention_backend="flash",
                                      attention_dropout=0.0))
    with pytest.raises(ValueError, match="attention_backend 'flash' cannot run here: it handles only mask_kind causal or none"):
        forced(x, torch.zeros(2, 1, 1, 6, dtype=torch.bool))


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_python_reads_the_head_width_from_the_op_config():
    """The fake kernel and uses_flash take the head width from the config string (kv_channels -> head_dim), as
    the C++ op does, not hidden / heads: CUDA flash needs head_dim % 8 == 0, true of 16, false of 48 / 4 = 12."""
    from megacore import _C
    from megacore.transformer.layer import _head_dim

    config = op_config(_config(torch.bfloat16, kv_channels=16, attention_dropout=0.0))
    assert _head_dim(config, 48) == 16 and _head_dim(op_config(_config(torch.bfloat16)), 48) == 12
    assert _C.transformer_layer_uses_flash(config, "cuda", "bfloat16", _head_dim(config, 48))
