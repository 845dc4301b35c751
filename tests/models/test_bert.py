"""BertModel (BERT and RoBERTa): equal to Hugging Face's models given the same weights, unaffected by
padding, the presets' shapes, clear errors, every dtype, activation checkpointing, tensor parallelism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacore.models import BertModel, ModelConfig
from megacore.models.bert import position_ids_from_input_ids
from megacore.models.registry import build, preset_config
from tests.models.bert_utils import (encoder_config, hf_embeddings, hf_encoder, load_exactly, prefixed,
                                     right_padding_mask)
from tests.parallel.utils import run_distributed

transformers = pytest.importorskip("transformers")

B, S, V = 3, 12, 101


def _hf_bert(config: ModelConfig):
    c = transformers.BertConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                                num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
                                intermediate_size=config.ffn_hidden_size,
                                max_position_embeddings=config.max_position_embeddings,
                                type_vocab_size=config.type_vocab_size, layer_norm_eps=config.norm_epsilon,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForPreTraining(c).eval()


def _from_hf_bert(model: BertModel, hf) -> None:
    sd, c = hf.state_dict(), model.config
    state = {**prefixed("embedding.", hf_embeddings(sd, "bert.embeddings.")),
             **prefixed("encoder.", hf_encoder(sd, "bert.encoder.", c.num_layers, c.num_attention_heads)),
             "pooler.dense.weight": sd["bert.pooler.dense.weight"], "pooler.dense.bias": sd["bert.pooler.dense.bias"],
             "mlm_head.dense.weight": sd["cls.predictions.transform.dense.weight"],
             "mlm_head.dense.bias": sd["cls.predictions.transform.dense.bias"],
             "mlm_head.norm.weight": sd["cls.predictions.transform.LayerNorm.weight"],
             "mlm_head.norm.bias": sd["cls.predictions.transform.LayerNorm.bias"],
             "mlm_head.bias": sd["cls.predictions.bias"],
             "binary_head.weight": sd["cls.seq_relationship.weight"], "binary_head.bias": sd["cls.seq_relationship.bias"]}
    load_exactly(model, state)


def _inputs(seed: int = 0, pad=(0, 3, 7), device="cpu"):
    """(ids, attention mask, token types, MLM labels), drawn on the CPU from ``seed`` and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    mask = right_padding_mask(B, S, pad)
    types = (torch.arange(S) >= S // 2).long().expand(B, S).clone()
    labels = torch.where(torch.rand(B, S, generator=g) < 0.3, ids, torch.full_like(ids, -100)) * mask + (mask - 1) * 100
    return tuple(t.to(device) for t in (ids, mask, types, labels))


# ---- against Hugging Face -------------------------------------------------------------------------------


def test_bert_matches_hf_bert_for_pretraining_logits_pooler_and_loss(device):
    """Hugging Face's model stays on the CPU (the reference); megacore's runs on ``device``."""
    torch.manual_seed(0)
    config = encoder_config()
    hf = _hf_bert(config)
    model = BertModel(config).eval()
    _from_hf_bert(model, hf)
    model = model.to(device)
    ids, mask, types, labels = _inputs()
    nsp = torch.tensor([0, 1, 1])
    on_device = [t.to(device) for t in (ids, mask, types)]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        out = model(*on_device)
        ref_loss = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                      next_sentence_label=nsp).loss
        out_loss = model(*on_device, labels=labels.to(device), next_sentence_label=nsp.to(device))
    torch.testing.assert_close(out.mlm.cpu(), ref.prediction_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.binary_logits.cpu(), ref.seq_relationship_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.hidden.cpu(), ref.hidden_states[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_loss.loss.cpu(), ref_loss, atol=1e-4, rtol=1e-4)
    # the per-token MLM loss is the cross-entropy of the logits at labelled tokens, 0 elsewhere
    ce = F.cross_entropy(ref.prediction_logits.transpose(1, 2), labels, reduction="none")
    torch.testing.assert_close(out_loss.mlm.cpu(), ce, atol=1e-4, rtol=1e-4)


def test_roberta_matches_hf_roberta_for_masked_lm_with_offset_positions(device):
    torch.manual_seed(0)
    pad_id = 1
    config = encoder_config(type_vocab_size=1, max_position_embeddings=S + pad_id + 1, norm_epsilon=1e-5)
    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=1, pad_token_id=pad_id, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    model = BertModel(config, add_pooler=False, head=None, position_offset_padding_idx=pad_id).eval()
    sd = hf.state_dict()
    load_exactly(model, {**prefixed("embedding.", hf_embeddings(sd, "roberta.embeddings.")),
                         **prefixed("encoder.", hf_encoder(sd, "roberta.encoder.", 2, 4)),
                         "mlm_head.dense.weight": sd["lm_head.dense.weight"],
                         "mlm_head.dense.bias": sd["lm_head.dense.bias"],
                         "mlm_head.norm.weight": sd["lm_head.layer_norm.weight"],
                         "mlm_head.norm.bias": sd["lm_head.layer_norm.bias"], "mlm_head.bias": sd["lm_head.bias"]})
    model = model.to(device)  # Hugging Face's stays on the CPU
    ids, mask, _, _ = _inputs()
    ids = ids.masked_fill(mask == 0, pad_id)  # RoBERTa's positions come from the padding id
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        out = model(ids.to(device), mask.to(device))
    assert out.binary_logits is None and out.pooled is None
    torch.testing.assert_close(out.mlm.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_roberta_position_ids_count_real_tokens_from_padding_idx_plus_one():
    ids = torch.tensor([[0, 5, 6, 1, 1], [0, 7, 8, 9, 2]])
    assert position_ids_from_input_ids(ids, 1).tolist() == [[2, 3, 4, 1, 1], [2, 3, 4, 5, 6]]


# ---- padding --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_padding_never_changes_outputs_at_real_positions(kind, device):
    torch.manual_seed(0)
    pad_id = 1
    if kind == "bert":
        model = BertModel(encoder_config()).eval()
    else:
        model = BertModel(encoder_config(type_vocab_size=1, max_position_embeddings=S + 8), add_pooler=False,
                          head=None, position_offset_padding_idx=pad_id).eval()
    model = model.to(device)
    real = 7
    ids = torch.randint(2, V, (2, real), generator=torch.Generator().manual_seed(1)).to(device)
    types = torch.zeros_like(ids)
    with torch.no_grad():
        base = model(ids, torch.ones_like(ids), types)
        for extra, fill in ((5, "pad"), (5, "random"), (1, "random"), (9, "random")):
            # drawn on the CPU (the default generator, as before), then moved
            pad = (torch.full((2, extra), pad_id) if fill == "pad" else torch.randint(2, V, (2, extra))).to(device)
            padded = torch.cat([ids, pad], 1)
            mask = torch.cat([torch.ones_like(ids), torch.zeros_like(pad)], 1)
            t = torch.cat([types, torch.randint(0, 2 if kind == "bert" else 1, (2, extra)).to(device)], 1)
            if kind == "roberta" and fill == "random":
                continue  # RoBERTa's padding is its padding id (positions are counted from it)
            out = model(padded, mask, t)
            what = f"{kind}, {extra} {fill} padding tokens"
            torch.testing.assert_close(out.hidden[:, :real], base.hidden, atol=1e-5, rtol=1e-5, msg=what)
            torch.testing.assert_close(out.mlm[:, :real], base.mlm, atol=1e-5, rtol=1e-5, msg=what)
            if kind == "bert":
                torch.testing.assert_close(out.binary_logits, base.binary_logits, atol=1e-5, rtol=1e-5, msg=what)


def test_padded_token_contents_are_bitwise_irrelevant_at_the_same_length(device):
    torch.manual_seed(0)
    model = BertModel(encoder_config()).eval().to(device)
    ids, mask, types, _ = _inputs(device=device)
    other = torch.where(mask.bool(), ids, torch.randint(2, V, ids.shape).to(device))
    other_types = torch.where(mask.bool(), types, 1 - types)
    with torch.no_grad():
        a, b = model(ids, mask, types), model(other, mask, other_types)
    real = mask.bool()
    assert torch.equal(a.hidden[real], b.hidden[real])
    assert torch.equal(a.mlm[real], b.mlm[real])
    assert torch.equal(a.binary_logits, b.binary_logits)


# ---- presets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, hf_name", [("bert-tiny", "bert"), ("bert-base", "bert"), ("roberta-base", "roberta")])
def test_presets_have_hf_parameter_counts(name, hf_name):
    model = build(name, device="meta")
    c = preset_config(name)
    kw = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
              num_attention_heads=c.num_attention_heads, intermediate_size=c.ffn_hidden_size,
              max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size)
    with torch.device("meta"):
        hf = (transformers.BertForPreTraining(transformers.BertConfig(**kw)) if hf_name == "bert"
              else transformers.RobertaForMaskedLM(transformers.RobertaConfig(**kw)))
    expected = sum(p.numel() for p in hf.parameters())  # HF counts the tied decoder weight once
    assert sum(p.numel() for p in model.parameters()) == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_roberta_preset_has_no_binary_head_and_one_token_type():
    model = build("roberta-base", device="meta")
    assert model.binary_head is None and model.pooler is None and model.position_offset_padding_idx == 1
    assert model.embedding.token_type.weight.shape == (1, 768)
    assert model.embedding.position.weight.shape == (514, 768)


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, match", [
    (dict(attention_mask_type="causal"), "attention_mask_type='causal'"),
    (dict(pre_norm=True), "pre_norm=True"),
    (dict(embedding_norm=False), "embedding_norm=False"),
])
def test_bad_configs_raise_naming_the_field(fields, match):
    with pytest.raises(ValueError, match=f"megacore.models.BertModel: {match}"):
        BertModel(encoder_config(**fields))


@pytest.mark.parametrize("kw, match", [
    (dict(head="mlm"), "head='mlm' is not one of nsp, sop"),
    (dict(head="nsp", add_pooler=False), "needs add_pooler=True"),
    (dict(position_offset_padding_idx=-1), "position_offset_padding_idx=-1"),
    (dict(position_offset_padding_idx=V), "position_offset_padding_idx=101"),
])
def test_bad_constructor_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        BertModel(encoder_config(), **kw)


def test_tensor_parallel_before_initialization_raises():
    with pytest.raises(RuntimeError, match="megacore.models.BertModel: tensor_parallel=True"):
        BertModel(encoder_config(tensor_parallel=True))


def test_bad_inputs_raise():
    model = BertModel(encoder_config(max_position_embeddings=S + 2), head=None, position_offset_padding_idx=1)
    ids = torch.randint(2, V, (B, S))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[3, 11\]"):
        model(ids, torch.ones(B, S - 1))
    with pytest.raises(ValueError, match=r"token_type_ids has shape \[12\]"):
        model(ids, token_type_ids=torch.zeros(S, dtype=torch.long))
    with pytest.raises(ValueError, match="no binary head"):
        model(ids, next_sentence_label=torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids has shape"):
        model(ids[0])
    with pytest.raises(ValueError, match="sequence length 14 needs 16 positions"):
        model(torch.randint(2, V, (B, S + 2)))
    unmasked = BertModel(encoder_config(attention_mask_type="none"))
    with pytest.raises(ValueError, match="attention_mask_type is 'none'"):
        unmasked(ids, torch.ones(B, S))


# ---- dtypes and activation checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_backward_in_every_dtype(dtype, device):
    torch.manual_seed(0)
    model = BertModel(encoder_config(params_dtype=dtype, hidden_dropout=0.1, attention_dropout=0.1)).train().to(device)
    ids, mask, types, labels = _inputs(device=device)
    out = model(ids, mask, types, labels=labels, next_sentence_label=torch.tensor([0, 1, 0], device=device))
    assert out.loss.dtype == torch.float32 and out.mlm.dtype == torch.float32
    assert out.hidden.dtype == dtype and out.binary_logits.dtype == dtype
    assert torch.isfinite(out.loss) and 3.0 < out.loss.item() < 8.0  # ~ln(101) + ln(2) at init
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
    logits = model.eval()(ids, mask, types).mlm
    assert logits.shape == (B, S, V) and logits.dtype == dtype


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_gradients(recompute, device):
    ids, mask, types, labels = _inputs(device=device)
    nsp = torch.tensor([1, 0, 1], device=device)
    grads = {}
    for mode in ("none", recompute):
        torch.manual_seed(0)
        model = BertModel(encoder_config(recompute=mode, hidden_dropout=0.1, attention_dropout=0.1)).train().to(device)
        torch.manual_seed(1)  # the same dropout masks in both runs (and the same CUDA generator state)
        model(ids, mask, types, labels=labels, next_sentence_label=nsp).loss.backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads[recompute][name], g, atol=1e-6, rtol=1e-5, msg=name)


# ---- tensor parallelism --------------------------------------------------------------------------------------


def _tensor_parallel_bert(rank, world):
    from megacore.parallel import initialize_model_parallel
    from megacore.parallel.layers import merge_weights
    from megacore.parallel import sum_sequence_parallel_gradients
    from tests.parallel.utils import gather_shards, shard_dims

    group = initialize_model_parallel(world).tensor_parallel_group
    ids, mask, types, labels = _inputs(pad=(0, 2, 5))
    ids, mask, types, labels = ids[:, :8] % 99, mask[:, :8], types[:, :8], labels[:, :8]
    labels = torch.where(labels >= 0, labels % 99, labels)  # vocab 99: padded to 100 for TP=2 and 4
    nsp = torch.tensor([1, 0, 1])
    results = {}
    for tp, sp in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        model = BertModel(encoder_config(vocab_size=99, tensor_parallel=tp, sequence_parallel=sp))
        out = model(ids, mask, types, labels=labels, next_sentence_label=nsp)
        out.loss.backward()
        sum_sequence_parallel_gradients(model)  # what the Trainer does after the last backward
        dims = shard_dims(model, world)
        grads = {n: merge_weights(gather_shards(p.grad, group, world), dims[n])
                 if dims[n] is not None else p.grad for n, p in model.named_parameters()}
        results[tp, sp] = out, grads
    base, base_grads = results[False, False]
    for key in ((True, False), (True, True)):
        out, grads = results[key]
        for field in ("loss", "binary_logits", "pooled", "hidden"):
            torch.testing.assert_close(getattr(out, field), getattr(base, field), atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{field}, tp/sp={key}: {m}")
        for name, g in base_grads.items():
            g_tp = grads[name][: g.shape[0]] if g.shape != grads[name].shape else grads[name]  # padded vocab rows
            torch.testing.assert_close(g_tp, g, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}, tp/sp={key}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_bert_equals_the_whole_model(world):
    run_distributed(_tensor_parallel_bert, world, timeout_s=240, collective_timeout_s=60)


@pytest.mark.parametrize("masked", ["some", "none", "all"])
def test_mlm_head_computed_at_labeled_rows_equals_the_full_cross_entropy_with_gradients(masked):
    """The MLM head forms the logits of the labeled (masked) rows only; loss and every gradient equal a plain
    PyTorch cross-entropy over the full logits (float64), with no labeled row, and with all rows labeled."""
    torch.manual_seed(0)
    config = encoder_config(params_dtype=torch.float64)
    model = BertModel(config)
    ids, mask, types, labels = _inputs()
    labels = {"some": labels, "none": torch.full_like(labels, -100), "all": ids.clone()}[masked]
    out = model(ids, mask, types, labels=labels)
    out.mlm.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits = model(ids, mask, types).mlm  # [b, s, v]: the full head, no labels
    ref = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # 0 at -100
    ref.sum().backward()
    torch.testing.assert_close(out.mlm, ref)
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            torch.testing.assert_close(grads[name], p.grad, msg=name)
        else:
            assert name not in grads or grads[name].abs().sum() == 0, name
