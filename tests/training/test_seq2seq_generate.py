"""Sequence-to-sequence decoding: KVCache.reorder moves a cache's rows."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megacore.interop import hf as interop  # noqa: E402
from tests.parallel.utils import run_distributed  # noqa: E402

VOCAB, EOS = 101, 1
VARIANTS = {
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _hf_config(variant: str, **overrides):
    fields = dict(vocab_size=VOCAB, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)
    return transformers.T5Config(**{**fields, **VARIANTS[variant], **overrides})


@functools.lru_cache(maxsize=None)
def _models(variant: str, seed: int = 0):
    """(transformers' model, megacore's from it). A random model seldom says eos: its head row is set to the
    decoder output's mean direction, so eos is likely after some tokens and not others (rows then end at
    different steps)."""
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(_hf_config(variant)).eval()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        out = hf(input_ids=torch.randint(2, VOCAB, (8, 9), generator=g),
                 decoder_input_ids=torch.randint(2, VOCAB, (8, 8), generator=g), output_hidden_states=True)
        h = out.decoder_hidden_states[-1] * (32 ** -0.5 if hf.config.tie_word_embeddings else 1.0)
        typical_max = out.logits.max(-1).values.mean()
        direction = h.reshape(-1, 32).mean(0)
        hf.lm_head.weight[EOS] = direction * (0.65 * typical_max / (direction @ direction))
    return hf, interop.from_hf(hf)


def _sources(batch: int = 4):
    """A padded batch: rows of 9, 6, 3 and 9 tokens."""
    ids = torch.randint(2, VOCAB, (batch, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    return ids, mask


def _hf_generate(hf, ids, mask, eos=EOS, **kw) -> list[list[int]]:
    """transformers' generate(), as lists without the start token and from the first eos on."""
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, eos_token_id=eos, pad_token_id=0, **kw)
    rows = [row[1:] for row in out.tolist()]
    return [row[:row.index(eos)] if eos is not None and eos in row else row for row in rows]


# --- KVCache.reorder ------------------------------------------------------------------------------------------------

def _started_cache(model, ids, mask, steps: int):
    """A cache after the start token and ``steps - 1`` more fixed tokens, and the last logits."""
    memory = model.encode(ids, mask)
    cache = model.new_cache(ids.shape[0], 8, ids.shape[1])
    tokens = torch.tensor([[0, 5, 9, 13, 17][:steps]] * ids.shape[0])
    logits = model.forward_with_cache(tokens[:, :1], cache, memory, mask)
    for t in range(1, steps):
        logits = model.forward_with_cache(tokens[:, t:t + 1], cache, attention_mask=mask)
    return cache, logits


def test_reorder_selects_and_repeats_the_rows_of_every_cached_tensor():
    _, model = _models("t5")
    ids, mask = _sources()
    cache, _ = _started_cache(model, ids, mask, 3)
    before = ({i: t.clone() for i, t in cache.keys.items()}, {i: t.clone() for i, t in cache.values.items()},
              {i: (k.clone(), v.clone()) for i, (k, v) in cache.cross.items()})
    index = torch.tensor([2, 0, 0, 3, 2, 1])  # a new batch of 6 (beams)
    cache.reorder(index)
    assert cache.batch == 6 and cache.length == 3
    for i in cache.keys:
        assert torch.equal(cache.keys[i], before[0][i][index]) and torch.equal(cache.values[i], before[1][i][index])
        assert torch.equal(cache.cross[i][0], before[2][i][0][index])
        assert torch.equal(cache.cross[i][1], before[2][i][1][index])


def test_decoding_goes_on_after_a_reorder_as_if_the_batch_had_been_reordered():
    _, model = _models("t5_v1_1")
    ids, mask = _sources()
    index = torch.tensor([3, 1, 1, 0])
    cache, _ = _started_cache(model, ids, mask, 3)
    cache.reorder(index)
    fresh, _ = _started_cache(model, ids[index], mask[index], 3)
    step = torch.tensor([[21], [22], [23], [24]])
    got = model.forward_with_cache(step, cache, attention_mask=mask[index])
    expected = model.forward_with_cache(step, fresh, attention_mask=mask[index])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_reorder_without_memory_keeps_the_memory_and_refuses_a_new_batch_size():
    _, model = _models("t5")
    ids, mask = _sources()
    cache, _ = _started_cache(model, ids, mask, 2)
    cross = dict(cache.cross)
    cache.reorder(torch.tensor([1, 0, 3, 2]), memory=False)
    assert all(cache.cross[i] is cross[i] for i in cross)
    with pytest.raises(ValueError, match=r"KVCache.reorder: index has 2 rows, the cache 4: memory=False"):
        cache.reorder(torch.tensor([0, 1]), memory=False)
    with pytest.raises(ValueError, match=r"KVCache.reorder: index holds rows outside \[0, 4\)"):
        cache.reorder(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"KVCache.reorder: index has shape \[2, 2\] and dtype torch.int64"):
        cache.reorder(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"KVCache.reorder: index has shape \[2\] and dtype torch.int32"):
        cache.reorder(torch.zeros(2, dtype=torch.int32))
