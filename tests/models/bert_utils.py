"""Test helpers for the encoder models: Hugging Face weights copied into megacore's BERT-style modules (a
test-only mapping, so the models are checked against ``transformers`` independently of megacore.interop),
and small configs."""

from __future__ import annotations

import torch

from megacore.models import ModelConfig


def encoder_config(**kw) -> ModelConfig:
    """A small post-LN encoder config (BERT's options), dropout off unless given."""
    base = dict(vocab_size=101, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                max_position_embeddings=40, type_vocab_size=2, embedding_norm=True, pre_norm=False,
                attention_mask_type="padding", norm_epsilon=1e-12, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def right_padding_mask(batch: int, seq: int, pad) -> torch.Tensor:
    """A ``[batch, seq]`` 1/0 attention mask whose row ``i`` ends in ``pad[i]`` padding positions."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i, p in enumerate(pad):
        if p:
            mask[i, seq - p:] = 0
    return mask


def per_head_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's separate q, k, v (``[h, ...]`` weights or ``[h]`` biases) as the layer's qkv rows, ordered
    (head, {q, k, v}, head_dim)."""
    d = q.shape[0] // heads
    return torch.stack([t.reshape(heads, d, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(3 * q.shape[0], *q.shape[1:])


def hf_embeddings(hf: dict, src: str) -> dict:
    """megacore ``Embedding`` entries from HF's ``<src>embeddings.*``."""
    out = {"word.weight": hf[f"{src}word_embeddings.weight"],
           "position.weight": hf[f"{src}position_embeddings.weight"],
           "norm.weight": hf[f"{src}LayerNorm.weight"], "norm.bias": hf[f"{src}LayerNorm.bias"]}
    if f"{src}token_type_embeddings.weight" in hf:
        out["token_type.weight"] = hf[f"{src}token_type_embeddings.weight"]
    return out


def hf_encoder(hf: dict, src: str, num_layers: int, heads: int) -> dict:
    """megacore ``TransformerStack`` entries (``layers.i.*``) from HF's ``<src>layer.i.*`` (post-LN BERT layers)."""
    out = {}
    for i in range(num_layers):
        p = f"{src}layer.{i}."
        for kind in ("weight", "bias"):
            out[f"layers.{i}.attention.qkv.{kind}"] = per_head_qkv(
                *(hf[f"{p}attention.self.{n}.{kind}"] for n in ("query", "key", "value")), heads)
            out[f"layers.{i}.attention.proj.{kind}"] = hf[f"{p}attention.output.dense.{kind}"]
            out[f"layers.{i}.attention_norm.{kind}"] = hf[f"{p}attention.output.LayerNorm.{kind}"]
            out[f"layers.{i}.mlp.fc1.{kind}"] = hf[f"{p}intermediate.dense.{kind}"]
            out[f"layers.{i}.mlp.fc2.{kind}"] = hf[f"{p}output.dense.{kind}"]
            out[f"layers.{i}.mlp_norm.{kind}"] = hf[f"{p}output.LayerNorm.{kind}"]
    return out


def prefixed(prefix: str, entries: dict) -> dict:
    return {prefix + k: v for k, v in entries.items()}


def load_exactly(model: torch.nn.Module, state: dict) -> None:
    """Loads ``state`` into ``model``, every parameter set (strict) and every value's shape checked."""
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
