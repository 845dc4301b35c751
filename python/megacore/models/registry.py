"""Model presets, one registry: ``build(name, **overrides)``.

Each preset is a model class and the config fields that define it (a ModelConfig, or the class's own
``config_class``: T5Config); ``overrides`` replace any
field (``build("gpt2-small", tensor_parallel=True, params_dtype=torch.bfloat16)``). Parameters are drawn
one tensor at a time and each rank keeps only its shard; ``device="meta"`` (or building under
``with torch.device("meta")``) allocates nothing, for inspecting a large model's shapes and sizes. To load
weights into a model without a random init, use ``megacore.interop.hf`` (it builds on the meta device and
sets each rank's shards itself). ``Module.to_empty`` works too: how a parameter is sharded is declared by its
module (``megacore.parallel.placement``), not stored on the Parameter object it replaces.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from megacore.models.bert import BertModel
from megacore.models.classification import Classifier
from megacore.models.common import ModelConfig
from megacore.models.electra import ElectraModel
from megacore.models.gpt import GPTModel
from megacore.models.t5 import T5Model

# name -> (model class, ModelConfig fields)
PRESETS: dict[str, tuple[Callable[..., nn.Module], dict]] = {
    "gpt-tiny": (GPTModel, dict(vocab_size=50257, hidden_size=256, num_layers=4, num_attention_heads=4,
                                max_position_embeddings=1024, activation="gelu_tanh")),
    "gpt2-small": (GPTModel, dict(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12,
                                  max_position_embeddings=1024, activation="gelu_tanh")),
    "gpt2-medium": (GPTModel, dict(vocab_size=50257, hidden_size=1024, num_layers=24, num_attention_heads=16,
                                   max_position_embeddings=1024, activation="gelu_tanh")),
    # GPT-3 XL's shape (Brown et al., 2020; Megatron's 1.3B): 24 layers x 2048 hidden x 16 heads, 2048 positions
    "gpt-1.3b": (GPTModel, dict(vocab_size=50257, hidden_size=2048, num_layers=24, num_attention_heads=16,
                                max_position_embeddings=2048, activation="gelu_tanh")),
}

# BERT-style encoders: post-LN, a padding mask, LayerNorm on the embeddings, exact GeLU, eps 1e-12 (Hugging Face's
# bert-*-uncased / google/electra-* configs); RoBERTa: eps 1e-5, one token type, positions offset by padding_idx + 1.
_ENCODER = dict(pre_norm=False, embedding_norm=True, attention_mask_type="padding", activation="gelu",
                norm_epsilon=1e-12, max_position_embeddings=512, type_vocab_size=2, vocab_size=30522)
PRESETS.update({
    "bert-tiny": (BertModel, dict(_ENCODER, hidden_size=128, num_layers=2, num_attention_heads=2, ffn_hidden_size=512)),
    "bert-base": (BertModel, dict(_ENCODER, hidden_size=768, num_layers=12, num_attention_heads=12)),
    # RobertaForMaskedLM: no binary head and no pooler (a pooler without a head would get no gradient)
    "roberta-base": (functools.partial(BertModel, head=None, add_pooler=False, position_offset_padding_idx=1),
                     dict(_ENCODER, vocab_size=50265, hidden_size=768, num_layers=12, num_attention_heads=12,
                          max_position_embeddings=514, type_vocab_size=1, norm_epsilon=1e-5)),
    # ELECTRA: the config is the discriminator's; the generator is the paper's fraction of it (hidden, heads,
    # FFN): 1/4 for Small (hidden 64, 1 head), 1/3 for Base (hidden 256, 4 heads, as google/electra-base-generator).
    "electra-small": (functools.partial(ElectraModel, generator_size=1 / 4),
                      dict(_ENCODER, embedding_size=128, hidden_size=256, num_layers=12, num_attention_heads=4,
                           ffn_hidden_size=1024)),
    "electra-base": (functools.partial(ElectraModel, generator_size=1 / 3),
                     dict(_ENCODER, hidden_size=768, num_layers=12, num_attention_heads=12)),
})

# T5 (Raffel et al.; Hugging Face's t5-small / t5-base and google/t5-v1_1-*): relative positions, RMSNorm, no biases;
# v1.1 has GeGLU, an untied head and (small) narrower, fewer heads. t5-tiny is for CPU runs and CI.
_T5 = dict(vocab_size=32128, kv_channels=64, hidden_dropout=0.1, attention_dropout=0.1)
_T5_V1_1 = dict(_T5, activation="geglu", tie_word_embeddings=False)
PRESETS.update({
    "t5-tiny": (T5Model, dict(_T5, hidden_size=128, kv_channels=32, ffn_hidden_size=512, num_layers=2,
                              num_attention_heads=4)),
    "t5-small": (T5Model, dict(_T5, hidden_size=512, ffn_hidden_size=2048, num_layers=6, num_attention_heads=8)),
    "t5-base": (T5Model, dict(_T5, hidden_size=768, ffn_hidden_size=3072, num_layers=12, num_attention_heads=12)),
    "t5-v1_1-tiny": (T5Model, dict(_T5_V1_1, hidden_size=128, kv_channels=32, ffn_hidden_size=320, num_layers=2,
                                   num_attention_heads=4)),
    "t5-v1_1-small": (T5Model, dict(_T5_V1_1, hidden_size=512, ffn_hidden_size=1024, num_layers=8,
                                    num_attention_heads=6)),
    "t5-v1_1-base": (T5Model, dict(_T5_V1_1, hidden_size=768, ffn_hidden_size=2048, num_layers=12,
                                   num_attention_heads=12)),
})


# Model classes that are no preset, by the name a checkpoint records (``extra["model_class"]``): a checkpoint of one
# is rebuilt as ``MODEL_CLASSES[name](MODEL_CLASSES[name].config_class(**fields))``.
MODEL_CLASSES: dict[str, type] = {"classifier": Classifier}


def _config_class(model: Callable[..., nn.Module]) -> type:
    """The config class a preset's model takes (a model class's ``config_class``, else ModelConfig)."""
    model = getattr(model, "func", model)  # a functools.partial of a model class
    return getattr(model, "config_class", ModelConfig)


def register(name: str, model: Callable[..., nn.Module], **fields) -> None:
    """Adds a preset (ValueError if the name is taken)."""
    if name in PRESETS:
        raise ValueError(f"megacore.models.register: preset {name!r} already exists")
    PRESETS[name] = (model, fields)


def preset_config(name: str, **overrides) -> ModelConfig:
    """The config (a ModelConfig; T5Config for T5) of preset ``name`` with ``overrides`` applied (ValueError for an
    unknown name)."""
    if name not in PRESETS:
        raise ValueError(f"megacore.models.build: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    model, fields = PRESETS[name]
    fields = dict(fields)
    fields.setdefault("num_layers", 1)
    fields["num_layers"] = overrides.get("num_layers", fields["num_layers"])
    return _config_class(model)(**{**fields, **overrides})


def build(name: str, device=None, **overrides) -> nn.Module:
    """Builds preset ``name`` (see ``PRESETS``) with ``overrides`` of its ModelConfig fields, on ``device``
    (``"meta"`` allocates nothing). Raises ValueError for an unknown preset, and the config's errors."""
    config = preset_config(name, **overrides)
    model_cls, _ = PRESETS[name]
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return model_cls(config, device="meta")
    return model_cls(config, device=device)


__all__ = ["MODEL_CLASSES", "PRESETS", "build", "preset_config", "register"]
