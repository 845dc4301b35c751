"""Sequence and token classification on a pretrained trunk (fine-tuning): BERT, RoBERTa, ELECTRA or GPT with
Hugging Face's classification heads.

    ids [b, s] -> the pretraining model's trunk (its module names) -> [s(/tp), b, h] -> gathered [s, b, h]
        -> sequence head: one row per text (token 0; GPT: the last real token) -> logits [b, num_labels]
        -> token head: every position                                          -> logits [b, s, num_labels]

=========  =============================================  ============================================  ==============
backbone   trunk                                          sequence head                                 token head
=========  =============================================  ============================================  ==============
bert       ``embedding``, ``encoder``                     token 0 -> ``pooler.dense`` -> tanh ->        dropout ->
                                                          dropout -> ``classifier``                     ``classifier``
roberta    ``embedding`` (offset positions), ``encoder``  token 0 -> dropout -> ``classifier.dense`` ->  dropout ->
                                                          tanh -> dropout -> ``classifier.out_proj``    ``classifier``
electra    ``embedding``, ``discriminator.projection``    token 0 -> dropout -> ``classifier.dense`` ->  dropout ->
           (when embedding_size != hidden),               exact GeLU -> dropout ->                      ``classifier``
           ``discriminator.encoder``                      ``classifier.out_proj``
gpt        ``embedding``, ``decoder``, ``final_norm``     the last real token -> ``score`` (no bias)    (none)
=========  =============================================  ============================================  ==============

These are ``BertFor{Sequence,Token}Classification``, ``RobertaFor...``, ``ElectraFor...`` and
``GPT2ForSequenceClassification``; ``megacore.interop.hf`` converts each way. The trunk keeps the pretraining
models' names (``BertModel``, ``ElectraModel`` / ``ElectraDiscriminatorModel``, ``GPTModel``), so a ``megacore
train`` checkpoint maps by name: :meth:`Classifier.from_pretrained_model`. BERT's pooler is part of the head here
but is named as BertModel's and copied from a model that has one (as ``BertForSequenceClassification``'s
``from_pretrained`` takes the pretrained pooler); the other heads start new.

ELECTRA's sequence head applies exact GeLU whatever ``activation`` says (as Hugging Face's
``ElectraClassificationHead``). GPT's sequence head reads the last real token: with an ``attention_mask``, the
rightmost position whose mask is 1 (right padding only: the causal layers take no padding mask); without one,
Hugging Face's rule, the rightmost token that is not ``pad_token_id``; without either, the last position. GPT has no
token types: ``token_type_ids`` are ignored (Hugging Face's GPT-2 would add their word embeddings).

Heads are small and replicated on every tensor-parallel rank; under sequence parallelism the trunk's output is
gathered for them (``gather_sequence``), so their gradients are whole on every rank.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megacore import ops
from megacore.models.bert import (
    BertModel,
    check_encoder_config,
    check_ids,
    dense,
    encoder_mask,
    gather_sequence,
    offset_position_ids,
    replicated_linear,
)
from megacore.models.common import (
    Embedding,
    ModelConfig,
    Norm,
    StagedModel,
    TransformerStack,
    _normal,
    _weight,
    tensor_parallel_world,
)
from megacore.models.electra import ElectraDiscriminatorModel, ElectraModel, _EncoderTrunk, shared_embedding
from megacore.models.gpt import GPTModel

BACKBONES = ("bert", "roberta", "electra", "gpt")
HEADS = ("sequence", "token")
PROBLEM_TYPES = ("single_label_classification", "regression")
IGNORE_INDEX = -100  # labels that count for nothing (padding, special tokens), as Hugging Face's losses
_NAME = "megacore.models.Classifier"


@dataclass
class ClassifierConfig(ModelConfig):
    """A ModelConfig (the trunk's, as the pretraining model has it) and the classifier's fields.

    Attributes beyond ModelConfig's:
        backbone: ``"bert"``, ``"roberta"``, ``"electra"`` or ``"gpt"``: which pretrained trunk (module layout in
            the module docstring). The encoders need a post-LN encoder config (``pre_norm=False``,
            ``embedding_norm=True``, ``attention_mask_type="padding"``), gpt a causal one.
        head: ``"sequence"`` (one prediction per text or text pair) or ``"token"`` (one per token; not gpt).
        num_labels: classes (>= 2), or 1 with ``problem_type="regression"``.
        problem_type: ``"single_label_classification"`` (cross-entropy) or ``"regression"`` (mean squared error
            of the one output; sequence head only). Hugging Face's names.
        label_names: label id -> name (Hugging Face's ``id2label``); ``[]`` means ``"LABEL_<i>"``.
        classifier_dropout: the heads' dropout; None: ``hidden_dropout`` (as Hugging Face). gpt's head has none.
        pad_token_id: gpt: the last-token rule without an ``attention_mask``; roberta: the padding id its
            positions are offset by (required); unused otherwise (kept for Hugging Face's config).
    Raises ValueError naming the field.
    """

    backbone: str = "bert"
    head: str = "sequence"
    num_labels: int = 2
    problem_type: str = "single_label_classification"
    label_names: list = field(default_factory=list)
    classifier_dropout: Optional[float] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        name = "megacore.models.ClassifierConfig"
        for attr, allowed in (("backbone", BACKBONES), ("head", HEADS), ("problem_type", PROBLEM_TYPES)):
            if getattr(self, attr) not in allowed:
                raise ValueError(f"{name}: {attr}={getattr(self, attr)!r} is not one of {', '.join(allowed)}")
        n = self.num_labels
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name}: num_labels={n!r} must be an int >= 1")
        if self.problem_type == "regression":
            if n != 1:
                raise ValueError(f"{name}: num_labels={n} with problem_type='regression'; a regression head has one "
                                 "output (num_labels=1)")
            if self.head != "sequence":
                raise ValueError(f"{name}: problem_type='regression' needs head='sequence' (a token head classifies)")
        elif n < 2:
            raise ValueError(f"{name}: num_labels={n} with problem_type={self.problem_type!r}; classification needs "
                             "at least 2 labels (one output is problem_type='regression')")
        if self.head == "token" and self.backbone == "gpt":
            raise ValueError(f"{name}: head='token' with backbone='gpt'; gpt has the sequence head only (as "
                             "Hugging Face's GPT2ForSequenceClassification)")
        if isinstance(self.label_names, (str, bytes)) or not isinstance(self.label_names, (list, tuple)):
            raise ValueError(f"{name}: label_names={self.label_names!r} must be a list of names")
        self.label_names = list(self.label_names)
        if self.label_names:
            if len(self.label_names) != n:
                raise ValueError(f"{name}: label_names has {len(self.label_names)} names, num_labels={n} (give one "
                                 "name per label, or none)")
            if not all(isinstance(x, str) for x in self.label_names):
                raise ValueError(f"{name}: label_names={self.label_names!r} must be strings")
            if len(set(self.label_names)) != n:
                raise ValueError(f"{name}: label_names={self.label_names!r} repeat a name")
        p = self.classifier_dropout
        if p is not None and (not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0):
            raise ValueError(f"{name}: classifier_dropout={p!r} must be None or in [0, 1)")
        if p is not None and self.backbone == "gpt":
            raise ValueError(f"{name}: classifier_dropout={p!r} with backbone='gpt'; gpt's head (score) has no "
                             "dropout (as Hugging Face's GPT2ForSequenceClassification): leave it None")
        pad = self.pad_token_id
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool)
                                or not 0 <= pad < self.vocab_size):
            raise ValueError(f"{name}: pad_token_id={pad!r} must be None or a token id in [0, vocab_size="
                             f"{self.vocab_size})")
        if self.backbone == "gpt":
            if self.attention_mask_type not in ("causal", "sliding_window"):
                raise ValueError(f"{name}: attention_mask_type={self.attention_mask_type!r} with backbone='gpt'; "
                                 "a causal LM needs 'causal' or 'sliding_window'")
        else:
            check_encoder_config(self, "ClassifierConfig")
        if self.backbone == "roberta":
            if pad is None:
                raise ValueError(f"{name}: backbone='roberta' needs pad_token_id (its positions are offset by "
                                 "padding_idx + 1; RoBERTa's is 1)")
            if self.position_embedding_type != "learned_absolute":
                raise ValueError(f"{name}: backbone='roberta' needs position_embedding_type='learned_absolute', got "
                                 f"{self.position_embedding_type!r}")

    @property
    def head_dropout(self) -> float:
        """The heads' dropout rate: ``classifier_dropout``, or ``hidden_dropout`` when None (gpt: 0)."""
        if self.backbone == "gpt":
            return 0.0
        return self.hidden_dropout if self.classifier_dropout is None else float(self.classifier_dropout)


class ClassifierOutput(NamedTuple):
    """``Classifier.forward``'s result: ``loss`` (0-dim fp32; None without labels) and ``logits``, ``[b,
    num_labels]`` (sequence head) or ``[b, s, num_labels]`` (token head), in the parameters' dtype."""

    loss: Optional[torch.Tensor]
    logits: torch.Tensor


def last_token_index(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     pad_token_id: Optional[int] = None) -> torch.Tensor:
    """The position GPT's sequence head reads in each row, int64 ``[b]``: with ``attention_mask [b, s]``, the
    rightmost position whose mask is 1 (Hugging Face's padding mask convention); else with ``pad_token_id``,
    Hugging Face's ``GPT2ForSequenceClassification`` rule, the rightmost token that is not ``pad_token_id``; else
    the last position, ``s - 1``. A row without any real token gives 0."""
    b, s = input_ids.shape
    positions = torch.arange(s, device=input_ids.device)
    if attention_mask is not None:
        return (positions * (attention_mask != 0)).argmax(-1)
    if pad_token_id is not None:
        return (positions * (input_ids != pad_token_id)).argmax(-1)
    return torch.full((b,), s - 1, dtype=torch.long, device=input_ids.device)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """The loss (0-dim fp32) of ``logits`` (``[..., num_labels]``) against ``labels`` (``logits.shape[:-1]``):
    cross-entropy averaged over the labels that are not -100 (0 when none is), or with ``problem_type=
    "regression"`` the mean squared error of ``logits[..., 0]`` (Hugging Face's losses). Raises ValueError for class
    ids outside ``[0, num_labels)`` (other than -100) or labels that are not integers."""
    if problem_type == "regression":
        return F.mse_loss(logits[..., 0].float(), labels.float())
    n = logits.shape[-1]
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{_NAME}: labels have dtype {labels.dtype}, expected integer class ids (int64) for "
                         f"problem_type={problem_type!r}")
    counted = labels != IGNORE_INDEX
    if not ((labels[counted] >= 0) & (labels[counted] < n)).all():
        raise ValueError(f"{_NAME}: labels hold class ids outside [0, num_labels={n}) (use {IGNORE_INDEX} for "
                         "positions that count for nothing)")
    total = F.cross_entropy(logits.reshape(-1, n).float(), labels.reshape(-1).long(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    return total / counted.sum().clamp(min=1)


def _head_dense(config: ModelConfig, device) -> nn.Module:
    """RoBERTa's / ELECTRA's sequence head: ``dense [h, h]`` and ``out_proj [num_labels, h]``."""
    head = nn.Module()
    head.dense = dense(config.hidden_size, config.hidden_size, config, device)
    head.out_proj = dense(config.num_labels, config.hidden_size, config, device)
    return head


class Classifier(StagedModel):
    """A pretrained trunk with a classification head (see the module docstring for each backbone's layout).

    Args:
        config: a :class:`ClassifierConfig`.
        device: where the parameters live (``"meta"``: nowhere).

    ``forward(input_ids [b, s], attention_mask=None [b, s] 1/0, token_type_ids=None [b, s], position_ids=None
    [b, s], labels=None)`` -> :class:`ClassifierOutput`. ``labels``: sequence head: int64 ``[b]`` class ids (float
    ``[b]`` targets for regression); token head: int64 ``[b, s]``; -100 counts for nothing. The loss is the
    cross-entropy averaged over the counted labels, or the mean squared error of ``logits[:, 0]`` (regression).

    Tensor parallelism: the trunk as in the pretraining models; the heads are replicated.

    Raises TypeError for a config that is not a ClassifierConfig, ValueError for bad inputs (shapes, labels,
    left padding with gpt) and the config's errors; RuntimeError with ``tensor_parallel=True`` before
    ``initialize_model_parallel``.
    """

    config_class = ClassifierConfig  # what a checkpoint's model_config fields build
    pretraining_task = None  # a Classifier is only trained by fine-tuning tasks

    def __init__(self, config: ClassifierConfig, device=None):
        super().__init__()
        if not isinstance(config, ClassifierConfig):
            raise TypeError(f"{_NAME}: config is a {type(config).__name__}, expected a ClassifierConfig")
        self.group, _, _ = tensor_parallel_world(config, "Classifier")
        self.config = config
        h, n = config.hidden_size, config.num_labels
        if config.backbone == "electra":
            self.embedding = shared_embedding(config, device)  # [s(/tp), b, embedding_dim]
            self.discriminator = _EncoderTrunk(config, device)
            self.pipeline_stacks = ("discriminator.encoder",)
            self.first_stage_modules = ("embedding", "discriminator.projection")
        elif config.backbone == "gpt":
            self.embedding = Embedding(config, device)
            self.decoder = TransformerStack(config, device)
            self.final_norm = Norm(config, h, device, sequence_parallel=config.sequence_parallel)
            self.pipeline_stacks, self.first_stage_modules = ("decoder",), ("embedding",)
        else:
            self.embedding = Embedding(config, device)
            self.encoder = TransformerStack(config, device)
            self.pipeline_stacks, self.first_stage_modules = ("encoder",), ("embedding",)

        # The heads, drawn after the trunk (torch's default generator, alike on every rank).
        if config.head == "token":
            self.classifier = dense(n, h, config, device)
            head = ("classifier",)
        elif config.backbone == "bert":
            self.pooler = nn.Module()
            self.pooler.dense = dense(h, h, config, device)
            self.classifier = dense(n, h, config, device)
            head = ("pooler", "classifier")
        elif config.backbone == "gpt":
            self.score = _weight(_normal(n, h, std=config.init_method_std), config, device)  # no bias
            head = ("score",)
        else:
            self.classifier = _head_dense(config, device)
            head = ("classifier",)
        self.last_stage_modules = (("final_norm",) if config.backbone == "gpt" else ()) + head

    @property
    def head_modules(self) -> tuple[str, ...]:
        """The head's module paths (BERT's pooler among them): what ``from_pretrained_model`` does not take
        from the trunk."""
        return tuple(m for m in self.last_stage_modules if m != "final_norm")

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None) -> ClassifierOutput:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids,
                 "position_ids": position_ids, "labels": labels}
        return self.run_stages(batch)[0]

    def _check_batch(self, batch: dict) -> None:
        input_ids, labels = batch["input_ids"], batch.get("labels")
        check_ids("Classifier", input_ids, attention_mask=batch.get("attention_mask"),
                  token_type_ids=batch.get("token_type_ids"), position_ids=batch.get("position_ids"))
        if labels is not None:
            expected = list(input_ids.shape) if self.config.head == "token" else [input_ids.shape[0]]
            if list(labels.shape) != expected:
                what = "[batch, seq] (token head)" if self.config.head == "token" else "[batch] (sequence head)"
                raise ValueError(f"{_NAME}: labels have shape {list(labels.shape)}, expected {what} = {expected}")

    def stage_input(self, batch: dict):
        self._check_batch(batch)
        c, input_ids = self.config, batch["input_ids"]
        position_ids = batch.get("position_ids")
        if position_ids is None and c.backbone == "roberta":
            position_ids = offset_position_ids(input_ids, c.pad_token_id, c, "Classifier", "pad_token_id")
        x = self.embedding(input_ids, batch.get("token_type_ids"), position_ids)  # [s(/tp), b, e]
        if c.backbone == "electra" and self.discriminator.projection is not None:
            x = replicated_linear(x, self.discriminator.projection)  # [s(/tp), b, h]
        return (x,), None

    def stage_mask(self, batch: dict) -> Optional[torch.Tensor]:
        if self.config.backbone == "gpt":
            return None  # causal: the layers build their own
        return encoder_mask(self.config, batch.get("attention_mask"), batch["input_ids"], "Classifier")

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.head_dropout
        return F.dropout(x, p) if self.training and p > 0 else x

    def stage_output(self, acts: tuple, batch: dict) -> ClassifierOutput:
        c, x = self.config, acts[0]
        if c.backbone == "gpt":
            x = self.final_norm(x)
        full = gather_sequence(x, self.group if c.sequence_parallel else None)  # [s, b, h]
        if c.head == "token":
            logits = replicated_linear(self._dropout(full), self.classifier).transpose(0, 1)  # [b, s, n]
        elif c.backbone == "bert":
            pooled = torch.tanh(replicated_linear(full[0], self.pooler.dense))  # [b, h]
            logits = replicated_linear(self._dropout(pooled), self.classifier)  # [b, n]
        elif c.backbone == "gpt":
            last = self._last_token(batch)  # [b]
            rows = full[last, torch.arange(full.shape[1], device=full.device)]  # [b, h]
            logits = F.linear(rows, self.score.weight)  # [b, n]
        else:
            h = replicated_linear(self._dropout(full[0]), self.classifier.dense)  # [b, h]
            h = torch.tanh(h) if c.backbone == "roberta" else ops.bias_gelu(h, None, "none")  # ELECTRA: exact GeLU
            logits = replicated_linear(self._dropout(h), self.classifier.out_proj)  # [b, n]
        labels = batch.get("labels")
        loss = classification_loss(logits, labels, c.problem_type) if labels is not None else None
        return ClassifierOutput(loss, logits)

    def _last_token(self, batch: dict) -> torch.Tensor:
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
        if attention_mask is not None and attention_mask.shape[1] > 1 and \
                bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise ValueError(f"{_NAME}: attention_mask has padding before a real token (left padding); gpt's causal "
                             "layers take no padding mask, so pad on the right")
        return last_token_index(input_ids, attention_mask, self.config.pad_token_id)

    @classmethod
    def from_pretrained_model(cls, model: nn.Module, head: str = "sequence", num_labels: int = 2,
                              problem_type: str = "single_label_classification", label_names=(),
                              classifier_dropout: Optional[float] = None) -> "Classifier":
        """A Classifier on ``model``'s trunk: ``model`` a ``BertModel`` (backbone bert, or roberta when it has
        ``position_offset_padding_idx``: then ``pad_token_id``), an ``ElectraModel`` or ``ElectraDiscriminatorModel``
        (electra), a ``GPTModel`` (gpt), or a Classifier (a new head on its trunk).

        The config is ``model.config``'s ModelConfig fields (tensor and sequence parallelism, dtype, dropout
        included) with the classifier's; the parameters go to ``model``'s device; the result is in ``model``'s
        train/eval mode. Every trunk tensor is copied from ``model``'s by name (under tensor parallelism, this
        rank's shard from this rank's shard); the head is drawn new from torch's default generator (as
        ``Classifier(config)`` draws it), except BERT's pooler, copied when ``model`` has one.

        Raises ValueError for a model without a classifier backbone (see :func:`backbone_of`), a trunk tensor
        ``model`` lacks or holds in another shape (naming them), and the config's errors.
        """
        backbone = backbone_of(model)
        fields = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(ModelConfig)}
        pad_token_id = model.position_offset_padding_idx if isinstance(model, BertModel) else None
        if isinstance(model, Classifier):
            pad_token_id = model.config.pad_token_id
        config = ClassifierConfig(**fields, backbone=backbone, head=head, num_labels=num_labels,
                                  problem_type=problem_type, label_names=list(label_names),
                                  classifier_dropout=classifier_dropout, pad_token_id=pad_token_id)
        device = next(model.parameters()).device
        classifier = cls(config, device=device)
        source, state = model.state_dict(), classifier.state_dict()
        head_prefixes = tuple(m + "." for m in classifier.head_modules)
        missing, wrong = [], []
        for name, tensor in state.items():
            if name.startswith(head_prefixes):
                if not (name.startswith("pooler.") and name in source):
                    continue  # a new head (BERT's pooler only when the model has none)
            if name not in source:
                missing.append(name)
            elif source[name].shape != tensor.shape:
                wrong.append(f"{name} {list(source[name].shape)} (expected {list(tensor.shape)})")
            else:
                state[name] = source[name]
        if missing or wrong:
            raise ValueError(f"{_NAME}.from_pretrained_model: the {type(model).__name__} lacks trunk tensors "
                             f"{missing or 'none'}; shapes differ: {wrong or 'none'}")
        classifier.load_state_dict(state, strict=True)
        return classifier.train(model.training)


def backbone_of(model: nn.Module) -> str:
    """The classifier backbone of a pretraining model: ``"bert"`` (a BertModel), ``"roberta"`` (a BertModel with
    ``position_offset_padding_idx``), ``"electra"`` (ElectraModel, ElectraDiscriminatorModel), ``"gpt"``
    (GPTModel); a Classifier's own. Raises ValueError naming the class otherwise."""
    if isinstance(model, Classifier):
        return model.config.backbone
    if isinstance(model, BertModel):
        return "bert" if model.position_offset_padding_idx is None else "roberta"
    if isinstance(model, (ElectraModel, ElectraDiscriminatorModel)):
        return "electra"
    if isinstance(model, GPTModel):
        return "gpt"
    raise ValueError(f"megacore.models.backbone_of: a {type(model).__name__} has no classifier backbone; expected a "
                     "BertModel, ElectraModel, ElectraDiscriminatorModel, GPTModel or Classifier")


__all__ = ["BACKBONES", "Classifier", "ClassifierConfig", "ClassifierOutput", "HEADS", "PROBLEM_TYPES", "backbone_of",
           "classification_loss", "last_token_index"]
