"""ELECTRA (Clark et al., 2020): a small masked-LM generator and a discriminator that tells which tokens the
generator replaced, sharing the token, position and token-type embeddings.

    ids (with [MASK] at masked positions) -> shared Embedding [s, b, e]
        -> generator: projection e->hg, post-LN encoder, MaskedLMHead -> MLM loss; sample x~softmax at masked
           positions (no gradient through the sampling)
    corrupted ids (samples at masked positions) -> shared Embedding
        -> discriminator: projection e->h, post-LN encoder, head (dense, GeLU, dense_prediction) -> logits [b, s]
    loss = generator MLM loss + discriminator_weight * binary cross-entropy("token differs from the original")

Names mirror Hugging Face's: ``embedding`` ~ ``electra.embeddings`` (shared), ``{generator,discriminator}.projection``
~ ``electra.embeddings_project``, ``.encoder.layers.i`` ~ ``electra.encoder.layer.i``, ``generator.mlm_head``
~ ``generator_predictions`` + ``generator_lm_head`` (tied), ``discriminator.head`` ~ ``discriminator_predictions``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore import ops
from megacore.models.bert import (
    check_encoder_config,
    check_ids,
    dense,
    encoder_mask,
    gather_sequence,
    replicated_linear,
)
from megacore.models.common import (Embedding, MaskedLMHead, ModelConfig, StagedModel, TransformerStack, lm_output,
                                    tensor_parallel_world)

# Fields the generator and the discriminator must agree on: they share the embedding (and its norm).
# The mask kind too: both read the same attention_mask.
SHARED_FIELDS = ("vocab_size", "embedding_dim", "max_position_embeddings", "type_vocab_size", "position_embedding_type",
                 "normalization", "norm_epsilon", "params_dtype", "tensor_parallel", "sequence_parallel",
                 "attention_mask_type")


def electra_generator_config(config: ModelConfig, size: float) -> ModelConfig:
    """The generator's config for a discriminator ``config``: hidden size, heads and FFN size scaled by ``size``
    (the paper's generator size: 1/4 for Small and Large, 1/3 for Base; heads at least 1), the embedding size
    kept (the embedding is shared). Raises ValueError for a size outside (0, 1]."""
    if not isinstance(size, (int, float)) or isinstance(size, bool) or not 0.0 < size <= 1.0:
        raise ValueError(f"megacore.models.electra_generator_config: size={size!r} must be in (0, 1]")
    return dataclasses.replace(config, hidden_size=max(1, round(config.hidden_size * size)),
                               num_attention_heads=max(1, round(config.num_attention_heads * size)),
                               ffn_hidden_size=max(1, round(config.ffn_hidden_size * size)),
                               embedding_size=config.embedding_dim)


def shared_embedding(config: ModelConfig, device=None) -> Embedding:
    """The embedding both models share, ``ids [b, s] -> [s(/tp), b, embedding_dim]``: its output stays at
    the embedding width (each model projects it to its own hidden size)."""
    width = dataclasses.replace(config, hidden_size=config.embedding_dim, embedding_size=None, num_attention_heads=1,
                                ffn_hidden_size=None)
    return Embedding(width, device)


class _EncoderTrunk(nn.Module):
    """``projection`` (``weight [h, e]``, ``bias [h]``; only when embedding_dim != hidden_size) then the post-LN
    ``encoder``: ``[s(/tp), b, e] -> [s(/tp), b, h]``."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        self.group, _, _ = tensor_parallel_world(config, "ElectraModel")
        self.projection = (dense(config.hidden_size, config.embedding_dim, config, device, on_sequence_shard=True)
                           if config.embedding_dim != config.hidden_size else None)
        self.encoder = TransformerStack(config, device)

    @property
    def sequence_parallel_group(self):
        return self.group if self.config.sequence_parallel else None

    def encode(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.projection is not None:
            x = replicated_linear(x, self.projection)
        return self.encoder(x, mask)


class ElectraGenerator(_EncoderTrunk):
    """The generator: projection, encoder and ``mlm_head`` (:class:`MaskedLMHead`, tied to the shared word
    embedding). ``forward(x [s(/tp), b, e], mask)`` -> the head's features ``[s(/tp), b, e]`` (see
    ``MaskedLMHead.transform``), from which logits and loss are taken."""

    def __init__(self, config: ModelConfig, embedding: Embedding, device=None):
        super().__init__(config, device)
        self.mlm_head = MaskedLMHead(config, embedding.word, device)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], embedding: Embedding) -> torch.Tensor:
        return self.mlm_head.transform(self.encode(x, mask), embedding.word)


class ElectraDiscriminator(_EncoderTrunk):
    """The discriminator: projection, encoder and ``head`` (``dense [h, h]`` -> GeLU -> ``dense_prediction
    [1, h]``). ``forward(x [s(/tp), b, e], mask, return_hidden=True)`` -> (logits ``[b, s]`` (parameters'
    dtype), the encoder output ``[b, s, h]`` or None)."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__(config, device)
        h = config.hidden_size
        self.head = nn.Module()
        self.head.dense = dense(h, h, config, device, on_sequence_shard=True)
        self.head.dense_prediction = dense(1, h, config, device, on_sequence_shard=True)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                return_hidden: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.encode(x, mask)  # [s(/tp), b, h]
        hidden = gather_sequence(x, self.sequence_parallel_group).transpose(0, 1) if return_hidden else None
        return self.head_logits(x), hidden

    def head_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head on the encoder's output ``[s(/tp), b, h]`` -> logits ``[b, s]`` (whole sequence, every rank)."""
        h = ops.bias_gelu(F.linear(x, self.head.dense.weight), self.head.dense.bias,
                          "none" if self.config.activation == "gelu" else "tanh")
        logits = replicated_linear(h, self.head.dense_prediction)[..., 0]  # [s(/tp), b]
        # the loss is computed alike on every rank from the whole sequence
        return gather_sequence(logits, self.sequence_parallel_group).t()


def replaced_token_loss(logits: torch.Tensor, labels: torch.Tensor,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The discriminator's loss: binary cross-entropy (fp32) of ``logits [b, s]`` against ``labels [b, s]``
    (1 / True = replaced), averaged over the real tokens (``attention_mask`` 1; all tokens without one), as
    Hugging Face's ``ElectraForPreTraining`` computes it."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    if attention_mask is None:
        return loss.mean()
    real = attention_mask.bool()
    return (loss * real).sum() / real.sum().clamp(min=1)


class ElectraDiscriminatorOutput(NamedTuple):
    """``ElectraDiscriminatorModel.forward``'s result: ``loss`` (scalar fp32, None without labels),
    ``logits [b, s]`` (> 0: "replaced"), ``hidden [b, s, h]`` (the encoder's output)."""

    loss: Optional[torch.Tensor]
    logits: torch.Tensor
    hidden: torch.Tensor


class ElectraDiscriminatorModel(nn.Module):
    """The discriminator alone, with its embedding: what is fine-tuned after pre-training (Hugging Face's
    ``ElectraForPreTraining``). Built on its own from ``config``, or around an ElectraModel's modules
    (``ElectraModel.discriminator_model()``: the same parameters, not copies).

    ``forward(input_ids [b, s], attention_mask=None [b, s] 1/0, token_type_ids=None, position_ids=None,
    labels=None [b, s] 1 = replaced)`` -> :class:`ElectraDiscriminatorOutput`.
    """

    def __init__(self, config: ModelConfig, device=None, embedding: Optional[Embedding] = None,
                 discriminator: Optional[ElectraDiscriminator] = None):
        super().__init__()
        check_encoder_config(config, "ElectraDiscriminatorModel")
        self.config = config
        self.embedding = embedding if embedding is not None else shared_embedding(config, device)
        self.discriminator = discriminator if discriminator is not None else ElectraDiscriminator(config, device)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> ElectraDiscriminatorOutput:
        check_ids("ElectraDiscriminatorModel", input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                   labels=labels)
        mask = encoder_mask(self.config, attention_mask, input_ids, "ElectraDiscriminatorModel")
        logits, hidden = self.discriminator(self.embedding(input_ids, token_type_ids, position_ids), mask)
        loss = replaced_token_loss(logits, labels, attention_mask) if labels is not None else None
        return ElectraDiscriminatorOutput(loss, logits, hidden)


class ElectraOutput(NamedTuple):
    """``ElectraModel.forward``'s result.

    loss: ``generator_loss + discriminator_weight * discriminator_loss`` (scalar fp32).
    generator_loss: mean masked-LM loss over the masked tokens (fp32).
    discriminator_loss: mean binary cross-entropy over the real tokens (fp32).
    sampled_ids: ``[b, s]``, the discriminator's input: the generator's samples at masked positions, the
        input elsewhere (no gradient: integers).
    discriminator_labels: ``[b, s]`` bool, True where ``sampled_ids`` differs from the original token.
    discriminator_logits: ``[b, s]`` (parameters' dtype).
    """

    loss: torch.Tensor
    generator_loss: torch.Tensor
    discriminator_loss: torch.Tensor
    sampled_ids: torch.Tensor
    discriminator_labels: torch.Tensor
    discriminator_logits: torch.Tensor


class ElectraModel(StagedModel):
    """ELECTRA pre-training: generator and discriminator sharing the embedding.

    Args:
        config: the discriminator's config (a post-LN encoder: ``attention_mask_type`` ``"padding"``,
            ``pre_norm=False``, ``embedding_norm=True``); ``embedding_size`` may differ from
            ``hidden_size`` (ELECTRA-small: 128 vs 256): each model then projects the shared embedding.
        generator_config: the generator's config; None derives it with :func:`electra_generator_config`
            and ``generator_size``. Must agree with ``config`` on ``SHARED_FIELDS``.
        discriminator_weight: λ in ``loss = generator_loss + λ * discriminator_loss`` (the paper's 50).
        generator_size: the generator's hidden/heads/FFN fraction of the discriminator's when
            ``generator_config`` is None.
        device: where the parameters live (``"meta"``: nowhere).

    ``forward(input_ids [b, s], attention_mask=None [b, s] 1/0, token_type_ids=None, mlm_labels [b, s],
    position_ids=None)``: ``mlm_labels`` hold the original token at masked positions and -100 elsewhere
    (``input_ids`` hold the mask token there). The generator samples replacements at the masked positions
    from its softmax (``torch.multinomial`` under no_grad, from torch's default generator: under tensor
    parallelism seed the ranks alike, as for dropout). Returns an :class:`ElectraOutput`.

    ``discriminator_model()`` is the discriminator alone, for fine-tuning; ``generator_logits(...)`` the
    generator's MLM logits.

    Raises ValueError for configs that do not agree or are not encoders, a bad weight or bad inputs;
    RuntimeError with ``tensor_parallel=True`` before ``initialize_model_parallel``.
    """

    pretraining_task = "electra"  # megacore.training.tasks: how `megacore train` trains this class

    def __init__(self, config: ModelConfig, generator_config: Optional[ModelConfig] = None,
                 discriminator_weight: float = 50.0, generator_size: float = 0.25, device=None):
        super().__init__()
        name = "megacore.models.ElectraModel"
        if generator_config is None:
            generator_config = electra_generator_config(config, generator_size)
        check_encoder_config(config, "ElectraModel")
        check_encoder_config(generator_config, "ElectraModel (generator_config)")
        for field in SHARED_FIELDS:
            d, g = getattr(config, field), getattr(generator_config, field)
            if d != g:
                raise ValueError(f"{name}: generator_config.{field}={g!r} differs from the discriminator's {d!r}; "
                                 "the two share the embedding")
        if (not isinstance(discriminator_weight, (int, float)) or isinstance(discriminator_weight, bool)
                or not discriminator_weight >= 0):
            raise ValueError(f"{name}: discriminator_weight={discriminator_weight!r} must be a number >= 0")
        tensor_parallel_world(config, "ElectraModel")
        tensor_parallel_world(generator_config, "ElectraModel (generator_config)")
        self.config, self.generator_config = config, generator_config
        self.discriminator_weight = float(discriminator_weight)
        self.embedding = shared_embedding(config, device)
        self.generator = ElectraGenerator(generator_config, self.embedding, device)
        self.discriminator = ElectraDiscriminator(config, device)

    def discriminator_model(self) -> ElectraDiscriminatorModel:
        """The discriminator with the shared embedding, as a model of its own (the same parameters)."""
        return ElectraDiscriminatorModel(self.config, embedding=self.embedding, discriminator=self.discriminator)

    def generator_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                         token_type_ids: Optional[torch.Tensor] = None,
                         position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The generator's masked-LM logits ``[b, s, vocab_size]`` (parameters' dtype)."""
        check_ids("ElectraModel", input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        mask = encoder_mask(self.generator_config, attention_mask, input_ids, "ElectraModel")
        features = self.generator(self.embedding(input_ids, token_type_ids, position_ids), mask, self.embedding)
        return lm_output(features, self.embedding.word, self.config.sequence_parallel, bias=self.generator.mlm_head.bias)

    @torch.no_grad()
    def _sample(self, features: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """One token per masked position, ``[n]``, drawn from the generator's softmax; ``features`` are the
        head's ``[s(/tp), b, e]``, ``masked`` ``[b, s]`` bool. Only the masked rows' logits are formed."""
        features = gather_sequence(features, self.generator.sequence_parallel_group)  # [s, b, e]
        rows = features.transpose(0, 1)[masked]  # [n, e]
        if rows.shape[0] == 0:
            return torch.empty(0, dtype=torch.long, device=masked.device)
        logits = lm_output(rows[:, None], self.embedding.word, False, bias=self.generator.mlm_head.bias)  # [1, n, v]
        return torch.multinomial(logits[0].float().softmax(-1), 1)[:, 0]

    # The pipeline divides the discriminator's layers; the generator (a fraction of the discriminator's size)
    # runs whole on the first stage, whose stage_input gives the generator's loss.
    pipeline_stacks = ("discriminator.encoder",)
    first_stage_modules = ("embedding", "generator", "discriminator.projection")
    last_stage_modules = ("discriminator.head",)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, mlm_labels: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> ElectraOutput:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "mlm_labels": mlm_labels, "position_ids": position_ids}
        generator_loss, sampled_ids, labels, x = self._generate(batch)
        x = self.discriminator.encoder(x, self.stage_mask(batch))
        out = self.stage_output((x, labels), batch)
        return ElectraOutput(generator_loss + out.loss, generator_loss, out.discriminator_loss, sampled_ids, labels,
                             out.logits)

    def _generate(self, batch: dict):
        """The first stage's work: (generator loss, sampled ids [b, s], replaced labels [b, s] bool, the
        discriminator's projected embedding of the sampled ids [s(/tp), b, h])."""
        input_ids, mlm_labels = batch["input_ids"], batch.get("mlm_labels")
        token_type_ids, position_ids = batch.get("token_type_ids"), batch.get("position_ids")
        if mlm_labels is None:
            raise ValueError("megacore.models.ElectraModel: forward needs mlm_labels (the original tokens at masked "
                             "positions, -100 elsewhere); for the discriminator alone use discriminator_model()")
        check_ids("ElectraModel", input_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                   mlm_labels=mlm_labels)
        masked = mlm_labels != -100  # [b, s]
        if masked.any() and not ((mlm_labels[masked] >= 0) & (mlm_labels[masked] < self.config.vocab_size)).all():
            raise ValueError(f"megacore.models.ElectraModel: mlm_labels hold ids outside [0, vocab_size="
                             f"{self.config.vocab_size}) (use -100 for positions that are not masked)")
        mask = self.stage_mask(batch)
        word = self.embedding.word

        features = self.generator(self.embedding(input_ids, token_type_ids, position_ids), mask, self.embedding)
        token_loss = lm_output(features, word, self.config.sequence_parallel, mlm_labels, only_labeled=True,
                               bias=self.generator.mlm_head.bias)  # [b, s] fp32, 0 where not masked
        generator_loss = token_loss.sum() / masked.sum().clamp(min=1)

        # The discriminator's input and labels are integers: nothing flows back into the generator
        # through them (the shared embedding is trained by both losses, through its own two uses).
        sampled_ids = input_ids.masked_scatter(masked, self._sample(features.detach(), masked))
        original = torch.where(masked, mlm_labels, input_ids)
        labels = sampled_ids != original
        x = self.embedding(sampled_ids, token_type_ids, position_ids)
        if self.discriminator.projection is not None:
            x = replicated_linear(x, self.discriminator.projection)
        return generator_loss, sampled_ids, labels, x

    def stage_input(self, batch: dict):
        generator_loss, _, labels, x = self._generate(batch)
        return (x, labels.to(torch.uint8)), generator_loss  # the labels travel with the hidden state

    def stage_mask(self, batch: dict) -> Optional[torch.Tensor]:
        return encoder_mask(self.config, batch.get("attention_mask"), batch["input_ids"], "ElectraModel")

    def stage_output(self, acts: tuple, batch: dict) -> "ElectraStageOutput":
        x, labels = acts
        logits = self.discriminator.head_logits(x)
        discriminator_loss = replaced_token_loss(logits, labels, batch.get("attention_mask"))
        return ElectraStageOutput(self.discriminator_weight * discriminator_loss, discriminator_loss, logits,
                                  labels.bool())

    def boundary_spec(self, batch: dict, layer: int):
        return super().boundary_spec(batch, layer) + [(tuple(batch["input_ids"].shape), torch.uint8)]


class ElectraStageOutput(NamedTuple):
    """``ElectraModel.stage_output``: the last stage's part of the loss (``discriminator_weight *
    discriminator_loss``; the generator's part is ``stage_input``'s), the discriminator's loss, its logits
    ``[b, s]`` and the replaced-token labels ``[b, s]`` bool."""

    loss: torch.Tensor
    discriminator_loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


__all__ = ["ElectraDiscriminator", "ElectraDiscriminatorModel", "ElectraDiscriminatorOutput", "ElectraGenerator",
           "ElectraModel", "ElectraOutput", "ElectraStageOutput", "electra_generator_config", "replaced_token_loss"]
