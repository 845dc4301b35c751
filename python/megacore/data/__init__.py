"""megacore.data: tokenizers, the embedded corpora, Megatron-compatible indexed datasets, datasets and samplers,
and the fine-tuning data of classifiers (labelled files and the embedded classification / tagging tasks)."""

from megacore.data.blended import BlendedDataset, blending_sample_counts
from megacore.data.classification import (
    ClassificationDataset,
    LabeledExample,
    LabelSet,
    austen_novel_examples,
    bible_pair_examples,
    encode_examples,
    label_counts,
    majority_baseline,
    proper_noun_examples,
    read_labeled,
)
from megacore.data.corpus import corpus_files, read_text
from megacore.data.gpt_dataset import GPTDataset, build_gpt_datasets, document_lengths
from megacore.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megacore.data.masked_lm import ElectraDataset, MaskedLMDataset, word_starts
from megacore.data.span_corruption import SpanCorruptionDataset, random_spans_noise_mask, span_corruption_lengths
from megacore.data.seq2seq import Seq2SeqDataset, TextPair, read_pairs, tokenize_pairs
from megacore.data.parallel import VersePair, bible_pairs, bible_text, read_bible_tsv
from megacore.data.prepare import PrepareError, PrepareSummary, merge_datasets, prepare_dataset, split_sentences
from megacore.data.sampler import PretrainingSampler, RandomPretrainingSampler
from megacore.data.splits import parse_split, split_documents, split_ranges
from megacore.data.tokenizer import (
    Tokenizer,
    from_gpt2_files,
    from_sentencepiece,
    from_tokenizer_json,
    from_wordpiece_vocab,
    train_bpe,
    train_unigram,
    train_wordpiece,
)

__all__ = [
    "BlendedDataset",
    "ClassificationDataset",
    "LabelSet",
    "LabeledExample",
    "austen_novel_examples",
    "bible_pair_examples",
    "encode_examples",
    "label_counts",
    "majority_baseline",
    "proper_noun_examples",
    "read_labeled",
    "DTYPE_CODES",
    "ElectraDataset",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "MaskedLMDataset",
    "PrepareError",
    "PrepareSummary",
    "PretrainingSampler",
    "RandomPretrainingSampler",
    "Tokenizer",
    "VersePair",
    "best_dtype",
    "bible_pairs",
    "bible_text",
    "random_spans_noise_mask",
    "read_pairs",
    "Seq2SeqDataset",
    "TextPair",
    "tokenize_pairs",
    "span_corruption_lengths",
    "SpanCorruptionDataset",
    "blending_sample_counts",
    "build_gpt_datasets",
    "corpus_files",
    "data_file_path",
    "document_lengths",
    "from_gpt2_files",
    "from_sentencepiece",
    "from_tokenizer_json",
    "from_wordpiece_vocab",
    "index_file_path",
    "merge_datasets",
    "read_bible_tsv",
    "parse_split",
    "prepare_dataset",
    "read_text",
    "split_documents",
    "split_ranges",
    "split_sentences",
    "train_bpe",
    "train_unigram",
    "train_wordpiece",
    "word_starts",
]
