"""megacore.training.evaluate: perplexity is exp of the mean token loss computed by hand (also when batches
are cut short or shared out over data-parallel ranks); LAMBADA-style passages end at sentence-final words;
last-word accuracy is 1.0 for a model forced to be right and equals a hand count of greedy decoding otherwise."""

import math

import numpy as np
import pytest
import torch

from megacore.data import GPTDataset, train_bpe
from megacore.data.corpus import corpus_files, read_text
from megacore.models import GPTModel, ModelConfig
from megacore.training.evaluate import last_word_accuracy, last_word_passages, perplexity
from megacore.training.generate import generate
from tests.parallel.utils import run_distributed

VOCAB = 300


class MemoryDataset:
    """An IndexedDataset-like set of documents held in memory (one sequence each)."""

    def __init__(self, documents):
        self.docs = [np.asarray(d, dtype=np.int64) for d in documents]
        self.sequence_lengths = np.array([len(d) for d in self.docs], dtype=np.int64)
        self.document_indices = np.arange(len(self.docs) + 1, dtype=np.int64)

    def get(self, i, offset=0, length=None):
        d = self.docs[i]
        return d[offset:] if length is None else d[offset:offset + length]


def _dataset(labels=False):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 50, size=int(rng.integers(10, 40))) for _ in range(12)]
    return GPTDataset(MemoryDataset(docs), seq_len=8, seed=3, cache_dir=False, labels=labels)


def _model(vocab=50, **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=vocab, hidden_size=32, num_layers=1, num_attention_heads=2, max_position_embeddings=64)
    return GPTModel(ModelConfig(**{**fields, **overrides}))


def _hand_mean_loss(model, dataset, indices):
    losses = []
    with torch.no_grad():
        for i in indices:
            tokens = torch.as_tensor(dataset[i]["tokens"])
            logits = model(tokens[None, :-1])[0].double()
            losses.append(torch.nn.functional.cross_entropy(logits, tokens[1:], reduction="none"))
    return torch.cat(losses).mean().item()


def test_perplexity_is_exp_of_the_mean_token_loss_by_hand():
    model, dataset = _model(), _dataset()
    model.train()
    result = perplexity(model, dataset, batch_size=3)
    expected = _hand_mean_loss(model.eval(), dataset, range(len(dataset)))
    assert result["tokens"] == 8 * len(dataset) and result["batches"] == -(-len(dataset) // 3)
    assert result["loss"] == pytest.approx(expected, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    assert model.training is False  # eval() above; a train-mode model is restored to train mode:
    model.train()
    perplexity(model, dataset, batch_size=3)
    assert model.training


def test_perplexity_max_batches_and_labelled_datasets():
    model = _model()
    result = perplexity(model, _dataset(labels=True), batch_size=2, max_batches=2)
    assert result["batches"] == 2 and result["tokens"] == 4 * 8
    assert result["loss"] == pytest.approx(_hand_mean_loss(model.eval(), _dataset(), range(4)), rel=1e-6)


def test_perplexity_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="perplexity: batch_size=0"):
        perplexity(model, _dataset(), 0)
    with pytest.raises(ValueError, match="max_batches=-1"):
        perplexity(model, _dataset(), 2, max_batches=-1)
    with pytest.raises(ValueError, match="dataset is empty"):
        perplexity(model, [], 2)


def _data_parallel_perplexity(rank, world):
    from megacore.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(1)  # data-parallel size = world
    try:
        model, dataset = _model(), _dataset()
        result = perplexity(model, dataset, batch_size=2, max_batches=5)
        expected = _hand_mean_loss(model.eval(), dataset, range(10))
        assert result["tokens"] == 80
        assert result["loss"] == pytest.approx(expected, rel=1e-6)
    finally:
        destroy_model_parallel()


def test_perplexity_under_data_parallelism_equals_one_process():
    run_distributed(_data_parallel_perplexity, 2, timeout_s=60)


@pytest.fixture(scope="module")
def text_and_tokenizer():
    text = read_text(corpus_files("valid")[0])[:40_000]
    return text, train_bpe([text], vocab_size=VOCAB)


def test_passages_end_at_sentence_final_words(text_and_tokenizer):
    text, tok = text_and_tokenizer
    passages = last_word_passages(tok, text, num_passages=20, context_tokens=24)
    assert len(passages) == 20
    for context, target in passages:
        assert len(context) == 24 and target
        word = tok.decode(target)
        assert word[0].isspace() and word.lstrip().isalpha(), word  # " word" or "\nword"
        assert tok.decode(context + target) in text
    with pytest.raises(ValueError, match="num_passages=0"):
        last_word_passages(tok, text, 0, 10)
    with pytest.raises(ValueError, match="no sentence-final word"):
        last_word_passages(tok, "no sentence ends here", 3, 4)


class OracleModel(torch.nn.Module):
    """Returns one-hot logits of the true next token of every passage prefix it was given (0 elsewhere);
    ``wrong`` passages get their last target token's logits moved to another id."""

    def __init__(self, passages, vocab, wrong=()):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab = vocab
        self.next = {}
        for p, (context, target) in enumerate(passages):
            seq = context + target
            for i in range(len(seq) - 1):
                self.next[tuple(seq[:i + 1])] = seq[i + 1]
            if p in wrong:
                self.next[tuple(seq[:-1])] = (seq[-1] + 1) % vocab

    def forward(self, ids):
        out = torch.zeros(*ids.shape, self.vocab)
        for r, row in enumerate(ids.tolist()):
            for i in range(len(row)):
                out[r, i, self.next.get(tuple(row[:i + 1]), 0)] = 1.0
        return out


def test_last_word_accuracy_is_one_for_a_model_forced_to_be_right(text_and_tokenizer):
    text, tok = text_and_tokenizer
    passages = last_word_passages(tok, text, 12, 16)
    result = last_word_accuracy(OracleModel(passages, tok.vocab_size), tok, text, 12, 16, batch_size=5)
    assert result == {"accuracy": 1.0, "correct": 12, "passages": 12}
    wrong = {1, 4, 5}
    result = last_word_accuracy(OracleModel(passages, tok.vocab_size, wrong), tok, text, 12, 16, batch_size=5)
    assert result == {"accuracy": 9 / 12, "correct": 9, "passages": 12}


def test_last_word_accuracy_matches_a_hand_count_of_greedy_decoding():
    # Sentences whose last word a small model learns ("... seven eight.") or cannot know ("... three four."
    # vs "... three nine."): a model trained briefly on them gets some passages right and some wrong.
    rng = np.random.default_rng(0)
    sentences = ["one two three four.", "five six seven eight.", "one two three nine."]
    text = " ".join(sentences[i] for i in rng.integers(0, 3, size=600))
    tok = train_bpe([text], vocab_size=VOCAB)
    model = _model(vocab=tok.vocab_size, hidden_dropout=0.0, attention_dropout=0.0)
    ids = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 33] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    passages = last_word_passages(tok, text, 30, 20)
    by_hand = sum(generate(model, c, len(t), greedy=True) == t for c, t in passages)
    result = last_word_accuracy(model, tok, text, 30, 20, batch_size=7)
    assert result["passages"] == 30 and result["correct"] == by_hand
    assert 0 < by_hand < 30, f"{by_hand} of 30 right: the test needs both outcomes"


def test_last_word_accuracy_rejects_too_long_passages(text_and_tokenizer):
    text, tok = text_and_tokenizer
    model = _model(vocab=tok.vocab_size, max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        last_word_accuracy(model, tok, text, 4, 20)
    with pytest.raises(ValueError, match="batch_size=0"):
        last_word_accuracy(model, tok, text, 4, 8, batch_size=0)
