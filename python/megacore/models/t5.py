"""T5: an encoder-decoder on the C++ transformer layer, with T5's learned, bucketed relative-position bias.

    input_ids [b, s] -> shared embedding -> encoder layers (padding mask, bidirectional bias) -> final RMSNorm
                                                                                              = memory [s, b, h]
    decoder_input_ids [b, t] -> shared embedding -> decoder layers (causal self-attention with a causal bias,
        cross-attention to the memory) -> final RMSNorm -> LM head (tied: scaled by d_model^-0.5; v1.1: its own)
        -> logits [b, t, vocab]   or, with labels, the per-token loss [b, t] (fp32)

Both stacks are pre-norm with RMSNorm without bias, no GEMM biases, no score scaling (``softmax_scale=1``), and
each has one relative-position bias table shared by its layers (``megacore.models.position_bias``). The MLP is
ReLU (T5) or GeGLU (T5 v1.1, which also unties the LM head). Heads may be narrower than ``hidden / heads``
(``kv_channels``, T5's ``d_kv``).

Differences from transformers' ``T5ForConditionalGeneration`` in training (none in eval): T5 also applies
dropout between the MLP's activation and its output GEMM; megacore's layer does not (as Megatron's T5).

Pipeline stages (``megacore.parallel.pipeline``): the pipeline layers are the encoder's E layers, then the
decoder's, divided as any model's. Up to decoder layer 0 the hidden state ``[s(/tp), b, h]`` crosses a boundary;
after it the decoder's ``[t(/tp), b, h]`` and the memory ``[s(/tp), b, h]``, whose gradient comes back with it.

    stage 0                    word embedding (the ids)
    decoder layer 0's stage    encoder_norm (the memory), word embedding (the decoder's ids)
    each stage with layers     their stacks' bias tables (encoder_bias, decoder_bias)
    last stage                 decoder_norm, LM head (T5: the word embedding; v1.1: lm_head)

A module on several stages is a tied copy on all but the first of them (the word embedding, as Megatron's
embedding group of first, decoder-first and last stage; the bias tables), its gradients summed after backward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megacore.models.common import (KVCache, ModelConfig, Norm, StagedModel, TransformerStack, WordEmbedding,
                                    lm_output, tensor_parallel_world)
from megacore.models.position_bias import RelativePositionBias
from megacore.parallel.mappings import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region

_NAME = "megacore.models.T5Model"


@dataclass
class T5Config(ModelConfig):
    """A ModelConfig with T5's defaults and its own fields.

    Attributes beyond ModelConfig's:
        num_decoder_layers: decoder layers; None: ``num_layers`` (the encoder's).
        relative_attention_num_buckets, relative_attention_max_distance: the relative-position buckets.
        tie_word_embeddings: the LM head is the shared embedding, its input scaled by ``hidden_size ** -0.5`` (T5);
            False gives the head its own table and no scaling (T5 v1.1).
    ``attention_mask_type`` is the encoder's (``"padding"``); the decoder's self-attention is causal.
    """

    position_embedding_type: str = "none"
    normalization: str = "rmsnorm"
    norm_epsilon: float = 1e-6
    activation: str = "relu"
    add_bias_linear: bool = False
    softmax_scale: Optional[float] = 1.0
    attention_mask_type: str = "padding"
    max_position_embeddings: int = 512  # not a table (positions are relative): the longest sequence expected
    num_decoder_layers: Optional[int] = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    tie_word_embeddings: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for field in ("num_decoder_layers", "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"megacore.models.T5Config: {field}={value!r} must be an int >= 1")
        for field, expected in (("position_embedding_type", "none"), ("attention_mask_type", "padding"),
                                ("pre_norm", True), ("embedding_size", None), ("type_vocab_size", 0),
                                ("embedding_norm", False)):
            if getattr(self, field) != expected:
                raise ValueError(f"megacore.models.T5Config: {field}={getattr(self, field)!r}; T5 needs {expected!r}")

    def encoder_layer_config(self):
        """The encoder layers' TransformerConfig: padded, bidirectional self-attention with the bias."""
        return dataclasses.replace(self.layer_config(), attention_bias=True)

    def decoder_layer_config(self):
        """The decoder layers': causal self-attention with the bias, then cross-attention to the memory."""
        return dataclasses.replace(self.layer_config(), attention_mask_type="causal", attention_bias=True,
                                   cross_attention=True, num_layers=self.num_decoder_layers)


class T5Model(StagedModel):
    """An encoder-decoder (T5 / T5 v1.1), tensor- and sequence-parallel like the other megacore models.

    ``forward(input_ids [b, s], decoder_input_ids [b, t] = None, labels [b, t] = None, attention_mask [b, s] =
    None)``: ``attention_mask`` is 1 for the tokens to attend to and 0 for padding (transformers' convention; None:
    no padding). Without ``decoder_input_ids``, they are ``labels`` shifted right with ``decoder_start_token_id``
    first (-100 read as ``pad_token_id``), as T5 trains. Returns the logits ``[b, t, vocab_size]`` in the
    parameters' dtype, or with ``labels`` (ids, or -100 to ignore) the per-token loss ``[b, t]`` in fp32.

    Raises ValueError for bad shapes and the config's errors.
    """

    config_class = T5Config  # what megacore.models.build makes from a preset's fields
    pretraining_task = "span_corruption"  # megacore.training.tasks.SpanCorruptionTask

    def __init__(self, config: T5Config, device=None, pad_token_id: int = 0, decoder_start_token_id: int = 0):
        super().__init__()
        if not isinstance(config, T5Config):
            raise TypeError(f"{_NAME}: config is a {type(config).__name__}, expected a T5Config")
        tensor_parallel_world(config, "T5Model")
        self.config = config
        self.pad_token_id, self.decoder_start_token_id = pad_token_id, decoder_start_token_id
        self.word = WordEmbedding(config, device)  # the shared embedding (T5's `shared`)
        bias = dict(num_heads=config.num_attention_heads, num_buckets=config.relative_attention_num_buckets,
                    max_distance=config.relative_attention_max_distance, tensor_parallel=config.tensor_parallel,
                    params_dtype=config.params_dtype, init_std=config.init_method_std, device=device)
        self.encoder_bias = RelativePositionBias(bidirectional=True, **bias)
        self.encoder = TransformerStack(config, device, config.encoder_layer_config())
        self.encoder_norm = Norm(config, config.hidden_size, device, sequence_parallel=config.sequence_parallel)
        self.decoder_bias = RelativePositionBias(bidirectional=False, **bias)
        self.decoder = TransformerStack(config, device, config.decoder_layer_config(), config.num_decoder_layers)
        self.decoder_norm = Norm(config, config.hidden_size, device, sequence_parallel=config.sequence_parallel)
        self.lm_head = None if config.tie_word_embeddings else WordEmbedding(config, device)
        self._t5_initialization()

    @torch.no_grad()
    def _t5_initialization(self) -> None:
        """T5's initialization (Mesh TensorFlow's, as transformers' ``T5PreTrainedModel._init_weights``): the word
        table and an own LM head normal(0, 1); a query projection (d_model x d_kv)^-0.5, keys and values
        d_model^-0.5, an attention output (heads x d_kv)^-0.5, the MLP's input d_model^-0.5 and output d_ff^-0.5,
        the relative-position tables d_model^-0.5. Every tensor was drawn normal(0, std) with a known std (the
        layers' ``init_method_std`` / ``output_init_std``, the tables' INIT_STD), so each is rescaled by target / std:
        exactly the target distribution, and the same on every tensor-parallel rank. The 0.02-scale default
        leaves the scaled, tied LM head's logits near zero, and a model so drawn barely learns for hundreds of
        steps (measured: a T5 copy task at loss ln(vocab) after 300 AdamW steps)."""
        from megacore.parallel.layers import INIT_STD

        c = self.config
        h = c.hidden_size
        for table in (self.word, self.lm_head):
            if table is not None:
                table.weight.mul_(1.0 / INIT_STD)
        for bias in (self.encoder_bias, self.decoder_bias):
            bias.weight.mul_(h ** -0.5 / c.init_method_std)
        for stack in (self.encoder, self.decoder):
            for index in stack.layer_indices():
                layer = stack.layer(index)
                lc = layer.config
                d, heads, f = lc.head_dim, lc.num_attention_heads, lc.ffn_hidden_size
                std, out_std = lc.init_method_std, lc.output_init_std
                qkv = layer.attention.qkv.weight.view(-1, 3, d, h)  # rows grouped (head, {q, k, v}, d)
                qkv[:, 0].mul_((h * d) ** -0.5 / std)
                qkv[:, 1:].mul_(h ** -0.5 / std)
                layer.attention.proj.weight.mul_((heads * d) ** -0.5 / out_std)
                if lc.cross_attention:
                    layer.cross_attention.q.weight.mul_((h * d) ** -0.5 / std)
                    layer.cross_attention.kv.weight.mul_(h ** -0.5 / std)
                    layer.cross_attention.proj.weight.mul_((heads * d) ** -0.5 / out_std)
                layer.mlp.fc1.weight.mul_(h ** -0.5 / std)
                layer.mlp.fc2.weight.mul_(f ** -0.5 / out_std)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.word(ids.t())  # [s, b, h]
        if self.training and self.config.hidden_dropout > 0:
            x = F.dropout(x, self.config.hidden_dropout)
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.word.group)
        return x

    def _final(self, norm: Norm, x: torch.Tensor) -> torch.Tensor:
        x = norm(x)
        return F.dropout(x, self.config.hidden_dropout) if self.training and self.config.hidden_dropout > 0 else x

    def _encoder_layers(self, x: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        indices: Optional[list[int]] = None) -> torch.Tensor:
        """The encoder's layers ``indices`` (None: all it holds) on ``x [s(/tp), b, h]``."""
        s = input_ids.shape[1]
        mask = _padding_mask(attention_mask, input_ids)
        if mask is None:  # the encoder's layers take a padding mask: an empty one
            mask = torch.zeros(input_ids.shape[0], 1, 1, s, dtype=torch.bool, device=input_ids.device)
        return self.encoder(x, mask, indices=indices, attention_bias=self.encoder_bias(s, s))

    def _decoder_layers(self, x: torch.Tensor, t: int, memory: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        indices: Optional[list[int]] = None) -> torch.Tensor:
        """The decoder's layers ``indices`` (None: all it holds) on ``x [t(/tp), b, h]`` attending to ``memory``."""
        return self.decoder(x, indices=indices, attention_bias=self.decoder_bias(t, t), memory=memory,
                            memory_mask=_padding_mask(attention_mask, None))

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The memory ``[s(/tp), b, h]`` (the encoder's output, after its final norm)."""
        _check_ids("input_ids", input_ids)
        x = self._encoder_layers(self._embed(input_ids), input_ids, attention_mask)
        return self._final(self.encoder_norm, x)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor,
               attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The decoder's output ``[t(/tp), b, h]`` (after its final norm) for ``memory`` from :meth:`encode`;
        ``attention_mask`` is the encoder input's (it masks the memory's padding)."""
        _check_ids("decoder_input_ids", decoder_input_ids)
        x = self._embed(decoder_input_ids)
        x = self._decoder_layers(x, decoder_input_ids.shape[1], memory, attention_mask)
        return self._final(self.decoder_norm, x)

    def _head(self, x: torch.Tensor, labels: Optional[torch.Tensor], sequence_parallel: bool) -> torch.Tensor:
        if self.lm_head is None:
            x = x * self.config.hidden_size ** -0.5  # T5 scales the tied head's input
        return lm_output(x, self.lm_head if self.lm_head is not None else self.word, sequence_parallel, labels)

    def new_cache(self, batch: int, capacity: int, memory_len: int) -> KVCache:
        """An empty decoder cache for ``batch`` sequences of up to ``capacity`` target positions, attending to a
        memory of ``memory_len`` positions."""
        return KVCache(self.decoder, batch, capacity, memory_len)

    @torch.no_grad()
    def forward_with_cache(self, decoder_input_ids: torch.Tensor, kv_cache: KVCache,
                           memory: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                           all_logits: bool = False) -> torch.Tensor:
        """Decoding: ``decoder_input_ids [b, n]`` continue the target sequences held in ``kv_cache`` (:meth:`new_cache`)
        at its ``length``. ``memory`` (:meth:`encode`'s output) goes with the first call only: its keys and values
        are computed then and cached; ``attention_mask`` (the source's, 1 = attend) with every call. Returns fp32
        logits ``[b, vocab_size]`` of the last new position, or ``[b, n, vocab_size]`` with ``all_logits``. No
        dropout, no autograd."""
        _check_ids("decoder_input_ids", decoder_input_ids)
        b, n = decoder_input_ids.shape
        position = kv_cache.length
        if b != kv_cache.batch:
            raise ValueError(f"{_NAME}.forward_with_cache: decoder_input_ids has batch {b}, expected {kv_cache.batch} "
                             "(the cache's batch)")
        if (memory is None) != (position > 0):
            raise ValueError(f"{_NAME}.forward_with_cache: pass memory with the first call (cache length 0) and only "
                             f"then (cache length {position}, memory {'given' if memory is not None else 'None'})")
        if memory is not None and self.config.sequence_parallel:
            memory = gather_from_sequence_parallel_region(memory, self.word.group)  # decoding never splits it
        x = self.word(decoder_input_ids.t())  # [n, b, h]
        x = self.decoder(x, kv_cache=kv_cache, attention_bias=self.decoder_bias(n, position + n, position),
                         memory=memory, memory_mask=_padding_mask(attention_mask, None))
        kv_cache.advance(n)
        x = self.decoder_norm(x if all_logits else x[-1:])
        logits = self._head(x, None, sequence_parallel=False).float()  # [b, n, vocab]
        return logits if all_logits else logits[:, -1]

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """``decoder_input_ids`` from ``labels``: ``decoder_start_token_id`` first, then the labels but the last,
        -100 read as ``pad_token_id``."""
        shifted = labels.new_full(labels.shape, self.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, self.pad_token_id)

    def _decoder_input_ids(self, decoder_input_ids: Optional[torch.Tensor],
                           labels: Optional[torch.Tensor]) -> torch.Tensor:
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError(f"{_NAME}: give decoder_input_ids or labels (shifted right into decoder_input_ids)")
            decoder_input_ids = self.shift_right(labels)
        return decoder_input_ids

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        decoder_input_ids = self._decoder_input_ids(decoder_input_ids, labels)
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"{_NAME}: labels has shape {list(labels.shape)}, expected "
                             f"{list(decoder_input_ids.shape)} (the shape of decoder_input_ids)")
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{_NAME}: decoder_input_ids has batch {decoder_input_ids.shape[0]}, expected "
                             f"{input_ids.shape[0]} (the batch of input_ids)")
        memory = self.encode(input_ids, attention_mask)
        x = self.decode(decoder_input_ids, memory, attention_mask)
        return self._head(x, labels, self.config.sequence_parallel)

    # Pipeline stages (the module docstring): the encoder's layers, then the decoder's; the stage holding decoder
    # layer 0 starts the decoder (the memory, the decoder's embedding).
    pipeline_stacks = ("encoder", "decoder")
    first_stage_modules = ("word",)
    last_stage_modules = ("decoder_norm", "lm_head")

    @property
    def tied_modules(self) -> tuple[str, ...]:
        return ("word",) if self.config.tie_word_embeddings else ()  # the tied LM head

    def layer_modules(self, layers) -> tuple[str, ...]:
        encoder_layers = self.config.num_layers
        paths = []
        if any(i < encoder_layers for i in layers):
            paths.append("encoder_bias")
        if any(i >= encoder_layers for i in layers):
            paths.append("decoder_bias")
        if encoder_layers in layers:  # decoder layer 0: the decoder starts here
            paths += ["encoder_norm", "word"]
        return tuple(paths)

    def stage_input(self, batch: dict):
        _check_ids("input_ids", batch["input_ids"])
        return (self._embed(batch["input_ids"]),), None  # [s(/tp), b, h]

    def run_layers(self, acts: tuple, batch: dict, layers) -> tuple:
        """Pipeline layers ``layers``: encoder layers (``acts`` = the encoder's hidden state), then from decoder layer
        0 on ``acts`` = (the decoder's hidden state, the memory)."""
        encoder_layers = self.config.num_layers
        encoder = [i for i in layers if i < encoder_layers]
        decoder = [i - encoder_layers for i in layers if i >= encoder_layers]
        if encoder:
            acts = (self._encoder_layers(acts[0], batch["input_ids"], batch.get("attention_mask"), encoder),)
        if decoder:
            ids = self._decoder_input_ids(batch.get("decoder_input_ids"), batch.get("labels"))
            if decoder[0] == 0:  # the encoder is done: its memory, and the decoder's input
                _check_ids("decoder_input_ids", ids)
                memory = self._final(self.encoder_norm, acts[0])  # first: dropout draws in forward's order
                acts = (self._embed(ids), memory)
            x, memory = acts
            acts = (self._decoder_layers(x, ids.shape[1], memory, batch.get("attention_mask"), decoder), memory)
        return acts

    def stage_output(self, acts: tuple, batch: dict) -> torch.Tensor:
        """The per-token loss ``[b, t]`` (fp32) when the batch has ``labels``, else the logits ``[b, t, v]``."""
        x = self._final(self.decoder_norm, acts[0])
        return self._head(x, batch.get("labels"), self.config.sequence_parallel)

    def boundary_spec(self, batch: dict, layer: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        b, s = batch["input_ids"].shape
        if layer <= self.config.num_layers:  # up to decoder layer 0: the encoder's hidden state
            return [self.hidden_spec(b, s)]
        t = self._decoder_input_ids(batch.get("decoder_input_ids"), batch.get("labels")).shape[1]
        return [self.hidden_spec(b, t), self.hidden_spec(b, s)]


def _check_ids(name: str, ids: torch.Tensor) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{_NAME}: {name} has shape {list(ids.shape)}, expected [batch, seq]")


def _padding_mask(attention_mask: Optional[torch.Tensor], ids: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """transformers' ``attention_mask [b, s]`` (1 = attend) -> the layers' bool ``[b, 1, 1, s]`` (True = masked)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or (ids is not None and attention_mask.shape != ids.shape):
        raise ValueError(f"{_NAME}: attention_mask has shape {list(attention_mask.shape)}, expected "
                         f"{list(ids.shape) if ids is not None else '[batch, seq]'} (1 = attend, 0 = padding)")
    return (attention_mask == 0)[:, None, None, :]


__all__ = ["T5Config", "T5Model"]
