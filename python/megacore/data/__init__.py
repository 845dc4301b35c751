"""megacore.data: tokenizers, Megatron-format indexed datasets, GPT / masked-LM datasets, samplers."""

from megacore.data.blended import BlendedDataset, blending_sample_counts
from megacore.data.gpt_dataset import GPTDataset, build_gpt_datasets, document_lengths
from megacore.data.sampler import PretrainingSampler, RandomPretrainingSampler
from megacore.data.splits import parse_split, split_documents, split_ranges
