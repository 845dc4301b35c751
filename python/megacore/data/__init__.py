"""megacore.data: tokenizers, the embedded corpus, Megatron-compatible indexed datasets, datasets and samplers."""

from megacore.data.blended import BlendedDataset, blending_sample_counts
from megacore.data.corpus import corpus_files, read_text
from megacore.data.gpt_dataset import GPTDataset, build_gpt_datasets, document_lengths
from megacore.data.masked_lm import ElectraDataset, MaskedLMDataset, word_starts
from megacore.data.sampler import PretrainingSampler, RandomPretrainingSampler
from megacore.data.splits import parse_split, split_documents, split_ranges
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
    "BlendedDataset",
    "ElectraDataset",
    "GPTDataset",
    "MaskedLMDataset",
    "PretrainingSampler",
    "RandomPretrainingSampler",
    "Tokenizer",
    "blending_sample_counts",
    "build_gpt_datasets",
    "corpus_files",
    "document_lengths",
    "from_gpt2_files",
    "from_sentencepiece",
    "from_tokenizer_json",
    "from_wordpiece_vocab",
    "parse_split",
    "read_text",
    "split_documents",
    "split_ranges",
    "train_bpe",
    "train_wordpiece",
    "word_starts",
]
