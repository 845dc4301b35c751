"""Sequence-to-sequence decoding from a T5Model: greedy and beam search, with the decoder's KV cache.

The encoder runs once. The decoder starts from ``decoder_start_token_id`` and runs one new token per step for
every live sequence (``T5Model.forward_with_cache``, through the C++ layers' decoding op); the memory's keys and
values are computed on the first step, for each source row once, and copied to its beams by
``KVCache.reorder``. A finished row leaves the batch (its cache rows are dropped); decoding ends when no row is
left or after ``max_new_tokens`` tokens.

Beam search is transformers' (``GenerationMixin._beam_search``, 5.x), step for step, so a converted model
returns the tokens ``T5ForConditionalGeneration.generate(num_beams=..., do_sample=False)`` does:

- each step keeps the ``2 * num_beams`` best continuations of all beams by summed log-probability; those ending
  in ``eos_token_id`` (or reaching ``max_new_tokens``) among the first ``num_beams`` are offered to the row's
  finished hypotheses, scored ``sum of log-probs / length ** length_penalty`` (the length counts the new tokens,
  eos included); the ``num_beams`` best that did not finish go on;
- a row is done when it holds ``num_beams`` finished hypotheses and either ``early_stopping`` is True, or the
  best running beam's score over its current length no longer beats the worst finished one (transformers'
  heuristic for ``early_stopping=False``); its best finished hypothesis is the answer;
- transformers' constants are kept (``-1e9`` for the beams that may not be chosen), so near-ties break the same
  way.

Tensor parallelism: every rank runs the model (heads sharded, logits gathered over the vocab); the choices of
tensor-parallel rank 0 (the greedy tokens; the beams' kept continuations and their scores) are broadcast, so
every rank decodes the same tokens.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

_NAME = "megacore.training.generate_seq2seq"
_NEG = -1.0e9  # transformers' score for a beam that may not be chosen (not -inf: sums stay ordered)


def _check_model(model) -> None:
    if not all(hasattr(model, a) for a in ("encode", "new_cache", "forward_with_cache", "decoder_start_token_id")):
        raise TypeError(f"{_NAME}: model must be a megacore T5Model (an encoder-decoder), got {type(model).__name__}")


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_args(vocab_size: int, max_new_tokens, num_beams, length_penalty, early_stopping, eos_token_id,
                min_new_tokens) -> None:
    if not _is_int(max_new_tokens, 0):
        raise ValueError(f"{_NAME}: max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if not _is_int(num_beams, 1):
        raise ValueError(f"{_NAME}: num_beams={num_beams!r} must be an int >= 1 (1 = greedy)")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not math.isfinite(length_penalty):
        raise ValueError(f"{_NAME}: length_penalty={length_penalty!r} must be a finite number")
    if not isinstance(early_stopping, bool):
        raise ValueError(f"{_NAME}: early_stopping={early_stopping!r} must be True or False")
    if eos_token_id is not None and not (_is_int(eos_token_id, 0) and eos_token_id < vocab_size):
        raise ValueError(f"{_NAME}: eos_token_id={eos_token_id!r} must be None or an id in [0, {vocab_size})")
    if not _is_int(min_new_tokens, 0) or min_new_tokens > max_new_tokens:
        raise ValueError(f"{_NAME}: min_new_tokens={min_new_tokens!r} must be an int in [0, max_new_tokens="
                         f"{max_new_tokens}]")


def _check_inputs(input_ids, attention_mask, vocab_size: int, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(input_ids ``[b, s]`` int64, attention_mask ``[b, s]`` int64 or None), on ``device``."""
    try:
        ids = torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{_NAME}: input_ids must be an int tensor or equal-length lists of ints ({e})") from None
    if ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{_NAME}: input_ids has shape {list(ids.shape)} and dtype {ids.dtype}, expected a "
                         "non-empty integer [batch, source_len]")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{_NAME}: input_ids hold {lo if lo < 0 else hi}, outside [0, vocab_size={vocab_size})")
    mask = None
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"{_NAME}: attention_mask has shape {list(mask.shape)}, expected {list(ids.shape)} "
                             "(input_ids' shape; 1 = token, 0 = padding)")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{_NAME}: attention_mask must hold only 1 (token) and 0 (padding)")
        empty = (mask == 0).all(1).nonzero()[:, 0].tolist()
        if empty:
            raise ValueError(f"{_NAME}: attention_mask rows {empty} are all padding: every source needs a token")
        mask = mask.to(device=device, dtype=torch.int64)
    return ids.to(device=device, dtype=torch.int64), mask


class _TensorParallelChoice:
    """Broadcasts tensor-parallel rank 0's choices to the group's ranks (nothing without a group)."""

    def __init__(self, group):
        self.group = group
        self.src = dist.get_global_rank(group, 0) if group is not None else None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.broadcast(t, self.src, group=self.group)
        return t


def generate_seq2seq(
    model,
    input_ids: Union[torch.Tensor, Sequence[Sequence[int]]],
    attention_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    eos_token_id: Optional[int] = None,
    min_new_tokens: int = 0,
) -> list[list[int]]:
    """Decodes a target sequence for each source row: greedy (``num_beams=1``) or beam search.

    Args:
        model: a megacore T5Model, whole or tensor-parallel (its dropout is never applied; its training flag is
            restored on return).
        input_ids: the sources, int ``[b, s]`` (a tensor or a list of equal-length lists).
        attention_mask: ``[b, s]``, 1 for tokens and 0 for padding (rows of different lengths); None: no padding.
        max_new_tokens: tokens to produce at most per row (0: empty lists, nothing run).
        num_beams: 1: the argmax at each step; more: beam search with that many beams, as transformers'.
        length_penalty: beam search: a finished hypothesis scores ``sum of log-probs / length ** length_penalty``
            (> 0 favours longer ones, < 0 shorter ones).
        early_stopping: beam search: a row is done as soon as it has ``num_beams`` finished hypotheses; False:
            also while its best running beam could still win by transformers' heuristic (its current summed
            log-prob over the current length beats the worst finished score).
        eos_token_id: a row's sequence ends when it produces this id; None: every row runs ``max_new_tokens``.
        min_new_tokens: ``eos_token_id`` is forbidden for the first ``min_new_tokens`` tokens (its
            log-probability is -inf, as transformers' MinNewTokensLengthLogitsProcessor).

    Returns, for each source row, the generated ids as a list of ints: without the decoder start token and
    without the final eos (a row that reached ``max_new_tokens`` has no eos). Under tensor parallelism every
    rank must call it with the same arguments, and every rank returns the same tokens (tensor-parallel rank 0's
    choices are broadcast).

    Raises TypeError for a model that is not an encoder-decoder, ValueError for bad arguments (each naming it).
    """
    _check_model(model)
    word = model.word
    _check_args(word.vocab_size, max_new_tokens, num_beams, length_penalty, early_stopping, eos_token_id,
                min_new_tokens)
    ids, mask = _check_inputs(input_ids, attention_mask, word.vocab_size, word.weight.device)
    batch, source_len = ids.shape
    if max_new_tokens == 0:
        return [[] for _ in range(batch)]
    choice = _TensorParallelChoice(word.group)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            memory = model.encode(ids, mask)  # [s(/tp), b, h]
        cache = model.new_cache(batch, max_new_tokens, source_len)  # the last token is never fed back
        start = ids.new_full((batch, 1), model.decoder_start_token_id)
        logits = model.forward_with_cache(start, cache, memory, mask)  # [b, vocab] fp32
        if num_beams == 1:
            return _greedy(model, cache, logits, mask, max_new_tokens, eos_token_id, min_new_tokens, choice)
        return _beam_search(model, cache, logits, mask, max_new_tokens, num_beams, length_penalty, early_stopping,
                            eos_token_id, min_new_tokens, choice)
    finally:
        model.train(training)


def _forbid_eos(scores: torch.Tensor, step: int, eos_token_id: Optional[int], min_new_tokens: int) -> torch.Tensor:
    if eos_token_id is not None and step < min_new_tokens:
        scores[:, eos_token_id] = -math.inf
    return scores


def _greedy(model, cache, logits, mask, max_new_tokens, eos_token_id, min_new_tokens, choice) -> list[list[int]]:
    out = [[] for _ in range(logits.shape[0])]
    rows = list(range(logits.shape[0]))  # the source row of each live row
    for step in range(max_new_tokens):
        token = choice(_forbid_eos(logits, step, eos_token_id, min_new_tokens).argmax(-1))  # [live]
        live = []
        for i, (row, t) in enumerate(zip(rows, token.tolist())):
            if t != eos_token_id:
                out[row].append(t)
                live.append(i)
        if not live or step == max_new_tokens - 1:
            break
        if len(live) < len(rows):  # finished rows leave the batch
            keep = torch.tensor(live, device=token.device)
            cache.reorder(keep)
            rows, token = [rows[i] for i in live], token[keep]
            mask = mask[keep] if mask is not None else None
        logits = model.forward_with_cache(token[:, None], cache, attention_mask=mask)
    return out


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t [rows, n, ...]`` at ``index [rows, k]`` along dim 1 -> ``[rows, k, ...]``."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], index]


def _beam_search(model, cache, logits, mask, max_new_tokens, num_beams, length_penalty, early_stopping,
                 eos_token_id, min_new_tokens, choice) -> list[list[int]]:
    rows, vocab = logits.shape
    beams, keep_k, steps = num_beams, 2 * num_beams, max_new_tokens
    device = logits.device
    out: list[list[int]] = [[] for _ in range(rows)]
    # the state of each live row (R of them), beams sorted best first, as in transformers
    state = dict(
        source=torch.arange(rows, device=device),  # [R] the source row
        running=torch.zeros(rows, beams, steps, dtype=torch.int64, device=device),  # [R, beams, steps] new tokens
        # only the first beam is real at the start: the others are its copies, kept out of the first choice
        running_scores=torch.tensor([0.0] + [_NEG] * (beams - 1), device=device).repeat(rows, 1),  # [R, beams]
        finished=torch.zeros(rows, beams, steps, dtype=torch.int64, device=device),
        finished_scores=torch.full((rows, beams), _NEG, device=device),
        finished_lengths=torch.zeros(rows, beams, dtype=torch.int64, device=device),
        is_finished=torch.zeros(rows, beams, dtype=torch.bool, device=device),
    )
    offered = torch.arange(keep_k, device=device) < beams  # only the first `beams` continuations may finish
    log_probs = F.log_softmax(logits, -1)[:, None].expand(rows, beams, vocab)  # the first step: every beam alike
    beam_mask = None
    for step in range(steps):
        s = state
        r = s["source"].shape[0]
        log_probs = _forbid_eos(log_probs.reshape(r * beams, vocab), step, eos_token_id, min_new_tokens)
        scores = (log_probs.view(r, beams, vocab) + s["running_scores"][:, :, None]).view(r, beams * vocab)
        top_scores, top = torch.topk(scores, keep_k)  # [R, 2 * beams]
        # one broadcast: float32 scores and int64 indices < 2**53 are both exact in float64
        packed = choice(torch.cat([top_scores.double(), top.double()], 1))
        top_scores, top = packed[:, :keep_k].float(), packed[:, keep_k:].long()
        parent, token = top // vocab, top % vocab
        candidates = _take(s["running"], parent)  # [R, 2 * beams, steps]
        candidates[:, :, step] = token
        ends = torch.full_like(token, step == steps - 1, dtype=torch.bool)
        if eos_token_id is not None:
            ends |= token == eos_token_id

        # the best `beams` continuations that did not end run on
        running_scores = top_scores + ends.float() * _NEG
        keep = torch.topk(running_scores, beams).indices  # [R, beams]
        s["running"], s["running_scores"] = _take(candidates, keep), _take(running_scores, keep)
        parent = _take(parent, keep)

        # the ended ones among the first `beams` join the finished hypotheses if they are among the best
        # (transformers also bars done rows from changing here: they have left the batch)
        new = top_scores / ((step + 1) ** length_penalty)
        just_finished = ends & offered
        new += (~just_finished) * _NEG
        lengths = torch.full_like(token, step + 1)
        scores = torch.cat([s["finished_scores"], new], 1)
        best = torch.topk(scores, beams).indices
        s["finished"] = _take(torch.cat([s["finished"], candidates], 1), best)
        s["finished_scores"] = _take(scores, best)
        s["finished_lengths"] = _take(torch.cat([s["finished_lengths"], lengths], 1), best)
        s["is_finished"] = _take(torch.cat([s["is_finished"], just_finished], 1), best)

        # done: no running beam can improve on the finished ones (transformers' heuristic: the best running score over
        # the current length against the worst finished score; any unfinished slot counts as -1e9), or early
        # stopping with every slot finished
        generated = step + 1
        best_running = s["running_scores"][:, :1] / (generated ** length_penalty)
        worst_finished = torch.where(s["is_finished"], s["finished_scores"].min(1, keepdim=True).values, _NEG)
        done = ~(best_running > worst_finished).any(-1)
        if early_stopping:
            done |= s["is_finished"].all(-1)
        if generated == steps:
            done[:] = True
        for i in done.nonzero()[:, 0].tolist():  # a done row's best hypothesis no longer changes
            tokens = s["finished"][i, 0, :int(s["finished_lengths"][i, 0])].tolist()
            out[int(s["source"][i])] = tokens[:-1] if tokens and tokens[-1] == eos_token_id else tokens
        if bool(done.all()):
            break

        # the cache follows each kept beam's parent (on the first step, the row's one copy); done rows leave
        if step == 0:
            index = torch.arange(r, device=device)[:, None].expand(r, beams)
        else:
            index = torch.arange(r, device=device)[:, None] * beams + parent  # [R, beams]
        live = (~done).nonzero()[:, 0]
        if live.numel() < r:
            state = {k: v[live] for k, v in s.items()}
            index = index[live]
        cache.reorder(index.reshape(-1), memory=step == 0 or live.numel() < r)
        if mask is not None and (step == 0 or live.numel() < r):
            beam_mask = mask[state["source"]].repeat_interleave(beams, 0)  # [R * beams, s]
        tokens = state["running"][:, :, step].reshape(-1, 1)  # [R * beams, 1] the newest tokens
        logits = model.forward_with_cache(tokens, cache, attention_mask=beam_mask)
        log_probs = F.log_softmax(logits, -1)
    return out


__all__ = ["generate_seq2seq"]
