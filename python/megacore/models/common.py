"""Pieces every megacore model shares: the model configuration, the embedding, the layer stack (with
activation checkpointing), the final norm and the tied, vocab-parallel LM head and its loss.

Layout: models take ``input_ids [batch, seq]`` (as Hugging Face does) and run the layers in Megatron's
``[seq, batch, hidden]``; under sequence parallelism the stack sees ``[seq / tp, batch, hidden]``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megacore import ops
from megacore.parallel import state
from megacore.parallel.cross_entropy import vocab_parallel_cross_entropy
from megacore.parallel.layers import INIT_STD, VocabParallelEmbedding
from megacore.parallel.placement import place
from megacore.parallel.mappings import (
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megacore.transformer import TransformerConfig, TransformerLayer

RECOMPUTE = ("none", "selective", "full")


@dataclass
class ModelConfig:
    """A model's shape and options; the per-layer options go to ``TransformerConfig`` (see there).

    Attributes beyond TransformerConfig's:
        vocab_size: token ids are in ``[0, vocab_size)``; the embedding is padded to a multiple of the
            tensor-parallel size, and the padded logits are masked out of every softmax.
        num_layers: transformer layers.
        max_position_embeddings: rows of the learned position table (the longest sequence).
        embedding_size: width of the token/position embeddings; None = hidden_size. Otherwise a
            linear projection maps it to hidden_size (ELECTRA-small: 128 -> 256).
        type_vocab_size: token-type (segment) embeddings, 0 for none (BERT: 2).
        embedding_norm: a norm on the embedding output (BERT/ELECTRA), before any projection.
        recompute: activation checkpointing: ``"none"``, ``"selective"`` (core attention only: the
            layers keep no attention probabilities) or ``"full"`` (each layer's activations are
            recomputed in backward from its input).
    Raises ValueError/TypeError naming the field, like TransformerConfig.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None
    kv_channels: Optional[int] = None
    max_position_embeddings: int = 1024
    position_embedding_type: str = "learned_absolute"
    embedding_size: Optional[int] = None
    type_vocab_size: int = 0
    embedding_norm: bool = False
    pre_norm: bool = True
    normalization: str = "layernorm"
    norm_epsilon: float = 1e-5
    activation: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    attention_mask_type: str = "causal"
    window_size: Optional[int] = None
    add_bias_linear: bool = True
    params_dtype: torch.dtype = torch.float32
    tensor_parallel: bool = False
    sequence_parallel: bool = False
    recompute: str = "none"
    attention_backend: str = "auto"
    init_method_std: float = INIT_STD
    rotary_percent: float = 1.0
    rotary_base: float = 10000.0
    softmax_scale: Optional[float] = None
    overlap_tp_comm: bool = True

    def __post_init__(self):
        name = f"megacore.models.{type(self).__name__}"
        for field in ("vocab_size", "max_position_embeddings"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {field}={value!r} must be an int >= 1")
        if self.embedding_size is not None and (not isinstance(self.embedding_size, int) or self.embedding_size < 1):
            raise ValueError(f"{name}: embedding_size={self.embedding_size!r} must be None or an int >= 1")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"{name}: type_vocab_size={self.type_vocab_size!r} must be an int >= 0")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"{name}: recompute={self.recompute!r} is not one of {', '.join(RECOMPUTE)}")
        self.layer_config()  # validates the layer's fields (its errors name TransformerConfig)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size

    def layer_config(self) -> TransformerConfig:
        """The TransformerConfig of each layer."""
        fields = {f.name for f in dataclasses.fields(TransformerConfig)}
        kw = {k: v for k, v in dataclasses.asdict(self).items() if k in fields}
        kw["recompute_core_attention"] = self.recompute == "selective"
        return TransformerConfig(**kw)

    @property
    def embedding_dim(self) -> int:
        return self.embedding_size or self.hidden_size


def tensor_parallel_world(config: ModelConfig, model: str) -> tuple[Optional[object], int, int]:
    """(tensor-parallel group or None, rank, size) for a model; a RuntimeError naming the model when
    ``tensor_parallel=True`` before initialize_model_parallel; ValueError when a size does not divide."""
    if not config.tensor_parallel:
        return None, 0, 1
    s = state.require_tensor_parallel(f"megacore.models.{model}",
                                      {field: getattr(config, field)
                                       for field in ("hidden_size", "num_attention_heads", "ffn_hidden_size")},
                                      config_flag=True)
    tp = s.tensor_parallel_size
    return s.tensor_parallel_group, s.tensor_parallel_rank, tp


def _normal(*shape: int, std: float = INIT_STD) -> torch.Tensor:
    """A master weight: fp32, normal(0, std) from the default generator (the meta device under
    ``with torch.device('meta')``, where nothing is drawn)."""
    return torch.empty(*shape, dtype=torch.float32).normal_(0.0, std)


def _param(t: torch.Tensor, config: ModelConfig, device) -> nn.Parameter:
    return nn.Parameter(t.to(device=device, dtype=config.params_dtype))


def _weight(t: torch.Tensor, config: ModelConfig, device) -> nn.Module:
    """A module holding one parameter as ``weight`` (state-dict keys read ``<name>.weight``)."""
    m = nn.Module()
    m.weight = _param(t, config, device)
    return m


class WordEmbedding(VocabParallelEmbedding):
    """The token table ``[padded_vocab / tp, embedding_dim]``, vocab-parallel under tensor parallelism and
    whole otherwise (drawn the same way, so TP=N builds what TP=1 builds)."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__(config.vocab_size, config.embedding_dim, config.params_dtype, device,
                         tensor_parallel=config.tensor_parallel)

    @property
    def vocab_size(self) -> int:
        return self.num_embeddings


class Embedding(nn.Module):
    """word + learned position (unless RoPE) + token type embeddings, then the optional norm, dropout and
    projection to hidden_size: ``ids [b, s] -> [s, b, hidden]`` (``[s / tp, b, hidden]`` with sequence
    parallelism)."""

    def __init__(self, config: ModelConfig, device=None):
        super().__init__()
        self.config = config
        e = config.embedding_dim
        self.word = WordEmbedding(config, device)
        self.position = (_weight(_normal(config.max_position_embeddings, e), config, device)
                         if config.position_embedding_type == "learned_absolute" else None)
        self.token_type = _weight(_normal(config.type_vocab_size, e), config, device) if config.type_vocab_size else None
        if config.embedding_norm:
            self.norm = Norm(config, e, device)
        else:
            self.norm = None
        if e != config.hidden_size:
            self.projection = nn.Module()
            self.projection.weight = _param(_normal(config.hidden_size, e), config, device)
            self.projection.bias = _param(torch.zeros(config.hidden_size), config, device)
        else:
            self.projection = None

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, start: Optional[int] = None) -> torch.Tensor:
        """``start``: decoding: the tokens continue a sequence at position ``start`` (its cache's length); the output
        is then never sequence-split and has no dropout."""
        decoding = start is not None
        start = start or 0
        b, s = input_ids.shape
        x = self.word(input_ids.t())  # [s, b, e]
        if self.position is not None:
            if start + s > self.config.max_position_embeddings:
                raise ValueError(f"megacore.models: sequence length {start + s} exceeds max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            pos = position_ids.t() if position_ids is not None else torch.arange(start, start + s, device=x.device)[:, None]
            x = x + F.embedding(pos, self.position.weight)
        if self.token_type is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + F.embedding(types.t(), self.token_type.weight)
        if self.norm is not None:
            x = self.norm(x)
        if self.training and self.config.hidden_dropout > 0 and not decoding:
            x = F.dropout(x, self.config.hidden_dropout)
        if self.projection is not None:
            x = F.linear(x, self.projection.weight, self.projection.bias)
        if self.config.sequence_parallel and not decoding:
            x = scatter_to_sequence_parallel_region(x, self.word.group)
        return x


class Norm(nn.Module):
    """The model-level norm (final norm, embedding norm, head norms): LayerNorm or RMSNorm over the last
    dim. ``sequence_parallel=True`` marks a norm applied to sequence shards: its parameters are declared
    ``sequence_parallel``, so their gradients (each rank's shard's part) are summed over the tensor-parallel
    group once per step (``megacore.parallel.sum_sequence_parallel_gradients``)."""

    def __init__(self, config: ModelConfig, size: int, device=None, sequence_parallel: bool = False):
        super().__init__()
        self.kind, self.eps = config.normalization, config.norm_epsilon
        self.weight = _param(torch.ones(size), config, device)
        self.bias = _param(torch.zeros(size), config, device) if self.kind == "layernorm" else None
        self.group = state.get_tensor_parallel_group() if sequence_parallel else None
        for name in ("weight", "bias"):
            place(self, name, None, sequence_parallel=self.group is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return ops.layer_norm(x, self.weight, self.bias, self.eps)
        return ops.rms_norm(x, self.weight, self.eps)


class KVCache:
    """The keys and values of every layer of a stack for a batch of sequences being decoded: layer ``i``'s are
    ``keys[i]``, ``values[i]``, each ``[b, heads / tp, capacity, head_dim]`` in the parameters' dtype; positions
    ``[0, length)`` are filled (the layers write the new tokens', :meth:`advance` moves ``length`` on). A decoder
    stack's layers (cross-attention) also hold the memory's keys and values, ``[b, heads / tp, memory_len,
    head_dim]``, written on the first call with the memory and read after."""

    def __init__(self, stack: "TransformerStack", batch: int, capacity: int, memory_len: int = 0):
        self.keys, self.values, self.cross = {}, {}, {}
        for index in stack.layer_indices():
            layer = stack.layer(index)
            weight = layer.attention.qkv.weight

            def empty(shape):
                return torch.empty(shape, dtype=weight.dtype, device=weight.device)

            self.keys[index] = empty(layer.cache_shape(batch, capacity))
            self.values[index] = empty(layer.cache_shape(batch, capacity))
            if layer.config.cross_attention:
                if memory_len < 1:
                    raise ValueError("megacore.models.KVCache: the stack's layers attend to a memory: give memory_len "
                                     "(the encoder output's length)")
                self.cross[index] = (empty(layer.cache_shape(batch, memory_len)),
                                     empty(layer.cache_shape(batch, memory_len)))
        self.batch, self.capacity, self.memory_len, self.length = batch, capacity, memory_len, 0

    def layer(self, index: int) -> tuple[torch.Tensor, ...]:
        """(keys, values), and the memory's (keys, values) for a cross-attention layer."""
        return (self.keys[index], self.values[index]) + self.cross.get(index, ())

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor, memory: bool = True) -> None:
        """Keeps batch rows ``index`` (int64 ``[b']``, rows of the current batch, repeats allowed) in that order:
        row ``j`` of every cached tensor becomes old row ``index[j]`` and ``batch`` becomes ``b'`` (beam search:
        expanding each sequence into its beams, following each beam's parent, dropping finished sequences).
        ``memory=False`` leaves the memory's keys and values as they are, for an ``index`` of the same size that
        only moves rows among rows with equal memories (the beams of one sequence): a copy saved per step.
        Raises ValueError for an index that is not 1-D, out of range, or that changes the batch with
        ``memory=False``."""
        if index.dim() != 1 or index.dtype != torch.int64:
            raise ValueError(f"megacore.models.KVCache.reorder: index has shape {list(index.shape)} and dtype "
                             f"{index.dtype}, expected int64 [new batch]")
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.batch):
            raise ValueError(f"megacore.models.KVCache.reorder: index holds rows outside [0, {self.batch}) (the "
                             "cache's batch)")
        if not memory and self.cross and index.numel() != self.batch:
            raise ValueError(f"megacore.models.KVCache.reorder: index has {index.numel()} rows, the cache "
                             f"{self.batch}: memory=False keeps the memory's rows, so the batch cannot change")
        for cache in (self.keys, self.values):
            for layer, t in cache.items():
                cache[layer] = t.index_select(0, index.to(t.device))
        if memory:
            for layer, (k, v) in self.cross.items():
                self.cross[layer] = (k.index_select(0, index.to(k.device)), v.index_select(0, index.to(v.device)))
        self.batch = index.numel()


class TransformerStack(nn.Module):
    """``num_layers`` C++ TransformerLayers; ``recompute='full'`` checkpoints each layer (its forward is
    recomputed in backward with the same dropout seed: the CPU RNG state is restored).

    Under pipeline parallelism a stage keeps only its layers: ``layers`` is then an ``nn.ModuleDict`` keyed by
    the global layer index (``megacore.parallel.pipeline.cut_stage``), so parameter names stay the full
    model's (``decoder.layers.5.*``)."""

    def __init__(self, config: ModelConfig, device=None, layer_config: Optional[TransformerConfig] = None,
                 num_layers: Optional[int] = None):
        """``layer_config``: the layers' config when it is not ``config.layer_config()`` (T5's encoder and decoder
        stacks differ in mask and cross-attention); ``num_layers``: when not ``config.num_layers``."""
        super().__init__()
        self.full_recompute = config.recompute == "full"
        layer_config = layer_config if layer_config is not None else config.layer_config()
        count = config.num_layers if num_layers is None else num_layers
        self.layers = nn.ModuleList(TransformerLayer(layer_config, device) for _ in range(count))

    def layer_indices(self) -> list[int]:
        """The global indices of the layers this stack holds, in order."""
        if isinstance(self.layers, nn.ModuleDict):
            return [int(k) for k in self.layers.keys()]
        return list(range(len(self.layers)))

    def layer(self, index: int) -> nn.Module:
        """Layer ``index`` (a global index)."""
        return self.layers[str(index)] if isinstance(self.layers, nn.ModuleDict) else self.layers[index]

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                indices: Optional[list[int]] = None, kv_cache: Optional["KVCache"] = None,
                attention_bias: Optional[torch.Tensor] = None, memory: Optional[torch.Tensor] = None,
                memory_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Runs the layers ``indices`` (global indices, in order; None: every layer held) on ``x [s(/tp), b, h]``.
        With ``kv_cache`` (decoding), ``x [n, b, h]`` are the new tokens after the cache's ``length`` positions:
        each layer reads and extends its part of the cache (the caller advances ``length``). ``attention_bias``,
        ``memory`` and ``memory_mask`` go to every layer (the layers' config must ask for them)."""
        extras = {k: v for k, v in (("attention_bias", attention_bias), ("memory", memory),
                                    ("memory_mask", memory_mask)) if v is not None}
        for index in (self.layer_indices() if indices is None else indices):
            layer = self.layer(index)
            if kv_cache is not None:
                x = layer(x, attention_mask, kv_cache=kv_cache.layer(index), position=kv_cache.length, **extras)
            elif self.full_recompute and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, attention_mask, use_reentrant=False, **extras)
            else:
                x = layer(x, attention_mask, **extras)
        return x


class StagedModel(nn.Module):
    """What pipeline parallelism needs of a model (``megacore.parallel.pipeline``): the model as
    *input part -> the pipeline layers -> output part*, each part a method, so that one process runs them back
    to back (``run_stages``) and a pipeline runs them on different ranks.

    The *pipeline layers* are the layers of the stacks ``pipeline_stacks`` names, one stack after the other,
    numbered from 0 (GPT, BERT, ELECTRA: one stack; T5: the encoder's layers, then the decoder's). The pipeline
    divides them among its stages; what a stage needs besides its layers is declared here, and a module that
    several stages need is held by each of them (a *tied copy* on all but the first, whose gradients are summed
    after backward: ``megacore.parallel.pipeline.sync_tied_gradients``).

    Class attributes (module paths, relative to the model):
        pipeline_stacks: the TransformerStacks whose layers are the pipeline layers, in the order they run.
        first_stage_modules: modules ``stage_input`` uses (they live on the first stage).
        last_stage_modules: modules ``stage_output`` uses (they live on the last stage).
        tied_modules: first-stage modules ``stage_output`` uses too (the tied word embedding of the LM head):
            the last stage holds a copy.

    Methods, for a micro-batch ``batch`` (a dict of ``[b, s]`` tensors, the model's keyword arguments):
        stage_input(batch) -> (acts, loss): what enters the first layer, ``acts`` a tuple whose first
            tensor is the hidden state ``[s(/tp), b, h]`` (more tensors travel along with it, e.g. ELECTRA's
            replaced-token labels), and a partial loss computed there (ELECTRA's generator) or None.
        stage_mask(batch): the layers' attention mask (every stage computes it from the batch).
        run_layers(acts, batch, layers) -> acts: the pipeline layers ``layers`` (consecutive indices) on ``acts``.
        layer_modules(layers): modules a stage holding pipeline layers ``layers`` needs to run them, besides the
            layers (T5: each stack's position-bias table; where the decoder starts, the encoder's final norm and
            the word embedding).
        stage_output(acts, batch): the model's output from the last layer's ``acts`` (with the batch's
            labels, its loss).
        boundary_spec(batch, layer): ``[(shape, dtype), ...]`` of the ``acts`` that enter pipeline layer ``layer``
            from the one before, so that a stage knows what it will receive before it arrives.
    """

    pipeline_stacks: tuple[str, ...] = ()
    first_stage_modules: tuple[str, ...] = ()
    last_stage_modules: tuple[str, ...] = ()
    tied_modules: tuple[str, ...] = ()

    def stage_input(self, batch: dict):
        raise NotImplementedError

    def stage_mask(self, batch: dict):
        return None

    def stage_output(self, acts: tuple, batch: dict):
        raise NotImplementedError

    def pipeline_layers(self) -> list[tuple[str, int]]:
        """(stack path, layer index in the stack) of each pipeline layer this model holds, in order: every layer
        of a model not cut into stages."""
        return [(path, i) for path in self.pipeline_stacks for i in self.get_submodule(path).layer_indices()]

    def run_layers(self, acts: tuple, batch: dict, layers) -> tuple:
        """The one stack's layers ``layers`` on the hidden state ``acts[0]`` with ``stage_mask``; the other
        tensors of ``acts`` travel along unchanged. Models of several stacks override it."""
        if len(self.pipeline_stacks) != 1:
            raise NotImplementedError(f"megacore.models.{type(self).__name__}: a model of several stacks runs its "
                                      "pipeline layers itself (run_layers)")
        stack = self.get_submodule(self.pipeline_stacks[0])
        return (stack(acts[0], self.stage_mask(batch), indices=list(layers)),) + tuple(acts[1:])

    def layer_modules(self, layers) -> tuple[str, ...]:
        return ()

    def hidden_spec(self, batch_size: int, seq: int) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) of a hidden state of ``seq`` positions: ``[seq(/tp), batch, hidden]`` in the layers'
        dtype (after a MixedPrecision cast too)."""
        c = self.config
        if c.sequence_parallel:
            seq //= state.get_tensor_parallel_world_size()
        dtype = next(p for path in self.pipeline_stacks for p in self.get_submodule(path).parameters()).dtype
        return (seq, batch_size, c.hidden_size), dtype

    def boundary_spec(self, batch: dict, layer: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """The hidden state ``[s(/tp), b, h]`` (``hidden_spec``) at every boundary; models that send more
        override it."""
        b, s = batch["input_ids"].shape
        return [self.hidden_spec(b, s)]

    def run_stages(self, batch: dict):
        """(output, input part's loss or None): the whole model on one process, input part -> every layer ->
        output part, the computation a pipeline spreads over its stages."""
        acts, input_loss = self.stage_input(batch)
        acts = self.run_layers(acts, batch, range(len(self.pipeline_layers())))
        return self.stage_output(acts, batch), input_loss


def lm_logits(x: torch.Tensor, word: WordEmbedding, sequence_parallel: bool,
              bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's logits against the (tied) word embedding: ``[s(/tp), b, e] -> [s, b, padded_vocab / tp]``,
    plus ``bias`` (this rank's ``[padded_vocab / tp]`` shard, e.g. BERT's output bias) when given; the
    padded columns are set to the dtype's lowest value so that no softmax ever gives them mass."""
    if word.group is not None:
        x = gather_from_sequence_parallel_region(x, word.group) if sequence_parallel else \
            copy_to_tensor_parallel_region(x, word.group)
    if x.device.type == "cpu" and x.numel() <= ops.SKINNY_LINEAR_MAX_ROWS * x.shape[-1]:
        # decoding's few rows: megacore's skinny-linear kernel streams the table at close to memory bandwidth
        logits = ops.linear(x, word.weight, bias)
    else:
        logits = F.linear(x, word.weight, bias)
    pad_start = max(word.vocab_size - word.vocab_start, 0)  # the local column where padding starts
    if pad_start < logits.shape[-1]:
        logits = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= pad_start,
                                    torch.finfo(logits.dtype).min)
    return logits


def lm_output(x: torch.Tensor, word: WordEmbedding, sequence_parallel: bool, labels: Optional[torch.Tensor] = None,
              ignore_index: int = -100, bias: Optional[torch.Tensor] = None, only_labeled: bool = False,
              transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """The LM head: ``x [s(/tp), b, e]`` -> per-token loss ``[b, s]`` (fp32) when ``labels [b, s]`` is given
    (vocab-parallel cross-entropy under tensor parallelism: the logits are never gathered), else the
    full logits ``[b, s, vocab_size]``. ``transform`` (e.g. BERT's dense-GeLU-norm) is applied to ``x`` first.

    ``only_labeled`` (with labels): the transform and the logits are computed for the labeled rows only (the
    masked 15 % of a masked LM, as Google's BERT and ELECTRA gather ``masked_lm_positions``); the loss is the
    same, the rows' losses are scattered back into ``[b, s]`` (0 elsewhere). Not under sequence parallelism,
    where each rank holds a slice of the rows (the full computation is used there)."""
    if labels is not None and only_labeled and not sequence_parallel:
        keep = labels.t() != ignore_index  # [s, b]
        rows = x[keep][:, None]  # [n, 1, e], in keep's row-major order (n may be 0)
        if transform is not None:
            rows = transform(rows)
        row_loss = lm_output(rows, word, False, labels.t()[keep][None], ignore_index, bias)  # [1, n]
        loss = torch.zeros(keep.shape, dtype=row_loss.dtype, device=row_loss.device)
        return loss.masked_scatter(keep, row_loss[0]).t()
    if transform is not None:
        x = transform(x)
    logits = lm_logits(x, word, sequence_parallel, bias)  # [s, b, v_local]
    if labels is not None:
        target = labels.t()
        if word.group is not None:
            loss = vocab_parallel_cross_entropy(logits, target, ignore_index)
        else:
            loss = ops.cross_entropy(logits, target, ignore_index)
        return loss.t()
    if word.group is not None:
        logits = gather_from_tensor_parallel_region(logits, word.group)
    return logits[..., : word.vocab_size].transpose(0, 1)



class MaskedLMHead(nn.Module):
    """BERT's masked-LM head (also ELECTRA's generator head): ``dense [hidden -> embedding_dim]`` -> GeLU
    -> norm -> logits against the tied word embedding plus an output bias (vocab-parallel, like the
    table: this rank's ``[padded_vocab / tp]``).

    ``forward(x [s(/tp), b, hidden], labels=None)`` -> per-token loss ``[b, s]`` (fp32; label -100 is
    ignored) or the logits ``[b, s, vocab_size]``. Parameter names follow Hugging Face's
    (``dense``, ``norm``, ``bias``) so the interop maps them one to one.
    """

    def __init__(self, config: ModelConfig, word: WordEmbedding, device=None):
        super().__init__()
        self.config = config
        self.dense = nn.Module()
        self.dense.weight = _param(_normal(config.embedding_dim, config.hidden_size), config, device)
        self.dense.bias = _param(torch.zeros(config.embedding_dim), config, device)
        for name in ("weight", "bias"):  # replicated, used on sequence shards under sequence parallelism
            place(self.dense, name, None, sequence_parallel=config.sequence_parallel)
        self.norm = Norm(config, config.embedding_dim, device, sequence_parallel=config.sequence_parallel)
        self.bias = _param(torch.zeros(word.weight.shape[0]), config, device)
        place(self, "bias", 0 if word.group is not None else None)  # vocab-parallel, like the table

    def transform(self, x: torch.Tensor, word: WordEmbedding) -> torch.Tensor:
        """dense -> GeLU -> norm, the features the logits are taken of: ``[s(/tp), b, hidden] ->
        [s(/tp), b, embedding_dim]`` (ELECTRA's generator reuses them to sample from its logits)."""
        h = ops.bias_gelu(F.linear(x, self.dense.weight), self.dense.bias,
                          "none" if self.config.activation == "gelu" else "tanh")
        return self.norm(h)

    def forward(self, x: torch.Tensor, word: WordEmbedding, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-token loss ``[b, s]`` (computed at the labeled positions only) when ``labels`` is given, else
        the logits ``[b, s, vocab_size]``."""
        return lm_output(x, word, self.config.sequence_parallel, labels, bias=self.bias, only_labeled=True,
                         transform=lambda h: self.transform(h, word))


def to_sequence_first_mask(padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A ``[b, s]`` attention mask in Hugging Face's convention (1 = attend, 0 = padding) as the layer's
    ``[b, 1, 1, s]`` bool mask (True = masked out); None stays None."""
    if padding_mask is None:
        return None
    if padding_mask.dim() != 2:
        raise ValueError(f"megacore.models: attention_mask has shape {list(padding_mask.shape)}, expected [batch, seq]")
    return (padding_mask == 0)[:, None, None, :]


__all__ = ["Embedding", "MaskedLMHead", "ModelConfig", "Norm", "StagedModel", "TransformerStack", "WordEmbedding", "lm_logits", "lm_output",
           "tensor_parallel_world", "to_sequence_first_mask"]
