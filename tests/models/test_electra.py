"""ElectraModel: generator and discriminator equal to Hugging Face's given the same (shared-embedding) weights;
the discriminator's labels are exactly "token differs from the original"; no gradient reaches the generator
through the sampled tokens; the loss; presets; clear errors; every dtype; activation checkpointing; tensor
parallelism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megacore.models import ElectraDiscriminatorModel, ElectraModel
from megacore.models.electra import electra_generator_config, replaced_token_loss
from megacore.models.registry import build, preset_config
from tests.models.bert_utils import (encoder_config, hf_embeddings, hf_encoder, load_exactly, prefixed,
                                     right_padding_mask)
from tests.parallel.utils import run_distributed

transformers = pytest.importorskip("transformers")

B, S, V, MASK_ID = 3, 12, 101, 4


def _config(**kw):
    """Discriminator: embedding 16 -> hidden 32; generator (1/4): hidden 8, one head, FFN 16: both project."""
    return encoder_config(embedding_size=16, **kw)


def _batch(seed: int = 0, pad=(0, 3, 5), rate: float = 0.3, device="cpu"):
    """(input_ids with MASK_ID at masked positions, attention_mask, token types, mlm_labels, original ids), drawn
    on the CPU from ``seed`` and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    original = torch.randint(5, V, (B, S), generator=g)
    attention = right_padding_mask(B, S, pad)
    masked = (torch.rand(B, S, generator=g) < rate) & attention.bool()
    masked[:, 0] = True  # every row has a masked token
    labels = torch.where(masked, original, torch.full_like(original, -100))
    types = (torch.arange(S) >= S // 2).long().expand(B, S).clone()
    ids = torch.where(masked, torch.full_like(original, MASK_ID), original)
    return tuple(t.to(device) for t in (ids, attention, types, labels, original))


def _hf_config(config, **kw):
    return transformers.ElectraConfig(
        vocab_size=config.vocab_size, embedding_size=config.embedding_dim, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        intermediate_size=config.ffn_hidden_size, max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.type_vocab_size, layer_norm_eps=config.norm_epsilon, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **kw)


def _trunk(sd: dict, c) -> dict:
    out = prefixed("encoder.", hf_encoder(sd, "electra.encoder.", c.num_layers, c.num_attention_heads))
    if "electra.embeddings_project.weight" in sd:
        out["projection.weight"] = sd["electra.embeddings_project.weight"]
        out["projection.bias"] = sd["electra.embeddings_project.bias"]
    return out


def _hf_pair(model: ElectraModel):
    """HF's ElectraForMaskedLM (generator) and ElectraForPreTraining (discriminator), the generator's
    embeddings set to the discriminator's (shared), and their weights loaded into ``model``."""
    disc = transformers.ElectraForPreTraining(_hf_config(model.config)).eval()
    gen = transformers.ElectraForMaskedLM(_hf_config(model.generator_config)).eval()
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    assert gen.generator_lm_head.weight is gen.electra.embeddings.word_embeddings.weight  # tied in HF too
    g, d = gen.state_dict(), disc.state_dict()
    load_exactly(model, {
        **prefixed("embedding.", hf_embeddings(d, "electra.embeddings.")),
        **prefixed("generator.", _trunk(g, model.generator_config)),
        "generator.mlm_head.dense.weight": g["generator_predictions.dense.weight"],
        "generator.mlm_head.dense.bias": g["generator_predictions.dense.bias"],
        "generator.mlm_head.norm.weight": g["generator_predictions.LayerNorm.weight"],
        "generator.mlm_head.norm.bias": g["generator_predictions.LayerNorm.bias"],
        "generator.mlm_head.bias": g["generator_lm_head.bias"],
        **prefixed("discriminator.", _trunk(d, model.config)),
        **{f"discriminator.head.{n}.{k}": d[f"discriminator_predictions.{n}.{k}"]
           for n in ("dense", "dense_prediction") for k in ("weight", "bias")},
    })
    return gen, disc


# ---- against Hugging Face -------------------------------------------------------------------------------
# Hugging Face's models stay on the CPU (the reference); megacore's runs on ``device``. A CUDA loss may differ
# from the CPU's in the summation order of its GEMMs: 1e-4 relative there, the CPU's 1e-5 here.


def _loss_tolerance(device) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if device == "cpu" else dict(atol=1e-5, rtol=1e-4)


def test_generator_and_discriminator_match_hf_electra(device):
    torch.manual_seed(0)
    model = ElectraModel(_config()).eval()
    assert model.generator.projection is not None and model.discriminator.projection is not None
    gen, disc = _hf_pair(model)
    model = model.to(device)
    ids, attention, types, _, original = _batch()
    replaced = (original != ids).long()
    on_device = [t.to(device) for t in (ids, attention, types)]
    with torch.no_grad():
        torch.testing.assert_close(model.generator_logits(*on_device).cpu(),
                                   gen(input_ids=ids, attention_mask=attention, token_type_ids=types).logits,
                                   atol=1e-4, rtol=1e-4)
        ours = model.discriminator_model()(*on_device, labels=replaced.to(device))
        ref = disc(input_ids=ids, attention_mask=attention, token_type_ids=types, labels=replaced)
    torch.testing.assert_close(ours.logits.cpu(), ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.loss.cpu(), ref.loss, **_loss_tolerance(device))


def test_generator_loss_is_hf_masked_lm_loss_and_total_is_generator_plus_lambda_discriminator(device):
    torch.manual_seed(0)
    model = ElectraModel(_config(), discriminator_weight=50.0).eval()
    gen, _ = _hf_pair(model)
    model = model.to(device)
    ids, attention, types, labels, _ = _batch()
    d_ids, d_attention, d_types, d_labels = (t.to(device) for t in (ids, attention, types, labels))
    with torch.no_grad():
        out = model(d_ids, d_attention, d_types, mlm_labels=d_labels)
        ref = gen(input_ids=ids, attention_mask=attention, token_type_ids=types, labels=labels).loss
        disc = model.discriminator_model()(out.sampled_ids, d_attention, d_types, labels=out.discriminator_labels)
    torch.testing.assert_close(out.generator_loss.cpu(), ref, **_loss_tolerance(device))
    torch.testing.assert_close(out.discriminator_logits, disc.logits)
    torch.testing.assert_close(out.discriminator_loss, disc.loss)
    torch.testing.assert_close(out.loss, out.generator_loss + 50.0 * out.discriminator_loss)


# ---- sampling and labels --------------------------------------------------------------------------------------


def test_discriminator_labels_are_exactly_token_differs_from_original(device):
    # the samples come from the device's generator: not the CPU's tokens on CUDA, but the same rules
    torch.manual_seed(0)
    model = ElectraModel(_config()).to(device)
    ids, attention, types, labels, original = _batch(device=device)
    masked = labels != -100
    out = model(ids, attention, types, mlm_labels=labels)
    assert out.sampled_ids.dtype == torch.long and not out.sampled_ids.requires_grad
    assert torch.equal(out.sampled_ids[~masked], ids[~masked])  # only masked positions are replaced
    assert ((out.sampled_ids >= 0) & (out.sampled_ids < V)).all()
    assert torch.equal(out.discriminator_labels, out.sampled_ids != original)
    assert out.discriminator_labels.dtype == torch.bool

    # A generator that puts all its mass on one token: masked positions holding that token originally are
    # "original" (label False) although they were masked; all the others are "replaced".
    token = 7
    original[:, 1] = token
    labels[:, 1] = token
    ids[:, 1] = MASK_ID
    masked = labels != -100
    with torch.no_grad():
        model.generator.mlm_head.bias.fill_(-1e4)
        model.generator.mlm_head.bias[token] = 1e4
    out = model(ids, attention, types, mlm_labels=labels)
    assert torch.equal(out.sampled_ids, torch.where(masked, torch.full_like(ids, token), ids))
    assert torch.equal(out.discriminator_labels, masked & (original != token))
    assert not out.discriminator_labels[:, 1].any()


def test_sampling_follows_the_generator_distribution():
    torch.manual_seed(0)
    model = ElectraModel(_config())
    with torch.no_grad():  # mass 0.75 / 0.25 on two tokens
        model.generator.mlm_head.bias.fill_(-1e4)
        model.generator.mlm_head.bias[10] = 0.0
        model.generator.mlm_head.bias[11] = -torch.log(torch.tensor(3.0))
        model.generator.mlm_head.dense.weight.zero_()  # features no longer depend on the input
        model.generator.mlm_head.norm.weight.zero_()
    ids = torch.full((64, 8), MASK_ID)
    labels = torch.full((64, 8), 12)
    out = model(ids, mlm_labels=labels)
    share = (out.sampled_ids == 10).float().mean().item()
    assert set(out.sampled_ids.unique().tolist()) == {10, 11} and abs(share - 0.75) < 0.06


def test_generator_gets_no_gradient_from_the_discriminator_loss(device):
    torch.manual_seed(0)
    model = ElectraModel(_config(hidden_dropout=0.1, attention_dropout=0.1)).train().to(device)
    ids, attention, types, labels, _ = _batch(device=device)
    out = model(ids, attention, types, mlm_labels=labels)
    generator_only = dict(model.generator.named_parameters())
    shared = dict(model.embedding.named_parameters())
    params = list(generator_only.values()) + list(shared.values())
    from_discriminator = torch.autograd.grad(out.discriminator_loss, params, allow_unused=True, retain_graph=True)
    for name, g in zip(generator_only, from_discriminator):
        assert g is None, f"generator.{name} receives a gradient from the discriminator loss"
    # not vacuous: the discriminator loss does train the shared embedding, the generator loss the generator
    assert all(g is not None and g.abs().sum() > 0 for g in from_discriminator[len(generator_only):])
    from_generator = torch.autograd.grad(out.generator_loss, list(generator_only.values()), allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in from_generator)

    # and so with the generator's loss weighted 0, the generator's parameters get no gradient at all
    model.zero_grad(set_to_none=True)
    out = model(ids, attention, types, mlm_labels=labels)
    (model.discriminator_weight * out.discriminator_loss).backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())


def test_discriminator_loss_ignores_padding():
    logits = torch.tensor([[2.0, -1.0, 30.0]])
    labels = torch.tensor([[True, False, False]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], labels[:, :2].float())
    torch.testing.assert_close(replaced_token_loss(logits, labels, torch.tensor([[1, 1, 0]])), expected)


# ---- the discriminator alone ---------------------------------------------------------------------------------


def test_discriminator_model_shares_parameters_and_stands_alone(device):
    torch.manual_seed(0)
    model = ElectraModel(_config()).to(device)
    alone = model.discriminator_model()
    ours = dict(alone.named_parameters())
    full = dict(model.named_parameters())
    assert set(ours) == {k for k in full if not k.startswith("generator.")}
    assert all(p is full[name] for name, p in ours.items())
    fresh = ElectraDiscriminatorModel(_config()).to(device)
    fresh.load_state_dict(alone.state_dict())
    ids, attention, types, _, _ = _batch(device=device)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids, attention, types).logits, alone.eval()(ids, attention, types).logits)
        assert alone(ids, attention, types).hidden.shape == (B, S, 32)


# ---- presets and configs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, generator", [("electra-small", (64, 1, 256)), ("electra-base", (256, 4, 1024))])
def test_presets_have_the_paper_shapes_and_hf_parameter_counts(name, generator):
    model = build(name, device="meta")
    g = model.generator_config
    assert (g.hidden_size, g.num_attention_heads, g.ffn_hidden_size) == generator
    assert g.embedding_dim == model.config.embedding_dim == (128 if name == "electra-small" else 768)
    with torch.device("meta"):
        disc = transformers.ElectraForPreTraining(_hf_config(model.config))
        gen = transformers.ElectraForMaskedLM(_hf_config(g))
    shared = sum(p.numel() for p in gen.electra.embeddings.parameters())
    expected = sum(p.numel() for p in disc.parameters()) + sum(p.numel() for p in gen.parameters()) - shared
    assert sum(p.numel() for p in model.parameters()) == expected


def test_electra_small_discriminator_is_hf_electra_small():
    c = preset_config("electra-small")
    shape = (c.embedding_dim, c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_hidden_size)
    assert shape == (128, 256, 12, 4, 1024)
    assert (c.vocab_size, c.max_position_embeddings, c.type_vocab_size, c.norm_epsilon) == (30522, 512, 2, 1e-12)


def test_generator_config_scales_hidden_heads_and_ffn():
    g = electra_generator_config(_config(), 0.5)
    assert (g.hidden_size, g.num_attention_heads, g.ffn_hidden_size, g.embedding_dim) == (16, 2, 32, 16)
    with pytest.raises(ValueError, match=r"electra_generator_config: size=0 must be in \(0, 1\]"):
        electra_generator_config(_config(), 0)


@pytest.mark.parametrize("generator_fields, match", [
    (dict(vocab_size=99), "generator_config.vocab_size=99 differs from the discriminator's 101"),
    (dict(embedding_size=8), "generator_config.embedding_dim=8 differs"),
    (dict(type_vocab_size=1), "generator_config.type_vocab_size=1 differs"),
    (dict(params_dtype=torch.bfloat16), "generator_config.params_dtype=torch.bfloat16 differs"),
    (dict(attention_mask_type="none"), "generator_config.attention_mask_type='none' differs"),
    (dict(pre_norm=True), r"ElectraModel \(generator_config\): pre_norm=True"),
])
def test_mismatched_generator_configs_raise(generator_fields, match):
    generator = dataclasses.replace(electra_generator_config(_config(), 0.25), **generator_fields)
    with pytest.raises(ValueError, match=match):
        ElectraModel(_config(), generator)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ElectraModel: pre_norm=True"):
        ElectraModel(_config(pre_norm=True))
    with pytest.raises(ValueError, match="discriminator_weight=-1"):
        ElectraModel(_config(), discriminator_weight=-1)
    with pytest.raises(ValueError, match=r"size=1.5 must be in \(0, 1\]"):
        ElectraModel(_config(), generator_size=1.5)
    with pytest.raises(RuntimeError, match="ElectraModel: tensor_parallel=True"):
        ElectraModel(_config(tensor_parallel=True))
    model = ElectraModel(_config())
    ids, attention, types, labels, _ = _batch()
    with pytest.raises(ValueError, match="forward needs mlm_labels"):
        model(ids, attention)
    with pytest.raises(ValueError, match=r"mlm_labels has shape \[3, 11\]"):
        model(ids, attention, mlm_labels=labels[:, 1:])
    with pytest.raises(ValueError, match="mlm_labels hold ids outside"):
        model(ids, attention, mlm_labels=labels.masked_fill(labels >= 0, V))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[3\]"):
        model(ids, attention[:, 0], mlm_labels=labels)


# ---- dtypes and activation checkpointing -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_forward_backward_in_every_dtype(dtype, device):
    torch.manual_seed(0)
    model = ElectraModel(_config(params_dtype=dtype, hidden_dropout=0.1, attention_dropout=0.1)).train().to(device)
    ids, attention, types, labels, _ = _batch(device=device)
    out = model(ids, attention, types, mlm_labels=labels)
    assert out.loss.dtype == torch.float32 and out.discriminator_logits.dtype == dtype
    assert torch.isfinite(out.loss) and 3.0 < out.generator_loss.item() < 6.0  # ~ln(101) at init
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_gradients(recompute, device):
    ids, attention, types, labels, _ = _batch(device=device)
    runs = {}
    for mode in ("none", recompute):
        torch.manual_seed(0)
        model = ElectraModel(_config(recompute=mode, hidden_dropout=0.1, attention_dropout=0.1)).train().to(device)
        torch.manual_seed(1)  # the same dropout masks and samples in both runs (it seeds CUDA's generator too)
        out = model(ids, attention, types, mlm_labels=labels)
        out.loss.backward()
        runs[mode] = out.sampled_ids, {n: p.grad for n, p in model.named_parameters()}
    assert torch.equal(runs[recompute][0], runs["none"][0])
    for name, g in runs["none"][1].items():
        torch.testing.assert_close(runs[recompute][1][name], g, atol=1e-6, rtol=1e-5, msg=name)


# ---- tensor parallelism --------------------------------------------------------------------------------------


def _tensor_parallel_electra(rank, world):
    from megacore.parallel import initialize_model_parallel
    from megacore.parallel.layers import merge_weights
    from megacore.parallel import sum_sequence_parallel_gradients
    from tests.parallel.utils import gather_shards, shard_dims

    group = initialize_model_parallel(world).tensor_parallel_group
    ids, attention, types, labels, _ = _batch(pad=(0, 2, 4))
    ids, attention, types, labels = ids[:, :8] % 99, attention[:, :8], types[:, :8], labels[:, :8]
    labels = torch.where(labels >= 0, labels % 99, labels)  # vocab 99: padded to 100 for TP=2 and 4
    results = {}
    for tp, sp in ((False, False), (True, False), (True, True)):
        torch.manual_seed(0)
        # the generator's heads must divide by tp: half the discriminator at tp=2, all of it at tp=4
        model = ElectraModel(_config(vocab_size=99, tensor_parallel=tp, sequence_parallel=sp),
                             generator_size=0.5 if world == 2 else 1.0)
        torch.manual_seed(1)
        out = model(ids, attention, types, mlm_labels=labels)
        out.loss.backward()
        sum_sequence_parallel_gradients(model)  # what the Trainer does after the last backward
        dims = shard_dims(model, world)
        grads = {n: merge_weights(gather_shards(p.grad, group, world), dims[n])
                 if dims[n] is not None else p.grad for n, p in model.named_parameters()}
        results[tp, sp] = out, grads
    base, base_grads = results[False, False]
    for key in ((True, False), (True, True)):
        out, grads = results[key]
        assert torch.equal(out.sampled_ids, base.sampled_ids), f"samples, tp/sp={key}"
        for field in ("loss", "generator_loss", "discriminator_loss", "discriminator_logits"):
            torch.testing.assert_close(getattr(out, field), getattr(base, field), atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{field}, tp/sp={key}: {m}")
        for name, g in base_grads.items():
            g_tp = grads[name][: g.shape[0]]  # the padded vocab rows
            torch.testing.assert_close(g_tp, g, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}, tp/sp={key}: {m}")


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_electra_equals_the_whole_model(world):
    run_distributed(_tensor_parallel_electra, world, timeout_s=240, collective_timeout_s=60)
