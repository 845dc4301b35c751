"""T5's relative-position bias (megacore.models.position_bias) against transformers' T5Attention, which defines it
for the checkpoints megacore converts; tensor parallelism against one process."""

import pytest
import torch

from megacore.models.position_bias import RelativePositionBias, relative_position_buckets
from tests.parallel.utils import run_distributed

transformers = pytest.importorskip("transformers")
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 40), (8, 9), (4, 1000)])
def test_buckets_are_t5s(bidirectional, num_buckets, max_distance):
    """Every distance from -600 to 600 (beyond max_distance on both sides), queries offset as in decoding."""
    for q_len, k_len, start in [(1, 1, 0), (37, 37, 0), (1, 601, 600), (5, 300, 295), (600, 601, 1)]:
        ours = relative_position_buckets(q_len, k_len, bidirectional, num_buckets, max_distance, query_start=start)
        relative = torch.arange(k_len)[None, :] - torch.arange(start, start + q_len)[:, None]
        theirs = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
        assert torch.equal(ours, theirs), (q_len, k_len, start)
        assert int(ours.min()) >= 0 and int(ours.max()) < num_buckets


def test_the_layout_of_the_buckets():
    """Bidirectional, 32 buckets: keys before the query in 0-15, after it in 16-31; exact up to distance 7."""
    b = relative_position_buckets(1, 200, True, 32, 128, query_start=100)[0]  # key - query = -100 .. 99
    assert b[100].item() == 0 and b[99].item() == 1 and b[93].item() == 7  # distances 0, 1, 7 before
    assert b[101].item() == 17 and b[107].item() == 23  # 1 and 7 after: offset by 16
    assert b[0].item() == b[1].item() == 15  # 100 and 99 before: the last bin (8 + int(8 log(d/8) / log 16))
    causal = relative_position_buckets(1, 10, False, 32, 128, query_start=4)[0]
    assert causal.tolist() == [4, 3, 2, 1, 0, 0, 0, 0, 0, 0]  # keys after the query share bucket 0


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bias_equals_transformers_compute_bias(bidirectional):
    from transformers import T5Config

    torch.manual_seed(0)
    config = T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=16,
                      relative_attention_max_distance=64, is_decoder=not bidirectional)
    hf = T5Attention(config, has_relative_attention_bias=True)
    ours = RelativePositionBias(4, bidirectional, num_buckets=16, max_distance=64)
    with torch.no_grad():
        ours.weight.copy_(hf.relative_attention_bias.weight)
    for q, k, start in [(9, 9, 0), (1, 12, 11), (3, 20, 17)]:
        expected = hf.compute_bias(q, k, past_seen_tokens=start) if start else hf.compute_bias(q, k)
        torch.testing.assert_close(ours(q, k, query_start=start), expected, rtol=0, atol=0)


def test_gradient_reaches_the_table_and_dtype_follows_it():
    bias = RelativePositionBias(2, True, num_buckets=8, max_distance=20, params_dtype=torch.bfloat16)
    out = bias(5, 5)
    assert out.shape == (1, 2, 5, 5) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    # each of the 25 (query, key) pairs adds 1 to its bucket's row, for both heads
    counts = torch.bincount(relative_position_buckets(5, 5, True, 8, 20).flatten(), minlength=8).float()
    torch.testing.assert_close(bias.weight.grad.float(), counts[:, None].expand(8, 2))


@pytest.mark.parametrize("kw, text", [
    (dict(num_heads=0), "num_heads=0 must be an int >= 1"),
    (dict(num_buckets=2), "num_buckets=2 must be >= 4"),
    (dict(max_distance=4), "max_distance=4 must exceed the exact buckets"),
])
def test_bad_arguments(kw, text):
    args = dict(num_heads=4, bidirectional=True, num_buckets=32, max_distance=128)
    args.update(kw)
    with pytest.raises(ValueError, match=text):
        RelativePositionBias(**args)


def _tensor_parallel_check(rank, world):
    from megacore.parallel import initialize_model_parallel

    initialize_model_parallel(world)
    torch.manual_seed(0)
    whole = RelativePositionBias(4, False, num_buckets=16, max_distance=32)
    torch.manual_seed(0)
    part = RelativePositionBias(4, False, num_buckets=16, max_distance=32, tensor_parallel=True)
    heads = 4 // world
    assert part.weight.shape == (16, heads)
    torch.testing.assert_close(part(6, 6), whole(6, 6)[:, rank * heads:(rank + 1) * heads], rtol=0, atol=0)


@pytest.mark.parametrize("world", [2])
def test_tensor_parallel_ranks_hold_their_heads(world):
    run_distributed(_tensor_parallel_check, world)
