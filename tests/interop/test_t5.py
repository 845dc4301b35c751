"""T5 / T5 v1.1: megacore's T5Model against transformers' T5ForConditionalGeneration (logits and loss on padded
batches, exact weight round trips, safetensors), its errors, and tensor parallelism against one process."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megacore.interop import hf as interop  # noqa: E402
from megacore.models.t5 import T5Config, T5Model  # noqa: E402
from tests.parallel.utils import run_distributed  # noqa: E402

VARIANTS = {
    # T5: ReLU, the tied head scaled by d_model^-0.5; heads of 6 in a 32-wide model (d_kv != d_model / heads)
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # T5 v1.1: GeGLU, its own unscaled head
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _hf(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=101, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, **VARIANTS[variant])
    return transformers.T5ForConditionalGeneration(config).eval()


def _batch(seed: int = 1, source_len: int = 11, target_len: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (3, source_len), generator=g)
    mask = torch.ones(3, source_len, dtype=torch.long)
    mask[1, 7:], mask[2, 4:] = 0, 0  # padded sources
    labels = torch.randint(1, 101, (3, target_len), generator=g)
    labels[2, 4:] = -100  # a padded target
    return ids, mask, labels


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_loss_equal_transformers_on_a_padded_batch(variant):
    hf = _hf(variant)
    model = interop.from_hf(hf)
    assert isinstance(model, T5Model) and model.config.kv_channels == 6
    assert (model.lm_head is None) == (variant == "t5")
    ids, mask, labels = _batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        logits = model(ids, decoder_input_ids=model.shift_right(labels), attention_mask=mask)
        loss = model(ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-4)
    assert loss.shape == labels.shape and bool((loss[labels == -100] == 0).all())
    torch.testing.assert_close(loss.sum() / (labels != -100).sum(), ref.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trips_are_exact(variant, tmp_path):
    hf = _hf(variant)
    model = interop.from_hf(hf)
    back = interop.to_hf(model).state_dict()
    assert set(back) == set(hf.state_dict())
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
    interop.save_hf_safetensors(model, str(tmp_path))
    again = interop.load_hf_safetensors(str(tmp_path))
    assert type(again) is T5Model
    # the init std travels as T5's initializer_factor (std * sqrt(d_model)): equal up to rounding
    assert again.config.init_method_std == pytest.approx(model.config.init_method_std, rel=1e-12)
    assert dataclasses.replace(again.config, init_method_std=model.config.init_method_std) == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_an_untied_head_stays_apart_in_safetensors_and_to_hf_refuses_to_tie_it(tmp_path):
    model = interop.from_hf(_hf("t5_v1_1"))
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    interop.save_hf_safetensors(model, str(tmp_path))
    again = interop.load_hf_safetensors(str(tmp_path))
    assert torch.equal(again.lm_head.weight, model.lm_head.weight) and torch.equal(again.word.weight, model.word.weight)
    if transformers.T5Config(tie_word_embeddings=False).tie_word_embeddings:  # transformers >= 5 always ties
        with pytest.raises(ValueError, match="megacore.interop.hf.to_hf: transformers .* ties .* save_hf_safetensors"):
            interop.to_hf(model)


def test_hf_defaults_are_transformers_defaults():
    from megacore.interop.hf.t5 import HF_DEFAULTS

    defaults = transformers.T5Config().to_dict()
    assert defaults["num_decoder_layers"] == defaults["num_layers"]  # HF fills it in; megacore's None means the same
    assert {k: defaults[k] for k in HF_DEFAULTS if k != "num_decoder_layers"} == \
        {k: v for k, v in HF_DEFAULTS.items() if k != "num_decoder_layers"}


def test_gradients_reach_every_parameter_including_both_bias_tables():
    model = interop.from_hf(_hf("t5_v1_1")).train()
    ids, mask, labels = _batch()
    model(ids, labels=labels, attention_mask=mask).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []


@pytest.mark.parametrize("kw, error, text", [
    (dict(position_embedding_type="rope"), ValueError, "position_embedding_type='rope'; T5 needs 'none'"),
    (dict(relative_attention_num_buckets=0), ValueError, "relative_attention_num_buckets=0 must be an int >= 1"),
    (dict(pre_norm=False), ValueError, "pre_norm=False; T5 needs True"),
])
def test_config_errors(kw, error, text):
    with pytest.raises(error, match=text):
        T5Config(vocab_size=10, hidden_size=8, num_layers=1, num_attention_heads=2, **kw)


def test_bad_calls_name_the_argument():
    model = T5Model(T5Config(vocab_size=10, hidden_size=8, num_layers=1, num_attention_heads=2))
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="T5Model: give decoder_input_ids or labels"):
        model(ids)
    with pytest.raises(ValueError, match=r"T5Model: attention_mask has shape \[2, 4\], expected \[2, 3\]"):
        model(ids, labels=ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"T5Model: decoder_input_ids has batch 1, expected 2"):
        model(ids, decoder_input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="T5Model: config is a ModelConfig, expected a T5Config"):
        from megacore.models import ModelConfig
        T5Model(ModelConfig(vocab_size=10, hidden_size=8, num_layers=1, num_attention_heads=2))


def _tensor_parallel_check(rank, world, sequence_parallel):
    from megacore.parallel import destroy_model_parallel, get_tensor_parallel_group, initialize_model_parallel
    from megacore.parallel.sharding import ParallelPlan, gather_full, param_shards

    initialize_model_parallel(world)
    hf = _hf("t5_v1_1")
    whole = interop.from_hf(hf).train()
    part = interop.from_hf(hf, tensor_parallel=True, sequence_parallel=sequence_parallel).train()
    ids, mask, labels = _batch(source_len=12)  # sequence parallelism splits both lengths over the 2 ranks
    for m in (whole, part):
        m.config.hidden_dropout = m.config.attention_dropout = 0.0  # compare without dropout
    loss_whole = whole(ids, labels=labels, attention_mask=mask)
    loss_part = part(ids, labels=labels, attention_mask=mask)
    torch.testing.assert_close(loss_part, loss_whole, rtol=1e-5, atol=1e-5)
    loss_whole.sum().backward()
    loss_part.sum().backward()
    if sequence_parallel:
        from megacore.parallel import sum_sequence_parallel_gradients
        sum_sequence_parallel_gradients(ParallelPlan(part))
    shards = {s.name: s for s in param_shards(part, world)}
    group = get_tensor_parallel_group()
    full_grads = dict(whole.named_parameters())
    for name, p in part.named_parameters():  # the plan's one gather, every rank in the same order
        merged = gather_full(shards[name], p.grad, group)
        torch.testing.assert_close(merged, full_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    destroy_model_parallel()


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_2_equals_one_process(sequence_parallel):
    run_distributed(_tensor_parallel_check, 2, sequence_parallel)


@pytest.mark.parametrize("preset, hf_name", [("t5-small", "t5-small"), ("t5-base", "t5-base"),
                                             ("t5-v1_1-small", "google/t5-v1_1-small"),
                                             ("t5-v1_1-base", "google/t5-v1_1-base")])
def test_presets_have_the_published_models_parameter_counts(preset, hf_name):
    """Built on the meta device; the counts of the published checkpoints (t5-small 60.5 M, t5-base 223 M, v1.1
    small 77 M and base 248 M, embeddings included once)."""
    from megacore.models import build

    expected = {"t5-small": 60_506_624, "t5-base": 222_903_552, "google/t5-v1_1-small": 76_961_152,
                "google/t5-v1_1-base": 247_577_856}[hf_name]
    model = build(preset, device="meta")
    assert isinstance(model, T5Model)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_the_full_forward_and_greedy_equals_transformers(variant):
    hf = _hf(variant)
    model = interop.from_hf(hf)
    ids, mask, labels = _batch()
    decoder_ids = model.shift_right(labels.clamp(min=0))  # [3, 6]
    with torch.no_grad():
        full = model(ids, decoder_input_ids=decoder_ids, attention_mask=mask).float()  # [3, 6, vocab]
        memory = model.encode(ids, mask)
    cache = model.new_cache(3, 8, memory_len=ids.shape[1])
    got = [model.forward_with_cache(decoder_ids[:, :3], cache, memory, mask, all_logits=True)]  # a prefix, then steps
    for t in range(3, 6):
        got.append(model.forward_with_cache(decoder_ids[:, t:t + 1], cache, attention_mask=mask, all_logits=True))
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=0, atol=2e-5)

    # greedy decoding with the cache picks transformers' tokens
    cache = model.new_cache(3, 6, memory_len=ids.shape[1])
    token = torch.zeros(3, 1, dtype=torch.long)  # decoder_start_token_id
    tokens = []
    for step in range(5):
        logits = model.forward_with_cache(token, cache, memory if step == 0 else None, mask)
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
    # transformers' greedy choice at each step, from its full forward over the prefix (its generate() cannot
    # build a cache for a decoder deeper than the encoder, as this one is)
    prefix = torch.zeros(3, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(5):
            logits = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=prefix).logits[:, -1]
            prefix = torch.cat([prefix, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(torch.cat(tokens, 1), prefix[:, 1:])


def test_cached_decoding_errors():
    model = interop.from_hf(_hf("t5"))
    ids, mask, _ = _batch()
    memory = model.encode(ids, mask).detach()
    cache = model.new_cache(3, 4, memory_len=11)
    start = torch.zeros(3, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="pass memory with the first call"):
        model.forward_with_cache(start, cache, None, mask)
    model.forward_with_cache(start, cache, memory, mask)
    with pytest.raises(ValueError, match="pass memory with the first call .* and only then"):
        model.forward_with_cache(start, cache, memory, mask)
    with pytest.raises(ValueError, match="decoder_input_ids has batch 2, expected 3"):
        model.forward_with_cache(start[:2], cache, None, mask)
    with pytest.raises(ValueError, match="KVCache: the stack's layers attend to a memory: give memory_len"):
        model.new_cache(3, 4, memory_len=0)


def test_a_new_t5_model_has_t5s_initialization():
    """T5's (Mesh TensorFlow's, transformers' _init_weights) per-tensor standard deviations, v1.1 too."""
    from megacore.models.registry import build

    for preset in ("t5-tiny", "t5-v1_1-tiny"):
        torch.manual_seed(0)
        model = build(preset, vocab_size=4000)
        c = model.config
        h, d, heads, f = c.hidden_size, c.kv_channels, c.num_attention_heads, c.ffn_hidden_size

        def std(t):
            return float(t.float().std())

        expected = {"word": (model.word.weight, 1.0), "bias": (model.encoder_bias.weight, h ** -0.5)}
        if model.lm_head is not None:
            expected["lm_head"] = (model.lm_head.weight, 1.0)
        layer = model.decoder.layer(0)
        qkv = layer.attention.qkv.weight.view(heads, 3, d, h)
        expected.update(q=(qkv[:, 0], (h * d) ** -0.5), kv=(qkv[:, 1:], h ** -0.5),
                        o=(layer.attention.proj.weight, (heads * d) ** -0.5),
                        cross_q=(layer.cross_attention.q.weight, (h * d) ** -0.5),
                        cross_kv=(layer.cross_attention.kv.weight, h ** -0.5),
                        wi=(layer.mlp.fc1.weight, h ** -0.5), wo=(layer.mlp.fc2.weight, f ** -0.5))
        for name, (tensor, target) in expected.items():
            assert std(tensor) == pytest.approx(target, rel=0.1), (preset, name)
