"""A Hugging Face model directory as the start of a run (``megacore finetune TASK --hf DIR``,
``TrainConfig.hf_model``): its model (``config.json`` and ``model.safetensors``, read with
``megacore.interop.hf.load_hf_safetensors``, no ``transformers`` needed) and its tokenizer (``tokenizer.json``, or
BERT's ``vocab.txt``, or GPT-2's ``vocab.json`` + ``merges.txt``), as ``save_pretrained`` writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

_FN = "megacore finetune"


def _check_directory(directory: str) -> Path:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"{_FN}: --hf {directory} is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{_FN}: --hf {directory} has no config.json (a Hugging Face model directory, as "
                                "save_pretrained writes it)")
    return path


def hf_tokenizer(directory: str):
    """(megacore Tokenizer, the path it was read from) of a Hugging Face directory: ``tokenizer.json`` (any fast
    tokenizer), else ``vocab.txt`` (WordPiece; lower-casing as ``tokenizer_config.json``'s ``do_lower_case`` says,
    else inferred), else ``vocab.json`` + ``merges.txt`` (byte-level BPE). Raises FileNotFoundError when there is
    none of them."""
    from megacore.data import Tokenizer, from_gpt2_files, from_wordpiece_vocab

    path = _check_directory(directory)
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path / "tokenizer.json"), str((path / "tokenizer.json").resolve())
    if (path / "vocab.txt").is_file():
        settings = path / "tokenizer_config.json"
        lowercase = json.loads(settings.read_text()).get("do_lower_case") if settings.is_file() else None
        return from_wordpiece_vocab(path / "vocab.txt", lowercase=lowercase), str((path / "vocab.txt").resolve())
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return from_gpt2_files(path / "vocab.json", path / "merges.txt"), str(path.resolve())
    raise FileNotFoundError(f"{_FN}: --hf {directory} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json + "
                            "merges.txt)")


def hf_meta_model(directory: str) -> torch.nn.Module:
    """The megacore model of a Hugging Face directory built on the meta device from its ``config.json`` alone
    (nothing read from the weights, nothing allocated): what the run's task inspects before the data is read.
    Raises ValueError for a model type or option megacore does not convert."""
    from megacore.interop.hf import FAMILIES
    from megacore.interop.hf.family import family_of_architecture

    path = _check_directory(directory)
    hf_config = json.loads((path / "config.json").read_text())
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"{_FN}: --hf {directory} holds a {model_type!r} model; megacore converts "
                         f"{', '.join(sorted(FAMILIES))}")
    family = FAMILIES[model_type]
    named = (hf_config.get("architectures") or [None])[0]
    architecture = named if named in family.architectures else family.architectures[0]
    family = family_of_architecture(architecture, "load_hf_safetensors")
    config = family.config_class(**family.config_from_hf(hf_config, architecture))
    with torch.device("meta"):
        return family.build(config, architecture, hf_config, "meta", None)


def hf_model(directory: str, overrides: dict) -> torch.nn.Module:
    """The megacore model of a Hugging Face directory with its weights (this rank's shards under tensor
    parallelism), in fp32 on the CPU, with the run-time ModelConfig fields of ``overrides`` (dropout, recompute, the
    parallel layout). Raises ValueError when the run's tokenizer has more tokens than the model's table."""
    from megacore.interop.hf import load_hf_safetensors

    keep = ("hidden_dropout", "attention_dropout", "recompute", "tensor_parallel", "sequence_parallel")
    model = load_hf_safetensors(directory, device="cpu", params_dtype=torch.float32,
                                **{k: overrides[k] for k in keep if k in overrides})
    if overrides["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"{_FN}: the tokenizer of --hf {directory} has {overrides['vocab_size']} tokens, its model "
                         f"{model.config.vocab_size}")
    return model.train()


__all__ = ["hf_meta_model", "hf_model", "hf_tokenizer"]
