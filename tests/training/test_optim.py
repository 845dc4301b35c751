"""The optimizer's weight-decay groups, the learning-rate schedule, and gradient clipping by the global norm
(single process, and across tensor-parallel ranks equal to the whole model)."""

import math

import pytest
import torch

from megacore.models import GPTModel, ModelConfig
from megacore.training import LRSchedule, build_optimizer, clip_grad_norm, parameter_groups
from megacore.parallel import sum_sequence_parallel_gradients
from tests.parallel.utils import gather_shards, run_distributed, shard_dims


def tiny_gpt(**overrides):
    fields = dict(vocab_size=101, hidden_size=32, num_layers=2, num_attention_heads=4, max_position_embeddings=16,
                  hidden_dropout=0.0, attention_dropout=0.0)
    return GPTModel(ModelConfig(**{**fields, **overrides}))


def test_weight_decay_excludes_biases_norms_and_embeddings():
    groups = parameter_groups(tiny_gpt(), weight_decay=0.1)
    decay, keep = groups
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert all(n.endswith(".weight") and ("qkv" in n or "proj" in n or "fc" in n) for n in decay["names"])
    assert "embedding.word.weight" in keep["names"] and "embedding.position.weight" in keep["names"]
    assert "final_norm.weight" in keep["names"] and "decoder.layers.0.attention.qkv.bias" in keep["names"]
    assert "decoder.layers.1.mlp_norm.weight" in keep["names"]


def test_no_decay_patterns_are_configurable():
    (everything,) = parameter_groups(tiny_gpt(), no_decay=())
    assert len(everything["names"]) == len(list(tiny_gpt().parameters()))
    decay, keep = parameter_groups(tiny_gpt(), no_decay=("bias",))
    assert "embedding.word.weight" in decay["names"] and all(n.endswith("bias") for n in keep["names"])
    with pytest.raises(TypeError, match="no_decay must be a sequence"):
        parameter_groups(tiny_gpt(), no_decay="bias")


def test_build_optimizer_is_fused_adamw_with_two_groups():
    opt = build_optimizer(tiny_gpt(), lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert opt.defaults["fused"] and opt.param_groups[0]["betas"] == (0.9, 0.95)
    with pytest.raises(ValueError, match="build_optimizer: lr=-1"):
        build_optimizer(tiny_gpt(), lr=-1)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(tiny_gpt(), lr=1e-3, betas=(0.9, 1.0))


def _schedule(decay, warmup=10, total=110, max_lr=1.0, min_lr=0.1):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    return opt, LRSchedule(opt, max_lr=max_lr, min_lr=min_lr, warmup_steps=warmup, total_steps=total, decay=decay)


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_warms_up_linearly_then_decays_to_min_lr(decay):
    opt, s = _schedule(decay)
    lrs = []
    for _ in range(130):
        assert opt.param_groups[0]["lr"] == s.lr
        lrs.append(s.lr)
        s.step()
    assert lrs[:10] == pytest.approx([(t + 1) / 10 for t in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    if decay == "constant":
        assert lrs[10:] == pytest.approx([1.0] * 120)
        return
    mid = {"cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), "linear": 1.0 - 0.9 * 0.5}[decay]
    assert lrs[60] == pytest.approx(mid)
    assert lrs[110:] == pytest.approx([0.1] * 20)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_schedule_state_dict_resumes_the_same_curve():
    _, a = _schedule("cosine")
    for _ in range(37):
        a.step()
    opt, b = _schedule("cosine", warmup=0, total=5)
    b.load_state_dict(a.state_dict())
    assert b.lr == a.lr and opt.param_groups[0]["lr"] == a.lr
    for _ in range(20):
        a.step(), b.step()
        assert a.lr == b.lr


def test_schedule_rejects_bad_arguments():
    opt, _ = _schedule("cosine")
    with pytest.raises(ValueError, match="decay='exp'"):
        LRSchedule(opt, 1.0, decay="exp")
    with pytest.raises(ValueError, match="min_lr <= max_lr"):
        LRSchedule(opt, 1.0, min_lr=2.0)
    with pytest.raises(ValueError, match="warmup_steps=20, total_steps=10"):
        LRSchedule(opt, 1.0, warmup_steps=20, total_steps=10)


def test_clip_grad_norm_matches_torch_and_reads_main_grad(device):
    # drawn on the CPU (the values randn_like gave there), then moved to the device
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3).to(device)) for _ in range(3)]
    for p in params:
        p.grad = (torch.randn(p.shape) * 3).to(device)
    ref = [p.grad.clone() for p in params]
    expected = torch.nn.utils.clip_grad_norm_([torch.nn.Parameter(g.clone()) for g in ref], 1.0)
    expected_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in ref]))
    norm = clip_grad_norm(params, 1.0)
    assert norm.dtype == torch.float32 and torch.allclose(norm, expected_norm)
    clipped = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params]))
    assert clipped.item() == pytest.approx(1.0, rel=1e-5)  # a number: approx cannot read a CUDA tensor
    del expected
    # main_grad wins over grad; below the threshold nothing changes
    q = torch.nn.Parameter(torch.zeros(4, device=device))
    q.grad = torch.full((4,), 100.0, device=device)
    q.main_grad = torch.full((4,), 0.5, device=device)
    assert clip_grad_norm([q], 10.0).item() == pytest.approx(1.0)
    assert (q.main_grad == 0.5).all() and (q.grad == 100.0).all()


def _check_clip_tensor_parallel(rank, world):
    from megacore.parallel import destroy_model_parallel, get_tensor_parallel_group, initialize_model_parallel
    from megacore.parallel.layers import merge_weights

    initialize_model_parallel(world)
    group = get_tensor_parallel_group()
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = torch.roll(ids, -1, 1)
    for sp in (False, True):
        results = []
        for tp in (False, True):
            torch.manual_seed(0)
            model = tiny_gpt(tensor_parallel=tp, sequence_parallel=sp and tp)
            (model(ids, labels=labels).mean() * 50).backward()  # a large norm, so clipping acts
            sum_sequence_parallel_gradients(model)
            norm = clip_grad_norm(model, 0.5)
            grads = {}
            dims = shard_dims(model, world)
            for name, p in model.named_parameters():
                g = p.grad
                if dims[name] is not None:
                    g = merge_weights(gather_shards(g, group, world), dims[name])
                grads[name] = g[: 101] if name == "embedding.word.weight" else g
            results.append((norm, grads))
        (norm_full, grads_full), (norm_tp, grads_tp) = results
        assert norm_full > 1.0
        torch.testing.assert_close(norm_tp, norm_full, rtol=1e-5, atol=1e-6)
        for name, g in grads_full.items():
            torch.testing.assert_close(grads_tp[name], g, rtol=2e-4, atol=2e-6, msg=lambda m: f"sp={sp} {name}: {m}")
        total = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads_tp.values()]))
        assert total.item() == pytest.approx(0.5, rel=1e-4)
    destroy_model_parallel()


@pytest.mark.parametrize("world", [2])
def test_clip_grad_norm_across_tensor_parallel_ranks_equals_whole_model(world):
    run_distributed(_check_clip_tensor_parallel, world, timeout_s=120, collective_timeout_s=60)
