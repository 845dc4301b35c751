"""megacore.interop.hf for the classifiers: BertFor{Sequence,Token}Classification, RobertaFor...,
ElectraFor... and GPT2ForSequenceClassification <-> megacore Classifier. Logits and loss equal transformers'
(1e-4, fp32) on a right-padded batch with an attention mask (and token types for BERT and ELECTRA); weights and
the classification config (labels, problem type, dropout, padding id) move exactly both ways and through the
safetensors layout. (Sharding under tensor parallelism is the families' shared code, tested in test_hf.py; the
classifiers' TP 2 == TP 1 is in tests/models/test_classification.py.)

Small random HF models as in test_hf.py (vocab 101, hidden 48, 2 layers), eval mode."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megacore.interop import hf as interop  # noqa: E402
from megacore.models import Classifier  # noqa: E402
from tests.interop.test_hf import (ATOL, ENCODER, VOCAB, _quiet_transformers, assert_close_on_cpu,  # noqa: E402,F401
                                   assert_same_weights, encoder_inputs, gpt2_config, on, randomize_vectors)

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
CONFIGS = {  # HF class -> its config
    "BertForSequenceClassification": lambda **kw: transformers.BertConfig(**{**ENCODER, **kw}),
    "BertForTokenClassification": lambda **kw: transformers.BertConfig(**{**ENCODER, **kw}),
    "RobertaForSequenceClassification": lambda **kw: transformers.RobertaConfig(**{**ENCODER, "type_vocab_size": 1, **kw}),
    "RobertaForTokenClassification": lambda **kw: transformers.RobertaConfig(**{**ENCODER, "type_vocab_size": 1, **kw}),
    "ElectraForSequenceClassification": lambda **kw: transformers.ElectraConfig(**{**ENCODER, "embedding_size": 32, **kw}),
    "ElectraForTokenClassification": lambda **kw: transformers.ElectraConfig(**{**ENCODER, "embedding_size": 32, **kw}),
    "GPT2ForSequenceClassification": lambda **kw: gpt2_config(**{"pad_token_id": 0, **kw}),
}
ARCHITECTURES = list(CONFIGS)
# the classification keys of an HF config that must survive a round trip
CLASSIFICATION_KEYS = ("id2label", "label2id", "num_labels", "problem_type", "pad_token_id")


def make_classifier(architecture, seed=0, **kw):
    """A random HF classifier in eval mode, named labels, nonzero biases; sequence classifiers say their problem
    type (None would be decided by the labels' dtype)."""
    if architecture.endswith("SequenceClassification"):
        kw.setdefault("problem_type", "single_label_classification")
    kw.setdefault("id2label", LABELS)
    kw.setdefault("label2id", {v: k for k, v in kw["id2label"].items()})
    torch.manual_seed(seed)
    return randomize_vectors(getattr(transformers, architecture)(CONFIGS[architecture](**kw)))


def inputs(architecture):
    """ids, mask (rows of 13, 9 and 5 real tokens), token types (BERT, ELECTRA; else None). RoBERTa's and GPT-2's
    padding holds their pad id (1, 0), which no real token is."""
    if architecture.startswith("GPT2"):
        ids, mask, _ = encoder_inputs("BertForSequenceClassification")
        return ids.masked_fill(mask == 0, 0), mask, None
    return encoder_inputs(architecture)


def labels_for(architecture, mask, regression=False):
    if regression:
        return torch.tensor([0.5, -1.25, 2.0])
    if architecture.endswith("TokenClassification"):
        labels = torch.randint(0, 3, mask.shape, generator=torch.Generator().manual_seed(4))
        return labels.masked_fill(mask == 0, -100)
    return torch.tensor([2, 0, 1])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_classifier_from_hf_logits_and_loss_equal_transformers(architecture, device):
    hf = make_classifier(architecture)
    model = interop.from_hf(hf, device=device)
    assert isinstance(model, Classifier) and not model.training
    ids, mask, types = inputs(architecture)
    labels = labels_for(architecture, mask)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out = model(*on(device, ids, mask, types), labels=labels.to(device))
    assert_close_on_cpu(out.logits, expected.logits, device)
    assert_close_on_cpu(out.loss, expected.loss, device)


@pytest.mark.parametrize("architecture", ["BertForSequenceClassification", "ElectraForSequenceClassification",
                                          "GPT2ForSequenceClassification"])
def test_one_label_is_regression_with_transformers_loss(architecture):
    hf = make_classifier(architecture, id2label={0: "score"}, problem_type=None)  # HF: regression for one label
    model = interop.from_hf(hf)
    assert (model.config.num_labels, model.config.problem_type, model.config.label_names) == (1, "regression", ["score"])
    ids, mask, types = inputs(architecture)
    targets = labels_for(architecture, mask, regression=True)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types, labels=targets)
        out = model(ids, mask, types, labels=targets)
    torch.testing.assert_close(out.logits, expected.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=ATOL, rtol=0)


def test_electra_sequence_head_is_exact_gelu_whatever_hidden_act_says():
    hf = make_classifier("ElectraForSequenceClassification", hidden_act="gelu_new")
    model = interop.from_hf(hf)
    ids, mask, types = inputs("ElectraForSequenceClassification")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types).logits, hf(ids, attention_mask=mask, token_type_ids=types).logits,
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_classifier_round_trip_reproduces_weights_and_classification_config_exactly(architecture):
    dropout = {} if architecture.startswith("GPT2") else {"classifier_dropout": 0.2}
    hf = make_classifier(architecture, **dropout)
    model = interop.from_hf(hf)
    c = model.config
    assert (c.num_labels, c.label_names) == (3, list(LABELS.values()))
    assert (c.backbone, c.head) == ({"Bert": "bert", "Roberta": "roberta", "Electra": "electra", "GPT2": "gpt"}[
        architecture.split("For")[0]], "token" if "Token" in architecture else "sequence")
    back = interop.to_hf(model)
    assert type(back).__name__ == architecture
    assert_same_weights(hf.state_dict(), back.state_dict())
    for key in CLASSIFICATION_KEYS + tuple(dropout):
        assert getattr(back.config, key) == getattr(hf.config, key), key


@pytest.mark.parametrize("architecture", ["BertForSequenceClassification", "RobertaForTokenClassification"])
def test_default_label_names_are_no_names_and_come_back_as_them(architecture):
    hf = make_classifier(architecture, id2label={i: f"LABEL_{i}" for i in range(4)})
    model = interop.from_hf(hf)
    assert (model.config.num_labels, model.config.label_names) == (4, [])
    back = interop.to_hf(model)
    assert back.config.id2label == hf.config.id2label and back.config.label2id == hf.config.label2id
    again = interop.from_hf(back)
    assert again.config == model.config  # megacore -> HF -> megacore: the same config


def test_problem_type_none_reads_as_what_transformers_decides_for_integer_labels():
    hf = make_classifier("BertForSequenceClassification", problem_type=None)
    model = interop.from_hf(hf)
    assert model.config.problem_type == "single_label_classification"
    assert interop.to_hf(model).config.problem_type == "single_label_classification"  # written out explicitly
    token = interop.from_hf(make_classifier("BertForTokenClassification", problem_type="regression"))
    assert token.config.problem_type == "single_label_classification"  # HF's token classifiers ignore it
    assert interop.to_hf(token).config.problem_type is None


def test_multi_label_classification_is_refused_naming_it():
    hf = make_classifier("BertForSequenceClassification", problem_type="multi_label_classification")
    with pytest.raises(ValueError, match="megacore.interop.hf.from_hf: this BertForSequenceClassification cannot be "
                                         "converted: problem_type='multi_label_classification'"):
        interop.from_hf(hf)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_classifier_safetensors_load_in_transformers_and_back_exactly(architecture, tmp_path):
    hf = make_classifier(architecture)
    model = interop.from_hf(hf)
    interop.save_hf_safetensors(model, str(tmp_path / "megacore"))
    loaded = getattr(transformers, architecture).from_pretrained(str(tmp_path / "megacore")).eval()
    assert_same_weights(hf.state_dict(), loaded.state_dict())
    assert loaded.config.id2label == LABELS and loaded.config.problem_type == hf.config.problem_type
    ids, mask, types = inputs(architecture)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask, token_type_ids=types).logits,
                                   model(ids, mask, types).logits, atol=ATOL, rtol=0)
    reread = interop.load_hf_safetensors(str(tmp_path / "megacore"))
    assert_same_weights(model.state_dict(), reread.state_dict())
    assert reread.config == model.config
    hf.save_pretrained(str(tmp_path / "hf"))
    from_transformers = interop.load_hf_safetensors(str(tmp_path / "hf"))
    assert_same_weights(model.state_dict(), from_transformers.state_dict())
    assert from_transformers.config == model.config


def test_from_pretrained_model_then_to_hf_is_a_transformers_classifier_of_that_trunk():
    from megacore.models import BertModel, ModelConfig

    config = ModelConfig(vocab_size=VOCAB, hidden_size=48, num_layers=2, num_attention_heads=4, ffn_hidden_size=80,
                         max_position_embeddings=64, type_vocab_size=2, pre_norm=False, embedding_norm=True,
                         attention_mask_type="padding", norm_epsilon=1e-12)
    pretrained = BertModel(config).eval()
    classifier = Classifier.from_pretrained_model(pretrained, head="token", num_labels=2, label_names=["O", "NAME"])
    hf = interop.to_hf(classifier)
    assert type(hf) is transformers.BertForTokenClassification and hf.config.id2label == {0: "O", 1: "NAME"}
    pretraining = interop.to_hf(pretrained).state_dict()
    for key, t in hf.state_dict().items():
        if key.startswith("bert."):
            assert torch.equal(t, pretraining[key]), key


@pytest.mark.parametrize("architecture, model_kw, message", [
    ("BertForTokenClassification", dict(head="sequence"),
     "BertForTokenClassification has the 'token' head, the model 'sequence'"),
    ("BertForMaskedLM", dict(head="sequence"), "a Classifier converts to a ...ForSequenceClassification"),
])
def test_to_hf_refuses_a_classifier_of_another_head_or_class(architecture, model_kw, message):
    model = interop.from_hf(make_classifier("BertForSequenceClassification"))
    with pytest.raises(ValueError, match=f"megacore.interop.hf.to_hf: this Classifier cannot be converted: {message}"):
        interop.to_hf(model, architecture=architecture)


def test_to_hf_refuses_a_pretraining_model_as_a_classifier():
    bert = interop.from_hf(transformers.BertForMaskedLM(CONFIGS["BertForSequenceClassification"]()))
    with pytest.raises(ValueError, match="BertForSequenceClassification is a megacore Classifier "
                                         r"\(Classifier.from_pretrained_model makes one from a BertModel\)"):
        interop.to_hf(bert, architecture="BertForSequenceClassification")
