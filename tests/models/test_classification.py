"""Classifier: each backbone's head computed by hand from its pretraining model's trunk, the losses against plain
PyTorch formulas, GPT's last-token rule, from_pretrained_model copying the trunk (and nothing of the head but BERT's
pooler), clear errors, pipeline stages, and tensor parallelism (TP 2 == TP 1) in real processes.

Tiny models: hidden 32, 2 layers, 10 tokens, dropout off unless a test says otherwise."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megacore.models import (MODEL_CLASSES, BertModel, Classifier, ClassifierConfig, ElectraDiscriminatorModel,
                             ElectraModel, GPTModel, ModelConfig, backbone_of)
from megacore.models.classification import classification_loss, last_token_index
from tests.models.bert_utils import encoder_config, right_padding_mask
from tests.parallel.utils import run_distributed

B, S, V, H = 3, 10, 101, 32
PAD = (0, 3, 6)  # padding at the end of each row
KINDS = [("bert", "sequence"), ("bert", "token"), ("roberta", "sequence"), ("roberta", "token"),
         ("electra", "sequence"), ("electra", "token"), ("gpt", "sequence")]


def trunk_config(backbone: str, **kw) -> ModelConfig:
    """The pretraining model's config of ``backbone`` (tiny, dropout off)."""
    if backbone == "gpt":
        fields = dict(vocab_size=V, hidden_size=H, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_position_embeddings=40, hidden_dropout=0.0, attention_dropout=0.0)
        return ModelConfig(**{**fields, **kw})
    extra = {"roberta": dict(type_vocab_size=1, norm_epsilon=1e-5), "electra": dict(embedding_size=16)}.get(backbone, {})
    return encoder_config(**{**extra, **kw})


def classifier_config(backbone: str, head: str = "sequence", num_labels: int = 3, **kw) -> ClassifierConfig:
    fields = {f.name: getattr(trunk_config(backbone), f.name) for f in dataclasses.fields(ModelConfig)}
    pad = {"roberta": 1, "gpt": 0}.get(backbone)
    return ClassifierConfig(**{**fields, "backbone": backbone, "head": head, "num_labels": num_labels,
                               "pad_token_id": pad, **kw})


def pretraining_model(backbone: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    config = trunk_config(backbone, **kw)
    if backbone == "bert":
        return BertModel(config)  # with the pooler and the NSP head
    if backbone == "roberta":
        return BertModel(config, add_pooler=False, head=None, position_offset_padding_idx=1)
    if backbone == "electra":
        return ElectraModel(config, generator_size=0.5)
    return GPTModel(config)


def batch(backbone: str, seed: int = 0, pad=PAD):
    """(ids, attention mask, token types or None), right-padded; padding positions hold the pad id (RoBERTa 1,
    GPT 0) and real tokens never do."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    mask = right_padding_mask(B, S, pad)
    pad_id = {"roberta": 1, "gpt": 0}.get(backbone)
    if pad_id is not None:
        ids = ids.masked_fill(mask == 0, pad_id)
    types = (torch.arange(S) >= S // 2).long().expand(B, S).clone() if backbone in ("bert", "electra") else None
    return ids, mask, types


def labels_for(config: ClassifierConfig, mask: torch.Tensor, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if config.problem_type == "regression":
        return torch.randn(B, generator=g)
    if config.head == "token":
        return torch.randint(0, config.num_labels, (B, S), generator=g).masked_fill(mask == 0, -100)
    return torch.randint(0, config.num_labels, (B,), generator=g)


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool = False) -> torch.Tensor:
    """Plain PyTorch: mean -log p(label) over the labels that are not -100; regression: mean squared error."""
    if regression:
        return ((logits[:, 0].double() - labels.double()) ** 2).mean()
    logp = logits.double().log_softmax(-1).reshape(-1, logits.shape[-1])
    flat = labels.reshape(-1)
    keep = flat != -100
    return -logp[keep].gather(1, flat[keep][:, None]).mean()


def trunk_hidden(model, backbone: str, ids, mask, types) -> torch.Tensor:
    """The pretraining model's trunk output ``[b, s, h]`` (its own forward's ``hidden`` where it has one)."""
    if backbone in ("bert", "roberta"):
        return model(ids, mask, types).hidden
    if backbone == "electra":
        return model.discriminator_model()(ids, mask, types).hidden
    x = model.decoder(model.embedding(ids))  # GPTModel's stack, run as its forward does
    return model.final_norm(x).transpose(0, 1)


def head_by_hand(classifier: Classifier, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face's heads written out with the classifier's head weights."""
    c = classifier.config
    linear = lambda x, m: x @ m.weight.t() + m.bias  # noqa: E731
    if c.head == "token":
        return linear(hidden, classifier.classifier)
    if c.backbone == "bert":
        return linear(torch.tanh(linear(hidden[:, 0], classifier.pooler.dense)), classifier.classifier)
    if c.backbone == "gpt":
        last = mask.sum(1) - 1  # right padding: the last real token
        return hidden[torch.arange(B), last] @ classifier.score.weight.t()
    x = linear(hidden[:, 0], classifier.classifier.dense)
    x = torch.tanh(x) if c.backbone == "roberta" else F.gelu(x)  # ELECTRA: exact GeLU
    return linear(x, classifier.classifier.out_proj)


# ---- the heads and the losses --------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone, head", KINDS)
def test_head_on_the_pretrained_trunk_is_hugging_faces_head_and_loss_is_cross_entropy(backbone, head):
    source = pretraining_model(backbone).eval()
    classifier = Classifier.from_pretrained_model(source, head=head, num_labels=3)
    ids, mask, types = batch(backbone)
    labels = labels_for(classifier.config, mask)
    with torch.no_grad():
        out = classifier(ids, mask, types, labels=labels)
        expected = head_by_hand(classifier, trunk_hidden(source, backbone, ids, mask, types), mask)
    assert out.logits.shape == ((B, S, 3) if head == "token" else (B, 3)) and out.logits.dtype == torch.float32
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=1e-5)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), reference_loss(out.logits, labels), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backbone", ["bert", "gpt"])
def test_regression_loss_is_mean_squared_error_of_the_one_output(backbone):
    torch.manual_seed(0)
    model = Classifier(classifier_config(backbone, num_labels=1, problem_type="regression")).eval()
    ids, mask, types = batch(backbone)
    targets = labels_for(model.config, mask)
    out = model(ids, mask, types, labels=targets)
    assert out.logits.shape == (B, 1)
    torch.testing.assert_close(out.loss.double(), reference_loss(out.logits, targets, regression=True))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_loss_counts_only_labels_that_are_not_minus_100():
    logits = torch.randn(4, 3)
    labels = torch.tensor([2, -100, 0, -100])
    torch.testing.assert_close(classification_loss(logits, labels, "single_label_classification"),
                               F.cross_entropy(logits[[0, 2]], labels[[0, 2]]))
    assert classification_loss(logits, torch.full((4,), -100), "single_label_classification").item() == 0.0


def test_backward_reaches_every_parameter_of_trunk_and_head():
    torch.manual_seed(0)
    model = Classifier(classifier_config("electra", "token"))
    ids, mask, types = batch("electra")
    model(ids, mask, types, labels=labels_for(model.config, mask)).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_head_dropout_defaults_to_hidden_dropout_and_applies_only_in_training():
    assert classifier_config("bert", hidden_dropout=0.3).head_dropout == 0.3
    assert classifier_config("bert", hidden_dropout=0.3, classifier_dropout=0.0).head_dropout == 0.0
    torch.manual_seed(0)
    model = Classifier(classifier_config("roberta", classifier_dropout=0.5))  # the trunk's dropout stays 0
    ids, mask, _ = batch("roberta")
    with torch.no_grad():
        evaluated = model.eval()(ids, mask).logits
        assert torch.equal(model(ids, mask).logits, evaluated)
        assert not torch.allclose(model.train()(ids, mask).logits, evaluated)


# ---- GPT's last token ----------------------------------------------------------------------------------------


def test_last_token_is_the_rightmost_real_token_by_mask_by_pad_id_or_the_last_position():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 0, 7, 8, 9], [0, 0, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert last_token_index(ids, mask).tolist() == [2, 4, 3]
    assert last_token_index(ids, pad_token_id=0).tolist() == [2, 4, 3]  # HF's rule: the rightmost non-pad token
    assert last_token_index(ids).tolist() == [4, 4, 4]


def test_gpt_reads_the_same_token_by_mask_or_by_pad_id_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = Classifier(classifier_config("gpt")).eval()
    ids, mask, _ = batch("gpt")
    with torch.no_grad():
        by_mask, by_pad = model(ids, mask).logits, model(ids).logits
        torch.testing.assert_close(by_mask, by_pad, atol=0, rtol=0)
        length = int(mask[2].sum())
        alone = model(ids[2:, :length]).logits  # the row without its padding: its last position
        torch.testing.assert_close(by_mask[2:], alone, atol=1e-6, rtol=1e-6)
        no_pad = Classifier(classifier_config("gpt", pad_token_id=None)).eval()
        no_pad.load_state_dict(model.state_dict())
        last = no_pad(ids).logits  # neither mask nor pad id: the last position, padding or not
        torch.testing.assert_close(last[0], by_mask[0])  # row 0 has no padding
        assert not torch.allclose(last[1:], by_mask[1:])


def test_gpt_rejects_left_padding_its_causal_layers_cannot_mask():
    torch.manual_seed(0)
    model = Classifier(classifier_config("gpt"))
    ids, mask, _ = batch("gpt")
    with pytest.raises(ValueError, match="megacore.models.Classifier: attention_mask has padding before a real token"):
        model(ids, mask.flip(1))


# ---- from_pretrained_model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone, head", KINDS + [("electra-discriminator", "sequence")])
def test_from_pretrained_model_copies_the_trunk_exactly_and_draws_a_new_head(backbone, head):
    name = backbone.split("-")[0]
    source = pretraining_model(name)
    if backbone == "electra-discriminator":
        source = source.discriminator_model()
    torch.manual_seed(7)
    classifier = Classifier.from_pretrained_model(source, head=head, num_labels=4, label_names=list("abcd"))
    torch.manual_seed(7)
    fresh = Classifier(classifier.config)  # the head as Classifier draws it from the same seed
    assert backbone_of(source) == classifier.config.backbone == name
    assert classifier.config.label_names == list("abcd") and classifier.training
    src, fresh_state = source.state_dict(), fresh.state_dict()
    copied_pooler = name == "bert" and head == "sequence"  # BertModel's pooler is BERT's sequence head's
    for key, t in classifier.state_dict().items():
        if key.startswith(classifier.head_modules) and not (copied_pooler and key.startswith("pooler.")):
            assert torch.equal(t, fresh_state[key]), f"{key}: a new head"
        else:
            assert torch.equal(t, src[key]), f"{key}: copied from the trunk"
    if name == "roberta":
        assert classifier.config.pad_token_id == 1
    for f in dataclasses.fields(ModelConfig):
        assert getattr(classifier.config, f.name) == getattr(source.config, f.name), f.name


def test_from_pretrained_model_draws_bert_pooler_new_when_the_model_has_none():
    torch.manual_seed(0)
    source = BertModel(trunk_config("bert"), add_pooler=False, head=None)
    torch.manual_seed(1)
    classifier = Classifier.from_pretrained_model(source)
    torch.manual_seed(1)
    assert torch.equal(classifier.pooler.dense.weight, Classifier(classifier.config).pooler.dense.weight)


def test_from_pretrained_model_keeps_dtype_and_mode_and_names_missing_trunk_tensors():
    source = pretraining_model("gpt").to(torch.float64).eval()
    source.config.params_dtype = torch.float64
    classifier = Classifier.from_pretrained_model(source)
    assert not classifier.training and all(p.dtype == torch.float64 for p in classifier.parameters())
    source.decoder.layers = source.decoder.layers[:1]  # as a pipeline stage would hold it
    with pytest.raises(ValueError, match=r"megacore.models.Classifier.from_pretrained_model: the GPTModel lacks trunk "
                                         r"tensors \['decoder.layers.1.attention_norm.weight'"):
        Classifier.from_pretrained_model(source)


def test_backbone_of_names_what_it_cannot_take():
    from megacore.models import T5Config, T5Model

    assert backbone_of(pretraining_model("roberta")) == "roberta"
    t5 = T5Model(T5Config(vocab_size=V, hidden_size=H, num_layers=1, num_attention_heads=4), device="meta")
    with pytest.raises(ValueError, match="megacore.models.backbone_of: a T5Model has no classifier backbone"):
        backbone_of(t5)
    with pytest.raises(ValueError, match="megacore.models.backbone_of: a T5Model"):
        Classifier.from_pretrained_model(t5)


def test_a_checkpoints_config_fields_rebuild_the_classifier():
    config = classifier_config("roberta", "token", num_labels=2, label_names=["O", "NAME"])
    fields = dataclasses.asdict(config)  # what a checkpoint records (extra["model_config"])
    cls = MODEL_CLASSES["classifier"]
    assert cls is Classifier and cls.pretraining_task is None
    assert cls.config_class(**fields) == config


# ---- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(backbone="t5"), "backbone='t5' is not one of bert, roberta, electra, gpt"),
    (dict(head="span"), "head='span' is not one of sequence, token"),
    (dict(problem_type="multi_label_classification"), "problem_type='multi_label_classification' is not one of"),
    (dict(num_labels=0), "num_labels=0 must be an int >= 1"),
    (dict(num_labels=1), "num_labels=1 with problem_type='single_label_classification'; classification needs at least 2"),
    (dict(problem_type="regression"), "num_labels=3 with problem_type='regression'; a regression head has one output"),
    (dict(problem_type="regression", num_labels=1, head="token"), "problem_type='regression' needs head='sequence'"),
    (dict(label_names=["a", "b"]), "label_names has 2 names, num_labels=3"),
    (dict(label_names=["a", "b", "a"]), "repeat a name"),
    (dict(label_names="abc"), "label_names='abc' must be a list of names"),
    (dict(classifier_dropout=1.0), r"classifier_dropout=1.0 must be None or in \[0, 1\)"),
    (dict(pad_token_id=V), r"pad_token_id=101 must be None or a token id in \[0, vocab_size=101\)"),
    (dict(pre_norm=True), "pre_norm=True; the encoder is post-LN"),
])
def test_bad_configs_raise_naming_the_field(kw, match):
    kw = dict(kw)
    with pytest.raises(ValueError, match=f"megacore.models.ClassifierConfig: .*{match}"):
        classifier_config(kw.pop("backbone", "bert"), **kw)  # an unknown backbone: on an encoder's trunk


@pytest.mark.parametrize("backbone, kw, match", [
    ("gpt", dict(head="token"), "head='token' with backbone='gpt'; gpt has the sequence head only"),
    ("gpt", dict(classifier_dropout=0.1), "classifier_dropout=0.1 with backbone='gpt'"),
    ("gpt", dict(attention_mask_type="padding"), "attention_mask_type='padding' with backbone='gpt'"),
    ("roberta", dict(pad_token_id=None), "backbone='roberta' needs pad_token_id"),
])
def test_backbone_specific_config_errors(backbone, kw, match):
    with pytest.raises(ValueError, match=f"megacore.models.ClassifierConfig: {match}"):
        classifier_config(backbone, **kw)


def test_bad_inputs_and_labels_raise_naming_the_argument():
    torch.manual_seed(0)
    sequence, token = Classifier(classifier_config("bert")), Classifier(classifier_config("bert", "token"))
    ids, mask, types = batch("bert")
    with pytest.raises(TypeError, match="megacore.models.Classifier: config is a ModelConfig, expected a ClassifierConfig"):
        Classifier(trunk_config("bert"))
    with pytest.raises(ValueError, match=r"labels have shape \[3, 10\], expected \[batch\] \(sequence head\) = \[3\]"):
        sequence(ids, mask, labels=torch.zeros(B, S, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels have shape \[3\], expected \[batch, seq\] \(token head\) = \[3, 10\]"):
        token(ids, mask, labels=torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels hold class ids outside \[0, num_labels=3\)"):
        sequence(ids, mask, labels=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="labels have dtype torch.float32, expected integer class ids"):
        sequence(ids, mask, labels=torch.zeros(B))
    with pytest.raises(ValueError, match=r"megacore.models.Classifier: attention_mask has shape \[3, 9\]"):
        sequence(ids, mask[:, :9])
    with pytest.raises(ValueError, match=r"megacore.models.Classifier: input_ids has shape \[10\]"):
        sequence(ids[0])


# ---- pipeline stages -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone, head", [("bert", "sequence"), ("electra", "token"), ("gpt", "sequence")])
def test_two_pipeline_stages_compute_the_whole_model(backbone, head):
    from megacore.parallel.pipeline import cut_stage

    torch.manual_seed(0)
    whole = Classifier(classifier_config(backbone, head)).eval()
    first, last = cut_stage(copy.deepcopy(whole), 0, 2), cut_stage(copy.deepcopy(whole), 1, 2)
    assert not any(n.startswith(whole.head_modules) for n, _ in first.named_parameters())
    assert not any(n.startswith("embedding.") for n, _ in last.named_parameters())
    ids, mask, types = batch(backbone)
    b = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "position_ids": None,
         "labels": labels_for(whole.config, mask)}
    with torch.no_grad():
        acts, _ = first.stage_input(b)
        acts = last.run_layers(first.run_layers(acts, b, range(0, 1)), b, range(1, 2))
        out, expected = last.stage_output(acts, b), whole(**b)
    torch.testing.assert_close(out.logits, expected.logits, atol=0, rtol=0)
    torch.testing.assert_close(out.loss, expected.loss, atol=0, rtol=0)


# ---- tensor parallelism --------------------------------------------------------------------------------------


def _tensor_parallel_classifiers(rank, world):
    from megacore.parallel import initialize_model_parallel, sum_sequence_parallel_gradients
    from megacore.parallel.layers import merge_weights
    from tests.parallel.utils import gather_shards, shard_dims

    group = initialize_model_parallel(world).tensor_parallel_group
    for backbone, head in (("bert", "sequence"), ("electra", "token"), ("gpt", "sequence")):
        ids, mask, types = batch(backbone)
        results = {}
        for tp, sp in ((False, False), (True, False), (True, True)):
            torch.manual_seed(0)
            model = Classifier(classifier_config(backbone, head, tensor_parallel=tp, sequence_parallel=sp))
            out = model(ids, mask, types, labels=labels_for(model.config, mask))
            out.loss.backward()
            sum_sequence_parallel_gradients(model)  # what the Trainer does after the last backward
            dims = shard_dims(model, world)
            grads = {n: merge_weights(gather_shards(p.grad, group, world), dims[n]) if dims[n] is not None
                     else p.grad for n, p in model.named_parameters()}
            results[tp, sp] = out, grads
        base, base_grads = results[False, False]
        for key in ((True, False), (True, True)):
            out, grads = results[key]
            what = f"{backbone} {head}, tp/sp={key}"
            torch.testing.assert_close(out.logits, base.logits, atol=1e-5, rtol=1e-4, msg=lambda m: f"logits, {what}: {m}")
            torch.testing.assert_close(out.loss, base.loss, atol=1e-5, rtol=1e-4, msg=lambda m: f"loss, {what}: {m}")
            for name, g in base_grads.items():  # the replicated heads' gradients are whole on every rank
                g_tp = grads[name][: g.shape[0]] if g.shape != grads[name].shape else grads[name]  # padded vocab rows
                torch.testing.assert_close(g_tp, g, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}, {what}: {m}")

    # a BertModel pretraining checkpoint maps into the classifier shard by shard
    ids, mask, types = batch("bert")
    logits = {}
    for tp in (False, True):
        source = pretraining_model("bert", tensor_parallel=tp).eval()
        torch.manual_seed(1)
        classifier = Classifier.from_pretrained_model(source, num_labels=3)
        assert torch.equal(classifier.encoder.layers[0].attention.qkv.weight,
                           source.encoder.layers[0].attention.qkv.weight)
        assert classifier.embedding.word.weight.shape[0] == (51 if tp else V)  # vocab-parallel: 102 rows / 2
        with torch.no_grad():
            logits[tp] = classifier(ids, mask, types).logits
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-4)


def test_tensor_parallel_classifiers_equal_the_whole_model():
    run_distributed(_tensor_parallel_classifiers, 2, timeout_s=240, collective_timeout_s=60)
