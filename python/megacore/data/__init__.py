"""megacore.data: tokenizers, Megatron-format indexed datasets, `megacore prepare`, datasets and samplers."""

from megacore.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    best_dtype,
    data_file_path,
    index_file_path,
)
from megacore.data.prepare import PrepareError, PrepareSummary, merge_datasets, prepare_dataset, split_sentences
