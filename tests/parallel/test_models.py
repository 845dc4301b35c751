"""Whole models at tensor-parallel sizes 1, 2 and 4 (real gloo processes) equal the same model built whole:
logits, per-token loss and every parameter gradient (shards merged), with and without sequence
parallelism, and with a vocab size that does not divide by the tensor-parallel size."""

import pytest
import torch

from megacore.parallel import sum_sequence_parallel_gradients
from tests.parallel.utils import gather_shards, run_distributed, shard_dims

TOL = dict(atol=2e-5, rtol=2e-4)


def _compare(rank, world, make_model, make_batch, run, what):
    """Builds the model whole and tensor-parallel from the same seed, runs ``run(model, batch)`` ->
    (outputs dict, loss to backprop) on both, and compares outputs and merged gradients."""
    from megacore.parallel import get_tensor_parallel_group
    from megacore.parallel.layers import merge_weights

    group = get_tensor_parallel_group()
    batch = make_batch()
    results = []
    for tensor_parallel in (False, True):
        torch.manual_seed(0)
        model = make_model(tensor_parallel)
        torch.manual_seed(1)
        outputs, loss = run(model, batch)
        loss.backward()
        sum_sequence_parallel_gradients(model)  # what the Trainer does after the last backward
        grads = {}
        dims = shard_dims(model, world)
        for name, p in model.named_parameters():
            g = p.grad
            if dims[name] is not None:
                g = merge_weights(gather_shards(g, group, world), dims[name])
            grads[name] = g
        results.append((outputs, grads, model))
    (full_out, full_grads, full_model), (tp_out, tp_grads, _) = results
    for key in full_out:
        torch.testing.assert_close(tp_out[key], full_out[key], **TOL, msg=lambda m: f"{what}: {key} at tp={world}: {m}")
    for name, g_full in full_grads.items():
        g = tp_grads[name]
        if g.shape != g_full.shape:  # a vocab-padded table: the padded rows get no gradient
            assert (g[g_full.shape[0]:] == 0).all(), f"{what}: padded rows of {name} got a gradient"
            g = g[: g_full.shape[0]]
        torch.testing.assert_close(g, g_full, **TOL, msg=lambda m: f"{what}: grad of {name} at tp={world}: {m}")


def _check_gpt(rank, world):
    from megacore.models import GPTModel, ModelConfig
    from megacore.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(world)
    seq = 8
    for sp, rope in ((False, False), (True, True)):
        def make_model(tensor_parallel):
            return GPTModel(ModelConfig(vocab_size=103, hidden_size=32, num_layers=2, num_attention_heads=4,
                                        max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0,
                                        position_embedding_type="rope" if rope else "learned_absolute",
                                        tensor_parallel=tensor_parallel, sequence_parallel=sp and tensor_parallel))

        def make_batch():
            ids = torch.randint(0, 103, (3, seq), generator=torch.Generator().manual_seed(2))
            return ids, torch.roll(ids, -1, 1)

        def run(model, batch):
            ids, labels = batch
            logits = model(ids)
            loss = model(ids, labels=labels)
            return {"logits": logits.detach(), "loss": loss.detach()}, loss.mean() + 0.1 * logits.float().pow(2).mean()

        _compare(rank, world, make_model, make_batch, run, f"GPT sp={sp} rope={rope}")
    destroy_model_parallel()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_gpt_tensor_parallel_equals_whole(world):
    run_distributed(_check_gpt, world, timeout_s=300, collective_timeout_s=60)


def _check_model_errors(rank, world):
    from megacore.models import GPTModel, ModelConfig
    from megacore.models.registry import build
    from megacore.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(world)
    with pytest.raises(ValueError, match="megacore.models.GPTModel: hidden_size=42 is not divisible by the tensor-parallel size 4"):
        GPTModel(ModelConfig(vocab_size=50, hidden_size=42, num_layers=1, num_attention_heads=2, tensor_parallel=True))
    with pytest.raises(ValueError, match="num_attention_heads=2 is not divisible by the tensor-parallel size 4"):
        build("bert-tiny", tensor_parallel=True, device="meta")
    destroy_model_parallel()


def test_model_sizes_that_do_not_divide_by_the_tensor_parallel_size_raise():
    run_distributed(_check_model_errors, 4, timeout_s=120)
