"""BERT (``BertForPreTraining``, ``BertForMaskedLM``) and RoBERTa (``RobertaForMaskedLM``) <-> megacore
``BertModel``; ``{Bert,Roberta}For{Sequence,Token}Classification`` <-> megacore ``Classifier``.

================================================  ==================================================  ==========
megacore                                          Hugging Face (``{p}`` = ``bert.`` / ``roberta.``)   transform
================================================  ==================================================  ==========
``embedding.word.weight``                         ``{p}embeddings.word_embeddings.weight``            (tied: the
                                                                                                      decoder)
``embedding.position.weight``                     ``{p}embeddings.position_embeddings.weight``
``embedding.token_type.weight``                   ``{p}embeddings.token_type_embeddings.weight``
``embedding.norm.*``                              ``{p}embeddings.LayerNorm.*``
``encoder.layers.{i}.attention.qkv.*``            ``{p}encoder.layer.{i}.attention.self.{query,key,    [q; k; v]
                                                  value}.*``                                          -> (head,
                                                                                                      qkv, d)
``...attention.proj.*``                           ``...attention.output.dense.*``
``...attention_norm.*`` (post-LN)                 ``...attention.output.LayerNorm.*``
``...mlp.fc1.*`` / ``...mlp.fc2.*``               ``...intermediate.dense.*`` / ``...output.dense.*``
``...mlp_norm.*`` (post-LN)                       ``...output.LayerNorm.*``
``pooler.dense.*``                                ``bert.pooler.dense.*`` (BertForPreTraining,
                                                  BertForSequenceClassification)
``mlm_head.dense.*`` / ``mlm_head.norm.*``        ``cls.predictions.transform.{dense,LayerNorm}.*`` /
                                                  ``lm_head.{dense,layer_norm}.*`` (RoBERTa)
``mlm_head.bias``                                 ``cls.predictions.bias`` / ``lm_head.bias``         (tied: the
                                                                                                      decoder's)
``binary_head.*``                                 ``cls.seq_relationship.*`` (BertForPreTraining)
``classifier.*`` (Classifier)                     ``classifier.*`` (BERT's sequence and the token
                                                  classifiers: one linear)
``classifier.{dense,out_proj}.*`` (Classifier)    ``classifier.{dense,out_proj}.*``
                                                  (RobertaForSequenceClassification)
================================================  ==================================================  ==========

``BertForPreTraining`` is ``BertModel(add_pooler=True, head="nsp")`` (a ``"sop"`` head has the same
weights and converts too: HF's ``seq_relationship`` does not say what its labels mean);
``BertForMaskedLM`` is ``BertModel(add_pooler=False, head=None)``; ``RobertaForMaskedLM`` is
``BertModel(add_pooler=False, head=None, position_offset_padding_idx=pad_token_id)``. RoBERTa checkpoints
of the whole ``RobertaModel`` carry a pooler that ``RobertaForMaskedLM`` ignores; so does the reader.

The classifiers are ``Classifier(ClassifierConfig(backbone="bert" / "roberta", head="sequence" / "token"))``;
RoBERTa's ``pad_token_id`` is its ``pad_token_id``. Their labels, problem type and dropout convert as
``megacore.interop.hf.classifier`` says.
"""

from __future__ import annotations

import functools

import torch

from megacore.interop.hf.classifier import (
    classifier_architecture,
    classifier_config_class,
    classifier_config_from_hf,
    classifier_config_to_hf,
    classifier_head,
    classifier_problems,
)
from megacore.interop.hf.family import Family, Mapping, check_supported, qkv_from_hf, qkv_to_hf, register
from megacore.models.bert import BertModel
from megacore.models.classification import Classifier
from megacore.models.common import ModelConfig

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
# Buffers (not weights) that older checkpoints saved.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")

# transformers.BertConfig's / RobertaConfig's defaults of the keys read here (checked by the tests).
BERT_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, is_decoder=False,
    add_cross_attention=False, tie_word_embeddings=True,
)
ROBERTA_DEFAULTS = dict(BERT_DEFAULTS, vocab_size=50265, pad_token_id=1)


def encoder_config_from_hf(c: dict, architecture: str, extra_problems: tuple = ()) -> dict:
    """ModelConfig fields of a BERT-style encoder config (BERT, RoBERTa, ELECTRA share these keys)."""
    problems = list(extra_problems)
    act = c["hidden_act"]
    if act not in _ACTIVATIONS:
        problems.append(f"hidden_act={act!r} (supported: {', '.join(_ACTIVATIONS)})")
    for key, supported in (("is_decoder", False), ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if c[key] != supported:
            problems.append(f"{key}={c[key]} (megacore needs {supported})")
    if c.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type={c['position_embedding_type']!r} (megacore has 'absolute')")
    check_supported("from_hf", f"this {architecture}", problems)
    return dict(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], ffn_hidden_size=c["intermediate_size"],
        max_position_embeddings=c["max_position_embeddings"], type_vocab_size=c["type_vocab_size"],
        position_embedding_type="learned_absolute", embedding_norm=True, pre_norm=False, normalization="layernorm",
        norm_epsilon=c["layer_norm_eps"], activation=_ACTIVATIONS[act], hidden_dropout=c["hidden_dropout_prob"],
        attention_dropout=c["attention_probs_dropout_prob"], attention_mask_type="padding", add_bias_linear=True,
        init_method_std=c["initializer_range"],
    )


def encoder_config_to_hf(config: ModelConfig, what: str, extra_problems: list) -> dict:
    """The HF config keys of a BERT-style encoder (ValueError listing what HF cannot hold)."""
    problems = list(extra_problems)
    for name, value, supported in (
        ("position_embedding_type", config.position_embedding_type, "learned_absolute"),
        ("normalization", config.normalization, "layernorm"), ("pre_norm", config.pre_norm, False),
        ("add_bias_linear", config.add_bias_linear, True), ("embedding_norm", config.embedding_norm, True),
    ):
        if value != supported:
            problems.append(f"{name}={value!r} (HF has {supported!r})")
    if config.attention_mask_type not in ("padding", "none"):
        problems.append(f"attention_mask_type={config.attention_mask_type!r} (HF's encoders are bidirectional)")
    if config.type_vocab_size < 1:
        problems.append("type_vocab_size=0 (HF's encoders always have token-type embeddings)")
    if config.kv_channels is not None and config.kv_channels * config.num_attention_heads != config.hidden_size:
        problems.append(f"kv_channels={config.kv_channels} (HF's heads are hidden_size / num_attention_heads wide)")
    check_supported("to_hf", what, problems)
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.ffn_hidden_size,
        hidden_act=_TO_HF_ACTIVATION[config.activation], hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, initializer_range=config.init_method_std,
        layer_norm_eps=config.norm_epsilon, tie_word_embeddings=True,
        dtype=str(config.params_dtype).removeprefix("torch."),
    )


def _join_qkv(q, k, v, num_heads):
    return qkv_from_hf(torch.cat([q, k, v]), num_heads)


def _split_qkv(t, num_heads):
    return tuple(x.contiguous() for x in qkv_to_hf(t, num_heads).chunk(3))


def embedding_mappings(p: str) -> list[Mapping]:
    """The embedding's tensors (``p``: the base model's prefix, e.g. ``bert.``)."""
    e = p + "embeddings."
    return [Mapping("embedding.word.weight", e + "word_embeddings.weight"),
            Mapping("embedding.position.weight", e + "position_embeddings.weight"),
            Mapping("embedding.token_type.weight", e + "token_type_embeddings.weight"),
            Mapping("embedding.norm.weight", e + "LayerNorm.weight"),
            Mapping("embedding.norm.bias", e + "LayerNorm.bias")]


def encoder_mappings(mc_prefix: str, hf_prefix: str, num_layers: int, num_heads: int) -> list[Mapping]:
    """The layers ``{mc_prefix}layers.{i}`` <-> ``{hf_prefix}layer.{i}`` of a BERT-style encoder."""
    join, split = functools.partial(_join_qkv, num_heads=num_heads), functools.partial(_split_qkv, num_heads=num_heads)
    out = []
    for i in range(num_layers):
        mc, hf = f"{mc_prefix}layers.{i}.", f"{hf_prefix}layer.{i}."
        a = hf + "attention."
        for kind in ("weight", "bias"):
            out += [
                Mapping(mc + f"attention.qkv.{kind}", tuple(f"{a}self.{x}.{kind}" for x in ("query", "key", "value")),
                        join, split),
                Mapping(mc + f"attention.proj.{kind}", a + f"output.dense.{kind}"),
                Mapping(mc + f"attention_norm.{kind}", a + f"output.LayerNorm.{kind}"),
                Mapping(mc + f"mlp.fc1.{kind}", hf + f"intermediate.dense.{kind}"),
                Mapping(mc + f"mlp.fc2.{kind}", hf + f"output.dense.{kind}"),
                Mapping(mc + f"mlp_norm.{kind}", hf + f"output.LayerNorm.{kind}"),
            ]
    return out


def _pairs(mc: str, hf: str) -> list[Mapping]:
    return [Mapping(f"{mc}.{kind}", f"{hf}.{kind}") for kind in ("weight", "bias")]


def encoder_classifier_head_mappings(config: ModelConfig, architecture: str, pooler: str) -> list[Mapping]:
    """The head of an encoder's ``...For{Sequence,Token}Classification`` (BERT, RoBERTa, ELECTRA name theirs
    alike): ``classifier.*``; BERT's sequence head also the pooler (``pooler``: its HF name, else None) and a
    plain ``classifier``, the others' ``classifier.dense`` and ``classifier.out_proj``."""
    if classifier_head(architecture) == "token":
        return _pairs("classifier", "classifier")
    if pooler is not None:
        return _pairs("pooler.dense", pooler) + _pairs("classifier", "classifier")
    return _pairs("classifier.dense", "classifier.dense") + _pairs("classifier.out_proj", "classifier.out_proj")


def classifier_config_from_encoder(c: dict, architecture: str, backbone: str, fields: dict) -> dict:
    """``fields`` (the encoder's ModelConfig fields) and, for a classification architecture, the classifier's."""
    if classifier_head(architecture) is None:
        return fields
    return dict(fields, **classifier_config_from_hf(c, architecture, backbone))


def encoder_classifier_config_to_hf(model, architecture: str, backbone: str, model_type: str) -> dict:
    """The HF config of a Classifier of an encoder ``backbone`` (ValueError listing what does not convert)."""
    problems = classifier_problems(model, architecture, backbone)
    fields = encoder_config_to_hf(model.config, f"this {type(model).__name__}", problems)
    return dict(fields, model_type=model_type, architectures=[architecture], **classifier_config_to_hf(model.config))


# ---- BERT ----------------------------------------------------------------------------------------------------


BERT_CLASSIFIERS = ("BertForSequenceClassification", "BertForTokenClassification")


def bert_config_from_hf(c: dict, architecture: str) -> dict:
    c = {**BERT_DEFAULTS, **c}
    return classifier_config_from_encoder(c, architecture, "bert", encoder_config_from_hf(c, architecture))


def bert_architecture(model):
    if isinstance(model, Classifier):
        return classifier_architecture(model, "Bert", "bert")
    if model.position_offset_padding_idx is not None:
        return None  # RoBERTa
    return "BertForPreTraining" if model.binary_head is not None else "BertForMaskedLM"


def _structure_problems(model: BertModel, architecture: str, pooler: bool, binary_head: bool) -> list[str]:
    problems = []
    if (model.pooler is not None) != pooler:
        problems.append(f"{architecture} has {'a' if pooler else 'no'} pooler (build BertModel with add_pooler={pooler})")
    if (model.binary_head is not None) != binary_head:
        problems.append(f"{architecture} has {'a' if binary_head else 'no'} binary head "
                        f"(build BertModel with head={'nsp' if binary_head else None!r})")
    return problems


def bert_config_to_hf(model, architecture: str) -> dict:
    if isinstance(model, Classifier) or classifier_head(architecture) is not None:
        return encoder_classifier_config_to_hf(model, architecture, "bert", "bert")
    pretraining = architecture == "BertForPreTraining"
    problems = _structure_problems(model, architecture, pretraining, pretraining)
    fields = encoder_config_to_hf(model.config, "this BertModel", problems)
    return dict(fields, model_type="bert", architectures=[architecture])


def bert_mappings(config: ModelConfig, architecture: str) -> list[Mapping]:
    out = embedding_mappings("bert.")
    out += encoder_mappings("encoder.", "bert.encoder.", config.num_layers, config.num_attention_heads)
    if classifier_head(architecture) is not None:
        return out + encoder_classifier_head_mappings(config, architecture, pooler="bert.pooler.dense")
    t = "cls.predictions.transform."
    out += _pairs("mlm_head.dense", t + "dense") + _pairs("mlm_head.norm", t + "LayerNorm")
    out.append(Mapping("mlm_head.bias", "cls.predictions.bias"))
    if architecture == "BertForPreTraining":
        out += _pairs("pooler.dense", "bert.pooler.dense") + _pairs("binary_head", "cls.seq_relationship")
    return out


def bert_build(config: ModelConfig, architecture: str, hf_config: dict, device, generator_config=None):
    if classifier_head(architecture) is not None:
        return Classifier(config, device=device)
    if architecture == "BertForPreTraining":
        return BertModel(config, add_pooler=True, head="nsp", device=device)
    return BertModel(config, add_pooler=False, head=None, device=device)


BERT = register(Family(
    model_type="bert",
    architectures=("BertForPreTraining", "BertForMaskedLM") + BERT_CLASSIFIERS,
    model_classes=(BertModel, Classifier),
    config_from_hf=bert_config_from_hf,
    config_to_hf=bert_config_to_hf,
    mappings=bert_mappings,
    build=bert_build,
    tied=lambda architecture, config: {} if classifier_head(architecture) else {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"},
    ignored=_BUFFERS,
    architecture_of=bert_architecture,
    config_classes=classifier_config_class(BERT_CLASSIFIERS),
))


# ---- RoBERTa -------------------------------------------------------------------------------------------------


ROBERTA_CLASSIFIERS = ("RobertaForSequenceClassification", "RobertaForTokenClassification")


def roberta_config_from_hf(c: dict, architecture: str) -> dict:
    c = {**ROBERTA_DEFAULTS, **c}
    return classifier_config_from_encoder(c, architecture, "roberta", encoder_config_from_hf(c, architecture))


def roberta_architecture(model):
    if isinstance(model, Classifier):
        return classifier_architecture(model, "Roberta", "roberta")
    return "RobertaForMaskedLM" if model.position_offset_padding_idx is not None else None


def roberta_config_to_hf(model, architecture: str) -> dict:
    if isinstance(model, Classifier) or classifier_head(architecture) is not None:
        return encoder_classifier_config_to_hf(model, architecture, "roberta", "roberta")
    problems = _structure_problems(model, architecture, False, False)
    fields = encoder_config_to_hf(model.config, "this BertModel", problems)
    return dict(fields, model_type="roberta", architectures=[architecture], pad_token_id=model.position_offset_padding_idx)


def roberta_mappings(config: ModelConfig, architecture: str) -> list[Mapping]:
    out = embedding_mappings("roberta.")
    out += encoder_mappings("encoder.", "roberta.encoder.", config.num_layers, config.num_attention_heads)
    if classifier_head(architecture) is not None:
        return out + encoder_classifier_head_mappings(config, architecture, pooler=None)
    out += _pairs("mlm_head.dense", "lm_head.dense") + _pairs("mlm_head.norm", "lm_head.layer_norm")
    out.append(Mapping("mlm_head.bias", "lm_head.bias"))
    return out


def roberta_build(config: ModelConfig, architecture: str, hf_config: dict, device, generator_config=None):
    if classifier_head(architecture) is not None:
        return Classifier(config, device=device)  # its pad_token_id is the padding id
    padding_idx = {**ROBERTA_DEFAULTS, **hf_config}["pad_token_id"]
    return BertModel(config, add_pooler=False, head=None, position_offset_padding_idx=padding_idx, device=device)


ROBERTA = register(Family(
    model_type="roberta",
    architectures=("RobertaForMaskedLM",) + ROBERTA_CLASSIFIERS,
    model_classes=(BertModel, Classifier),
    config_from_hf=roberta_config_from_hf,
    config_to_hf=roberta_config_to_hf,
    mappings=roberta_mappings,
    build=roberta_build,
    tied=lambda architecture, config: {} if classifier_head(architecture) else {
        "lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight", "lm_head.decoder.bias": "lm_head.bias"},
    ignored=_BUFFERS + ("roberta.pooler.dense.weight", "roberta.pooler.dense.bias"),
    architecture_of=roberta_architecture,
    config_classes=classifier_config_class(ROBERTA_CLASSIFIERS),
))
