"""GPT-2 (``GPT2LMHeadModel``) <-> megacore ``GPTModel``; ``GPT2ForSequenceClassification`` <-> megacore
``Classifier`` with ``backbone="gpt"``.

=======================================  ==============================  =================================
megacore                                 Hugging Face                    transform
=======================================  ==============================  =================================
``embedding.word.weight``                ``transformer.wte.weight``      (``lm_head.weight`` is tied to it)
``embedding.position.weight``            ``transformer.wpe.weight``
``decoder.layers.{i}.attention_norm.*``  ``transformer.h.{i}.ln_1.*``
``...attention.qkv.weight``              ``...attn.c_attn.weight``       Conv1D ``[in, out]``: transpose;
                                                                         rows [q; k; v] -> (head, qkv, d)
``...attention.qkv.bias``                ``...attn.c_attn.bias``         [q; k; v] -> (head, qkv, d)
``...attention.proj.*``                  ``...attn.c_proj.*``            weight transposed
``decoder.layers.{i}.mlp_norm.*``        ``transformer.h.{i}.ln_2.*``
``...mlp.fc1.*`` / ``...mlp.fc2.*``      ``...mlp.c_fc.*`` / ``c_proj.*``  weights transposed
``final_norm.*``                         ``transformer.ln_f.*``
``score.weight`` (Classifier)            ``score.weight``                (no bias)
=======================================  ==============================  =================================

Dropout: GPT-2 has three rates (``embd_pdrop`` on the embeddings, ``resid_pdrop`` on each block's
output, ``attn_pdrop`` on the attention probabilities); megacore has one ``hidden_dropout`` for the
embeddings and the residual branches, taken from ``resid_pdrop`` (a warning says so when
``embd_pdrop`` differs). ``to_hf`` writes ``hidden_dropout`` to both.

The classifier reads the last real token as HF does with ``pad_token_id`` (``ClassifierConfig.pad_token_id``);
given an ``attention_mask``, megacore reads the rightmost position it marks (the same token in a right-padded batch
whose real tokens are never the pad id). HF's GPT-2 adds the word embeddings of ``token_type_ids`` when given;
megacore's GPT has no token types and ignores them: convert classifiers used without them.
"""

from __future__ import annotations

import functools
import warnings

from megacore.interop.hf.classifier import (
    classifier_architecture,
    classifier_config_class,
    classifier_config_from_hf,
    classifier_config_to_hf,
    classifier_problems,
)
from megacore.interop.hf.family import Family, Mapping, check_supported, qkv_from_hf, qkv_to_hf, register, transpose
from megacore.models.classification import Classifier
from megacore.models.common import ModelConfig
from megacore.models.gpt import GPTModel

LM, CLASSIFIER = "GPT2LMHeadModel", "GPT2ForSequenceClassification"

# HF activation name -> megacore's; the first HF name of each is what to_hf writes.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal-mask buffers of old GPT-2 checkpoints
# transformers.GPT2Config's defaults of the keys read here (tests check them against GPT2Config()).
HF_DEFAULTS = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5,
    initializer_range=0.02, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
    add_cross_attention=False, tie_word_embeddings=True, pad_token_id=None,
)


def config_from_hf(c: dict, architecture: str) -> dict:
    c = {**HF_DEFAULTS, **c}
    problems = []
    act = c["activation_function"]
    if act not in _ACTIVATIONS:
        problems.append(f"activation_function={act!r} (supported: {', '.join(_ACTIVATIONS)})")
    for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if c[key] != supported:
            problems.append(f"{key}={c[key]} (megacore needs {supported})")
    check_supported("from_hf", f"this {architecture}", problems)
    if c["embd_pdrop"] != c["resid_pdrop"]:
        warnings.warn(f"megacore.interop.hf.from_hf: embd_pdrop={c['embd_pdrop']} differs from resid_pdrop="
                      f"{c['resid_pdrop']}; megacore uses hidden_dropout={c['resid_pdrop']} (resid_pdrop) for both",
                      stacklevel=3)
    h = c["n_embd"]
    fields = dict(
        vocab_size=c["vocab_size"], hidden_size=h, num_layers=c["n_layer"], num_attention_heads=c["n_head"],
        ffn_hidden_size=c["n_inner"] or 4 * h, max_position_embeddings=c["n_positions"],
        position_embedding_type="learned_absolute", pre_norm=True, normalization="layernorm",
        norm_epsilon=c["layer_norm_epsilon"], activation=_ACTIVATIONS[act], hidden_dropout=c["resid_pdrop"],
        attention_dropout=c["attn_pdrop"], attention_mask_type="causal", add_bias_linear=True,
        init_method_std=c["initializer_range"],
    )
    if architecture == CLASSIFIER:
        fields.update(classifier_config_from_hf(c, architecture, "gpt"))
    return fields


def config_to_hf(model, architecture: str) -> dict:
    config = model.config
    problems = classifier_problems(model, architecture, "gpt")
    for name, value, supported in (
        ("position_embedding_type", config.position_embedding_type, "learned_absolute"),
        ("normalization", config.normalization, "layernorm"), ("pre_norm", config.pre_norm, True),
        ("add_bias_linear", config.add_bias_linear, True), ("attention_mask_type", config.attention_mask_type, "causal"),
        ("type_vocab_size", config.type_vocab_size, 0), ("embedding_norm", config.embedding_norm, False),
    ):
        if value != supported:
            problems.append(f"{name}={value!r} (GPT-2 has {supported!r})")
    if config.embedding_dim != config.hidden_size:
        problems.append(f"embedding_size={config.embedding_size} != hidden_size={config.hidden_size}")
    if config.kv_channels is not None and config.kv_channels * config.num_attention_heads != config.hidden_size:
        problems.append(f"kv_channels={config.kv_channels} (HF's heads are hidden_size / num_attention_heads wide)")
    check_supported("to_hf", f"this {type(model).__name__}", problems)
    classifier = classifier_config_to_hf(config) if architecture == CLASSIFIER else {}
    return dict(classifier,
        model_type="gpt2", architectures=[architecture], vocab_size=config.vocab_size,
        n_positions=config.max_position_embeddings, n_embd=config.hidden_size, n_layer=config.num_layers,
        n_head=config.num_attention_heads, n_inner=config.ffn_hidden_size,
        activation_function=_TO_HF_ACTIVATION[config.activation], resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.hidden_dropout, attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.norm_epsilon, initializer_range=config.init_method_std,
        tie_word_embeddings=True, dtype=str(config.params_dtype).removeprefix("torch."),
    )


def mappings(config: ModelConfig, architecture: str) -> list[Mapping]:
    heads = config.num_attention_heads
    qkv_in = functools.partial(qkv_from_hf, num_heads=heads)
    qkv_out = functools.partial(qkv_to_hf, num_heads=heads)
    out = [Mapping("embedding.word.weight", "transformer.wte.weight"),
           Mapping("embedding.position.weight", "transformer.wpe.weight")]
    for i in range(config.num_layers):
        mc, hf = f"decoder.layers.{i}.", f"transformer.h.{i}."
        out += [
            Mapping(mc + "attention_norm.weight", hf + "ln_1.weight"),
            Mapping(mc + "attention_norm.bias", hf + "ln_1.bias"),
            Mapping(mc + "attention.qkv.weight", hf + "attn.c_attn.weight",
                    lambda t: qkv_in(transpose(t)), lambda t: transpose(qkv_out(t))),
            Mapping(mc + "attention.qkv.bias", hf + "attn.c_attn.bias", qkv_in, qkv_out),
            Mapping(mc + "attention.proj.weight", hf + "attn.c_proj.weight", transpose, transpose),
            Mapping(mc + "attention.proj.bias", hf + "attn.c_proj.bias"),
            Mapping(mc + "mlp_norm.weight", hf + "ln_2.weight"),
            Mapping(mc + "mlp_norm.bias", hf + "ln_2.bias"),
            Mapping(mc + "mlp.fc1.weight", hf + "mlp.c_fc.weight", transpose, transpose),
            Mapping(mc + "mlp.fc1.bias", hf + "mlp.c_fc.bias"),
            Mapping(mc + "mlp.fc2.weight", hf + "mlp.c_proj.weight", transpose, transpose),
            Mapping(mc + "mlp.fc2.bias", hf + "mlp.c_proj.bias"),
        ]
    out += [Mapping("final_norm.weight", "transformer.ln_f.weight"), Mapping("final_norm.bias", "transformer.ln_f.bias")]
    if architecture == CLASSIFIER:
        out.append(Mapping("score.weight", "score.weight"))
    return out


def normalize_keys(state: dict, architecture: str) -> dict:
    """Checkpoints of the bare ``GPT2Model`` (the hub's ``gpt2``) name tensors without ``transformer.``."""
    if any(k.startswith("transformer.") for k in state):
        return state
    return {k if k == "lm_head.weight" else "transformer." + k: v for k, v in state.items()}


def build(config: ModelConfig, architecture: str, hf_config: dict, device, generator_config=None):
    return Classifier(config, device=device) if architecture == CLASSIFIER else GPTModel(config, device=device)


GPT2 = register(Family(
    model_type="gpt2",
    architectures=(LM, CLASSIFIER),
    model_classes=(GPTModel, Classifier),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    mappings=mappings,
    build=build,
    tied=lambda architecture, config: {"lm_head.weight": "transformer.wte.weight"} if architecture == LM else {},
    ignored=_BUFFERS,
    normalize_keys=normalize_keys,
    architecture_of=lambda model: (classifier_architecture(model, "GPT2", "gpt") if isinstance(model, Classifier)
                                   else LM),
    config_classes=classifier_config_class((CLASSIFIER,)),
))
