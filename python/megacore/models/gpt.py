"""GPT: a causal language model on the C++ transformer layer (pre-LN), with tied, vocab-parallel
input/output embeddings.

    ids [b, s] -> Embedding -> [s, b, h] -> TransformerLayer x L -> final norm -> tied LM head
               -> logits [b, s, vocab]   or, with labels, the per-token loss [b, s] (fp32)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megacore.models.common import Embedding, ModelConfig, Norm, TransformerStack, lm_output, tensor_parallel_world


class GPTModel(nn.Module):
    """A GPT-2 / GPT-NeoX-style causal LM.

    ``config.attention_mask_type`` must be ``"causal"`` or ``"sliding_window"``;
    ``position_embedding_type`` ``"learned_absolute"`` (GPT-2) or ``"rope"``. Under tensor
    parallelism the token table is vocab-parallel and the LM head reuses it (tied weights), the loss
    is computed without gathering the logits (``vocab_parallel_cross_entropy``).

    ``forward(input_ids [b, s], labels=None, position_ids=None)`` returns the logits
    ``[b, s, vocab_size]`` in the parameters' dtype, or, with ``labels [b, s]`` (ids, or -100 to
    ignore), the per-token loss ``[b, s]`` in fp32. Labels are the targets of each position as given
    (shift them yourself: ``labels[:, i]`` is the token after ``input_ids[:, i]``).

    Raises ValueError for a non-causal mask type, and the config's/layers' errors.
    """

    pretraining_task = "causal_lm"  # megacore.training.tasks: how `megacore train` trains this class

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        if config.attention_mask_type not in ("causal", "sliding_window"):
            raise ValueError(f"megacore.models.GPTModel: attention_mask_type={config.attention_mask_type!r}; "
                             "a causal LM needs 'causal' or 'sliding_window'")
        tensor_parallel_world(config, "GPTModel")
        self.config = config
        self.embedding = Embedding(config, device)
        self.decoder = TransformerStack(config, device)
        self.final_norm = Norm(config, config.hidden_size, device, sequence_parallel=config.sequence_parallel)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"megacore.models.GPTModel: input_ids has shape {list(input_ids.shape)}, "
                             "expected [batch, seq]")
        x = self.embedding(input_ids, position_ids=position_ids)  # [s, b, h]
        x = self.final_norm(self.decoder(x))
        return lm_output(x, self.embedding.word, self.config.sequence_parallel, labels)


__all__ = ["GPTModel"]
