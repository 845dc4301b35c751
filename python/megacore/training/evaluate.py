"""Evaluation of causal language models: perplexity over a GPTDataset, and a LAMBADA-style last-word
accuracy over a held-out text (predict the last word of a passage from its context).
"""

from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megacore.parallel import state

_NAME = "megacore.training"

# A word that ends a sentence: letters, then (after an optional closing quote) ., ! or ?.
_SENTENCE_FINAL_WORD = re.compile(r"[A-Za-z]+(?=[\"'\u201d\u2019]?[.!?])")


def _positive_int(fn: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{_NAME}.{fn}: {name}={value!r} must be an int >= 1")


def _model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _data_parallel() -> tuple[Optional[dist.ProcessGroup], int, int]:
    """(data-parallel group or None, rank, size): batches are shared out over the data-parallel ranks."""
    if not (dist.is_available() and dist.is_initialized() and state.model_parallel_is_initialized()):
        return None, 0, 1
    size = state.get_data_parallel_world_size()
    if size == 1:
        return None, 0, 1
    return state.get_data_parallel_group(), state.get_data_parallel_rank(), size


def _inputs_and_labels(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    if "labels" in sample:
        return np.asarray(sample["tokens"]), np.asarray(sample["labels"])
    tokens = np.asarray(sample["tokens"])
    return tokens[:-1], tokens[1:]


@torch.no_grad()
def perplexity(model, dataset, batch_size: int, max_batches: Optional[int] = None) -> dict:
    """Mean per-token loss of a causal LM over ``dataset`` and its exponential.

    Args:
        model: called as ``model(input_ids [b, s], labels=labels [b, s])`` -> per-token loss ``[b, s]``
            (megacore's GPTModel; whole or tensor-parallel). Run in eval mode (its mode is restored after).
        dataset: a GPTDataset (items ``{"tokens": [s + 1]}`` or ``{"tokens": [s], "labels": [s]}``), or any
            sequence of such items; labels of -100 are not counted.
        batch_size: samples per forward.
        max_batches: evaluate only the first this many batches (None: the whole dataset).
    Under data parallelism (initialize_model_parallel with data-parallel size > 1), batch ``i`` runs on
    data-parallel rank ``i % size`` and the sums are all-reduced: every rank returns the same result.
    Returns ``{"loss": mean token loss, "perplexity": exp(loss), "tokens": tokens counted, "batches":
    batches evaluated}``. Raises ValueError for bad arguments or an empty dataset.
    """
    _positive_int("perplexity", "batch_size", batch_size)
    if max_batches is not None:
        _positive_int("perplexity", "max_batches", max_batches)
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{_NAME}.perplexity: dataset is empty")
    num_batches = -(-n // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    group, dp_rank, dp_size = _data_parallel()
    device = _model_device(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    token_count = torch.zeros((), dtype=torch.float64)
    try:
        for batch in range(dp_rank, num_batches, dp_size):
            pairs = [_inputs_and_labels(dataset[i]) for i in range(batch * batch_size, min(n, (batch + 1) * batch_size))]
            inputs = torch.as_tensor(np.stack([p[0] for p in pairs]), dtype=torch.int64, device=device)
            labels = torch.as_tensor(np.stack([p[1] for p in pairs]), dtype=torch.int64, device=device)
            loss = model(inputs, labels=labels).double()  # [b, s]
            counted = labels != -100
            loss_sum += loss.masked_fill(~counted, 0.0).sum().cpu()
            token_count += counted.sum().cpu()
    finally:
        model.train(was_training)
    if group is not None:
        totals = torch.stack([loss_sum, token_count])
        dist.all_reduce(totals, group=group)
        loss_sum, token_count = totals[0], totals[1]
    if token_count.item() == 0:
        raise ValueError(f"{_NAME}.perplexity: no token was counted (every label is -100)")
    mean = loss_sum.item() / token_count.item()
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": int(token_count.item()), "batches": num_batches}


def last_word_passages(tokenizer, text: str, num_passages: int, context_tokens: int) -> list[tuple[list[int], list[int]]]:
    """LAMBADA-style passages from ``text``: ``(context ids, target ids)`` pairs, at most ``num_passages``.

    Targets are sentence-final words (letters followed by ``.``, ``!`` or ``?``, possibly after a closing
    quote), spread evenly over the text; the context is the ``context_tokens`` tokens before the word.
    The target's tokens are those of the word with its leading whitespace (``" word"``, as byte-level BPE
    writes a word), taken only where tokenizing context + word gives the context's tokens followed by the
    target's (a word whose tokens would merge with the context is skipped), and only where the text
    before it holds at least ``context_tokens`` tokens.
    Raises ValueError for bad arguments and when the text yields no passage.
    """
    _positive_int("last_word_passages", "num_passages", num_passages)
    _positive_int("last_word_passages", "context_tokens", context_tokens)
    if not isinstance(text, str):
        raise TypeError(f"{_NAME}.last_word_passages: text must be a str, got {type(text).__name__}")
    candidates = [m.span() for m in _SENTENCE_FINAL_WORD.finditer(text)]
    stride = max(1, len(candidates) // num_passages)
    # The evenly spaced candidates first, then the ones between them, until there are enough passages.
    order = [i for offset in range(stride) for i in range(offset, len(candidates), stride)]
    passages = []
    window = 16 * context_tokens  # characters before a word: enough for context_tokens tokens in prose
    for i in order:
        if len(passages) == num_passages:
            break
        word_start, word_end = candidates[i]
        context_end = len(text[:word_start].rstrip())
        start = max(0, context_end - window)
        context = tokenizer.encode(text[start:context_end])
        whole = tokenizer.encode(text[start:word_end])
        if len(context) < context_tokens + (start > 0) or whole[:len(context)] != context:
            continue  # too little context (the window's first token may be a cut word), or tokens merge
        target = whole[len(context):]
        if target:
            passages.append((context[-context_tokens:], target))
    if not passages:
        raise ValueError(f"{_NAME}.last_word_passages: the text holds no sentence-final word with "
                         f"{context_tokens} tokens of context before it")
    return passages


@torch.no_grad()
def last_word_accuracy(model, tokenizer, text: str, num_passages: int, context_tokens: int,
                       batch_size: int = 16) -> dict:
    """LAMBADA-style accuracy: the fraction of passages (:func:`last_word_passages`) whose last word greedy
    decoding reproduces, every one of its tokens.

    Greedy decoding reproduces the target exactly when, at each target position, the argmax of the
    logits given the context and the target's earlier tokens is the target's next token: so each
    passage takes one teacher-forced forward of ``context + target`` (batched, right-padded: a causal
    model's outputs at a position do not depend on later ones).

    Args:
        model: called as ``model(input_ids [b, s])`` -> logits ``[b, s, vocab]`` (megacore's GPTModel, whole
            or tensor-parallel; run in eval mode, its mode restored after).
        tokenizer: a megacore Tokenizer (``encode``), the one the model was trained with.
        text: held-out text (e.g. a novel not in the training split).
        num_passages, context_tokens: see :func:`last_word_passages`; context + target must fit the
            model's positions.
        batch_size: passages per forward.
    Returns ``{"accuracy": correct / passages, "correct": int, "passages": int}``.
    Raises ValueError for bad arguments and too long passages.
    """
    _positive_int("last_word_accuracy", "batch_size", batch_size)
    passages = last_word_passages(tokenizer, text, num_passages, context_tokens)
    longest = max(len(c) + len(t) for c, t in passages)
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if getattr(getattr(model, "config", None), "position_embedding_type", None) == "learned_absolute" \
            and max_positions is not None and longest - 1 > max_positions:
        raise ValueError(f"{_NAME}.last_word_accuracy: context_tokens={context_tokens} plus a target word needs "
                         f"{longest - 1} positions, more than max_position_embeddings={max_positions}")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for first in range(0, len(passages), batch_size):
            chunk = passages[first:first + batch_size]
            # the model reads context + target minus its last token; position i predicts token i + 1
            sequences = [c + t[:-1] for c, t in chunk]
            length = max(len(s) for s in sequences)
            ids = torch.zeros(len(chunk), length, dtype=torch.int64)
            for row, s in enumerate(sequences):
                ids[row, :len(s)] = torch.tensor(s)
            predicted = model(ids.to(device)).argmax(-1).cpu()  # [b, length]
            for row, (context, target) in enumerate(chunk):
                span = predicted[row, len(context) - 1:len(context) - 1 + len(target)]
                correct += int(span.tolist() == target)
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(passages), "correct": correct, "passages": len(passages)}


__all__ = ["last_word_accuracy", "last_word_passages", "perplexity"]
