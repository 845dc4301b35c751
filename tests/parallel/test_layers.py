"""Tensor-parallel layers and the vocab-parallel cross-entropy vs their unpartitioned references.

Each spawned run (one per world size, all checks grouped to pay the process start-up once) builds a
layer at TP=world from a seed, rebuilds the full weight with ``merge_weights`` of every rank's shard,
and compares outputs and gradients (input, merged weight shards) with plain torch on the full weight.
The full weight must also equal the documented master init: ``normal(0, 0.02)`` drawn from the seed.
"""

import pytest
import torch
import torch.nn.functional as F

from megacore.parallel.placement import placement_of
from tests.parallel.utils import gather_shards, run_distributed

TOL = dict(rtol=1e-5, atol=1e-6)




def _seeded(seed, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _check_layers(rank, world):
    from megacore import ops
    from megacore.parallel import destroy_model_parallel, get_tensor_parallel_group, initialize_model_parallel
    from megacore.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megacore.parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, merge_weights, split_weight)

    initialize_model_parallel(world)
    group = get_tensor_parallel_group()
    merged = lambda t, dim: merge_weights(gather_shards(t, group, world), dim)  # noqa: E731

    # ColumnParallelLinear(gather_output=True): [3, 5, 6] -> [3, 5, 8].
    torch.manual_seed(7)
    col = ColumnParallelLinear(6, 8, gather_output=True)
    assert col.weight.shape == (8 // world, 6) and placement_of(col, "weight").dim == 0
    torch.manual_seed(7)
    w = torch.empty(8, 6).normal_(0.0, 0.02)
    torch.testing.assert_close(merged(col.weight.detach(), 0), w, rtol=0, atol=0)
    with torch.no_grad():
        col.bias.copy_(split_weight(_seeded(1, 8), 0, rank, world))  # a non-zero bias to check its sharding
    x = _seeded(2, 3, 5, 6).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    wr, br = w.clone().requires_grad_(), _seeded(1, 8).requires_grad_()
    g = _seeded(3, 3, 5, 8)
    y = col(x)
    yr = F.linear(xr, wr, br)
    torch.testing.assert_close(y, yr, **TOL)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(merged(col.weight.grad, 0), wr.grad, **TOL)
    torch.testing.assert_close(merged(col.bias.grad, 0), br.grad, **TOL)

    # MLP: ColumnParallelLinear(gather_output=False) -> gelu -> RowParallelLinear(input_is_parallel=True).
    torch.manual_seed(11)
    fc1 = ColumnParallelLinear(6, 12, gather_output=False)
    fc2 = RowParallelLinear(12, 6, input_is_parallel=True)
    assert fc2.weight.shape == (6, 12 // world) and placement_of(fc2, "weight").dim == 1
    torch.manual_seed(11)
    w1, w2 = torch.empty(12, 6).normal_(0.0, 0.02), torch.empty(6, 12).normal_(0.0, 0.02)
    torch.testing.assert_close(merged(fc1.weight.detach(), 0), w1, rtol=0, atol=0)
    torch.testing.assert_close(merged(fc2.weight.detach(), 1), w2, rtol=0, atol=0)
    with torch.no_grad():
        fc2.bias.copy_(_seeded(4, 6))
    w1r, w2r, b2r = w1.clone().requires_grad_(), w2.clone().requires_grad_(), _seeded(4, 6).requires_grad_()
    b1r = torch.zeros(12, requires_grad=True)
    x = (_seeded(5, 4, 6) * 10).requires_grad_()  # larger inputs: gelu far from linear
    xr = x.detach().clone().requires_grad_()
    g = _seeded(6, 4, 6)
    h = fc1(x)
    assert h.shape == (4, 12 // world)
    y = fc2(F.gelu(h))
    yr = F.linear(F.gelu(F.linear(xr, w1r, b1r)), w2r, b2r)
    torch.testing.assert_close(y, yr, **TOL)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(merged(fc1.weight.grad, 0), w1r.grad, **TOL)
    torch.testing.assert_close(merged(fc1.bias.grad, 0), b1r.grad, **TOL)
    torch.testing.assert_close(merged(fc2.weight.grad, 1), w2r.grad, **TOL)
    torch.testing.assert_close(fc2.bias.grad, b2r.grad, **TOL)  # replicated: the full gradient on every rank

    # RowParallelLinear(input_is_parallel=False, bias=False): the full input is scattered first.
    torch.manual_seed(13)
    row = RowParallelLinear(8, 3, bias=False, input_is_parallel=False)
    torch.manual_seed(13)
    w = torch.empty(3, 8).normal_(0.0, 0.02)
    wr = w.clone().requires_grad_()
    x = _seeded(7, 2, 8).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y, yr = row(x), F.linear(xr, wr)
    torch.testing.assert_close(y, yr, **TOL)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL)
    torch.testing.assert_close(merged(row.weight.grad, 1), wr.grad, **TOL)

    # VocabParallelEmbedding: vocab 10 padded to a multiple of world (12 at TP 4: shards of 3), ids at
    # every shard border, repeated ids (gradient accumulation).
    torch.manual_seed(17)
    emb = VocabParallelEmbedding(10, 5)
    padded = -(-10 // world) * world
    per = padded // world
    assert emb.weight.shape == (per, 5) and (emb.vocab_start, emb.vocab_end) == (rank * per, (rank + 1) * per)
    torch.manual_seed(17)
    w = torch.empty(10, 5).normal_(0.0, 0.02)
    full = merged(emb.weight.detach(), 0)
    torch.testing.assert_close(full[:10], w, rtol=0, atol=0)
    assert not full[10:].any()
    borders = sorted({b for s in range(0, padded, per) for b in (s - 1, s, s + per - 1) if 0 <= b < 10})
    ids = torch.tensor(borders + [9, 0, 4, 4, 1, 2, 7, 8][: 8 - len(borders) % 2]).reshape(2, -1)  # [2, n]
    wr = w.clone().requires_grad_()
    g = _seeded(8, *ids.shape, 5)
    y, yr = emb(ids), F.embedding(ids, wr)
    torch.testing.assert_close(y, yr, rtol=0, atol=0)
    (y * g).sum().backward()
    (yr * g).sum().backward()
    gfull = merged(emb.weight.grad, 0)
    torch.testing.assert_close(gfull[:10], wr.grad, **TOL)
    assert not gfull[10:].any()
    with pytest.raises(ValueError, match=r"VocabParallelEmbedding: ids hold 10, outside \[0, num_embeddings=10\)"):
        emb(torch.tensor([3, 10]))

    # vocab_parallel_cross_entropy == megacore.ops.cross_entropy on the full logits, with ignored tokens.
    for dtype, tol in [(torch.float32, TOL), (torch.float64, dict(rtol=1e-12, atol=1e-12))]:
        vocab, tokens = 12, 9
        logits = _seeded(9, tokens, vocab, dtype=dtype) * 4
        target = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(10))
        target[[1, 5]] = -100
        target[2], target[3] = 0, vocab - 1
        shard = split_weight(logits, 1, rank, world).requires_grad_()
        full = logits.clone().requires_grad_()
        g = _seeded(11, tokens, dtype=torch.float64).to(dtype)
        loss = vocab_parallel_cross_entropy(shard, target)
        ref = ops.cross_entropy(full, target)
        assert loss.dtype == ref.dtype and loss.shape == (tokens,)
        torch.testing.assert_close(loss, ref, **tol)
        assert loss[1] == 0 and loss[5] == 0
        (loss * g).sum().backward()
        (ref * g).sum().backward()
        torch.testing.assert_close(shard.grad, split_weight(full.grad, 1, rank, world), **tol)
        assert not shard.grad[[1, 5]].any()

    # Errors: sizes not divisible by the tensor-parallel size.
    if world > 1:
        with pytest.raises(ValueError, match=f"ColumnParallelLinear: out_features={world + 1} is not divisible "
                                             f"by the tensor-parallel size {world}"):
            ColumnParallelLinear(4, world + 1)
        with pytest.raises(ValueError, match=f"RowParallelLinear: in_features={world + 1} is not divisible "
                                             f"by the tensor-parallel size {world}"):
            RowParallelLinear(world + 1, 4)
    destroy_model_parallel()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_layers_match_unpartitioned(world):
    run_distributed(_check_layers, world, timeout_s=180)


def test_layers_before_initialize_model_parallel():
    from megacore.parallel import model_parallel_is_initialized
    from megacore.parallel.cross_entropy import vocab_parallel_cross_entropy
    from megacore.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    assert not model_parallel_is_initialized()
    for make, name in [(lambda: ColumnParallelLinear(4, 4), "ColumnParallelLinear"),
                       (lambda: RowParallelLinear(4, 4), "RowParallelLinear"),
                       (lambda: VocabParallelEmbedding(10, 4), "VocabParallelEmbedding")]:
        with pytest.raises(RuntimeError, match=f"megacore.parallel.{name}: model parallel is not initialized; "
                                               "call megacore.parallel.initialize_model_parallel first"):
            make()
    with pytest.raises(RuntimeError, match="model parallel is not initialized"):
        vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


def test_shard_arithmetic():
    from megacore import _C
    from megacore.parallel.layers import merge_weights, split_weight

    assert _C.divide(12, 4) == 3 and _C.divide(0, 3) == 0
    assert [_C.pad_to_multiple(n, 4) for n in (0, 1, 4, 10, 12)] == [0, 4, 4, 12, 12]
    assert _C.pad_to_multiple(7, 1) == 7
    assert [_C.shard_range(12, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert _C.shard_range(5, 0, 1) == (0, 5)
    assert [_C.vocab_range(12, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    for call, msg in [
        (lambda: _C.divide(10, 4), "megacore.divide: n=10 is not divisible by parts=4"),
        (lambda: _C.divide(10, 0), "megacore.divide: parts=0 must be >= 1"),
        (lambda: _C.pad_to_multiple(10, 0), "megacore.pad_to_multiple: k=0 must be >= 1"),
        (lambda: _C.pad_to_multiple(-1, 2), "megacore.pad_to_multiple: n=-1 must be >= 0"),
        (lambda: _C.shard_range(10, 0, 4), "megacore.shard_range: size=10 is not divisible by world_size=4"),
        (lambda: _C.shard_range(12, 4, 4), r"megacore.shard_range: rank=4 is not in \[0, world_size=4\)"),
        (lambda: _C.shard_range(12, 0, 0), "megacore.shard_range: world_size=0 must be >= 1"),
        (lambda: _C.vocab_range(10, 1, 4), "megacore.vocab_range: padded_vocab=10 is not divisible by world_size=4"),
    ]:
        with pytest.raises(ValueError, match=msg):
            call()
    w = torch.arange(24.0).reshape(4, 6)
    for dim in (0, 1):
        shards = [split_weight(w, dim, r, 2) for r in range(2)]
        assert shards[1].is_contiguous() and shards[0].shape[dim] == w.shape[dim] // 2
        assert torch.equal(merge_weights(shards, dim), w)
    with pytest.raises(ValueError, match="size=6 is not divisible by world_size=4"):
        split_weight(w, 1, 0, 4)
