"""Hugging Face interop: megacore models <-> ``transformers`` models and their safetensors layout.

    model = from_hf(hf_model)                 # the megacore model with the same weights
    hf_model = to_hf(model)                   # a transformers model with megacore's weights
    save_hf_safetensors(model, "ckpt/")       # ckpt/model.safetensors + ckpt/config.json, HF's layout
    model = load_hf_safetensors("ckpt/")      # from such a directory (HF's save_pretrained writes one too)

Supported: ``GPT2LMHeadModel`` <-> ``GPTModel``; ``BertForPreTraining``, ``BertForMaskedLM`` and
``RobertaForMaskedLM`` <-> ``BertModel``; ``ElectraForPreTraining`` (+ the generator, ``ElectraForMaskedLM``)
<-> ``ElectraDiscriminatorModel`` / ``ElectraModel``; ``T5ForConditionalGeneration`` (T5 and T5 v1.1) <->
``T5Model``; the classifiers ``BertForSequenceClassification``, ``BertForTokenClassification``,
``RobertaForSequenceClassification``, ``RobertaForTokenClassification``, ``ElectraForSequenceClassification``,
``ElectraForTokenClassification`` and ``GPT2ForSequenceClassification`` <-> ``Classifier`` (labels, problem type,
dropout and padding id as ``megacore.interop.hf.classifier`` says). Each family's module has the name-by-name
mapping.

Under tensor parallelism (``from_hf(m, tensor_parallel=True)`` after
``megacore.parallel.initialize_model_parallel``), ``from_hf`` and
``load_hf_safetensors`` keep this rank's shards, and ``to_hf`` / ``save_hf_safetensors`` all-gather them:
those two are collectives, every rank of the tensor-parallel group must call them.

Only ``to_hf`` and ``from_hf`` need ``transformers``; the safetensors functions need only
``safetensors``, so a checkpoint can be carried to a machine that has just one of the two libraries.
Every conversion is a permutation, transpose or copy of the weights: exact in both directions.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megacore._files import atomic_write
from megacore.interop.hf import bert, electra, gpt2, t5  # noqa: F401  (register their families)
from megacore.interop.hf.family import FAMILIES, Family, family_of_architecture, family_of_model
from megacore.interop.hf.sharding import full_state, load_full_state

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def _build(family: Family, parts: list[tuple[str, dict, dict]], overrides: dict, device, fn: str,
           params_dtype: torch.dtype) -> nn.Module:
    """The megacore model holding the weights of ``parts``, each ``(architecture, hf_config, hf_state)``:
    one model, or ELECTRA's discriminator then its generator; this rank's shards on ``device``."""
    config_class = family.config_class_for(parts[0][0])
    unknown = sorted(set(overrides) - set(config_class.__dataclass_fields__))
    if unknown:
        raise TypeError(f"megacore.interop.hf.{fn}: {unknown} are not {config_class.__name__} fields")
    if len(parts) > 1:
        if family.generator_architecture is None:
            raise ValueError(f"megacore.interop.hf.{fn}: a generator goes only with a model that has one (ELECTRA); "
                             f"{parts[0][0]} has none")
        if parts[1][0] != family.generator_architecture:
            raise ValueError(f"megacore.interop.hf.{fn}: generator is a {parts[1][0]}, expected a "
                             f"{family.generator_architecture}")
    configs = [family.config_class_for(architecture)(**{**family.config_from_hf(hf_config, architecture),
                                                        "params_dtype": params_dtype, **overrides})
               for architecture, hf_config, _ in parts]
    full: dict[str, torch.Tensor] = {}
    for (architecture, _, hf_state), config in zip(parts, configs):
        for name, tensor in family.state_from_hf(hf_state, config, architecture).items():
            if name in full and not torch.equal(full[name], tensor):  # ELECTRA's shared embedding
                raise ValueError(f"megacore.interop.hf.{fn}: {name} differs between the {parts[0][0]} and the "
                                 f"{architecture}; megacore shares it between the two")
            full[name] = tensor
    architecture, hf_config, _ = parts[0]
    # Built on the meta device (no random init, nothing allocated), then given the loaded shards.
    with torch.device("meta"):
        model = family.build(configs[0], architecture, hf_config, "meta", configs[1] if len(parts) > 1 else None)
    return load_full_state(model, full, device, fn)


def _first_dtype(tensors) -> torch.dtype:
    for t in tensors:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def from_hf(hf_model: nn.Module, device=None, generator: Optional[nn.Module] = None, **overrides) -> nn.Module:
    """The megacore model with ``hf_model``'s weights and configuration.

    Args:
        hf_model: a ``transformers`` model of a supported class (``GPT2LMHeadModel``, ``BertForPreTraining``,
            ``BertForMaskedLM``, ``RobertaForMaskedLM``, ``ElectraForPreTraining``, ``T5ForConditionalGeneration``,
            a ``...ForSequenceClassification`` / ``...ForTokenClassification`` of BERT, RoBERTa, ELECTRA or GPT-2).
        device: where the parameters go; None = ``hf_model``'s device.
        generator: ELECTRA only: the generator (``ElectraForMaskedLM``) to join the discriminator
            ``hf_model`` in one ``ElectraModel`` (their embeddings must be equal: megacore shares them).
            Without it, an ``ElectraForPreTraining`` becomes an ``ElectraDiscriminatorModel``.
        overrides: ModelConfig fields to set beyond those the HF config defines, e.g.
            ``tensor_parallel=True`` (keep this rank's shards), ``sequence_parallel``, ``recompute``,
            ``attention_backend``, ``params_dtype`` (default: ``hf_model``'s dtype).
    Returns: the megacore model (``GPTModel``, ``BertModel``, ``ElectraDiscriminatorModel``, ``ElectraModel``,
    ``T5Model`` or ``Classifier``), in ``hf_model``'s train/eval mode.
    Raises ValueError for an unsupported class or an HF option megacore cannot reproduce (naming it),
    TypeError for an override that is not a ModelConfig field.
    """
    architecture = type(hf_model).__name__
    family = family_of_architecture(architecture, "from_hf")
    parts = [(architecture, hf_model.config.to_dict(), hf_model.state_dict())]
    if generator is not None:
        parts.append((type(generator).__name__, generator.config.to_dict(), generator.state_dict()))
    params = list(hf_model.parameters())
    model = _build(family, parts, overrides, device or params[0].device, "from_hf", _first_dtype(params))
    return model.train(hf_model.training)


def _architecture(family: Family, model: nn.Module, architecture: Optional[str], fn: str) -> str:
    architecture = architecture or family.default_architecture(model)
    if architecture not in family.architectures:
        raise ValueError(f"megacore.interop.hf.{fn}: architecture={architecture!r}; a {type(model).__name__} "
                         f"converts to {', '.join(family.architectures)}")
    return architecture


def _hf_export(model: nn.Module, architecture: Optional[str], fn: str, include_tied: bool):
    """(architecture, HF config dict, HF state dict) of a megacore model (a collective under TP)."""
    family = family_of_model(model, fn)
    architecture = _architecture(family, model, architecture, fn)
    hf_config = family.config_to_hf(model, architecture)
    state = full_state(model)
    config = family.model_config(model, architecture)
    return architecture, hf_config, family.state_to_hf(state, config, architecture, include_tied)


def to_hf(model: nn.Module, architecture: Optional[str] = None) -> nn.Module:
    """A ``transformers`` model with ``model``'s weights (gathered under tensor parallelism: every rank of
    the group must call it, and every rank gets the whole model).

    Args:
        model: a megacore model of a supported class (``GPTModel``, ``BertModel``, ``ElectraModel``,
            ``ElectraDiscriminatorModel``, ``T5Model``, ``Classifier``).
        architecture: the HF class name to build; None = the one matching ``model`` (``GPT2LMHeadModel``;
            ``BertForPreTraining`` for a BertModel with the NSP head, ``BertForMaskedLM`` without,
            ``RobertaForMaskedLM`` for one with RoBERTa's positions; ``ElectraForPreTraining`` for ELECTRA,
            whose generator is ``architecture="ElectraForMaskedLM"``; for a Classifier, its backbone's
            ``...ForSequenceClassification`` or ``...ForTokenClassification``).
    Returns: the HF model on ``model``'s device and dtype, in its train/eval mode.
    Raises TypeError for an unsupported model, ValueError for a megacore option the HF class cannot
    hold (naming it), ImportError without ``transformers``.
    """
    try:
        import transformers
    except ImportError as e:  # an optional dependency: say which function needs it
        raise ImportError("megacore.interop.hf.to_hf needs the transformers package") from e
    architecture, hf_config, hf_state = _hf_export(model, architecture, "to_hf", include_tied=True)
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    p = next(model.parameters())
    hf_model = getattr(transformers, architecture)(config).to(dtype=p.dtype)
    hf_model.load_state_dict(hf_state, strict=True)
    # A key the HF class ties to another (one tensor) keeps whichever was loaded last: refuse rather than return
    # a model whose weights are not megacore's (transformers >= 5 ties T5 v1.1's LM head to its embedding).
    loaded = hf_model.state_dict()
    differ = sorted(k for k, t in hf_state.items() if k in loaded and not torch.equal(loaded[k], t.to(loaded[k])))
    if differ:
        raise ValueError(f"megacore.interop.hf.to_hf: transformers {transformers.__version__}'s {architecture} ties "
                         f"{', '.join(differ)} to another weight, and this model's differ; save_hf_safetensors "
                         "writes them apart")
    return hf_model.to(p.device).train(model.training)


def save_hf_safetensors(model: nn.Module, directory: str, architecture: Optional[str] = None) -> str:
    """Writes ``model``'s weights in the Hugging Face layout: ``directory/model.safetensors`` (HF's key
    names and shapes, tied copies left out as ``save_pretrained`` does) and ``directory/config.json``
    (so ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads it). Each file is written
    atomically (a temporary file renamed over it).

    Under torch.distributed every rank must call it (the shards are gathered); global rank 0 writes, and
    all ranks return after the files exist (a barrier). Returns the weights file's path. Needs
    ``safetensors``, not ``transformers``. Raises like ``to_hf``.
    """
    from safetensors.torch import save_file

    _, hf_config, hf_state = _hf_export(model, architecture, "save_hf_safetensors", include_tied=False)
    path = os.path.join(directory, WEIGHTS_NAME)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
        tensors = {k: v.to("cpu").contiguous() for k, v in hf_state.items()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))

        def write_config(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(hf_config, f, indent=2, sort_keys=True)
                f.write("\n")

        atomic_write(os.path.join(directory, CONFIG_NAME), write_config)
    if dist.is_initialized():
        dist.barrier()
    return path


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``model.safetensors``, or of the files a ``model.safetensors.index.json`` names."""
    from safetensors.torch import load_file

    single, index = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for name in files:
            out.update(load_file(os.path.join(directory, name)))
        return out
    raise FileNotFoundError(f"megacore.interop.hf.load_hf_safetensors: neither {WEIGHTS_NAME} nor "
                            f"{WEIGHTS_INDEX_NAME} in {directory}")


def _read_checkpoint(directory: str, architecture: Optional[str], fn: str) -> tuple[Family, str, dict, dict]:
    """(family, architecture, HF config dict, HF state dict) of a checkpoint directory."""
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"megacore.interop.hf.{fn}: no {CONFIG_NAME} in {directory}")
    with open(config_path) as f:
        hf_config = json.load(f)
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"megacore.interop.hf.{fn}: model_type={model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    family = FAMILIES[model_type]
    known = family.architectures
    if architecture is None:
        named = (hf_config.get("architectures") or [None])[0]
        architecture = named if named in known else known[0]
    elif architecture not in known:
        raise ValueError(f"megacore.interop.hf.{fn}: architecture={architecture!r} is not one of "
                         f"{', '.join(known)} (model_type {model_type!r})")
    return family, architecture, hf_config, _read_weights(directory)


def load_hf_safetensors(directory: str, device=None, architecture: Optional[str] = None,
                        generator: Optional[str] = None, **overrides) -> nn.Module:
    """The megacore model stored in ``directory`` in the Hugging Face layout (``config.json`` and
    ``model.safetensors`` or a sharded ``model.safetensors.index.json``), as written by
    :func:`save_hf_safetensors` or ``transformers``' ``save_pretrained``.

    Args:
        directory: the checkpoint directory.
        device: where the parameters go (default CPU).
        architecture: the HF class whose weights these are; None = the config's ``architectures[0]``
            (a base-model class such as ``GPT2Model`` maps to its family's first class: its weights are
            the same minus the head's).
        generator: ELECTRA only: the generator's checkpoint directory, as ``from_hf``'s ``generator``.
        overrides: ModelConfig fields, as for :func:`from_hf` (``params_dtype`` defaults to the stored
            tensors' dtype).
    Returns: the megacore model in eval mode (as ``from_pretrained`` returns one).
    Raises FileNotFoundError for a missing file, ValueError for an unsupported model type or options.
    Needs ``safetensors``, not ``transformers``.
    """
    fn = "load_hf_safetensors"
    family, architecture, hf_config, hf_state = _read_checkpoint(directory, architecture, fn)
    parts = [(architecture, hf_config, hf_state)]
    if generator is not None:
        _, generator_architecture, generator_config, generator_state = _read_checkpoint(
            generator, family.generator_architecture, fn)
        parts.append((generator_architecture, generator_config, generator_state))
    model = _build(family, parts, overrides, device or "cpu", fn, _first_dtype(hf_state.values()))
    return model.eval()


__all__ = ["FAMILIES", "from_hf", "load_hf_safetensors", "save_hf_safetensors", "to_hf"]
