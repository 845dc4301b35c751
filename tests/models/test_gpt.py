"""GPTModel in one process: shapes, causality, the loss, activation checkpointing, dtypes, presets, errors.
Tensor-parallel equality is in tests/parallel/test_models.py; Hugging Face equality in tests/interop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megacore.models import GPTModel, ModelConfig
from megacore.models.registry import PRESETS, build

dtype_ids = lambda d: str(d).removeprefix("torch.")  # noqa: E731


def _config(**kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=48, num_layers=2, num_attention_heads=4, max_position_embeddings=40,
                hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("kw", [dict(), dict(position_embedding_type="rope"),
                                dict(attention_mask_type="sliding_window", window_size=4)],
                         ids=["learned", "rope", "sliding_window"])
def test_future_tokens_never_change_past_logits(kw, device):
    torch.manual_seed(0)
    model = GPTModel(_config(**kw)).eval().to(device)
    ids = torch.randint(0, 97, (2, 20)).to(device)
    logits = model(ids)
    assert logits.shape == (2, 20, 97)
    for cut in (1, 7, 19):
        changed = ids.clone()
        changed[:, cut:] = torch.randint(0, 97, changed[:, cut:].shape).to(device)
        torch.testing.assert_close(model(changed)[:, :cut], logits[:, :cut], atol=0, rtol=0)


def test_loss_is_cross_entropy_of_the_logits_with_ignored_labels(device):
    torch.manual_seed(0)
    model = GPTModel(_config()).eval().to(device)
    ids = torch.randint(0, 97, (3, 12)).to(device)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    loss = model(ids, labels=labels)
    expected = F.cross_entropy(model(ids).double().flatten(0, 1), labels.flatten(), reduction="none").view(3, 12)
    assert loss.dtype == torch.float32 and loss.shape == (3, 12)
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    assert (loss[:, -1] == 0).all()


def test_word_embedding_is_tied_to_the_output():
    torch.manual_seed(0)
    model = GPTModel(_config())
    ids = torch.randint(0, 97, (2, 8))
    model(ids, labels=ids).mean().backward()
    names = [n for n, _ in model.named_parameters()]
    assert "embedding.word.weight" in names and not any("lm_head" in n for n in names)
    grad = model.embedding.word.weight.grad
    assert grad is not None and (grad.abs().sum(1) > 0).sum() > ids.unique().numel()  # the head touches every row


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_gradients(recompute, device):
    torch.manual_seed(0)
    plain = GPTModel(_config(hidden_dropout=0.1, attention_dropout=0.1))
    other = GPTModel(_config(hidden_dropout=0.1, attention_dropout=0.1, recompute=recompute))
    other.load_state_dict(plain.state_dict())
    plain, other = plain.to(device), other.to(device)
    ids = torch.randint(0, 97, (2, 16)).to(device)
    grads = []
    for model in (plain, other):
        torch.manual_seed(5)  # the same dropout masks (seeds are drawn from the CPU generator)
        loss = model(ids, labels=ids).mean()
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=0, rtol=0)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_ids)
def test_trains_in_each_dtype(dtype, device):
    """A few SGD steps on one batch lower the loss, in every dtype."""
    torch.manual_seed(0)
    model = GPTModel(_config(params_dtype=dtype, position_embedding_type="rope")).to(device)
    ids = torch.randint(0, 97, (4, 16)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.5 if dtype == torch.float32 else 1.0)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=torch.roll(ids, -1, 1)).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.dtype == dtype for p in model.parameters())
    assert losses[-1] < losses[0] - 0.05, losses


def test_presets_build_with_the_published_sizes():
    assert {"gpt-tiny", "gpt2-small", "gpt2-medium"} <= set(PRESETS)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    small, medium = build("gpt2-small", device="meta"), build("gpt2-medium", device="meta")
    assert all(p.device.type == "meta" for p in medium.parameters())  # nothing allocated
    assert count(small) == 124_439_808  # GPT-2 small, tied embeddings (HF's count)
    assert count(medium) == 354_823_168  # GPT-2 medium ("345M" in Megatron's naming)
    tiny = build("gpt-tiny", num_layers=1, vocab_size=1000)  # overrides
    assert len(tiny.decoder.layers) == 1 and tiny.embedding.word.weight.shape == (1000, 256)


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match="megacore.models.build: unknown preset 'gpt5'"):
        build("gpt5")
    with pytest.raises(ValueError, match="hidden_size=50 is not divisible by num_attention_heads=4"):
        _config(hidden_size=50)
    with pytest.raises(ValueError, match="megacore.models.ModelConfig: recompute='some' is not one of"):
        _config(recompute="some")
    with pytest.raises(ValueError, match="GPTModel: attention_mask_type='padding'; a causal LM needs"):
        GPTModel(_config(attention_mask_type="padding"))
    with pytest.raises(RuntimeError, match="GPTModel: tensor_parallel=True but model parallel is not initialized"):
        GPTModel(_config(tensor_parallel=True))
    model = GPTModel(_config())
    with pytest.raises(ValueError, match="VocabParallelEmbedding: ids hold 97, outside \\[0, num_embeddings=97\\)"):
        model(torch.full((1, 4), 97))
    with pytest.raises(ValueError, match="sequence length 41 exceeds max_position_embeddings=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="GPTModel: input_ids has shape \\[4\\], expected \\[batch, seq\\]"):
        model(torch.zeros(4, dtype=torch.long))
