"""megacore.data: tokenizers, the embedded corpus, Megatron-compatible indexed datasets, datasets and samplers."""

from megacore.data.corpus import corpus_files, read_text
from megacore.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megacore.data.masked_lm import ElectraDataset, MaskedLMDataset, word_starts
from megacore.data.prepare import PrepareError, PrepareSummary, merge_datasets, prepare_dataset, split_sentences
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
    "DTYPE_CODES",
    "ElectraDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "MaskedLMDataset",
    "PrepareError",
    "PrepareSummary",
    "Tokenizer",
    "best_dtype",
    "corpus_files",
    "data_file_path",
    "from_gpt2_files",
    "from_sentencepiece",
    "from_tokenizer_json",
    "from_wordpiece_vocab",
    "index_file_path",
    "merge_datasets",
    "prepare_dataset",
    "read_text",
    "split_sentences",
    "train_bpe",
    "train_wordpiece",
    "word_starts",
]
