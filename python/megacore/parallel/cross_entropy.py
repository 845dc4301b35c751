"""Vocab-parallel cross-entropy: the loss over logits whose vocab dim is split across the tensor-parallel
group (the output of a ColumnParallelLinear LM head with ``gather_output=False``), without gathering them.

Forward: one pass over the local shard (``megacore.ops.vocab_parallel_cross_entropy_stats``) gives the
local max, the sum of exponentials relative to it and the target's logit (where this rank owns it);
three ``[tokens]`` all-reduces (MAX, then SUM of the rescaled sums and of the target logits) give
``lse = log(sum) + global_max`` and ``loss = lse - target_logit``. Backward needs only ``lse``:
``megacore.ops.cross_entropy_backward`` rebuilds the softmax of the local shard.
"""

from __future__ import annotations

import torch

from megacore import _C
from megacore.ops.cross_entropy import cross_entropy_backward, vocab_parallel_cross_entropy_stats
from megacore.parallel import state
from megacore.parallel.collectives import all_reduce


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        s = state.get_parallel_state()
        group, rank, world = s.tensor_parallel_group, s.tensor_parallel_rank, s.tensor_parallel_size
        vocab_start, _ = _C.vocab_range(logits.size(-1) * world, rank, world)
        local_max, local_sum, target_logit = vocab_parallel_cross_entropy_stats(
            logits, target, vocab_start, ignore_index)  # each [tokens], fp32 (fp64 for fp64)
        global_max = all_reduce(local_max, group, "max")
        sums = all_reduce(torch.stack([local_sum * torch.exp(local_max - global_max), target_logit]), group, "sum")
        lse = torch.log(sums[0]) + global_max
        loss = torch.where(target == ignore_index, torch.zeros_like(lse), lse - sums[1])
        ctx.save_for_backward(logits, target, lse)
        ctx.vocab_start, ctx.ignore_index = vocab_start, ignore_index
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, target, lse = ctx.saved_tensors
        grad = cross_entropy_backward(grad_loss.contiguous(), logits, target, lse, ctx.vocab_start, ctx.ignore_index)
        return grad, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token ``logsumexp(full logits) - full_logits[target]`` from this rank's vocab shard.

    Args:
        logits_shard: ``[tokens, vocab_padded / tp]`` (or ``[..., vocab_padded / tp]``): this rank's
            contiguous slice of the (padded) vocab, ids ``[rank * v, (rank + 1) * v)``.
        target: ``[tokens]`` (the logits' leading shape), global ids in ``[0, vocab)`` or ``ignore_index``.
            Targets in the padded region ``[vocab, vocab_padded)`` never occur (the data has no such ids);
            their logits still enter the softmax, so an LM head should keep them very negative or the
            caller should mask them (the padded rows of a VocabParallelEmbedding-tied head are zero).
        ignore_index: tokens with this target get loss 0 and gradient 0.

    Returns:
        ``[tokens]`` float32 (float64 for float64 logits), identical on every tensor-parallel rank.

    Raises RuntimeError before ``initialize_model_parallel``; the stats op's ValueError/TypeError for
    bad shapes, dtypes or targets.
    """
    return _VocabParallelCrossEntropy.apply(logits_shard, target, int(ignore_index))


__all__ = ["vocab_parallel_cross_entropy"]
