"""What the classification architectures of every family share: which Hugging Face class is which megacore
:class:`~megacore.models.Classifier`, and the classification keys of an HF config <-> ClassifierConfig fields.

==========================================  =========================================================================
Hugging Face                                megacore ``ClassifierConfig``
==========================================  =========================================================================
``<Family>ForSequenceClassification``       ``head="sequence"``
``<Family>ForTokenClassification``          ``head="token"``
``id2label`` / ``label2id`` / num_labels    ``num_labels``, ``label_names``: HF's default names ``LABEL_0 ..
                                            LABEL_{n-1}`` are ``[]`` (megacore's "no names": ``LABEL_<i>``), and
                                            ``[]`` is written back as them, so either round trip is exact
``problem_type``                            ``problem_type``; None (HF: decided by the labels) reads as
                                            ``"regression"`` for one label, ``"single_label_classification"``
                                            otherwise, and is written back explicitly (sequence head; a token head
                                            writes None: HF's token classifiers ignore it). HF's
                                            ``"multi_label_classification"`` does not convert
``classifier_dropout``                      ``classifier_dropout`` (encoders; GPT-2's head has no dropout)
``pad_token_id``                            ``pad_token_id``, read as HF has it (BERT's and ELECTRA's too, unused
                                            by megacore, so HF -> megacore -> HF keeps it) and written when not
                                            None (a megacore BERT classifier's None comes back as HF's default 0)
==========================================  =========================================================================
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from megacore.interop.hf.family import check_supported
from megacore.models.classification import PROBLEM_TYPES, Classifier, ClassifierConfig

_SUFFIXES = {"ForSequenceClassification": "sequence", "ForTokenClassification": "token"}


def classifier_head(architecture: str) -> Optional[str]:
    """``"sequence"`` / ``"token"`` for a classification architecture, None for any other."""
    for suffix, head in _SUFFIXES.items():
        if architecture.endswith(suffix):
            return head
    return None


def classifier_architecture(model: nn.Module, prefix: str, backbone: str) -> Optional[str]:
    """``{prefix}For{Sequence,Token}Classification`` for a Classifier of ``backbone``; None for any other model."""
    if not isinstance(model, Classifier) or model.config.backbone != backbone:
        return None
    return prefix + ("ForSequenceClassification" if model.config.head == "sequence" else "ForTokenClassification")


def classifier_problems(model: nn.Module, architecture: str, backbone: str) -> list[str]:
    """Why ``model`` cannot convert to ``architecture`` as a classifier (or as anything else, being one)."""
    head = classifier_head(architecture)
    if head is None:
        return [f"a Classifier converts to a ...ForSequenceClassification / ...ForTokenClassification class, not "
                f"{architecture}"] if isinstance(model, Classifier) else []
    if not isinstance(model, Classifier):
        return [f"{architecture} is a megacore Classifier (Classifier.from_pretrained_model makes one from a "
                f"{type(model).__name__})"]
    c, problems = model.config, []
    if c.backbone != backbone:
        problems.append(f"{architecture} has the {backbone!r} backbone, the model {c.backbone!r}")
    if c.head != head:
        problems.append(f"{architecture} has the {head!r} head, the model {c.head!r}")
    return problems


def classifier_config_from_hf(c: dict, architecture: str, backbone: str) -> dict:
    """The ClassifierConfig fields of an HF classifier's config ``c`` (its class's defaults filled in)."""
    head = classifier_head(architecture)
    problems = []
    id2label = c.get("id2label")
    if id2label:
        labels = {int(k): v for k, v in id2label.items()}
        if sorted(labels) != list(range(len(labels))):
            problems.append(f"id2label has ids {sorted(labels)} (megacore needs 0 .. num_labels - 1)")
        names = [labels[i] for i in sorted(labels)]
    else:
        names = [f"LABEL_{i}" for i in range(c.get("num_labels") or 2)]
    n = len(names)
    problem_type = c.get("problem_type")
    if head == "token":
        problem_type = "single_label_classification"  # HF's token classifiers ignore problem_type
    elif problem_type is None:
        problem_type = "regression" if n == 1 else "single_label_classification"
    elif problem_type not in PROBLEM_TYPES:
        problems.append(f"problem_type={problem_type!r} (megacore has {', '.join(PROBLEM_TYPES)})")
    check_supported("from_hf", f"this {architecture}", problems)
    return dict(backbone=backbone, head=head, num_labels=n, problem_type=problem_type,
                label_names=[] if names == [f"LABEL_{i}" for i in range(n)] else names,
                classifier_dropout=None if backbone == "gpt" else c.get("classifier_dropout"),
                pad_token_id=c.get("pad_token_id"))


def classifier_config_to_hf(config: ClassifierConfig) -> dict:
    """The HF config keys of a ClassifierConfig's classification fields."""
    names = config.label_names or [f"LABEL_{i}" for i in range(config.num_labels)]
    out = dict(id2label={str(i): name for i, name in enumerate(names)},
               label2id={name: i for i, name in enumerate(names)},
               problem_type=config.problem_type if config.head == "sequence" else None)
    if config.backbone != "gpt":
        out["classifier_dropout"] = config.classifier_dropout
    if config.pad_token_id is not None:
        out["pad_token_id"] = config.pad_token_id
    return out


def classifier_config_class(architectures: tuple[str, ...]) -> tuple[tuple[str, type], ...]:
    """``Family.config_classes`` entries: ClassifierConfig for each classification architecture."""
    return tuple((a, ClassifierConfig) for a in architectures if classifier_head(a) is not None)


__all__ = ["classifier_architecture", "classifier_config_class", "classifier_config_from_hf", "classifier_config_to_hf",
           "classifier_head", "classifier_problems"]
