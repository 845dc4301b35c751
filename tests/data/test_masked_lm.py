"""MaskedLMDataset / ElectraDataset: the samples mapping against a plain-Python Megatron loop; BERT's
masking statistics (15 %, 80/10/10) and its rules (never a special token, whole words); NSP / SOP label
balance and meaning; the pair structure; packed segments; determinism per (seed, index); lengths; the
ELECTRA variant; clear errors; batches that BertModel / ElectraModel accept; a real prepared file.

The data is a small in-memory stand-in for IndexedDataset (documents of random sentences)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megacore.data.masked_lm import ElectraDataset, MaskedLMDataset, build_samples_mapping, word_starts

PAD, CLS, SEP, MASK, EOD = 0, 1, 2, 3, 4
VOCAB = 1000
SPECIALS = (PAD, CLS, SEP, MASK, EOD)
# ids 5..499 start a word; 500..999 continue one (WordPiece's "##" pieces)
IS_WORD_START = np.arange(VOCAB) < 500


class Tokenizer:
    """The special ids and size of a tokenizer (what the datasets read)."""

    def __init__(self, vocab_size=VOCAB, eod=None, **ids):
        self.vocab_size, self.eod = vocab_size, eod
        self.pad, self.cls, self.sep, self.mask = PAD, CLS, SEP, MASK
        for k, v in ids.items():
            setattr(self, k, v)


class InMemoryIndexedDataset:
    """IndexedDataset's reading interface over a list of documents, each a list of 1-D int arrays."""

    def __init__(self, documents):
        self.sequences = [np.asarray(s, dtype=np.int32) for doc in documents for s in doc]
        self.sequence_lengths = np.array([s.size for s in self.sequences], dtype=np.int32)
        self.document_indices = np.concatenate([[0], np.cumsum([len(d) for d in documents])]).astype(np.int64)

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return self.sequences[i]


def random_documents(seed=0, docs=120, sentences=(1, 16), length=(3, 40), low=5, high=VOCAB):
    rng = np.random.default_rng(seed)
    return [[rng.integers(low, high, rng.integers(*length)) for _ in range(rng.integers(*sentences))]
            for _ in range(docs)]


def make(cls=MaskedLMDataset, documents=None, tokenizer=None, max_seq_length=64, **kw):
    return cls(InMemoryIndexedDataset(documents if documents is not None else random_documents()),
               tokenizer or Tokenizer(), max_seq_length, **kw)


def original_tokens(item, labels="labels"):
    """The unmasked real tokens of a sample ``[t]``: labels where predicted, inputs elsewhere."""
    real = item["attention_mask"] == 1
    return np.where(item[labels] != -100, item[labels], item["input_ids"])[real]


def segments(item):
    """(A, B) of a pair sample, unmasked: the tokens between [CLS] and the [SEP]s."""
    tokens = original_tokens(item)
    seps = np.flatnonzero(tokens == SEP)
    return tokens[1:seps[0]], tokens[seps[0] + 1:seps[1]]


def key(tokens):
    return "," + ",".join(map(str, tokens)) + ","


# -- the samples mapping ----------------------------------------------------------------------------

def megatron_end(lengths, start, last, target, min_sentences):
    """Megatron's build_mapping loop for one sample (helpers.cpp), with the remaining-sentences rule
    generalized to ``min_sentences``: where the sample starting at ``start`` ends."""
    seq_len = num = 0
    for k in range(start, last):
        seq_len += lengths[k]
        num += 1
        remaining = last - (k + 1)
        if (seq_len >= target and remaining >= min_sentences and num >= min_sentences) or remaining == 0:
            return k + 1
    raise AssertionError("unreachable")


def reference_mapping(lengths, doc_starts, min_sentences, target):
    out = []
    for doc in range(len(doc_starts) - 1):
        first, last = doc_starts[doc], doc_starts[doc + 1]
        if last - first < min_sentences:
            continue
        start = first
        while start < last:
            end = megatron_end(lengths, start, last, target, min_sentences)
            out.append((start, end, target, doc))
            start = end
    return np.array(out, dtype=np.int64).reshape(-1, 4)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_sentences", [1, 2])
def test_mapping_equals_the_python_megatron_loop_without_short_sequences(seed, min_sentences):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=600)
    doc_starts = np.unique(np.concatenate([[0, 600], rng.integers(0, 600, size=40)]))
    target = int(rng.integers(8, 120))
    got = build_samples_mapping(lengths, doc_starts, min_sentences, target, 0.0, np.random.default_rng(seed))
    np.testing.assert_array_equal(got, reference_mapping(lengths, doc_starts, min_sentences, target))


@pytest.mark.parametrize("seed", range(4))
def test_mapping_with_short_sequences_cuts_every_sample_by_the_rule_for_its_target(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=800)
    doc_starts = np.unique(np.concatenate([[0, 800], rng.integers(0, 800, size=30)]))
    got = build_samples_mapping(lengths, doc_starts, 2, 100, 0.5, np.random.default_rng(seed))
    targets = got[:, 2]
    assert ((targets >= 2) & (targets <= 100)).all()
    assert 0.3 < (targets < 100).mean() < 0.7  # ~half short (a uniform draw of 100 is rare)
    for doc in range(len(doc_starts) - 1):
        first, last = doc_starts[doc], doc_starts[doc + 1]
        rows = got[got[:, 3] == doc]
        if last - first < 2:
            assert rows.size == 0  # too short for a pair: skipped
            continue
        # the samples of a document tile it, in order, each cut where Megatron's loop cuts for its target
        assert rows[0, 0] == first and rows[-1, 1] == last and (rows[1:, 0] == rows[:-1, 1]).all()
        for start, end, target, _ in rows:
            assert end == megatron_end(lengths, start, last, target, 2)
            assert end - start >= 2


def test_each_epoch_covers_every_eligible_document_once_before_any_repeats():
    documents = random_documents(sentences=(1, 8), length=(3, 30))  # no sentence over a chunk (30)
    ds = make(documents=documents, mode="sop", num_samples=10_000)
    eligible = {d for d, doc in enumerate(documents) if len(doc) >= 2}
    one_epoch = make(documents=documents, mode="sop")
    per_epoch = len(one_epoch)
    # epochs differ in size (new target lengths each), so as many as reach num_samples
    assert len(ds) == 10_000 and ds.num_epochs >= 10_000 // per_epoch
    first = ds.samples_mapping[:per_epoch]
    np.testing.assert_array_equal(first, one_epoch.samples_mapping)
    assert set(first[:, 3]) == eligible
    # the first epoch's samples tile each document exactly once
    assert sum(int(e - s) for s, e, _, _ in first) == sum(len(documents[d]) for d in eligible)
    assert not np.array_equal(first[:, 3], np.sort(first[:, 3]))  # shuffled


def test_long_sentences_are_chunked_not_dropped_and_packed_samples_cover_them_exactly():
    rng = np.random.default_rng(3)
    documents = [[rng.integers(5, VOCAB, 1000)], [rng.integers(5, VOCAB, 130)]]  # unsplit documents
    ds = make(documents=documents, mode="packed", max_seq_length=64, short_seq_prob=0.0)
    order = np.lexsort((ds.samples_mapping[:, 0],))
    text = np.concatenate([original_tokens(ds[int(i)])[1:-1] for i in order])
    np.testing.assert_array_equal(text, np.concatenate([documents[0][0], documents[1][0]]))


# -- masking ----------------------------------------------------------------------------------------

def masking_counts(ds, samples):
    maskable = predicted = as_mask = as_random = kept = 0
    for i in range(samples):
        item = ds[i]
        tokens = original_tokens(item)
        maskable += int(np.isin(tokens, (CLS, SEP), invert=True).sum())
        where = item["labels"] != -100
        predicted += int(where.sum())
        inputs, labels = item["input_ids"][where], item["labels"][where]
        as_mask += int((inputs == MASK).sum())
        kept += int((inputs == labels).sum())
        as_random += int(((inputs != MASK) & (inputs != labels)).sum())
    return maskable, predicted, as_mask, as_random, kept


def test_bert_masking_statistics_15_percent_then_80_10_10():
    ds = make(mode="packed", max_seq_length=128, short_seq_prob=0.0, num_samples=1200)
    maskable, predicted, as_mask, as_random, kept = masking_counts(ds, len(ds))
    assert predicted > 15_000
    assert abs(predicted / maskable - 0.15) < 0.005
    assert abs(as_mask / predicted - 0.8) < 0.015
    assert abs(as_random / predicted - 0.1) < 0.01
    assert abs(kept / predicted - 0.1) < 0.01


def test_masking_probability_and_replace_probabilities_are_honoured():
    ds = make(mode="packed", max_seq_length=128, short_seq_prob=0.0, num_samples=400, masked_lm_prob=0.3,
              mask_replace_probs=(0.5, 0.5, 0.0))
    maskable, predicted, as_mask, as_random, kept = masking_counts(ds, len(ds))
    assert abs(predicted / maskable - 0.3) < 0.01
    assert abs(as_mask / predicted - 0.5) < 0.03 and kept < 0.01 * predicted


@pytest.mark.parametrize("mode", ["nsp", "sop", "packed"])
@pytest.mark.parametrize("whole_word_masking", [False, True])
def test_special_tokens_and_padding_are_never_masked_or_imitated(mode, whole_word_masking):
    ds = make(mode=mode, num_samples=300, whole_word_masking=whole_word_masking, is_word_start=IS_WORD_START,
              masked_lm_prob=0.5)
    seps = 1 if mode == "packed" else 2
    for i in range(len(ds)):
        item = ds[i]
        real = int(item["attention_mask"].sum())
        ids, labels = item["input_ids"], item["labels"]
        assert ids[0] == CLS and ids[real - 1] == SEP
        structural = np.flatnonzero(np.isin(ids, (CLS, SEP, PAD)))
        # specials appear only where the structure puts them: the random replacements never produce them
        assert (ids[:real] == CLS).sum() == 1 and (ids[:real] == SEP).sum() == seps and (ids[:real] != PAD).all()
        assert (labels[structural] == -100).all() and (labels[real:] == -100).all()
        assert (ids[real:] == PAD).all() and (item["attention_mask"][real:] == 0).all()
        assert not np.isin(labels[labels != -100], SPECIALS).any()


def test_whole_word_masking_masks_all_pieces_of_a_word_or_none():
    ds = make(mode="sop", num_samples=400, whole_word_masking=True, is_word_start=IS_WORD_START)
    predicted = maskable = 0
    for i in range(len(ds)):
        item = ds[i]
        real = item["attention_mask"] == 1
        tokens = np.where(item["labels"] != -100, item["labels"], item["input_ids"])[real]
        masked = (item["labels"] != -100)[real]
        special = np.isin(tokens, (CLS, SEP))
        word = np.cumsum(IS_WORD_START[tokens] | special | np.roll(special, 1))  # word ids, specials apart
        for w in np.unique(word[~special]):
            flags = masked[word == w]
            assert flags.all() or not flags.any(), f"sample {i}: word {tokens[word == w]} partly masked"
        predicted += int(masked.sum())
        maskable += int((~special).sum())
    assert abs(predicted / maskable - 0.15) < 0.01  # words that do not fit are skipped, the count is kept


def test_whole_word_masking_never_joins_pieces_across_a_separator():
    # every sentence: a lone continuation piece, then two-piece words; B's first piece follows the [SEP]
    rng = np.random.default_rng(4)
    sentence = lambda: np.concatenate([[rng.integers(500, VOCAB)],  # noqa: E731
                                       np.stack([rng.integers(5, 500, 6), rng.integers(500, VOCAB, 6)], 1).ravel()])
    documents = [[sentence() for _ in range(2)] for _ in range(300)]
    ds = make(documents=documents, mode="sop", whole_word_masking=True, is_word_start=IS_WORD_START,
              short_seq_prob=0.0, masked_lm_prob=0.3)
    same = []
    for i in range(len(ds)):
        item = ds[i]
        masked = (item["labels"] != -100)[item["attention_mask"] == 1]
        sep = int(np.flatnonzero(item["input_ids"] == SEP)[0])
        same.append(masked[sep - 1] == masked[sep + 1])  # A's last word vs B's first piece
    assert 0.3 < np.mean(same) < 0.95  # chosen independently; one group across [SEP] would always agree


def test_whole_word_masking_takes_a_callable_or_the_tokenizers_vocabulary():
    from_array = make(mode="sop", whole_word_masking=True, is_word_start=IS_WORD_START)
    from_callable = make(mode="sop", whole_word_masking=True, is_word_start=lambda ids: ids < 500)
    np.testing.assert_array_equal(from_array.is_word_start, from_callable.is_word_start)
    for i in range(20):
        np.testing.assert_array_equal(from_array[i]["input_ids"], from_callable[i]["input_ids"])

    class WordPiece(Tokenizer):
        kind = "wordpiece"

        def id_to_token(self, i):
            return {PAD: "[PAD]", CLS: "[CLS]", SEP: "[SEP]", MASK: "[MASK]"}.get(i, f"w{i}" if i < 500 else f"##p{i}")

    np.testing.assert_array_equal(word_starts(WordPiece()), IS_WORD_START | np.isin(np.arange(VOCAB), SPECIALS))
    ds = make(tokenizer=WordPiece(), mode="sop", whole_word_masking=True)
    assert ds.is_word_start[5] and not ds.is_word_start[600]


# -- sentence pairs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["nsp", "sop"])
def test_pair_structure_and_token_types(mode):
    ds = make(mode=mode, num_samples=200)
    for i in range(len(ds)):
        item = ds[i]
        real = int(item["attention_mask"].sum())
        seps = np.flatnonzero(item["input_ids"][:real] == SEP)
        assert seps.size == 2 and seps[1] == real - 1 and 1 < seps[0] < real - 2  # A and B non-empty
        types = item["token_type_ids"]
        assert (types[:seps[0] + 1] == 0).all() and (types[seps[0] + 1:real] == 1).all() and (types[real:] == 0).all()
        assert item["next_sentence_label"] in (0, 1)


@pytest.mark.parametrize("mode", ["nsp", "sop"])
def test_labels_are_balanced(mode):
    ds = make(mode=mode, num_samples=2000)
    labels = np.array([ds[i]["next_sentence_label"] for i in range(len(ds))])
    assert abs(labels.mean() - 0.5) < 0.04


def test_sop_label_1_means_swapped_and_0_in_order():
    documents = random_documents(seed=5)
    streams = [key(np.concatenate(doc)) for doc in documents]
    ds = make(documents=documents, mode="sop", num_samples=300)
    for i in range(len(ds)):
        item = ds[i]
        a, b = segments(item)
        doc = streams[int(ds.samples_mapping[i, 3])]
        pa, pb = doc.find(key(a)), doc.find(key(b))
        assert pa >= 0 and pb >= 0  # both from the sample's document, contiguous (truncation trims the ends)
        assert (pb < pa) == bool(item["next_sentence_label"])


def test_nsp_label_1_means_b_from_another_document_and_0_its_continuation():
    documents = random_documents(seed=6)
    streams = [key(np.concatenate(doc)) for doc in documents]
    ds = make(documents=documents, mode="nsp", num_samples=300)
    for i in range(len(ds)):
        item = ds[i]
        a, b = segments(item)
        d = int(ds.samples_mapping[i, 3])
        pa, pb = streams[d].find(key(a)), streams[d].find(key(b))
        assert pa >= 0
        if item["next_sentence_label"]:
            assert pb < 0 and any(s.find(key(b)) >= 0 for j, s in enumerate(streams) if j != d)
        else:
            assert pb > pa


# -- packed segments, lengths -----------------------------------------------------------------------

def test_packed_mode_fills_single_segments():
    documents = random_documents(seed=7, docs=40, sentences=(20, 40))
    ds = make(documents=documents, mode="packed", max_seq_length=128, short_seq_prob=0.0)
    doc_ends = set(ds._doc_span_starts[1:].tolist())
    tails = 0
    for i in range(len(ds)):
        item = ds[i]
        assert "next_sentence_label" not in item and (item["token_type_ids"] == 0).all()
        assert (original_tokens(item) == SEP).sum() == 1
        if int(ds.samples_mapping[i, 1]) in doc_ends:
            tails += 1
        else:  # every sample is full except each document's last (its tail)
            assert item["attention_mask"].sum() == 128
    assert tails == len(documents)


@pytest.mark.parametrize("mode", ["nsp", "sop", "packed"])
@pytest.mark.parametrize("max_seq_length", [7, 24, 100])
def test_lengths_never_exceed_max_seq_length(mode, max_seq_length):
    ds = make(documents=random_documents(seed=8, length=(1, 90)), mode=mode, max_seq_length=max_seq_length,
              short_seq_prob=0.3, num_samples=300)
    for i in range(len(ds)):
        item = ds[i]
        for name, value in item.items():
            if name != "next_sentence_label":
                assert value.shape == (max_seq_length,) and value.dtype == np.int64, name
        assert 3 <= item["attention_mask"].sum() <= max_seq_length


def test_eod_tokens_of_gpt_prepared_data_are_removed():
    documents = [[*doc[:-1], np.append(doc[-1], EOD)] for doc in random_documents(seed=9)]
    documents += [[np.array([7, 8, 9]), np.array([EOD])]]  # an EOD-only sequence is not a sentence
    for mode in ("nsp", "packed"):
        ds = make(documents=documents, tokenizer=Tokenizer(eod=EOD), mode=mode, num_samples=300)
        for i in range(len(ds)):
            assert EOD not in original_tokens(ds[i]) and EOD not in ds[i]["input_ids"]


def test_an_eod_that_is_sep_is_removed_so_each_sample_has_only_its_own_separators():
    # megacore's WordPiece tokenizer (as BERT's) has eod = [SEP]: prepared paragraphs end in it
    documents = [[*doc[:-1], np.append(doc[-1], SEP)] for doc in random_documents(seed=9)]
    for mode, separators in (("nsp", 2), ("packed", 1)):
        ds = make(documents=documents, tokenizer=Tokenizer(eod=SEP), mode=mode, num_samples=300)
        for i in range(len(ds)):
            item = ds[i]
            assert (item["input_ids"][item["attention_mask"] == 1] == SEP).sum() == separators


# -- determinism ------------------------------------------------------------------------------------

def test_sample_i_depends_only_on_seed_and_i():
    kw = dict(mode="nsp", num_samples=500, whole_word_masking=True, is_word_start=IS_WORD_START)
    one, two = make(seed=11, **kw), make(seed=11, **kw)
    np.testing.assert_array_equal(one.samples_mapping, two.samples_mapping)
    forward = [one[i] for i in range(50)]
    backward = [two[i] for i in reversed(range(50))][::-1]
    for x, y in zip(forward, backward):
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
    # negative indices are the same samples
    np.testing.assert_array_equal(one[-1]["input_ids"], one[len(one) - 1]["input_ids"])
    other = make(seed=12, **kw)
    assert any(not np.array_equal(one[i]["input_ids"], other[i]["input_ids"]) for i in range(10))


# -- ELECTRA ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask_replace_probs", [(1.0, 0.0, 0.0), (0.8, 0.1, 0.1)])
def test_electra_original_ids_equal_input_ids_at_unmasked_positions(mask_replace_probs):
    ds = make(ElectraDataset, num_samples=300, mask_replace_probs=mask_replace_probs)
    assert ds.mode == "packed"
    masked_total = real_total = 0
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {"input_ids", "original_ids", "attention_mask", "token_type_ids", "mlm_labels"}
        masked = item["mlm_labels"] != -100
        np.testing.assert_array_equal(item["input_ids"][~masked], item["original_ids"][~masked])
        np.testing.assert_array_equal(item["mlm_labels"][masked], item["original_ids"][masked])
        if mask_replace_probs[0] == 1.0:
            assert (item["input_ids"][masked] == MASK).all()
        masked_total += int(masked.sum())
        real_total += int(item["attention_mask"].sum()) - 2
    assert abs(masked_total / real_total - 0.15) < 0.01


def test_electra_matches_the_masked_lm_dataset_for_the_same_arguments():
    kw = dict(mode="sop", mask_replace_probs=(0.8, 0.1, 0.1), num_samples=50, seed=3)
    bert, electra = make(**kw), make(ElectraDataset, **kw)
    for i in range(len(bert)):
        b, e = bert[i], electra[i]
        for name in ("input_ids", "attention_mask", "token_type_ids", "next_sentence_label"):
            np.testing.assert_array_equal(b[name], e[name])
        np.testing.assert_array_equal(b["labels"], e["mlm_labels"])


# -- the models take the batches --------------------------------------------------------------------

def test_batches_feed_bert_and_electra_models():
    from megacore.models import BertModel, ElectraModel
    from tests.models.bert_utils import encoder_config

    vocab = 101
    documents = random_documents(seed=10, high=vocab)
    loader = torch.utils.data.DataLoader(make(documents=documents, tokenizer=Tokenizer(vocab), max_seq_length=32,
                                              mode="sop"), batch_size=4)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 32) and batch["next_sentence_label"].shape == (4,)
    out = BertModel(encoder_config(vocab_size=vocab), head="sop")(**batch)
    assert torch.isfinite(out.loss)

    electra = torch.utils.data.DataLoader(make(ElectraDataset, documents=documents, tokenizer=Tokenizer(vocab),
                                               max_seq_length=32), batch_size=4)
    batch = next(iter(electra))
    original = batch.pop("original_ids")
    torch.manual_seed(0)
    out = ElectraModel(encoder_config(vocab_size=vocab, embedding_size=16))(**batch)
    assert torch.isfinite(out.loss)
    # the discriminator's labels: replaced exactly where the sample differs from the original tokens
    assert torch.equal(out.discriminator_labels, out.sampled_ids != original)


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(mode="mlm"), "mode='mlm'"),
    (dict(max_seq_length=4), "max_seq_length=4"),
    (dict(max_seq_length=64.0), "max_seq_length=64.0"),
    (dict(masked_lm_prob=0.0), "masked_lm_prob"),
    (dict(mask_replace_probs=(0.8, 0.1)), "mask_replace_probs"),
    (dict(mask_replace_probs=(0.8, 0.3, -0.1)), "mask_replace_probs"),
    (dict(short_seq_prob=1.5), "short_seq_prob"),
    (dict(seed=-1), "seed=-1"),
    (dict(num_samples=0), "num_samples=0"),
    (dict(whole_word_masking=True, is_word_start=np.ones(10, bool)), r"is_word_start has shape \[10\]"),
    (dict(whole_word_masking=True, is_word_start=lambda ids: ids[:3] > 0), "is_word_start"),
    (dict(whole_word_masking=True), "id_to_token"),
    (dict(tokenizer=Tokenizer(mask=None)), r"tokenizer.mask=None"),
    (dict(tokenizer=Tokenizer(cls=VOCAB)), r"tokenizer.cls=1000"),
    (dict(tokenizer=Tokenizer(vocab_size=None)), "vocab_size"),
    (dict(documents=[[np.arange(5, 20)]] * 5), "no sample can be made"),  # single-sentence documents
    (dict(documents=[[np.arange(5, 20)] * 3]), "at least two non-empty documents"),
])
def test_bad_arguments_raise_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        make(**kw)
    assert "megacore.data.MaskedLMDataset" in str(info.value)


def test_inconsistent_index_and_bad_indices_raise():
    bad = InMemoryIndexedDataset(random_documents(docs=3))
    bad.document_indices = bad.document_indices[:-1]
    with pytest.raises(ValueError, match="document_indices"):
        MaskedLMDataset(bad, Tokenizer(), 64)
    with pytest.raises(ValueError, match="sequence_lengths and document_indices"):
        MaskedLMDataset([np.arange(5)], Tokenizer(), 64)
    wrong_tokenizer = make(tokenizer=Tokenizer(vocab_size=500), mode="packed")
    with pytest.raises(ValueError, match=r"token ids outside \[0, vocab_size=500\)"):
        [wrong_tokenizer[i] for i in range(len(wrong_tokenizer))]
    ds = make(mode="packed", num_samples=10)
    with pytest.raises(IndexError, match="index 10 out of range for 10"):
        ds[10]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["0"]
    with pytest.raises(ValueError, match="megacore.data.ElectraDataset: mode"):
        make(ElectraDataset, mode="x")


# -- a real prepared file ---------------------------------------------------------------------------

def test_reads_a_real_indexed_dataset_file(tmp_path):
    indexed = pytest.importorskip("megacore.data.indexed")
    documents = random_documents(seed=13, docs=30)
    builder = indexed.IndexedDatasetBuilder(str(tmp_path / "corpus.bin"), np.uint16)
    for doc in documents:
        builder.add_document(np.concatenate(doc), lengths=[len(s) for s in doc])
    builder.finalize(str(tmp_path / "corpus.idx"))
    real = MaskedLMDataset(indexed.IndexedDataset(str(tmp_path / "corpus")), Tokenizer(), 64, mode="nsp",
                           num_samples=100)
    memory = make(documents=documents, mode="nsp", num_samples=100)
    np.testing.assert_array_equal(real.samples_mapping, memory.samples_mapping)
    for i in range(len(real)):
        for name, value in memory[i].items():
            np.testing.assert_array_equal(real[i][name], value)


def test_whole_word_masking_with_a_trained_wordpiece_vocabulary():
    tokenizers = pytest.importorskip("tokenizers")
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
            "in want of a wife. However little known the feelings or views of such a man may be on his first "
            "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
            "he is considered the rightful property of some one or other of their daughters. Emma Woodhouse, "
            "handsome, clever, and rich, with a comfortable home and happy disposition, seemed to unite some of "
            "the best blessings of existence. Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man "
            "who, for his own amusement, never took up any book but the Baronetage.")
    sentences = [s.strip() + "." for s in text.split(".") if s.strip()]
    hf = tokenizers.Tokenizer(tokenizers.models.WordPiece(unk_token="[UNK]"))
    hf.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
    hf.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    hf.train_from_iterator(sentences, tokenizers.trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]))

    class WordPiece:  # the megacore Tokenizer's attributes over the trained model
        kind, vocab_size = "wordpiece", hf.get_vocab_size()
        pad, cls, sep, mask = (hf.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
        id_to_token = staticmethod(hf.id_to_token)

    encoded = [np.array(e.ids) for e in hf.encode_batch(sentences)]
    documents = [encoded[i:] + encoded[:i] for i in range(len(encoded))]  # rotations: many pairs
    ds = MaskedLMDataset(InMemoryIndexedDataset(documents), WordPiece(), 48, mode="sop", whole_word_masking=True,
                         masked_lm_prob=0.3, num_samples=200)
    pieces = 0
    for i in range(len(ds)):
        item = ds[i]
        real = item["attention_mask"] == 1
        tokens = [hf.id_to_token(int(t)) for t in original_tokens(item)]
        masked = (item["labels"] != -100)[real]
        for k in range(1, len(tokens)):
            # a piece is masked exactly when the piece before it is (truncation may leave a piece first)
            if tokens[k].startswith("##") and tokens[k - 1] not in ("[CLS]", "[SEP]"):
                pieces += 1
                assert masked[k] == masked[k - 1], f"sample {i}: {tokens[k - 1]} {tokens[k]} split by the mask"
    assert pieces > 500  # the small vocabulary splits many words
