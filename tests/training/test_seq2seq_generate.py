"""megacore.training.generate_seq2seq: greedy and beam search from a T5Model equal transformers' generate() token for
token (padded batches, T5 and v1.1, eos, min_new_tokens, length penalties, early stopping), beam search finds the
exhaustive best sequence where greedy does not, KVCache.reorder moves a cache's rows, the errors name the argument,
and tensor-parallel 2 decodes what one process does."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch

from megacore.interop import hf as interop
from megacore.training import generate_seq2seq
from tests.parallel.utils import run_distributed

VOCAB, EOS = 101, 1
VARIANTS = {
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _transformers():
    """transformers, imported where a test first needs it (skipped without it): the tensor-parallel test's workers
    import this module and need none of it."""
    return pytest.importorskip("transformers")


def _hf_config(variant: str, **overrides):
    fields = dict(vocab_size=VOCAB, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
                  decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)
    return _transformers().T5Config(**{**fields, **VARIANTS[variant], **overrides})


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: more threads only wait on each other (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# seeds whose padded batch (_sources) has rows that end at eos, early or late, and rows that run to the end
SEEDS = {"t5": 1, "t5_v1_1": 0}


@functools.lru_cache(maxsize=None)
def _models(variant: str):
    """(transformers' model, megacore's from it). A random model seldom says eos: its head row is set to the
    decoder output's mean direction, so eos is likely after some tokens and not others."""
    torch.manual_seed(SEEDS[variant])
    hf = _transformers().T5ForConditionalGeneration(_hf_config(variant)).eval()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        out = hf(input_ids=torch.randint(2, VOCAB, (8, 9), generator=g),
                 decoder_input_ids=torch.randint(2, VOCAB, (8, 8), generator=g), output_hidden_states=True)
        h = out.decoder_hidden_states[-1] * (32 ** -0.5 if hf.config.tie_word_embeddings else 1.0)
        typical_max = out.logits.max(-1).values.mean()
        direction = h.reshape(-1, 32).mean(0)
        hf.lm_head.weight[EOS] = direction * (0.65 * typical_max / (direction @ direction))
    return hf, interop.from_hf(hf)


def _sources(length: int = 9):
    """A padded batch: rows of ``length``, 6, 3 and ``length`` tokens."""
    ids = torch.randint(2, VOCAB, (4, length), generator=torch.Generator().manual_seed(1))
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
    filled = slice(0, 3)  # the positions past the length were never written (torch.empty: may hold NaN)
    for i in cache.keys:
        assert torch.equal(cache.keys[i][:, :, filled], before[0][i][index][:, :, filled])
        assert torch.equal(cache.values[i][:, :, filled], before[1][i][index][:, :, filled])
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


# --- against transformers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_equals_transformers_on_a_padded_batch(variant, device):
    hf, model = _models(variant)
    ids, mask = _sources()
    got = generate_seq2seq(copy.deepcopy(model).to(device), ids, mask, max_new_tokens=10, eos_token_id=EOS)
    assert got == _hf_generate(hf, ids, mask, max_new_tokens=10, num_beams=1)
    assert len({len(row) for row in got}) > 1  # rows end at different steps (eos) or run to the end


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_without_eos_and_with_min_new_tokens_equals_transformers(variant):
    hf, model = _models(variant)
    ids, mask = _sources()
    got = generate_seq2seq(model, ids, mask, max_new_tokens=6)
    assert all(len(row) == 6 for row in got)
    hf.generation_config.eos_token_id = None  # else generate() reads the model's eos for None
    try:
        assert got == _hf_generate(hf, ids, mask, eos=None, max_new_tokens=6, num_beams=1)
    finally:
        hf.generation_config.eos_token_id = EOS
    got = generate_seq2seq(model, ids, mask, max_new_tokens=8, eos_token_id=EOS, min_new_tokens=3)
    assert got == _hf_generate(hf, ids, mask, max_new_tokens=8, min_new_tokens=3, num_beams=1)
    assert all(len(row) >= 3 for row in got) and got != generate_seq2seq(model, ids, mask, max_new_tokens=8,
                                                                         eos_token_id=EOS)


# each beam count with each penalty, each penalty with and without early stopping (the full product costs twice)
@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [
    (3, 0.6, True), (3, 1.0, False), (3, 2.0, True), (4, 0.6, False), (4, 1.0, True), (4, 2.0, False)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_beam_search_equals_transformers(variant, num_beams, length_penalty, early_stopping):
    hf, model = _models(variant)
    ids, mask = _sources()
    kw = dict(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    assert generate_seq2seq(model, ids, mask, eos_token_id=EOS, **kw) == _hf_generate(hf, ids, mask, **kw)


def test_beam_search_rows_finish_at_different_steps_and_min_new_tokens_equal_transformers(device):
    """The rows leave the batch at different steps (some at eos, some at the end), which must not change the
    others; min_new_tokens keeps eos out of the first tokens."""
    hf, model = _models("t5")
    ids, mask = _sources()
    kw = dict(max_new_tokens=10, num_beams=4, length_penalty=1.0, early_stopping=True)
    model = copy.deepcopy(model).to(device)
    got = generate_seq2seq(model, ids, mask, eos_token_id=EOS, **kw)
    assert min(len(row) for row in got) < 10 and 10 in {len(row) for row in got}
    with_min = generate_seq2seq(model, ids, mask, eos_token_id=EOS, min_new_tokens=5, **kw)
    assert got == _hf_generate(hf, ids, mask, **kw)
    assert with_min == _hf_generate(hf, ids, mask, min_new_tokens=5, **kw)
    assert all(len(row) >= 5 for row in with_min) and with_min != got


def test_one_beam_is_the_repeated_argmax_of_the_full_forward():
    _, model = _models("t5_v1_1")
    ids, mask = _sources()
    got = generate_seq2seq(model, ids, mask, max_new_tokens=7, num_beams=1, length_penalty=2.0, early_stopping=True)
    prefix = torch.zeros(ids.shape[0], 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(7):
            logits = model(ids, decoder_input_ids=prefix, attention_mask=mask)[:, -1]
            prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], 1)
    assert got == prefix[:, 1:].tolist()


# --- beam search finds what greedy misses ---------------------------------------------------------------------------

def _ranked_sequences(model, source, vocab: int, length: int, length_penalty: float) -> list[tuple[tuple, float]]:
    """Every target of up to ``length`` tokens (ended by eos, or by reaching ``length``) with its beam-search score
    ``sum of log-probs / length ** length_penalty`` (eos counted), best first, from one full forward over all
    ``(vocab - 1) ** length`` eos-free sequences (their prefixes are the shorter ones)."""
    words = [t for t in range(vocab) if t != EOS]
    seqs = torch.tensor(list(itertools.product(words, repeat=length)))  # [n, length]
    decoder_ids = torch.cat([torch.zeros(len(seqs), 1, dtype=torch.long), seqs[:, :-1]], 1)
    with torch.no_grad():
        log_probs = model(source.expand(len(seqs), -1), decoder_input_ids=decoder_ids).float().log_softmax(-1)
    prefix_sums = log_probs.gather(2, seqs[:, :, None])[..., 0].cumsum(1)  # [n, length]
    scores = {}
    for i, seq in enumerate(seqs.tolist()):
        for k in range(length):  # k words, then eos
            before = prefix_sums[i, k - 1].item() if k else 0.0
            scores[tuple(seq[:k])] = (before + log_probs[i, k, EOS].item()) / (k + 1) ** length_penalty
        scores[tuple(seq)] = prefix_sums[i, -1].item() / length ** length_penalty
    return sorted(scores.items(), key=lambda kv: -kv[1])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_finds_the_exhaustive_best_sequence_that_greedy_misses(length_penalty):
    """A 5-token vocabulary and 4 new tokens: 64 beams keep every eos-free prefix, so beam search is exhaustive and
    must return the best-scoring sequence; greedy's first choices lead elsewhere."""
    vocab, length = 5, 4
    torch.manual_seed(0)
    config = _hf_config("t5", vocab_size=vocab, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                        relative_attention_num_buckets=4, relative_attention_max_distance=8)
    model = interop.from_hf(_transformers().T5ForConditionalGeneration(config).eval())
    source = torch.tensor([[2, 3, 4, 2, 3]])
    ranked = _ranked_sequences(model, source, vocab, length, length_penalty)
    (best, best_score), (_, second_score) = ranked[:2]
    assert best_score - second_score > 1e-3  # a clear winner: round-off cannot pick another
    beam = generate_seq2seq(model, source, max_new_tokens=length, num_beams=64, length_penalty=length_penalty,
                            eos_token_id=EOS)
    greedy = generate_seq2seq(model, source, max_new_tokens=length, eos_token_id=EOS)
    assert beam == [list(best)]
    assert dict(ranked)[tuple(greedy[0])] < best_score


# --- errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, text", [
    (dict(max_new_tokens=-1), "max_new_tokens=-1 must be an int >= 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens=2.0 must be an int >= 0"),
    (dict(num_beams=0), r"num_beams=0 must be an int >= 1 \(1 = greedy\)"),
    (dict(length_penalty=float("nan")), "length_penalty=nan must be a finite number"),
    (dict(length_penalty=None), "length_penalty=None must be a finite number"),
    (dict(early_stopping="never"), "early_stopping='never' must be True or False"),
    (dict(eos_token_id=VOCAB), r"eos_token_id=101 must be None or an id in \[0, 101\)"),
    (dict(min_new_tokens=5), r"min_new_tokens=5 must be an int in \[0, max_new_tokens=4\]"),
    (dict(input_ids=torch.ones(3, dtype=torch.long)), r"input_ids has shape \[3\] .* expected a non-empty integer"),
    (dict(input_ids=torch.ones(2, 3)), r"input_ids has shape \[2, 3\] and dtype torch.float32"),
    (dict(input_ids=[[5, 6, 7], [8]]), "input_ids must be an int tensor or equal-length lists of ints"),
    (dict(input_ids=torch.full((2, 3), VOCAB)), r"input_ids hold 101, outside \[0, vocab_size=101\)"),
    (dict(attention_mask=torch.ones(2, 4)), r"attention_mask has shape \[2, 4\], expected \[2, 3\]"),
    (dict(attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]])), r"attention_mask rows \[1\] are all padding"),
    (dict(attention_mask=torch.tensor([[1, 2, 0], [1, 1, 1]])), r"attention_mask must hold only 1 \(token\) and 0"),
])
def test_bad_arguments_name_the_function_and_the_argument(kw, text):
    _, model = _models("t5")
    args = {**dict(input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=None, max_new_tokens=4), **kw}
    with pytest.raises(ValueError, match=f"megacore.training.generate_seq2seq: {text}"):
        generate_seq2seq(model, args.pop("input_ids"), args.pop("attention_mask"), **args)


def test_a_model_that_is_not_an_encoder_decoder_is_refused_and_no_tokens_is_no_work():
    from megacore.models import GPTModel, ModelConfig

    gpt = GPTModel(ModelConfig(vocab_size=10, hidden_size=8, num_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="generate_seq2seq: model must be a megacore T5Model .* got GPTModel"):
        generate_seq2seq(gpt, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2)
    _, model = _models("t5")
    assert generate_seq2seq(model, [[5, 6], [7, 8]], max_new_tokens=0, num_beams=3) == [[], []]


def test_dropout_is_off_in_training_mode_and_the_mode_is_restored():
    hf, model = _models("t5")
    ids, mask = _sources()
    expected = generate_seq2seq(model, ids, mask, max_new_tokens=5, num_beams=3, eos_token_id=EOS)
    with_dropout = _transformers().T5ForConditionalGeneration(_hf_config("t5", dropout_rate=0.5))
    with_dropout.load_state_dict(hf.state_dict())
    model = interop.from_hf(with_dropout).train()
    assert model.config.hidden_dropout == model.config.attention_dropout == 0.5
    assert generate_seq2seq(model, ids, mask, max_new_tokens=5, num_beams=3, eos_token_id=EOS) == expected
    assert model.training


# --- tensor parallelism ---------------------------------------------------------------------------------------------

def _tensor_parallel_decoding(rank, world):
    """The models are built from a seed, without transformers (importing it costs each worker seconds)."""
    from megacore.models.t5 import T5Config, T5Model
    from megacore.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(world)
    try:
        # T5 v1.1's shape; vocab 101 does not divide by 2: the padded logits must never be chosen
        fields = dict(vocab_size=VOCAB, hidden_size=32, kv_channels=6, ffn_hidden_size=48, num_layers=2,
                      num_attention_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                      activation="geglu", tie_word_embeddings=False)
        torch.manual_seed(0)
        whole = T5Model(T5Config(**fields))
        ids, mask = _sources(length=10)  # sequence parallelism splits the source over the 2 ranks
        eos = generate_seq2seq(whole, ids, mask, max_new_tokens=8)[0][3]  # a token of the first row: it ends early
        for sequence_parallel in (False, True):
            torch.manual_seed(0)
            part = T5Model(T5Config(**fields, tensor_parallel=True, sequence_parallel=sequence_parallel))
            for kw in (dict(num_beams=1), dict(num_beams=3, length_penalty=0.6, early_stopping=False)):
                expected = generate_seq2seq(whole, ids, mask, max_new_tokens=8, eos_token_id=eos, **kw)
                got = generate_seq2seq(part, ids, mask, max_new_tokens=8, eos_token_id=eos, **kw)
                assert got == expected, (rank, sequence_parallel, kw, got, expected)
                assert min(len(row) for row in got) < 8
    finally:
        destroy_model_parallel()


def test_tensor_parallel_2_decodes_what_one_process_does():
    run_distributed(_tensor_parallel_decoding, 2, timeout_s=90)
