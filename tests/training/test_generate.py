"""megacore.training.generate: decoding with a KV cache gives the full forward's logits at every position
(learned positions, RoPE, sliding window, post-LN/RMSNorm), greedy decoding is the repeated argmax of the full
forward, sampling is seeded and restricted by top-k / top-p, and tensor-parallel 2 generates what size 1 does.
The single-process tests run on every device present (the ``device`` fixture); sampling draws from a CPU
generator whatever the device (generate moves the probabilities to the CPU), so a seed fixes the tokens on
each device."""

import pytest
import torch

from megacore.models import GPTModel, ModelConfig
from megacore.training.generate import filter_logits, forward_with_cache, generate, new_cache
from tests.parallel.utils import run_distributed

VOCAB = 97


def _model(device="cpu", **overrides) -> GPTModel:
    """Built on the CPU from seed 0, then moved to ``device``."""
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, max_position_embeddings=32)
    return GPTModel(ModelConfig(**{**fields, **overrides})).eval().to(device)


VARIANTS = {
    "learned_positions": dict(),
    "rope": dict(position_embedding_type="rope"),
    "rope_partial": dict(position_embedding_type="rope", rotary_percent=0.5),
    "sliding_window": dict(attention_mask_type="sliding_window", window_size=3),
    "rope_sliding_window": dict(position_embedding_type="rope", attention_mask_type="sliding_window", window_size=4),
    "rmsnorm_no_bias_gelu": dict(normalization="rmsnorm", add_bias_linear=False, activation="gelu"),
    "post_norm": dict(pre_norm=False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_step_logits_equal_full_forward_at_each_position(variant, device):
    model = _model(device, **VARIANTS[variant])
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        full = model(ids)  # [2, 12, vocab]
    cache = new_cache(model, 2, 12)
    prefill = forward_with_cache(model, ids[:, :5], cache, all_logits=True)
    torch.testing.assert_close(prefill, full[:, :5], atol=1e-5, rtol=0)
    for t in range(5, 12):
        step = forward_with_cache(model, ids[:, t:t + 1], cache)  # [2, vocab]
        torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=0, msg=lambda m: f"position {t}: {m}")
    assert cache.length == 12


def test_greedy_equals_repeated_argmax_of_full_forward(device):
    for variant in ("learned_positions", "rope_sliding_window"):
        model = _model(device, **VARIANTS[variant])
        prompt = [5, 17, 3, 42]
        got = generate(model, prompt, max_new_tokens=10, greedy=True)
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                seq.append(int(model(torch.tensor([seq], device=device))[0, -1].argmax()))
        assert got == seq[len(prompt):], variant


def test_batch_greedy_equals_each_prompt_alone(device):
    model = _model(device, position_embedding_type="rope")
    prompts = torch.tensor([[1, 2, 3], [40, 50, 60]], device=device)
    batch = generate(model, prompts, max_new_tokens=6, greedy=True)
    assert batch.shape == (2, 6) and batch.device == prompts.device
    for row, prompt in zip(batch, prompts):
        assert row.tolist() == generate(model, prompt.tolist(), max_new_tokens=6, greedy=True)
    from_cpu = generate(model, prompts.cpu(), max_new_tokens=6, greedy=True)  # tokens come back where the prompt was
    assert from_cpu.device.type == "cpu" and torch.equal(from_cpu, batch.cpu())
    assert generate(model, prompts.cpu(), max_new_tokens=0).device.type == "cpu"


def test_sampling_is_deterministic_for_a_seed_and_streams_each_token(device):
    model = _model(device)
    streamed = []
    a = generate(model, [1, 2, 3], 12, temperature=1.5, seed=7, stream=streamed.append)
    b = generate(model, [1, 2, 3], 12, temperature=1.5, seed=7)
    c = generate(model, [1, 2, 3], 12, temperature=1.5, seed=8)
    assert a == b == streamed and len(a) == 12
    assert a != c


def test_top_k_and_top_p_restrict_the_support(device):
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]], device=device))
    keep_k = torch.isfinite(filter_logits(logits, top_k=2))[0].tolist()
    assert keep_k == [False, True, False, True, False]
    # nucleus 0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; 0.85 >= 0.75 stops there
    keep_p = torch.isfinite(filter_logits(logits, top_p=0.75))[0].tolist()
    assert keep_p == [False, True, False, True, True]
    keep_tiny_p = torch.isfinite(filter_logits(logits, top_p=0.01))[0].tolist()
    assert keep_tiny_p == [False, True, False, False, False]  # the most likely token always stays

    model = _model(device)
    with torch.no_grad():
        cache = new_cache(model, 1, 4)
        last = forward_with_cache(model, torch.tensor([[1, 2, 3]], device=device), cache)  # [1, vocab]
        top3 = set(last[0].topk(3).indices.tolist())
    first = {generate(model, [1, 2, 3], 1, top_k=3, temperature=5.0, seed=s)[0] for s in range(40)}
    assert first <= top3 and len(first) > 1
    assert {generate(model, [1, 2, 3], 1, top_p=1e-6, seed=s)[0] for s in range(5)} == {
        generate(model, [1, 2, 3], 1, greedy=True)[0]}


def test_eos_stops_generation_and_pads_finished_rows(device):
    model = _model(device)
    greedy = generate(model, [5, 17, 3, 42], 8, greedy=True)
    eos = greedy[2]
    stop = greedy.index(eos)
    assert generate(model, [5, 17, 3, 42], 8, greedy=True, eos_id=eos) == greedy[:stop + 1]


def test_dropout_is_off_even_in_training_mode(device):
    model = _model(device, hidden_dropout=0.5, attention_dropout=0.5)
    expected = generate(model, [1, 2, 3], 6, greedy=True)
    model.train()
    assert generate(model, [1, 2, 3], 6, greedy=True) == expected


def test_bad_arguments_name_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1], -1)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [1], 2, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [1], 2, top_k=-3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 2, top_p=0.0)
    with pytest.raises(ValueError, match="prompt_ids hold 97"):
        generate(model, [1, 97], 2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [], 2)
    with pytest.raises(TypeError, match="integer dtype"):
        generate(model, torch.tensor([1.0, 2.0]), 2)
    with pytest.raises(ValueError, match="max_position_embeddings=32"):
        generate(model, [1] * 30, 5)
    with pytest.raises(ValueError, match="eos_id"):
        generate(model, [1], 2, eos_id=1000)
    with pytest.raises(TypeError, match="GPTModel"):
        generate(torch.nn.Linear(2, 2), [1], 2)
    assert generate(model, [1, 2], 0) == []


def _tp_generation(rank, world):
    from megacore.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(world)
    try:
        for rope in (False, True):
            results = []
            for tensor_parallel in (False, True):
                # vocab 97 does not divide by 2: the padded logits must never be drawn
                model = _model(tensor_parallel=tensor_parallel, sequence_parallel=tensor_parallel and rope,
                               position_embedding_type="rope" if rope else "learned_absolute")
                ids = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
                cache = new_cache(model, 2, 9)
                logits = [forward_with_cache(model, ids, cache)]
                logits += [forward_with_cache(model, ids[:, i:i + 1], cache) for i in range(4)]
                greedy = generate(model, ids, 8, greedy=True)
                sampled = generate(model, ids, 8, temperature=1.3, top_k=20, top_p=0.9, seed=5)
                results.append((torch.stack(logits), greedy, sampled))
            (l1, g1, s1), (l2, g2, s2) = results
            torch.testing.assert_close(l2, l1, atol=2e-5, rtol=0)
            assert torch.equal(g1, g2) and torch.equal(s1, s2), (rope, g1, g2, s1, s2)
    finally:
        destroy_model_parallel()


def test_tensor_parallel_2_generates_what_size_1_does():
    run_distributed(_tp_generation, 2, timeout_s=90)


def test_compiled_decoding_equals_eager_without_a_graph_per_position():
    """torch.compile of the decoding step: the cache position stays symbolic (the op takes a SymInt), so the
    prompt and the steps compile once each (RoPE: once more, the first step fills the layer's table cache), not
    once per position; and the logits are eager's."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # other tests' graphs
    for variant, most_graphs in (("learned_positions", 2), ("rope", 3)):
        model = _model(**VARIANTS[variant])
        compiled = torch.compile(model.forward_with_cache)
        ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
        eager_cache, compiled_cache = new_cache(model, 2, 20), new_cache(model, 2, 20)
        torch.testing.assert_close(compiled(ids, compiled_cache), model.forward_with_cache(ids, eager_cache))
        for t in range(10):
            step = ids[:, t % 6:t % 6 + 1]
            torch.testing.assert_close(compiled(step, compiled_cache), model.forward_with_cache(step, eager_cache),
                                       atol=1e-5, rtol=1e-5)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs <= most_graphs, (variant, graphs)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
