"""The C++ transformer layer under tensor (and sequence) parallelism, in real gloo processes.

One spawned run per world size (TP = world, all configurations grouped to pay the process start-up once).
For every mask kind, pre- and post-LN, with and without sequence parallelism, in fp32 and bf16:

1. on every rank, the C++ layer equals the Python reference composition (output and every gradient,
   dropout on: both use the same Philox masks);
2. without dropout, the tensor-parallel layer equals the whole (TP=1) layer built from the same seed:
   the output (this rank's sequence chunk under sequence parallelism), the input gradient, and every
   parameter gradient once the shards are merged.
"""

import itertools

import pytest
import torch
import torch.distributed as dist

from megacore.parallel.collectives import all_reduce
from megacore.parallel.sharding import ParallelPlan, gather_full, param_shards
from tests.parallel.utils import run_distributed

SEQ, BATCH, HIDDEN, HEADS, FFN = 8, 2, 32, 4, 64
VARIANTS = {
    "causal": dict(attention_mask_type="causal"),
    "padding": dict(attention_mask_type="padding"),
    "sliding_window": dict(attention_mask_type="sliding_window", window_size=3, normalization="rmsnorm"),
    "none_rope": dict(attention_mask_type="none", position_embedding_type="rope"),
    # a T5 v1.1 decoder layer: relative-position bias (each rank its heads), cross-attention, GeGLU (fc1's
    # [gate; up] halves split separately over the ranks)
    "t5v11_decoder": dict(attention_bias=True, cross_attention=True, softmax_scale=1.0, normalization="rmsnorm",
                          add_bias_linear=False, activation="geglu"),
    # the input gradient's collectives synchronous (the other variants overlap them with the weight GEMMs)
    "cross_swiglu_sync": dict(cross_attention=True, activation="swiglu", overlap_tp_comm=False),
    "narrow_heads": dict(kv_channels=4, attention_mask_type="padding"),  # 4 heads of 4 in a 32-wide layer
}




def _check_layer(rank, world, dtypes):
    from megacore.parallel import destroy_model_parallel, get_tensor_parallel_group, initialize_model_parallel
    from megacore.transformer import TransformerConfig, TransformerLayer
    from tests.transformer.utils import (
        assert_close_relative, assert_layer_close, make_extras, make_mask, run_layer, run_reference)

    initialize_model_parallel(world)
    group = get_tensor_parallel_group()
    cases = itertools.product(VARIANTS.items(), (True, False), (False, True), dtypes)
    for (variant, kw), pre_norm, sp, dtype in cases:
        where = f"{variant}, {'pre' if pre_norm else 'post'}-LN, sp={sp}, {dtype}, tp={world}"

        def config(tensor_parallel, dropout):
            return TransformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                                     params_dtype=dtype, pre_norm=pre_norm, tensor_parallel=tensor_parallel,
                                     sequence_parallel=sp and tensor_parallel, hidden_dropout=dropout,
                                     attention_dropout=dropout, **kw)

        x_full = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(3)).to(dtype)
        chunk = SEQ // world
        x = x_full[rank * chunk:(rank + 1) * chunk] if sp else x_full
        mask = make_mask(config(False, 0.0), BATCH, SEQ)
        # the memory (cross-attention) is split like hidden under sequence parallelism; the bias by heads
        extras = make_extras(config(False, 0.0), BATCH, SEQ, SEQ, rank, world, memory_chunk=sp)
        full_extras = make_extras(config(False, 0.0), BATCH, SEQ, SEQ)

        # 1. C++ == reference on this rank, dropout on.
        torch.manual_seed(0)
        layer = TransformerLayer(config(True, 0.1))
        out, grads = run_layer(layer, x, mask, seed=11, extras=extras)
        ref_out, ref_grads = run_reference(layer, x, mask, seed=11, extras=extras)
        try:
            assert_layer_close(out, grads, ref_out, ref_grads, dtype,
                               ["hidden"] + [n for n, _ in layer.named_parameters()] + sorted(extras))
        except AssertionError as e:
            raise AssertionError(f"C++ vs reference ({where}): {e}") from None

        # 2. TP == the whole layer, dropout off.
        torch.manual_seed(0)
        tp_layer = TransformerLayer(config(True, 0.0))
        torch.manual_seed(0)
        full_layer = TransformerLayer(config(False, 0.0))
        full_out, full_grads = _run_with_fixed_grad(full_layer, x_full, mask, rank, world, extras=full_extras)
        out, grads = _run_with_fixed_grad(tp_layer, x, mask, rank, world, chunked=sp, extras=extras)
        n_params = len(list(tp_layer.parameters()))
        if "attention_bias" in extras:  # this rank's heads of the whole layer's bias gradient
            per = HEADS // world
            assert_close_relative(grads[1 + n_params], full_grads[1 + n_params][:, rank * per:(rank + 1) * per],
                                  dtype, f"TP attention-bias gradient ({where})")
        if "memory" in extras:  # the memory's gradient: whole on every rank, or its chunk under sequence parallelism
            g_memory, full_g_memory = grads[-1], full_grads[-1]
            expected = full_g_memory[rank * chunk:(rank + 1) * chunk] if sp else full_g_memory
            assert_close_relative(g_memory, expected, dtype, f"TP memory gradient ({where})")
        grads, full_grads = grads[:1 + n_params], full_grads[:1 + n_params]
        expected_out = full_out[rank * chunk:(rank + 1) * chunk] if sp else full_out
        assert_close_relative(out, expected_out, dtype, f"TP output ({where})")
        expected_gx = full_grads[0][rank * chunk:(rank + 1) * chunk] if sp else full_grads[0]
        assert_close_relative(grads[0], expected_gx, dtype, f"TP input gradient ({where})")
        shards = {s.name: s for s in param_shards(tp_layer, world)}
        # parameters used on sequence shards hold their shard's part: the once-per-step sum the Trainer does
        partial = {s.name for s in ParallelPlan(tp_layer).params if s.sequence_parallel}
        assert bool(partial) == bool(sp), partial
        for (name, p), g, g_full in zip(tp_layer.named_parameters(), grads[1:], full_grads[1:]):
            if name in partial:
                g = all_reduce(g, group)
            merged = gather_full(shards[name], g, group)  # the plan's one gather (a gated fc1: [gate; up] chunks)
            assert_close_relative(merged, g_full, dtype, f"TP gradient of {name} ({where})")
    destroy_model_parallel()


def _run_with_fixed_grad(layer, x, mask, rank, world, chunked=False, extras=None):
    """Output and gradients (input, parameters, then the attention bias's and the memory's when given) for an
    output gradient drawn over the whole sequence from a fixed seed, of which a sequence-parallel rank takes its
    chunk (so TP and TP=1 see the same upstream gradient)."""
    from megacore.transformer import transformer_layer

    x = x.detach().clone().requires_grad_()
    extras = {k: v.detach().clone().requires_grad_(k != "memory_mask") for k, v in (extras or {}).items()}
    leaves = [extras[k] for k in ("attention_bias", "memory") if k in extras]
    rotary = layer.rotary_tables(layer.full_seq_len(x), x.device)
    out = transformer_layer(x, layer.layer_params(), layer.config, mask, rotary, torch.tensor([5]),
                            layer.group_name, layer.training, **extras)
    g = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(6)).to(out.dtype)
    if chunked:
        chunk = SEQ // world
        g = g[rank * chunk:(rank + 1) * chunk]
    return out.detach(), list(torch.autograd.grad(out, [x, *layer.parameters(), *leaves], g))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_transformer_layer_tensor_parallel(world):
    run_distributed(_check_layer, world, [torch.float32, torch.bfloat16], timeout_s=400, collective_timeout_s=60)


def _check_overlap(rank, world):
    """The overlapped backward (the input gradient's collective under the weight GEMM) gives exactly the synchronous
    path's gradients, with and without sequence parallelism, for a decoder layer (every column-parallel GEMM)."""
    import dataclasses

    from megacore.parallel import destroy_model_parallel, initialize_model_parallel
    from megacore.transformer import TransformerConfig, TransformerLayer
    from tests.transformer.utils import make_extras, run_layer

    initialize_model_parallel(world)
    for sp in (False, True):
        config = TransformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                                   tensor_parallel=True, sequence_parallel=sp, cross_attention=True)
        torch.manual_seed(0)
        layer = TransformerLayer(config)
        x = torch.randn(SEQ // world if sp else SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(3))
        extras = make_extras(config, BATCH, SEQ, SEQ, rank, world, memory_chunk=sp)
        out, grads = run_layer(layer, x, None, seed=4, extras=extras)
        layer.config = dataclasses.replace(config, overlap_tp_comm=False)
        sync_out, sync_grads = run_layer(layer, x, None, seed=4, extras=extras)
        assert torch.equal(out, sync_out)
        for i, (a, b) in enumerate(zip(grads, sync_grads)):
            assert torch.equal(a, b), (sp, i)
    destroy_model_parallel()


def test_overlapped_backward_equals_synchronous():
    run_distributed(_check_overlap, 2, timeout_s=120)


def _check_errors(rank, world):
    from megacore.parallel import destroy_model_parallel, initialize_model_parallel
    from megacore.transformer import TransformerConfig, TransformerLayer

    initialize_model_parallel(world)
    with pytest.raises(ValueError, match="TransformerLayer: num_attention_heads=6 is not divisible by the tensor-parallel size 4"):
        TransformerLayer(TransformerConfig(hidden_size=48, num_attention_heads=6, tensor_parallel=True))
    with pytest.raises(ValueError, match="TransformerLayer: ffn_hidden_size=10 is not divisible by the tensor-parallel size 4"):
        TransformerLayer(TransformerConfig(hidden_size=32, num_attention_heads=4, ffn_hidden_size=10,
                                           tensor_parallel=True))
    # A layer sharded for another group size: the C++ op checks the shard shapes against the group.
    whole = TransformerLayer(TransformerConfig(hidden_size=32, num_attention_heads=4, tensor_parallel=False))
    whole.group_name = dist.group.WORLD.group_name
    with pytest.raises(ValueError, match=r"megacore.transformer_layer: qkv_weight has shape \[96, 32\], expected \[24, 32\]"):
        whole(torch.randn(4, 2, 32))
    destroy_model_parallel()


def test_transformer_layer_errors():
    run_distributed(_check_errors, 4, timeout_s=120)
