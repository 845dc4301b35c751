"""Shared fixtures. ``device`` runs a test once per device present: "cpu" always, "cuda" when a GPU is (so
the whole suite runs on CUDA on a GPU machine, as scripts/gpu-check.sh does, and CUDA results can be
compared with the CPU's from the same seeds)."""

from __future__ import annotations

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """The device a test runs on; one test per device present."""
    return request.param


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> str:
    """A cache directory holding the embedded corpus prepared once for the whole session (a BPE of 1,000
    tokens, as the small `megacore train` runs of the tests use: --vocab-size 1000)."""
    from megacore.training.run import embedded_corpus

    root = tmp_path_factory.mktemp("corpus-cache")
    embedded_corpus(str(root), 1000, log=lambda m: None)
    return str(root)


@pytest.fixture(scope="session")
def t5_corpus_cache(tmp_path_factory) -> str:
    """A cache directory holding the embedded corpus as T5 pretraining prepares it (the novels and the Bible
    corpus, a bilingual Unigram of 1,000 tokens with sentinels), once for the whole session."""
    from megacore.training.corpus import embedded_corpus_t5

    root = tmp_path_factory.mktemp("t5-corpus-cache")
    embedded_corpus_t5(str(root), 1000, log=lambda m: None)
    return str(root)


@pytest.fixture(scope="session")
def wordpiece_corpus_cache(tmp_path_factory) -> str:
    """A cache directory holding the embedded corpus as masked-LM / ELECTRA pretraining prepares it (a WordPiece of
    1,000 tokens, sentences), once for the whole session; fine-tuning from scratch reads its tokenizer."""
    from megacore.training.corpus import embedded_corpus_wordpiece

    root = tmp_path_factory.mktemp("wordpiece-corpus-cache")
    embedded_corpus_wordpiece(str(root), 1000, log=lambda m: None)
    return str(root)
