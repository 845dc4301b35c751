"""T5 and T5 v1.1 (``T5ForConditionalGeneration``) <-> megacore ``T5Model``.

==================================================  ===================================================  ==========================
megacore                                            Hugging Face                                         transform
==================================================  ===================================================  ==========================
``word.weight``                                     ``shared.weight``                                    (``encoder.embed_tokens``,
                                                                                                         ``decoder.embed_tokens``
                                                                                                         and, tied, ``lm_head``)
``encoder_bias.weight`` / ``decoder_bias.weight``   ``{en,de}coder.block.0.layer.0.SelfAttention.``
                                                    ``relative_attention_bias.weight``
``encoder.layers.{i}.attention_norm.weight``        ``encoder.block.{i}.layer.0.layer_norm.weight``
``...attention.qkv.weight``                         ``...layer.0.SelfAttention.{q,k,v}.weight``          [q; k; v] -> (head, qkv, d)
``...attention.proj.weight``                        ``...layer.0.SelfAttention.o.weight``
``decoder.layers.{i}.cross_attention_norm.weight``  ``decoder.block.{i}.layer.1.layer_norm.weight``
``...cross_attention.q.weight``                     ``...layer.1.EncDecAttention.q.weight``
``...cross_attention.kv.weight``                    ``...layer.1.EncDecAttention.{k,v}.weight``          [k; v] -> (head, kv, d)
``...cross_attention.proj.weight``                  ``...layer.1.EncDecAttention.o.weight``
``...mlp_norm.weight``                              ``...layer.{1 enc, 2 dec}.layer_norm.weight``
``...mlp.fc1.weight``                               ``...DenseReluDense.wi.weight`` (v1.1:               (v1.1: [wi_0; wi_1],
                                                    ``wi_0``, ``wi_1``)                                  [gate; up])
``...mlp.fc2.weight``                               ``...DenseReluDense.wo.weight``
``encoder_norm.weight`` / ``decoder_norm.weight``   ``{en,de}coder.final_layer_norm.weight``
``lm_head.weight`` (untied only)                    ``lm_head.weight``
==================================================  ===================================================  ==========================

HF's ``dropout_rate`` is megacore's ``hidden_dropout`` and ``attention_dropout`` both. A T5 v1.1 config (untied,
unscaled LM head) reads ``tie_word_embeddings: false``; transformers >= 5 writes it as ``scale_decoder_outputs:
false`` and ties the head to ``shared`` in its model class, so ``to_hf`` of a v1.1 model whose head differs from
its embedding raises there, while ``save_hf_safetensors`` / ``load_hf_safetensors`` keep the two apart.
"""

from __future__ import annotations

import torch

from megacore.interop.hf.family import Family, Mapping, check_supported, qkv_from_hf, qkv_to_hf, register
from megacore.models.t5 import T5Config, T5Model

# HF feed_forward_proj -> megacore activation (GeGLU is T5 v1.1's, with the tanh GeLU HF calls gelu_new)
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu", "gated-relu": "reglu", "gated-silu": "swiglu"}
_TO_HF_ACTIVATION = {v: k for k, v in _ACTIVATIONS.items()}
# transformers.T5Config's defaults of the keys read here (a test checks them against T5Config()).
HF_DEFAULTS = dict(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=None, num_heads=8,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1, layer_norm_epsilon=1e-6,
    initializer_factor=1.0, feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0,
)


def _scaled_tied_head(c: dict) -> bool:
    """Whether the LM head is the shared embedding with its input scaled by d_model^-0.5 (T5) or not (T5 v1.1: its
    own head, unscaled). Configs say so with ``tie_word_embeddings`` (False in v1.1's); transformers >= 5 keeps
    that as ``scale_decoder_outputs`` and sets ``tie_word_embeddings`` to True in every config it writes."""
    if "scale_decoder_outputs" in c:
        return bool(c["scale_decoder_outputs"])
    return bool(c["tie_word_embeddings"])


def config_from_hf(c: dict, architecture: str) -> dict:
    c = {**HF_DEFAULTS, **c}
    if c["feed_forward_proj"] not in _ACTIVATIONS:
        check_supported("from_hf", f"this {architecture}",
                        [f"feed_forward_proj={c['feed_forward_proj']!r} (supported: {', '.join(_ACTIVATIONS)})"])
    return dict(
        vocab_size=c["vocab_size"], hidden_size=c["d_model"], kv_channels=c["d_kv"], ffn_hidden_size=c["d_ff"],
        num_layers=c["num_layers"], num_decoder_layers=c["num_decoder_layers"] or c["num_layers"],
        num_attention_heads=c["num_heads"], relative_attention_num_buckets=c["relative_attention_num_buckets"],
        relative_attention_max_distance=c["relative_attention_max_distance"], hidden_dropout=c["dropout_rate"],
        attention_dropout=c["dropout_rate"], norm_epsilon=c["layer_norm_epsilon"],
        activation=_ACTIVATIONS[c["feed_forward_proj"]], tie_word_embeddings=_scaled_tied_head(c),
        init_method_std=c["initializer_factor"] * c["d_model"] ** -0.5,
    )


def config_to_hf(model: T5Model, architecture: str) -> dict:
    config = model.config
    problems = []
    for name, value, supported in (("normalization", config.normalization, "rmsnorm"),
                                   ("add_bias_linear", config.add_bias_linear, False),
                                   ("softmax_scale", config.softmax_scale, 1.0)):
        if value != supported:
            problems.append(f"{name}={value!r} (T5 has {supported!r})")
    if config.activation not in _TO_HF_ACTIVATION:
        problems.append(f"activation={config.activation!r} (T5 has {', '.join(_TO_HF_ACTIVATION)})")
    if config.hidden_dropout != config.attention_dropout:
        problems.append(f"hidden_dropout={config.hidden_dropout} != attention_dropout={config.attention_dropout} "
                        "(T5 has one dropout_rate)")
    check_supported("to_hf", "this T5Model", problems)
    return dict(
        model_type="t5", architectures=[architecture], vocab_size=config.vocab_size, d_model=config.hidden_size,
        d_kv=config.layer_config().head_dim, d_ff=config.ffn_hidden_size, num_layers=config.num_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_attention_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance, dropout_rate=config.hidden_dropout,
        layer_norm_epsilon=config.norm_epsilon, feed_forward_proj=_TO_HF_ACTIVATION[config.activation],
        tie_word_embeddings=config.tie_word_embeddings, is_encoder_decoder=True,
        pad_token_id=model.pad_token_id, decoder_start_token_id=model.decoder_start_token_id,
        initializer_factor=config.init_method_std * config.hidden_size ** 0.5,
        dtype=str(config.params_dtype).removeprefix("torch."),
    )


def _kv_from_hf(k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[all k heads; all v heads] -> megacore's (head, {k, v}, head_dim) rows."""
    t = torch.cat([k, v])
    return t.reshape(2, num_heads, -1, t.shape[-1]).transpose(0, 1).reshape(t.shape).contiguous()


def _kv_to_hf(t: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = t.reshape(num_heads, 2, -1, t.shape[-1]).transpose(0, 1).reshape(2, -1, t.shape[-1])
    return k.contiguous(), v.contiguous()


def mappings(config: T5Config, architecture: str) -> list[Mapping]:
    heads = config.num_attention_heads
    gated = config.layer_config().gated

    def qkv(prefix: str) -> Mapping:
        return Mapping(f"{prefix[0]}attention.qkv.weight", tuple(f"{prefix[1]}{n}.weight" for n in "qkv"),
                       lambda q, k, v: qkv_from_hf(torch.cat([q, k, v]), heads),
                       lambda t: tuple(qkv_to_hf(t, heads).chunk(3)))

    def mlp(mc: str, hf: str) -> list[Mapping]:
        fc1 = (Mapping(mc + "mlp.fc1.weight", (hf + "DenseReluDense.wi_0.weight", hf + "DenseReluDense.wi_1.weight"),
                       lambda gate, up: torch.cat([gate, up]), lambda t: tuple(t.chunk(2)))
               if gated else Mapping(mc + "mlp.fc1.weight", hf + "DenseReluDense.wi.weight"))
        return [Mapping(mc + "mlp_norm.weight", hf + "layer_norm.weight"), fc1,
                Mapping(mc + "mlp.fc2.weight", hf + "DenseReluDense.wo.weight")]

    out = [Mapping("word.weight", "shared.weight")]
    for stack, count in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        out.append(Mapping(f"{stack}_bias.weight",
                           f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"))
        for i in range(count):
            mc, hf = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            out += [Mapping(mc + "attention_norm.weight", hf + "0.layer_norm.weight"),
                    qkv((mc, hf + "0.SelfAttention.")),
                    Mapping(mc + "attention.proj.weight", hf + "0.SelfAttention.o.weight")]
            if stack == "decoder":
                cross = hf + "1.EncDecAttention."
                out += [Mapping(mc + "cross_attention_norm.weight", hf + "1.layer_norm.weight"),
                        Mapping(mc + "cross_attention.q.weight", cross + "q.weight"),
                        Mapping(mc + "cross_attention.kv.weight", (cross + "k.weight", cross + "v.weight"),
                                lambda k, v: _kv_from_hf(k, v, heads), lambda t: _kv_to_hf(t, heads)),
                        Mapping(mc + "cross_attention.proj.weight", cross + "o.weight")]
            out += mlp(mc, hf + ("2." if stack == "decoder" else "1."))
        out.append(Mapping(f"{stack}_norm.weight", f"{stack}.final_layer_norm.weight"))
    if not config.tie_word_embeddings:
        out.append(Mapping("lm_head.weight", "lm_head.weight"))
    return out


def tied(architecture: str, config: T5Config) -> dict[str, str]:
    keys = ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    if config.tie_word_embeddings:
        keys.append("lm_head.weight")
    return {key: "shared.weight" for key in keys}


def build(config: T5Config, architecture: str, hf_config: dict, device, generator_config) -> T5Model:
    pad = hf_config.get("pad_token_id", HF_DEFAULTS["pad_token_id"])
    pad = 0 if pad is None else pad
    start = hf_config.get("decoder_start_token_id")
    return T5Model(config, device=device, pad_token_id=pad, decoder_start_token_id=pad if start is None else start)


T5 = register(Family(
    model_type="t5",
    architectures=("T5ForConditionalGeneration",),
    model_classes=(T5Model,),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    mappings=mappings,
    build=build,
    tied=tied,
    config_class=T5Config,
))

__all__ = ["HF_DEFAULTS", "T5"]
