"""Fused softmax cross-entropy, and its vocab-parallel pieces."""

from __future__ import annotations

import torch

from megacore.ops._common import acc_dtype

_lib = torch.ops.megacore


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-token ``logsumexp(logits) - logits[target]``, fused.

    Forward is one pass per row (online max and sum of exponentials); only the row's logsumexp
    (one float per token) is kept for backward, which recomputes the softmax from the logits: no
    full-size probability tensor is stored. Tokens whose target is ``ignore_index`` get loss 0 and
    gradient 0.

    Args:
        logits: ``[tokens, vocab]`` (or ``[..., vocab]``), float dtypes.
        target: ``[tokens]`` (logits' leading shape), int64 or int32, each in ``[0, vocab)`` or
            ``ignore_index``.

    Returns:
        ``[tokens]`` (logits' leading shape), float32 (float64 for float64 logits).

    Raises:
        ValueError: shape mismatch, a target out of range. On CUDA the range check is done by the
            kernel and read back as one flag (a host sync per call); during CUDA graph capture it is
            skipped and an out-of-range target gets loss 0.
        TypeError: non-float logits, non-integer target.
    """
    loss, _ = _lib.cross_entropy(logits, target, int(ignore_index))
    return loss


def vocab_parallel_cross_entropy_stats(
    logits: torch.Tensor, target: torch.Tensor, vocab_start: int, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over a vocab shard: ``(local_max, local_sum_exp, target_logit)``, each ``[tokens]`` fp32.

    ``logits`` holds vocab ids ``[vocab_start, vocab_start + vocab_local)``; ``target`` holds global ids.
    ``local_sum_exp`` is relative to ``local_max``; ``target_logit`` is the target's logit where it
    falls in this shard, else 0. A tensor-parallel loss all-reduces them: global max (MAX), then
    ``sum(local_sum_exp * exp(local_max - global_max))`` and ``target_logit`` (SUM); its backward is
    :func:`cross_entropy_backward` with the global logsumexp.
    """
    return _lib.vocab_parallel_cross_entropy_stats(logits, target, int(vocab_start), int(ignore_index))


def cross_entropy_backward(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    vocab_start: int = 0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """``grad_loss * (exp(logits - lse) - onehot(target - vocab_start))``, 0 for ignored tokens."""
    return _lib.cross_entropy_backward(grad_loss, logits, target, lse, int(vocab_start), int(ignore_index))


@torch.library.register_fake("megacore::cross_entropy")
def _cross_entropy_fake(logits, target, ignore_index=-100):
    loss = logits.new_empty(logits.shape[:-1], dtype=acc_dtype(logits.dtype))
    return loss, torch.empty_like(loss)


@torch.library.register_fake("megacore::cross_entropy_backward")
def _cross_entropy_backward_fake(grad_loss, logits, target, lse, vocab_start, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("megacore::vocab_parallel_cross_entropy_stats")
def _stats_fake(logits, target, vocab_start, ignore_index):
    stat = logits.new_empty(logits.shape[:-1], dtype=acc_dtype(logits.dtype))
    return stat, torch.empty_like(stat), torch.empty_like(stat)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(logits, target, lse)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad_loss, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    grad = _lib.cross_entropy_backward(grad_loss, logits, target, lse, 0, ctx.ignore_index)
    return grad, None, None


torch.library.register_autograd("megacore::cross_entropy", _backward, setup_context=_setup_context)
