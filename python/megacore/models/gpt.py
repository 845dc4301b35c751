"""GPT: a causal language model on the C++ transformer layer (pre-LN), with tied, vocab-parallel
input/output embeddings.

    ids [b, s] -> Embedding -> [s, b, h] -> TransformerLayer x L -> final norm -> tied LM head
               -> logits [b, s, vocab]   or, with labels, the per-token loss [b, s] (fp32)
"""

from __future__ import annotations

from typing import Optional

import torch

from megacore.models.common import (Embedding, KVCache, ModelConfig, Norm, StagedModel, TransformerStack, lm_output,
                                    tensor_parallel_world)


class GPTModel(StagedModel):
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

    pipeline_stacks = ("decoder",)
    first_stage_modules = ("embedding",)
    last_stage_modules = ("final_norm",)
    tied_modules = ("embedding.word",)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        return self.run_stages(batch)[0]

    @torch.no_grad()
    def forward_with_cache(self, input_ids: torch.Tensor, kv_cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Decoding: ``input_ids [b, n]`` continue the sequences held in ``kv_cache`` (``new_cache``) at its
        ``length``; their keys and values are appended. Returns fp32 logits ``[b, vocab_size]`` of the last new
        position, or ``[b, n, vocab_size]`` with ``all_logits=True`` (the full vocabulary on every rank). No dropout,
        no autograd. Raises ValueError when the cache or the position table is too short."""
        if input_ids.dim() != 2 or input_ids.shape[0] != kv_cache.batch:
            raise ValueError(f"megacore.models.GPTModel.forward_with_cache: input_ids has shape "
                             f"{list(input_ids.shape)}, expected [{kv_cache.batch}, n] (the cache's batch)")
        x = self.embedding(input_ids, start=kv_cache.length)  # [n, b, h]
        x = self.decoder(x, kv_cache=kv_cache)
        kv_cache.advance(input_ids.shape[1])
        x = self.final_norm(x if all_logits else x[-1:])
        logits = lm_output(x, self.embedding.word, sequence_parallel=False).float()  # [b, n, vocab]
        return logits if all_logits else logits[:, -1]

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty key/value cache for ``batch`` sequences of up to ``capacity`` positions."""
        return KVCache(self.decoder, batch, capacity)

    def stage_input(self, batch: dict):
        input_ids = batch["input_ids"]
        if input_ids.dim() != 2:
            raise ValueError(f"megacore.models.GPTModel: input_ids has shape {list(input_ids.shape)}, "
                             "expected [batch, seq]")
        return (self.embedding(input_ids, position_ids=batch.get("position_ids")),), None  # [s(/tp), b, h]

    def stage_output(self, acts: tuple, batch: dict) -> torch.Tensor:
        """The per-token loss ``[b, s]`` (fp32) when the batch has ``labels``, else the logits ``[b, s, v]``."""
        x = self.final_norm(acts[0])
        return lm_output(x, self.embedding.word, self.config.sequence_parallel, batch.get("labels"))


__all__ = ["GPTModel"]
