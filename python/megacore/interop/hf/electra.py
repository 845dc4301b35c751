"""ELECTRA: ``ElectraForPreTraining`` (the discriminator) and ``ElectraForMaskedLM`` (the generator) <->
megacore ``ElectraDiscriminatorModel`` / ``ElectraModel``.

Hugging Face keeps the two as separate models (``google/electra-*-discriminator`` / ``-generator``), each
with its own copy of the embeddings; megacore's ``ElectraModel`` holds one embedding both use. So:

- ``from_hf(discriminator)`` -> ``ElectraDiscriminatorModel`` (what is fine-tuned);
  ``from_hf(discriminator, generator=generator)`` -> ``ElectraModel`` (their embeddings must be equal);
- ``to_hf(model)`` -> ``ElectraForPreTraining`` for either megacore class;
  ``to_hf(electra_model, architecture="ElectraForMaskedLM")`` -> the generator, with the shared embedding;
- ``ElectraFor{Sequence,Token}Classification`` <-> ``Classifier`` with ``backbone="electra"`` (the
  discriminator's trunk and a classification head).

=============================================  ===========================================  ==================
megacore                                       Hugging Face                                 transform
=============================================  ===========================================  ==================
``embedding.*``                                ``electra.embeddings.*`` (as BERT's)
``{discriminator,generator}.projection.*``     ``electra.embeddings_project.*``             (when embedding_size
                                                                                            != hidden_size)
``{...}.encoder.layers.{i}.*``                 ``electra.encoder.layer.{i}.*`` (as BERT's)  q/k/v joined
``discriminator.head.dense.*``                 ``discriminator_predictions.dense.*``
``discriminator.head.dense_prediction.*``      ``discriminator_predictions.dense_prediction.*``
``generator.mlm_head.dense.*`` / ``norm.*``    ``generator_predictions.dense.*`` / ``LayerNorm.*``
``generator.mlm_head.bias``                    ``generator_lm_head.bias``                   (``generator_lm_head.
                                                                                            weight`` is tied)
``classifier.*`` (Classifier, token head)      ``classifier.*``
``classifier.{dense,out_proj}.*`` (sequence)   ``classifier.{dense,out_proj}.*``
=============================================  ===========================================  ==================

HF's generator head applies exact GeLU whatever ``hidden_act`` says; megacore's uses the config's
activation, so a generator converts only with ``hidden_act="gelu"``. The sequence classifier's head is exact GeLU
in both, whatever ``hidden_act`` says.
"""

from __future__ import annotations

from megacore.interop.hf.bert import (
    BERT_DEFAULTS,
    _BUFFERS,
    _pairs,
    classifier_config_from_encoder,
    embedding_mappings,
    encoder_classifier_config_to_hf,
    encoder_classifier_head_mappings,
    encoder_config_from_hf,
    encoder_config_to_hf,
    encoder_mappings,
)
from megacore.interop.hf.classifier import (
    classifier_architecture,
    classifier_config_class,
    classifier_head,
)
from megacore.interop.hf.family import Family, Mapping, register
from megacore.models.classification import Classifier
from megacore.models.common import ModelConfig
from megacore.models.electra import ElectraDiscriminatorModel, ElectraModel

DISCRIMINATOR, GENERATOR = "ElectraForPreTraining", "ElectraForMaskedLM"
CLASSIFIERS = ("ElectraForSequenceClassification", "ElectraForTokenClassification")
# transformers.ElectraConfig's defaults of the keys read here (checked by the tests).
ELECTRA_DEFAULTS = dict(BERT_DEFAULTS, embedding_size=128, hidden_size=256, num_attention_heads=4,
                        intermediate_size=1024)


def config_from_hf(c: dict, architecture: str) -> dict:
    c = {**ELECTRA_DEFAULTS, **c}
    problems = []
    if architecture == GENERATOR and c["hidden_act"] != "gelu":
        problems.append(f"hidden_act={c['hidden_act']!r} (HF's generator head applies exact GeLU regardless; "
                        "megacore's head follows hidden_act: only 'gelu' converts)")
    fields = dict(encoder_config_from_hf(c, architecture, tuple(problems)), embedding_size=c["embedding_size"])
    return classifier_config_from_encoder(c, architecture, "electra", fields)


def architecture_of(model):
    if isinstance(model, Classifier):
        return classifier_architecture(model, "Electra", "electra")
    return DISCRIMINATOR


def config_of(model, architecture: str) -> ModelConfig:
    return model.generator_config if architecture == GENERATOR else model.config


def config_to_hf(model, architecture: str) -> dict:
    if isinstance(model, Classifier) or classifier_head(architecture) is not None:
        return dict(encoder_classifier_config_to_hf(model, architecture, "electra", "electra"),
                    embedding_size=model.config.embedding_dim)
    if architecture == GENERATOR and not isinstance(model, ElectraModel):
        raise ValueError(f"megacore.interop.hf.to_hf: architecture={GENERATOR!r} is ELECTRA's generator; a "
                         f"{type(model).__name__} has none (an ElectraModel does)")
    config = config_of(model, architecture)
    problems = []
    if architecture == GENERATOR and config.activation != "gelu":
        problems.append(f"the generator's activation={config.activation!r} (HF's generator head is exact GeLU)")
    fields = encoder_config_to_hf(config, f"this {type(model).__name__}", problems)
    return dict(fields, model_type="electra", architectures=[architecture], embedding_size=config.embedding_dim)


def mappings(config: ModelConfig, architecture: str) -> list[Mapping]:
    part = "generator" if architecture == GENERATOR else "discriminator"
    out = embedding_mappings("electra.")
    if config.embedding_dim != config.hidden_size:
        out += _pairs(f"{part}.projection", "electra.embeddings_project")
    out += encoder_mappings(f"{part}.encoder.", "electra.encoder.", config.num_layers, config.num_attention_heads)
    if classifier_head(architecture) is not None:
        out += encoder_classifier_head_mappings(config, architecture, pooler=None)
    elif architecture == GENERATOR:
        out += _pairs("generator.mlm_head.dense", "generator_predictions.dense")
        out += _pairs("generator.mlm_head.norm", "generator_predictions.LayerNorm")
        out.append(Mapping("generator.mlm_head.bias", "generator_lm_head.bias"))
    else:
        out += _pairs("discriminator.head.dense", "discriminator_predictions.dense")
        out += _pairs("discriminator.head.dense_prediction", "discriminator_predictions.dense_prediction")
    return out


def build(config: ModelConfig, architecture: str, hf_config: dict, device, generator_config):
    if classifier_head(architecture) is not None:
        return Classifier(config, device=device)
    if architecture == GENERATOR:
        raise ValueError(f"megacore.interop.hf: an {GENERATOR} is ELECTRA's generator: pass it as generator= "
                         f"together with the {DISCRIMINATOR} discriminator (megacore has no generator-only model)")
    if generator_config is None:
        return ElectraDiscriminatorModel(config, device=device)
    return ElectraModel(config, generator_config=generator_config, device=device)


ELECTRA = register(Family(
    model_type="electra",
    architectures=(DISCRIMINATOR, GENERATOR) + CLASSIFIERS,
    model_classes=(ElectraDiscriminatorModel, ElectraModel, Classifier),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    mappings=mappings,
    build=build,
    tied=lambda architecture, config: ({"generator_lm_head.weight": "electra.embeddings.word_embeddings.weight"}
                               if architecture == GENERATOR else {}),
    ignored=_BUFFERS,
    generator_architecture=GENERATOR,
    config_of=config_of,
    architecture_of=architecture_of,
    config_classes=classifier_config_class(CLASSIFIERS),
))
