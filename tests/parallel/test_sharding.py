"""megacore.parallel.sharding: the one layout description and gather/scatter that checkpoints and the HF
interop share. The all-gather half runs in real processes in tests/training/test_checkpoint.py (TP 2 saved,
loaded at TP 1 and 4) and tests/interop/test_hf.py (TP 2 from_hf / to_hf); here, the layout and the
scatter, which need no process group."""

from __future__ import annotations

import torch
from torch import nn

from megacore.models import build
from megacore.parallel.sharding import ParamShard, param_shards, shard_of


def _shard(shape, dim, vocab_size, world):
    return ParamShard("t", nn.Parameter(torch.zeros(shape)), dim, vocab_size, world)


def test_a_vocab_table_is_padded_then_split_and_its_full_shape_is_unpadded():
    # vocab 5 padded to 6 over 2 ranks: each rank holds 3 rows
    s = _shard((3, 4), 0, 5, 2)
    assert s.full_shape() == [5, 4]
    full = torch.arange(20.0).view(5, 4)
    top, bottom = shard_of(s, full, 0), shard_of(s, full, 1)
    assert torch.equal(top, full[:3])
    assert torch.equal(bottom[:2], full[3:]) and torch.equal(bottom[2], torch.zeros(4))  # the padding row


def test_a_column_and_a_row_shard_split_their_dim_and_a_replicated_tensor_is_whole():
    full = torch.arange(24.0).view(4, 6)
    rows = _shard((2, 6), 0, None, 2)
    cols = _shard((4, 3), 1, None, 2)
    whole = _shard((4, 6), None, None, 2)
    assert torch.equal(shard_of(rows, full, 1), full[2:])
    assert torch.equal(shard_of(cols, full, 1), full[:, 3:])
    assert torch.equal(shard_of(whole, full, 1), full)


def test_a_chunked_shard_splits_each_chunk_and_gathers_them_back_in_order():
    """A gated MLP's fc1 [gate; up] over 2 ranks: rank r holds [gate rows of r; up rows of r], and the gather of
    the ranks' pieces gives [gate; up] back (single process: the gather's merge step on both pieces)."""
    from megacore.parallel.layers import merge_weights

    full = torch.arange(16.0).view(8, 2)  # gate = rows 0-3, up = rows 4-7
    s = ParamShard("fc1", nn.Parameter(torch.zeros(4, 2)), 0, None, 2, chunks=2)
    r0, r1 = shard_of(s, full, 0), shard_of(s, full, 1)
    assert torch.equal(r0, full[[0, 1, 4, 5]]) and torch.equal(r1, full[[2, 3, 6, 7]])
    pieces = [r.chunk(2, 0) for r in (r0, r1)]
    merged = torch.cat([merge_weights([p[c] for p in pieces], 0) for c in range(2)], 0)  # as gather_full does
    assert torch.equal(merged, full)


def test_a_gated_layer_declares_its_fc1_in_two_chunks():
    from megacore.parallel.placement import placement_of
    from megacore.transformer import TransformerConfig, TransformerLayer

    layer = TransformerLayer(TransformerConfig(hidden_size=8, num_attention_heads=2, activation="swiglu"))
    assert layer.mlp.fc1.weight.shape == (64, 8) and layer.mlp.fc2.weight.shape == (8, 32)
    assert placement_of(layer.mlp.fc1, "weight").chunks == 1  # no tensor parallelism: nothing declared
    plain = TransformerLayer(TransformerConfig(hidden_size=8, num_attention_heads=2))
    assert plain.mlp.fc1.weight.shape == (32, 8)


def test_a_tensor_of_another_shape_is_refused_not_cut():
    s = _shard((3, 4), 0, 5, 2)
    assert shard_of(s, torch.zeros(6, 4), 0) is None  # the padded size is not the full shape
    assert shard_of(s, torch.zeros(5, 5), 0) is None


def test_param_shards_finds_the_vocab_tables_of_every_family_once():
    """The embedding table of every model and the masked-LM output bias are vocab tables (what the HF
    families used to list by name); a tied parameter appears once."""
    for preset, expected in [("gpt-tiny", {"embedding.word.weight"}),
                             ("bert-tiny", {"embedding.word.weight", "mlm_head.bias"}),
                             ("electra-small", {"embedding.word.weight", "generator.mlm_head.bias"})]:
        with torch.device("meta"):
            model = build(preset)
        shards = param_shards(model, 1)
        assert {s.name for s in shards if s.vocab_size is not None} == expected, preset
        assert all(s.vocab_size == model.config.vocab_size for s in shards if s.vocab_size is not None)
        assert len({id(s.param) for s in shards}) == len(shards)
        assert all(s.dim is None for s in shards)  # world 1: nothing is sharded


def test_the_plan_knows_each_parameters_stage_and_tied_copies():
    from megacore.models.registry import build
    from megacore.parallel import pipeline
    from megacore.parallel.sharding import param_shards

    tiny = dict(vocab_size=61, hidden_size=32, num_layers=4, num_attention_heads=4, max_position_embeddings=16)
    torch.manual_seed(0)
    last = pipeline.cut_stage(build("gpt-tiny", **tiny), 1, 2)
    shards = {s.name: s for s in param_shards(last, 1)}
    assert shards["embedding.word.weight"].tied_copy and shards["embedding.word.weight"].stage == 0
    assert shards["decoder.layers.3.attention.qkv.weight"].stage == 1 and not shards["final_norm.weight"].tied_copy
    assert all(s.stage == 0 and not s.tied_copy for s in param_shards(build("gpt-tiny", **tiny), 1))
