"""BERT and RoBERTa: a post-LN, bidirectional encoder on the C++ transformer layer, with the masked-LM
head (tied, vocab-parallel), the pooler and the next-sentence (or sentence-order) head.

    ids [b, s] -> Embedding (word + position + token type, LayerNorm) -> [s, b, h]
               -> TransformerLayer x L (post-LN, padding mask)  -> masked-LM head -> loss [b, s] / logits [b, s, v]
                                                                -> pooler (tanh dense on token 0) -> binary head [b, 2]

RoBERTa is the same model without the binary head, with one token type and Hugging Face's position ids
(counted over non-padding tokens, offset by ``padding_idx + 1``).

Module names mirror Hugging Face's ``BertForPreTraining`` (``embedding`` ~ ``bert.embeddings``,
``encoder.layers.i`` ~ ``bert.encoder.layer.i``, ``pooler.dense``, ``mlm_head`` ~ ``cls.predictions``,
``binary_head`` ~ ``cls.seq_relationship``), so a checkpoint maps one name to one name (the layer's
``attention.qkv`` rows are Megatron's per-head ``(head, {q, k, v}, head_dim)`` order).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore.models.common import (
    Embedding,
    MaskedLMHead,
    ModelConfig,
    StagedModel,
    TransformerStack,
    _normal,
    _param,
    tensor_parallel_world,
    to_sequence_first_mask,
)
from megacore.parallel.mappings import gather_from_tensor_parallel_region
from megacore.parallel.placement import place

BINARY_HEADS = ("nsp", "sop")


class BertOutput(NamedTuple):
    """What ``BertModel.forward`` returns.

    loss: scalar fp32, mean masked-LM loss over the non-ignored tokens plus the binary head's
        cross-entropy (each term present when its labels are given), or None without labels.
    mlm: per-token masked-LM loss ``[b, s]`` (fp32, 0 at ignored tokens) with ``labels``, else the
        logits ``[b, s, vocab_size]`` in the parameters' dtype.
    binary_logits: ``[b, 2]`` (next-sentence / sentence-order), None without the head.
    pooled: ``[b, h]``, the pooler's output, None without the pooler.
    hidden: ``[b, s, h]``, the encoder's output (batch-first, whole sequence).
    """

    loss: Optional[torch.Tensor]
    mlm: torch.Tensor
    binary_logits: Optional[torch.Tensor]
    pooled: Optional[torch.Tensor]
    hidden: torch.Tensor


def dense(out_features: int, in_features: int, config: ModelConfig, device=None,
          on_sequence_shard: bool = False) -> nn.Module:
    """A small replicated linear layer's parameters (``weight [out, in]`` ~ normal(0, init_method_std),
    ``bias [out]`` zeros): the heads' dense layers, identical on every tensor-parallel rank.
    ``on_sequence_shard``: applied to sequence shards; under sequence parallelism the parameters are then
    declared ``sequence_parallel`` (each rank's gradient is its shard's part, summed once per step by
    ``megacore.parallel.sum_sequence_parallel_gradients``)."""
    m = nn.Module()
    m.weight = _param(_normal(out_features, in_features, std=config.init_method_std), config, device)
    m.bias = _param(torch.zeros(out_features), config, device)
    for name in ("weight", "bias"):
        place(m, name, None, sequence_parallel=on_sequence_shard and config.sequence_parallel)
    return m


def replicated_linear(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x @ module.weight.T + module.bias`` with replicated weights (a :func:`dense` module)."""
    return F.linear(x, module.weight, module.bias)


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The whole sequence from sequence shards, for computation every rank repeats alike (the pooler, the
    outputs, a replicated loss): ``[s / tp, ...] -> [s, ...]``; None group = identity.

    Its gradient is then whole and identical on every rank, so backward keeps this rank's chunk
    (Megatron's ``tensor_parallel_output_grad=False``); ``gather_from_sequence_parallel_region``'s
    reduce-scatter would sum tp identical copies. ``gather_from_tensor_parallel_region`` is that pair
    (all-gather, keep chunk) along the last dim, hence the moves.
    """
    if group is None:
        return x
    return gather_from_tensor_parallel_region(x.movedim(0, -1).contiguous(), group).movedim(-1, 0)


def position_ids_from_input_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """RoBERTa's (Hugging Face's ``create_position_ids_from_input_ids``) positions ``[b, s]``: real tokens
    count ``padding_idx + 1, padding_idx + 2, ...`` over the non-padding tokens; padding tokens get
    ``padding_idx``."""
    real = (input_ids != padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


def offset_position_ids(input_ids: torch.Tensor, padding_idx: int, config: ModelConfig, model: str,
                        field: str) -> torch.Tensor:
    """RoBERTa's positions of ``input_ids`` (:func:`position_ids_from_input_ids`); ValueError naming
    ``megacore.models.<model>`` and ``field`` (the padding id's name there) when the sequence needs more rows
    than the position table has."""
    s = input_ids.shape[1]
    if s + padding_idx + 1 > config.max_position_embeddings:
        raise ValueError(f"megacore.models.{model}: sequence length {s} needs {s + padding_idx + 1} positions with "
                         f"{field}={padding_idx}, but max_position_embeddings={config.max_position_embeddings}")
    return position_ids_from_input_ids(input_ids, padding_idx)


def check_ids(model: str, input_ids: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """ValueError naming ``megacore.models.<model>`` unless ``input_ids`` is ``[batch, seq]`` and every
    other given ``[batch, seq]`` argument (by keyword) has its shape."""
    if input_ids.dim() != 2:
        raise ValueError(f"megacore.models.{model}: input_ids has shape {list(input_ids.shape)}, expected [batch, seq]")
    for arg, value in others.items():
        if value is not None and value.shape != input_ids.shape:
            raise ValueError(f"megacore.models.{model}: {arg} has shape {list(value.shape)}, expected [batch, seq] = "
                             f"{list(input_ids.shape)} like input_ids")


def encoder_mask(config: ModelConfig, attention_mask: Optional[torch.Tensor], input_ids: torch.Tensor,
                 model: str) -> Optional[torch.Tensor]:
    """The layers' mask for an encoder: bool ``[b, 1, 1, s]`` (True = padding) from Hugging Face's
    ``[b, s]`` 1/0 ``attention_mask``; with ``attention_mask_type='padding'`` and no mask, an all-False
    ``[1, 1, 1, s]`` (the layer then takes one); None with ``'none'``."""
    b, s = input_ids.shape
    if config.attention_mask_type == "none":
        if attention_mask is not None:
            raise ValueError(f"megacore.models.{model}: attention_mask given but the config's "
                             "attention_mask_type is 'none' (use 'padding')")
        return None
    if attention_mask is None:
        return torch.zeros(1, 1, 1, s, dtype=torch.bool, device=input_ids.device)
    if tuple(attention_mask.shape) != (b, s):
        raise ValueError(f"megacore.models.{model}: attention_mask has shape {list(attention_mask.shape)}, "
                         f"expected [batch, seq] = {[b, s]} like input_ids")
    return to_sequence_first_mask(attention_mask)


def check_encoder_config(config: ModelConfig, model: str) -> None:
    """What a post-LN bidirectional encoder (BERT, ELECTRA) needs of a ModelConfig (ValueError naming
    the field otherwise)."""
    name = f"megacore.models.{model}"
    if config.attention_mask_type not in ("padding", "none"):
        raise ValueError(f"{name}: attention_mask_type={config.attention_mask_type!r}; a bidirectional encoder "
                         "needs 'padding' (a [batch, seq] attention_mask) or 'none'")
    if config.pre_norm:
        raise ValueError(f"{name}: pre_norm=True; the encoder is post-LN (set pre_norm=False): it has no final norm")
    if not config.embedding_norm:
        raise ValueError(f"{name}: embedding_norm=False; the encoder's embeddings end in a norm (set embedding_norm=True)")


class BertModel(StagedModel):
    """BERT (and RoBERTa): embeddings with LayerNorm, a post-LN encoder with a padding mask, the masked-LM
    head, the pooler and a next-sentence / sentence-order head.

    Args:
        config: ``attention_mask_type`` ``"padding"`` (or ``"none"``), ``pre_norm=False``,
            ``embedding_norm=True``; ``type_vocab_size`` token types (BERT 2, RoBERTa 1).
        add_pooler: the pooler (``dense [h, h]``, tanh, on the first token).
        head: ``"nsp"`` / ``"sop"``: the binary head ``binary_head`` (``weight [2, h]``, ``bias [2]``) on
            the pooled output (the two differ only in what the labels mean); None for none (RoBERTa).
        position_offset_padding_idx: RoBERTa's padding id: positions are then computed from the ids as
            Hugging Face does (:func:`position_ids_from_input_ids`), so the position table needs
            ``seq + padding_idx + 1`` rows (514 for 512 tokens). None: positions ``0 .. s-1``.
        device: where the parameters live (``"meta"``: nowhere).

    ``forward(input_ids [b, s], attention_mask=None [b, s] 1/0, token_type_ids=None [b, s],
    position_ids=None [b, s], labels=None [b, s] (masked-LM targets, -100 ignored),
    next_sentence_label=None [b] (0/1))`` returns a :class:`BertOutput`.

    Tensor parallelism: the encoder's layers and the vocab are split; the pooler and the binary head are
    small and replicated. Under sequence parallelism the encoder's output is gathered (once) for the
    pooler and ``hidden``.

    Raises ValueError for a config that is not a post-LN bidirectional encoder, an unknown head, a
    binary head without the pooler, bad inputs; RuntimeError with ``tensor_parallel=True`` before
    ``initialize_model_parallel``.
    """

    # megacore.training.tasks: how `megacore train` trains this class (with sentence pairs when the model has a
    # binary head: its ``head_type``)
    pretraining_task = "masked_lm"

    def __init__(self, config: ModelConfig, add_pooler: bool = True, head: Optional[str] = "nsp",
                 position_offset_padding_idx: Optional[int] = None, device=None):
        super().__init__()
        check_encoder_config(config, "BertModel")
        if head is not None and head not in BINARY_HEADS:
            raise ValueError(f"megacore.models.BertModel: head={head!r} is not one of {', '.join(BINARY_HEADS)} or None")
        if head is not None and not add_pooler:
            raise ValueError(f"megacore.models.BertModel: head={head!r} reads the pooled output; it needs add_pooler=True")
        if position_offset_padding_idx is not None:
            p = position_offset_padding_idx
            if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < config.vocab_size:
                raise ValueError(f"megacore.models.BertModel: position_offset_padding_idx={p!r} must be None or a "
                                 f"token id in [0, vocab_size={config.vocab_size})")
            if config.position_embedding_type != "learned_absolute":
                raise ValueError("megacore.models.BertModel: position_offset_padding_idx needs "
                                 f"position_embedding_type='learned_absolute', got {config.position_embedding_type!r}")
        self.group, _, _ = tensor_parallel_world(config, "BertModel")
        self.config = config
        self.head_type = head
        self.position_offset_padding_idx = position_offset_padding_idx
        h = config.hidden_size
        self.embedding = Embedding(config, device)
        self.encoder = TransformerStack(config, device)
        self.mlm_head = MaskedLMHead(config, self.embedding.word, device)
        if add_pooler:
            self.pooler = nn.Module()
            self.pooler.dense = dense(h, h, config, device)
        else:
            self.pooler = None
        self.binary_head = dense(2, h, config, device) if head is not None else None

    def position_ids(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        """The position ids the model uses for ``input_ids`` when none are given: RoBERTa's offset ones,
        or None (``0 .. s-1``). Raises ValueError when they exceed the position table."""
        p = self.position_offset_padding_idx
        if p is None:
            return None
        return offset_position_ids(input_ids, p, self.config, "BertModel", "position_offset_padding_idx")

    pipeline_stacks = ("encoder",)
    first_stage_modules = ("embedding",)
    last_stage_modules = ("mlm_head", "pooler", "binary_head")
    tied_modules = ("embedding.word",)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None,
                next_sentence_label: Optional[torch.Tensor] = None) -> BertOutput:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "position_ids": position_ids, "labels": labels, "next_sentence_label": next_sentence_label}
        return self.run_stages(batch)[0]

    def stage_input(self, batch: dict):
        check_ids("BertModel", batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                  position_ids=batch.get("position_ids"), labels=batch.get("labels"))
        input_ids, position_ids = batch["input_ids"], batch.get("position_ids")
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        return (self.embedding(input_ids, batch.get("token_type_ids"), position_ids),), None  # [s(/tp), b, h]

    def stage_mask(self, batch: dict) -> Optional[torch.Tensor]:
        return encoder_mask(self.config, batch.get("attention_mask"), batch["input_ids"], "BertModel")

    def stage_output(self, acts: tuple, batch: dict) -> BertOutput:
        if batch.get("next_sentence_label") is not None and self.binary_head is None:
            raise ValueError("megacore.models.BertModel: next_sentence_label given but the model has no binary head "
                             "(head=None)")
        x, labels, next_sentence_label = acts[0], batch.get("labels"), batch.get("next_sentence_label")
        mlm = self.mlm_head(x, self.embedding.word, labels)  # loss [b, s] or logits [b, s, v]
        full = gather_sequence(x, self.group if self.config.sequence_parallel else None)  # [s, b, h]
        pooled = binary_logits = None
        if self.pooler is not None:
            pooled = torch.tanh(replicated_linear(full[0], self.pooler.dense))  # [b, h]
        if self.binary_head is not None:
            binary_logits = replicated_linear(pooled, self.binary_head)  # [b, 2]
        loss = None
        if labels is not None:
            loss = mlm.sum() / (labels != -100).sum().clamp(min=1)
        if next_sentence_label is not None:
            binary_loss = F.cross_entropy(binary_logits.float(), next_sentence_label)
            loss = binary_loss if loss is None else loss + binary_loss
        return BertOutput(loss, mlm, binary_logits, pooled, full.transpose(0, 1))


__all__ = ["BertModel", "BertOutput", "position_ids_from_input_ids"]
