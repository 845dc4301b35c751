"""megacore.data: tokenizers, Megatron-compatible indexed datasets, and the datasets and samplers built on
them."""

from megacore.data.masked_lm import ElectraDataset, MaskedLMDataset, word_starts

__all__ = ["ElectraDataset", "MaskedLMDataset", "word_starts"]
