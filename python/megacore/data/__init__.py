"""megacore.data: tokenizers, the embedded corpus, Megatron-compatible indexed datasets, datasets and samplers."""

from megacore.data.corpus import corpus_files, read_text
from megacore.data.masked_lm import ElectraDataset, MaskedLMDataset, word_starts
from megacore.data.tokenizer import (
    Tokenizer,
    from_gpt2_files,
    from_sentencepiece,
    from_tokenizer_json,
    from_wordpiece_vocab,
    train_bpe,
    train_wordpiece,
)

__all__ = [
    "ElectraDataset",
    "MaskedLMDataset",
    "Tokenizer",
    "corpus_files",
    "from_gpt2_files",
    "from_sentencepiece",
    "from_tokenizer_json",
    "from_wordpiece_vocab",
    "read_text",
    "train_bpe",
    "train_wordpiece",
    "word_starts",
]
