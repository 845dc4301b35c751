"""How one Hugging Face model family maps onto a megacore model: the ``Family`` record, the registry of
families, and the tensor transforms the families share.

A family converts plain data only (config dicts and name -> tensor dicts), so that reading and writing
the Hugging Face layout needs neither ``transformers`` nor a process group. Every transform is a
permutation, a transpose or a copy: converting in either direction is exact.

Megacore names are those of the unsharded model (``model.state_dict()`` at tensor-parallel size 1,
the word table unpadded); sharding and gathering happen in ``megacore.interop.hf.sharding``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from megacore.models.common import ModelConfig

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class Mapping:
    """One megacore tensor and the Hugging Face tensor(s) it is made of, with the exact transform each
    way. ``hf`` names one tensor, or several (BERT's separate query, key and value) that ``from_hf``
    takes in that order and ``to_hf`` returns as a tuple in that order."""

    megacore: str
    hf: Union[str, tuple[str, ...]]
    from_hf: Callable[..., Tensor] = _same  # (*HF tensors) -> megacore tensor
    to_hf: Callable[[Tensor], Union[Tensor, tuple[Tensor, ...]]] = _same  # megacore tensor -> HF tensor(s)

    @property
    def hf_keys(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)


@dataclass(frozen=True)
class Family:
    """A Hugging Face model family (one ``model_type``) and the megacore model that holds it.

    Attributes:
        model_type: the HF config's ``model_type`` (``"gpt2"``).
        architectures: the HF model classes handled, by class name (``"GPT2LMHeadModel"``); the first
            is what ``to_hf`` builds by default.
        model_classes: the megacore model classes this family converts.
        config_from_hf: ``(hf_config: dict, architecture) -> ModelConfig fields`` (raises ValueError for
            an HF option megacore cannot reproduce). It fills absent keys with the HF config class's
            defaults: ``save_pretrained`` writes only the keys that differ from them.
        config_to_hf: ``(megacore model, architecture) -> hf_config dict`` (with ``model_type`` and
            ``architectures``; ValueError for a megacore option HF cannot hold).
        mappings: ``(ModelConfig, architecture) -> [Mapping]``, every tensor of the megacore model.
        build: ``(ModelConfig, architecture, hf_config, device, generator_config) -> megacore model``
            (``hf_config`` for constructor options that are not ModelConfig fields, e.g. RoBERTa's padding
            id; ``generator_config`` the ModelConfig of a companion generator model, or None).
        generator_architecture: the HF class accepted as a companion ``generator=`` (ELECTRA's
            ``ElectraForMaskedLM``, whose weights join the discriminator's in one megacore model).
        config_of: ``(megacore model, architecture) -> ModelConfig`` of the part that converts to
            ``architecture`` (ELECTRA's generator has its own config); None: ``model.config``.
        tied: ``(architecture, ModelConfig) -> {HF key: the HF key it is tied to}`` (``lm_head.weight`` ->
            ``transformer.wte.weight``; T5's LM head only when its config ties it): written by ``to_hf``, left
            out of safetensors files (as ``save_pretrained`` does), and checked to equal its source when present
            on input.
        config_class: the megacore config class ``config_from_hf``'s fields build (``ModelConfig``, or a
            subclass with the family's own fields: ``T5Config``).
        config_classes: ``(architecture, config class)`` pairs for the architectures whose megacore config is
            not ``config_class`` (the classifiers': ``ClassifierConfig``).
        ignored: HF key suffixes that are buffers, not weights (GPT-2's old causal-mask ``attn.bias``).
        normalize_keys: ``(hf_state, architecture) -> hf_state`` with this family's canonical names (e.g.
            adds the base-model prefix that checkpoints of the bare base model lack).
        architecture_of: ``(megacore model) -> HF class name``, the class ``to_hf`` builds by default, or
            None when the model is not of this family (families can share a megacore class: BERT and
            RoBERTa are both ``BertModel``). None: every ``model_classes`` model, first architecture.
    """

    model_type: str
    architectures: tuple[str, ...]
    model_classes: tuple[type, ...]
    config_from_hf: Callable[[dict, str], dict]
    config_to_hf: Callable[[nn.Module, str], dict]
    mappings: Callable[[ModelConfig, str], list[Mapping]]
    build: Callable[[ModelConfig, str, dict, object, Optional[ModelConfig]], nn.Module]
    tied: Callable[[str, ModelConfig], dict[str, str]] = lambda architecture, config: {}
    ignored: tuple[str, ...] = ()
    normalize_keys: Callable[[StateDict, str], StateDict] = lambda state, architecture: state
    architecture_of: Optional[Callable[[nn.Module], Optional[str]]] = None
    generator_architecture: Optional[str] = None
    config_of: Optional[Callable[[nn.Module, str], ModelConfig]] = None
    config_class: type = ModelConfig
    config_classes: tuple[tuple[str, type], ...] = ()

    def config_class_for(self, architecture: str) -> type:
        """The megacore config class of ``architecture``'s model."""
        return dict(self.config_classes).get(architecture, self.config_class)

    def default_architecture(self, model: nn.Module) -> Optional[str]:
        """The HF class ``model`` converts to by default; None when ``model`` is not of this family."""
        if type(model) not in self.model_classes:
            return None
        return self.architecture_of(model) if self.architecture_of is not None else self.architectures[0]

    def model_config(self, model: nn.Module, architecture: str) -> ModelConfig:
        """The ModelConfig of the part of ``model`` that converts to ``architecture``."""
        return self.config_of(model, architecture) if self.config_of is not None else model.config

    def state_from_hf(self, hf_state: StateDict, config: ModelConfig, architecture: str) -> StateDict:
        """The megacore tensors (unsharded) from an HF state dict. Raises ValueError naming missing or
        unexpected keys, and a tied key whose tensor differs from its source."""
        where = "megacore.interop.hf.from_hf"
        hf_state = {k: v for k, v in self.normalize_keys(dict(hf_state), architecture).items()
                    if not k.endswith(self.ignored)}
        for key, source in self.tied(architecture, config).items():
            tensor = hf_state.pop(key, None)
            if tensor is not None and source in hf_state and not torch.equal(tensor, hf_state[source]):
                raise ValueError(f"{where}: {key} differs from {source}; megacore ties them ({architecture} "
                                 "with untied weights cannot be represented)")
        out, used, missing = {}, set(), []
        for m in self.mappings(config, architecture):
            absent = [k for k in m.hf_keys if k not in hf_state]
            if absent:
                missing += absent
                continue
            out[m.megacore] = m.from_hf(*(hf_state[k].detach() for k in m.hf_keys))
            used.update(m.hf_keys)
        unexpected = sorted(set(hf_state) - used)
        if missing or unexpected:
            raise ValueError(f"{where}: the {architecture} weights do not match its config: missing "
                             f"{_names(missing)}, unexpected {_names(unexpected)}")
        return out

    def state_to_hf(self, state: StateDict, config: ModelConfig, architecture: str,
                    include_tied: bool = True) -> StateDict:
        """The HF state dict of ``architecture`` from the megacore tensors (unsharded); tied keys share
        their source's tensor unless ``include_tied=False`` leaves them out."""
        out = {}
        for m in self.mappings(config, architecture):
            if m.megacore not in state:
                raise ValueError(f"megacore.interop.hf.to_hf: the model has no tensor {m.megacore!r}")
            tensors = m.to_hf(state[m.megacore].detach())
            out.update(zip(m.hf_keys, (tensors,) if isinstance(m.hf, str) else tensors))
        if include_tied:
            for key, source in self.tied(architecture, config).items():
                out[key] = out[source]
        return out


def _names(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds a family (ValueError when its model_type or an architecture is taken)."""
    if family.model_type in FAMILIES:
        raise ValueError(f"megacore.interop.hf.register: model_type {family.model_type!r} is already registered")
    taken = {a for f in FAMILIES.values() for a in f.architectures}
    if taken & set(family.architectures):
        raise ValueError(f"megacore.interop.hf.register: architectures {sorted(taken & set(family.architectures))} "
                         "are already registered")
    FAMILIES[family.model_type] = family
    return family


def known_architectures() -> list[str]:
    return sorted(a for f in FAMILIES.values() for a in f.architectures)


def family_of_architecture(architecture: str, fn: str) -> Family:
    """The family that handles HF class ``architecture``; ValueError naming ``fn`` otherwise."""
    for f in FAMILIES.values():
        if architecture in f.architectures:
            return f
    raise ValueError(f"megacore.interop.hf.{fn}: {architecture} is not supported; supported: "
                     f"{', '.join(known_architectures())}")


def family_of_model(model: nn.Module, fn: str) -> Family:
    """The family ``model`` belongs to; TypeError naming ``fn`` otherwise."""
    for f in FAMILIES.values():
        if f.default_architecture(model) is not None:
            return f
    supported = sorted({c.__name__ for f in FAMILIES.values() for c in f.model_classes})
    raise TypeError(f"megacore.interop.hf.{fn}: model is a {type(model).__name__}; supported: {', '.join(supported)}")


# ---- shared transforms ---------------------------------------------------------------------------------


def qkv_from_hf(t: Tensor, num_heads: int) -> Tensor:
    """Fused q/k/v rows from HF's ``[all q heads; all k; all v]`` to megacore's per-head grouping
    ``(head, {q, k, v}, head_dim)`` (Megatron's, so a contiguous tensor-parallel split keeps whole
    heads): ``[3 * heads * d, ...] -> [3 * heads * d, ...]``."""
    return t.reshape(3, num_heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def qkv_to_hf(t: Tensor, num_heads: int) -> Tensor:
    """The inverse of :func:`qkv_from_hf`."""
    return t.reshape(num_heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def transpose(t: Tensor) -> Tensor:
    """A 2-D transpose, contiguous (HF's Conv1D stores ``[in, out]``; megacore's linears ``[out, in]``)."""
    return t.t().contiguous()


def check_supported(fn: str, what: str, problems: list[str]) -> None:
    """ValueError listing every option of ``what`` that the other side cannot reproduce."""
    if problems:
        raise ValueError(f"megacore.interop.hf.{fn}: {what} cannot be converted: {'; '.join(problems)}")


__all__ = ["FAMILIES", "Family", "Mapping", "check_supported", "family_of_architecture", "family_of_model",
           "known_architectures", "qkv_from_hf", "qkv_to_hf", "register", "transpose"]
