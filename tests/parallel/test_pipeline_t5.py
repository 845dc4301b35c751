"""T5 pipeline stages: the encoder's layers then the decoder's, cut by the pipeline's layer division. Where each
module lives, what crosses each boundary, and real gloo pipelines (PP 2 with the split inside the encoder and at the
encoder/decoder boundary; PP 4, whose splits fall inside both stacks and at the boundary; interleaved; TP 2 x PP 2 with sequence parallelism) against
one process: the loss, every parameter's gradient and the gradient norm, for T5 (tied, scaled head) and T5 v1.1
(its own head)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megacore.parallel import pipeline
from tests.parallel.utils import run_distributed

TINY = dict(vocab_size=61, hidden_size=32, kv_channels=8, ffn_hidden_size=48, num_attention_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, hidden_dropout=0.0,
            attention_dropout=0.0)
SOURCE, TARGET, MICRO, MICROBATCHES = 8, 6, 2, 4


def _t5(encoder_layers: int, decoder_layers: int, tied: bool = True, seed: int = 0, **overrides):
    from megacore.models.registry import build

    torch.manual_seed(seed)
    preset = "t5-tiny" if tied else "t5-v1_1-tiny"
    return build(preset, **{**TINY, "num_layers": encoder_layers, "num_decoder_layers": decoder_layers, **overrides})


def _batches(count: int = MICROBATCHES, seed: int = 0) -> list[dict]:
    """Padded sources, targets with ignored positions; the decoder's ids are the labels shifted right."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, TINY["vocab_size"], (MICRO, SOURCE), generator=g)
        mask = torch.ones(MICRO, SOURCE, dtype=torch.long)
        mask[1, -3:] = 0
        labels = torch.randint(1, TINY["vocab_size"], (MICRO, TARGET), generator=g)
        labels[1, -2:] = -100
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels})
    return out


# ---- one process ------------------------------------------------------------------------------------------------


def test_run_stages_is_forward_with_dropout():
    model = _t5(2, 2, hidden_dropout=0.1, attention_dropout=0.1).train()
    batch = _batches(1)[0]
    torch.manual_seed(3)
    expected = model(**batch)
    torch.manual_seed(3)
    got, input_loss = model.run_stages(batch)
    assert input_loss is None and got.shape == (MICRO, TARGET)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same code, the same dropout draws


def _held(encoder_layers, decoder_layers, tied, size, virtual_size=1):
    stages = [pipeline.cut_stage(_t5(encoder_layers, decoder_layers, tied), r, size, virtual_size) for r in range(size)]
    modules = [sorted({n.rsplit(".", 1)[0] for n, _ in s.named_parameters() if ".layers." not in n}) for s in stages]
    layers = [sorted({".".join(n.split(".")[:3]) for n, _ in s.named_parameters() if ".layers." in n}) for s in stages]
    return stages, modules, layers


def test_pp4_places_the_encoder_then_the_decoder_and_ties_word_and_bias_copies():
    stages, modules, layers = _held(2, 2, True, 4)
    assert layers == [["encoder.layers.0"], ["encoder.layers.1"], ["decoder.layers.0"], ["decoder.layers.1"]]
    assert modules == [["encoder_bias", "word"], ["encoder_bias"],
                       ["decoder_bias", "encoder_norm", "word"],  # decoder layer 0 starts the decoder
                       ["decoder_bias", "decoder_norm", "word"]]  # the tied LM head
    assert [dict(s.pipeline.shared) for s in stages] == [
        {"word.weight": (0, 2, 3), "encoder_bias.weight": (0, 1)}, {"encoder_bias.weight": (0, 1)},
        {"word.weight": (0, 2, 3), "decoder_bias.weight": (2, 3)},
        {"word.weight": (0, 2, 3), "decoder_bias.weight": (2, 3)}]
    assert all(s.pipeline.tie_groups == ((0, 1), (0, 2, 3), (2, 3)) for s in stages)
    assert [s.pipeline.tied_copies for s in stages] == [
        frozenset(), {"encoder_bias.weight"}, {"word.weight"}, {"word.weight", "decoder_bias.weight"}]

    from megacore.parallel.sharding import param_shards

    shards = {s.name: s for s in param_shards(stages[3], 1)}
    assert shards["decoder_bias.weight"].tied_copy and shards["decoder_bias.weight"].stage == 2  # its owner
    assert shards["word.weight"].stage == 0 and not shards["decoder_norm.weight"].tied_copy
    assert shards["decoder.layers.1.attention.qkv.weight"].stage == 3


def test_v1_1_keeps_its_own_head_on_the_last_stage_only():
    stages, modules, _ = _held(2, 2, False, 4)
    assert modules[3] == ["decoder_bias", "decoder_norm", "lm_head"]
    assert dict(stages[0].pipeline.shared)["word.weight"] == (0, 2)  # the encoder's and the decoder's inputs


@pytest.mark.parametrize("encoder_layers, decoder_layers, layers", [
    (3, 1, [["encoder.layers.0", "encoder.layers.1"], ["decoder.layers.0", "encoder.layers.2"]]),
    (1, 3, [["decoder.layers.0", "encoder.layers.0"], ["decoder.layers.1", "decoder.layers.2"]]),
])
def test_a_split_inside_a_stack_shares_its_bias_table(encoder_layers, decoder_layers, layers):
    stages, modules, held = _held(encoder_layers, decoder_layers, True, 2)
    assert held == layers
    bias = "encoder_bias.weight" if encoder_layers > decoder_layers else "decoder_bias.weight"
    assert dict(stages[1].pipeline.shared) == {"word.weight": (0, 1), bias: (0, 1)}


def test_interleaved_chunks_hold_both_stacks():
    stages, modules, layers = _held(2, 2, True, 2, virtual_size=2)
    assert layers == [["decoder.layers.0", "encoder.layers.0"], ["decoder.layers.1", "encoder.layers.1"]]
    assert modules == [["decoder_bias", "encoder_bias", "encoder_norm", "word"],
                       ["decoder_bias", "decoder_norm", "encoder_bias", "word"]]


def test_boundary_spec_is_the_encoder_state_then_the_decoder_state_and_the_memory():
    model = _t5(2, 2)
    batch = _batches(1)[0]
    hidden = lambda s: ((s, MICRO, TINY["hidden_size"]), torch.float32)  # noqa: E731
    assert model.boundary_spec(batch, 1) == [hidden(SOURCE)]
    assert model.boundary_spec(batch, 2) == [hidden(SOURCE)]  # into decoder layer 0: the encoder's last state
    assert model.boundary_spec(batch, 3) == [hidden(TARGET), hidden(SOURCE)]
    with_ids = dict(batch, labels=None, decoder_input_ids=batch["labels"][:, :4].clamp(min=0))
    assert model.boundary_spec(with_ids, 3) == [hidden(4), hidden(SOURCE)]


# ---- pipelines of real processes against one process -----------------------------------------------------------


def _reference(model, batches: list[dict]) -> tuple[float, dict, float]:
    """(mean loss, gradient by name, gradient norm) of one process over the micro-batches."""
    from megacore.parallel.pipeline import default_output_loss

    loss = sum(default_output_loss(model(**b), b) for b in batches) / len(batches)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))
    return float(loss), grads, norm


def _check_checkpoint(model, directory: str, owners: dict) -> None:
    """Saves the stage; every parameter is written once, by its owner's stage, and a differently drawn model cut
    alike loads every parameter it holds, tied copies included (from their owner's file)."""
    from megacore.training.checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint

    layout = model.pipeline
    path = save_checkpoint(directory, 1, model)
    saved = read_checkpoint_meta(path)["parameters"]
    assert saved.keys() == set(owners), set(owners) ^ saved.keys()
    assert all(saved[name]["stage"] == stage for name, stage in owners.items())
    config = model.config
    other = pipeline.cut_stage(_t5(config.num_layers, config.num_decoder_layers, config.tie_word_embeddings, seed=1),
                               virtual_size=layout.virtual_size)
    load_checkpoint(path, other, restore_rng=False)
    mine = dict(model.named_parameters())
    for name, p in other.named_parameters():
        torch.testing.assert_close(p, mine[name], rtol=0, atol=0, msg=lambda m: f"rank {layout.rank}: {name}: {m}")


def _check_layout(rank, world, tp, pp, vp, encoder_layers, decoder_layers, sequence_parallel, checkpoint_dir=None):
    from megacore.parallel import initialize_model_parallel, sum_sequence_parallel_gradients
    from megacore.parallel.sharding import gather_full, param_shards
    from megacore.training.optim import clip_grad_norm

    s = initialize_model_parallel(tp, pp)
    batches = _batches()
    for tied in (True, False):
        ref_loss, ref_grads, ref_norm = _reference(_t5(encoder_layers, decoder_layers, tied), batches)
        model = _t5(encoder_layers, decoder_layers, tied, tensor_parallel=tp > 1, sequence_parallel=sequence_parallel)
        model = pipeline.cut_stage(model, virtual_size=vp)
        losses = pipeline.forward_backward(model, batches, lambda loss: loss / len(batches))
        pipeline.sync_tied_gradients(model)
        sum_sequence_parallel_gradients(model)
        loss = pipeline.pipeline_loss(losses, len(batches), torch.device("cpu"))
        what = f"rank {rank}, {'T5' if tied else 'T5 v1.1'}"
        torch.testing.assert_close(loss, torch.tensor(ref_loss), rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")
        held = []
        for info in param_shards(model, tp):
            assert info.param.grad is not None, f"{what}: {info.name} has no gradient"
            full = gather_full(info, info.param.grad, s.tensor_parallel_group)
            torch.testing.assert_close(full, ref_grads[info.name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{what}: gradient of {info.name}: {m}")
            held.append(info.name)
        every = [None] * pp
        dist.all_gather_object(every, held, group=s.pipeline_parallel_group)
        assert set().union(*every) == set(ref_grads), f"{what}: no stage holds {set(ref_grads) - set().union(*every)}"
        norm = clip_grad_norm(model, float("inf"))  # a tied copy counts once, on its owner's stage
        torch.testing.assert_close(norm.double(), torch.tensor(ref_norm, dtype=torch.float64), rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{what}: gradient norm: {m}")
        if checkpoint_dir is not None and tied:
            owners = [None] * pp
            dist.all_gather_object(owners, {info.name: info.stage for info in param_shards(model, tp)},
                                   group=s.pipeline_parallel_group)
            _check_checkpoint(model, checkpoint_dir, {k: v for stage in owners for k, v in stage.items()})


LAYOUTS = {  # name: (world, tp, pp, vp, encoder layers, decoder layers, sequence parallel)
    "pp2_split_at_the_encoder_decoder_boundary": (2, 1, 2, 1, 2, 2, False),
    "pp2_split_inside_the_encoder": (2, 1, 2, 1, 3, 1, False),  # stage 1: the encoder's end and the decoder's start
    # (a split inside the decoder, the memory crossing with the decoder's state: pp4's stages 2 | 3)
    "pp4_one_layer_per_stage": (4, 1, 4, 1, 2, 2, False),
    "pp2_interleaved_2_chunks": (2, 1, 2, 2, 2, 2, False),
    "tp2_pp2_sequence_parallel": (4, 2, 2, 1, 2, 2, True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_t5_and_v1_1_pipelines_equal_one_process(name, tmp_path):
    world, *layout = LAYOUTS[name]
    # PP 4 (the decoder's bias table owned by stage 2, the word embedding tied over stages 0, 2 and 3) also saves a
    # checkpoint and loads it into a differently drawn model
    checkpoint_dir = str(tmp_path) if name == "pp4_one_layer_per_stage" else None
    run_distributed(_check_layout, world, *layout, checkpoint_dir, timeout_s=240)
