"""Text generation from a GPTModel with a KV cache: greedy, temperature, top-k and top-p sampling, under
tensor parallelism too, streaming each token as it is produced.

Generation runs the model's own modules (``GPTModel.forward_with_cache``): the embedding at the new positions,
each C++ TransformerLayer through its decoding op (``megacore::transformer_layer_decode``, the same block as
training: the new tokens' keys and values are written into the layer's cache and their queries attend to every
cached position), the final norm and the tied LM head. Prefill is the same call over the whole prompt.

Tensor parallelism: heads are sharded, each rank caches its own heads; the logits are gathered over the vocab,
and the token chosen on tensor-parallel rank 0 is broadcast, so every rank draws the same tokens. A
sequence-parallel model decodes without splitting the sequence (its replicated parameters are whole on every
rank).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from megacore.models.common import KVCache

_NAME = "megacore.training.generate"


def _check_model(model) -> None:
    if not hasattr(model, "forward_with_cache") or not hasattr(model, "config"):
        raise TypeError(f"{_NAME}: model must be a megacore GPTModel (a causal LM), got {type(model).__name__}")
    if model.config.attention_mask_type not in ("causal", "sliding_window"):
        raise TypeError(f"{_NAME}: model has attention_mask_type={model.config.attention_mask_type!r}; "
                        "generation needs a causal LM")


def new_cache(model, batch: int, capacity: int) -> KVCache:
    """An empty KV cache for ``model`` (a GPTModel), ``batch`` sequences of up to ``capacity`` positions."""
    _check_model(model)
    return model.new_cache(batch, capacity)


def forward_with_cache(model, ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
    """Runs ``ids [b, n]`` (the positions after the cached ones) through the model, appending their keys and
    values to ``cache``. Returns fp32 logits ``[b, vocab_size]`` of the last position, or ``[b, n,
    vocab_size]`` with ``all_logits=True`` (every rank gets the full vocabulary under tensor parallelism).
    Dropout is never applied. Raises ValueError when the cache or the position table is too short."""
    _check_model(model)
    return model.forward_with_cache(ids, cache, all_logits)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``logits [b, vocab]`` (fp32) divided by ``temperature``, with every token outside the ``top_k`` largest
    and outside the smallest set whose probability reaches ``top_p`` (nucleus) set to ``-inf``. ``top_k=0`` and
    ``top_p=1.0`` keep everything; the most likely token is always kept."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _check_args(max_new_tokens, temperature, top_k, top_p, greedy) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"{_NAME}: max_new_tokens={max_new_tokens!r} must be an int >= 0")
    if not greedy and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"{_NAME}: temperature={temperature!r} must be > 0 (use greedy=True for argmax decoding)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"{_NAME}: top_k={top_k!r} must be an int >= 0 (0 = no top-k filtering)")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"{_NAME}: top_p={top_p!r} must be in (0, 1]")


def _prompt_tensor(prompt_ids, vocab_size: int, device) -> tuple[torch.Tensor, bool]:
    """(``[b, s]`` int64 on device, whether the prompt was a single sequence)."""
    single = not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() == 1
    try:
        ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{_NAME}: prompt_ids must be a list of ints or an int tensor [s] or [b, s] ({e})") from None
    if isinstance(prompt_ids, torch.Tensor) and prompt_ids.is_floating_point():
        raise TypeError(f"{_NAME}: prompt_ids has dtype {prompt_ids.dtype}, expected an integer dtype")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{_NAME}: prompt_ids has shape {list(ids.shape)}, expected a non-empty [s] or [b, s]")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{_NAME}: prompt_ids hold {lo if lo < 0 else hi}, outside [0, vocab_size={vocab_size})")
    return ids.to(device), single


def generate(
    model,
    prompt_ids: Union[Sequence[int], torch.Tensor],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    stream: Optional[Callable] = None,
) -> Union[list[int], torch.Tensor]:
    """Continues ``prompt_ids`` with up to ``max_new_tokens`` tokens, with a KV cache.

    Args:
        model: a megacore GPTModel (whole or tensor-parallel; its dropout is never applied, whatever its
            training flag).
        prompt_ids: a list of ints or an int tensor ``[s]`` (one prompt), or ``[b, s]`` (a batch of prompts of
            equal length).
        max_new_tokens: tokens to produce at most (with learned positions, ``s + max_new_tokens`` must not
            exceed ``max_position_embeddings``).
        temperature, top_k, top_p: sampling: the logits are divided by ``temperature``, then only the
            ``top_k`` most likely tokens (0 = all) and the nucleus of probability ``top_p`` (1.0 = all) are kept.
        greedy: take the argmax (temperature, top_k, top_p are then ignored).
        eos_id: stop a sequence after it produces this id (a batch stops when every sequence has; finished
            sequences are padded with ``eos_id``).
        seed: seeds the sampling generator (a CPU ``torch.Generator``): the same seed gives the same tokens;
            None draws from torch's default generator.
        stream: called once per step with the new token: an int for one prompt, an int64 tensor ``[b]`` for
            a batch (on every rank).
    Returns: the new tokens only: a list of ints for one prompt, an int64 tensor ``[b, n]`` (on the
    prompt's device) for a batch; ``n <= max_new_tokens``.
    Under tensor parallelism every rank must call it with the same arguments; every rank returns the
    same tokens (tensor-parallel rank 0's draw is broadcast).
    Raises TypeError for a model that is not a causal LM or non-integer prompts, ValueError for bad
    arguments (each naming it).
    """
    _check_model(model)
    _check_args(max_new_tokens, temperature, top_k, top_p, greedy)
    word = model.embedding.word
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < word.vocab_size):
        raise ValueError(f"{_NAME}: eos_id={eos_id!r} must be None or an id in [0, {word.vocab_size})")
    device = word.weight.device
    ids, single = _prompt_tensor(prompt_ids, word.vocab_size, device)
    # a batch comes back where its prompt was (a CPU prompt for a CUDA model gives CPU tokens)
    out_device = prompt_ids.device if isinstance(prompt_ids, torch.Tensor) else device
    b, s = ids.shape
    if model.embedding.position is not None and s + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"{_NAME}: prompt of {s} tokens + max_new_tokens={max_new_tokens} exceeds "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    if max_new_tokens == 0:
        return [] if single else ids.new_empty((b, 0), device=out_device)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    group = word.group
    src = dist.get_global_rank(group, 0) if group is not None else None
    cache = new_cache(model, b, s + max_new_tokens)
    logits = forward_with_cache(model, ids, cache)  # [b, vocab]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out = []
    for step in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)
        else:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1).cpu()
            token = torch.multinomial(probs, 1, generator=generator)[:, 0].to(device)
        if group is not None:  # every rank continues with rank 0's tokens
            dist.broadcast(token, src, group=group)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done = done | (token == eos_id)
        out.append(token)
        if stream is not None:
            stream(int(token[0]) if single else token.clone())
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = forward_with_cache(model, token[:, None], cache)
    tokens = torch.stack(out, dim=1)  # [b, n]
    return tokens[0].tolist() if single else tokens.to(out_device)


__all__ = ["KVCache", "filter_logits", "forward_with_cache", "generate", "new_cache"]
