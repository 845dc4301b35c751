"""megacore.training.checkpoint: atomic, resumable checkpoints that load at any tensor-parallel size. The round
trip, the bit-exact resume (with the CPU and, on a GPU, CUDA RNG states) and the fp32 masters run on every
device present (the ``device`` fixture)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from megacore.models import GPTModel, ModelConfig
from megacore.training.checkpoint import (
    load_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint,
    save_checkpoint,
    step_directory_name,
)
from tests.parallel.utils import run_distributed

VOCAB = 101  # not a multiple of 2 or 4: the TP-padded vocab rows must be cut on save and restored on load
SEQ, BATCH = 8, 2


def tiny_gpt(seed: int = 0, dropout: float = 0.1, device="cpu", **overrides) -> GPTModel:
    """Built on the CPU from ``seed``, then moved to ``device``."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_attention_heads=4, ffn_hidden_size=64,
                  max_position_embeddings=SEQ, hidden_dropout=dropout, attention_dropout=dropout)
    return GPTModel(ModelConfig(**{**fields, **overrides})).to(device)


def adamw(model) -> torch.optim.AdamW:
    """Two groups, like a trainer's weight-decay exclusion: matrices decay, vectors do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, foreach=True)


def batch(step: int, device="cpu"):
    """The data at ``step``: the data position is the step, so resuming at a step resumes the data (drawn on the
    CPU, then moved to ``device``)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def train(model, optimizer, start: int, steps: int) -> list[float]:
    """Steps ``start, ..., start + steps - 1`` on the model's device; their losses."""
    device = next(model.parameters()).device
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, device)
        loss = model(x, labels=y).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def optimizer_moments(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------ TP = 1


def test_round_trip_is_bit_exact(tmp_path, device):
    model = tiny_gpt(seed=0, device=device)
    opt = adamw(model)
    train(model, opt, 0, 2)
    path = save_checkpoint(tmp_path, 2, model, opt, extra={"consumed_samples": 4, "scheduler": {"last_epoch": 2}})
    assert os.path.basename(path) == "step_00000002"
    assert sorted(os.listdir(path)) == ["extra.pt", "meta.json", "model.safetensors", "optimizer.pt", "rng_rank0.pt"]
    assert open(tmp_path / "latest").read().strip() == "step_00000002"

    other = tiny_gpt(seed=1, device=device)
    other_opt = adamw(other)
    extra = load_checkpoint(tmp_path, other, other_opt)
    assert extra == {"consumed_samples": 4, "scheduler": {"last_epoch": 2}, "step": 2}
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name
    saved, loaded = optimizer_moments(model, opt), optimizer_moments(other, other_opt)
    for name in saved:
        for key in saved[name]:
            assert torch.equal(saved[name][key], loaded[name][key]), (name, key)
    assert [g["weight_decay"] for g in other_opt.param_groups] == [0.1, 0.0]


def test_resume_reproduces_the_loss_curve_bit_for_bit(tmp_path, device):
    # dropout on: the restored RNG state matters. The layers' dropout seeds come from the CPU generator; on
    # CUDA the embedding's dropout (F.dropout) draws from the CUDA generator, whose state must be restored too.
    model = tiny_gpt(seed=0, dropout=0.1, device=device)
    opt = adamw(model)
    train(model, opt, 0, 3)
    save_checkpoint(tmp_path, 3, model, opt, extra={"next_step": 3})
    cuda_rng = torch.cuda.get_rng_state() if device == "cuda" else None
    uninterrupted = train(model, opt, 3, 4)

    resumed_model = tiny_gpt(seed=7, dropout=0.1, device=device)
    resumed_opt = adamw(resumed_model)
    torch.manual_seed(12345)  # a fresh process's RNG (it reseeds CUDA's too): the checkpoint must restore it
    extra = load_checkpoint(tmp_path, resumed_model, resumed_opt)
    if device == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng), "the CUDA RNG state was not restored"
    resumed = train(resumed_model, resumed_opt, extra["next_step"], 4)
    assert resumed == uninterrupted


def test_keep_last_prunes_older_steps_and_latest_names_the_newest(tmp_path):
    model = tiny_gpt()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000003", "step_00000004"]
    assert read_checkpoint_meta(tmp_path)["step"] == 4


def test_resaving_a_complete_step_is_refused_unless_overwrite(tmp_path):
    model = tiny_gpt()
    save_checkpoint(tmp_path, 1, model, extra={"v": 1})
    with pytest.raises(FileExistsError, match="step_00000001 is a complete checkpoint; refusing to overwrite"):
        save_checkpoint(tmp_path, 1, model, extra={"v": 2})
    assert load_checkpoint(tmp_path, tiny_gpt())["v"] == 1
    save_checkpoint(tmp_path, 1, model, extra={"v": 2}, overwrite=True)
    assert load_checkpoint(tmp_path, tiny_gpt())["v"] == 2
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]


def test_stale_latest_falls_back_to_the_newest_complete_step(tmp_path):
    model = tiny_gpt()
    save_checkpoint(tmp_path, 5, model)
    save_checkpoint(tmp_path, 6, model)
    (tmp_path / "latest").write_text("step_00000009\n")  # e.g. pruned by hand
    assert resolve_checkpoint(tmp_path).endswith("step_00000006")
    assert resolve_checkpoint(tmp_path / "step_00000005").endswith("step_00000005")


def test_fp32_master_weights_of_half_precision_parameters_are_saved_and_restored(tmp_path, device):
    model = tiny_gpt(dropout=0.0, params_dtype=torch.bfloat16, device=device)
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    opt = torch.optim.AdamW(masters, lr=1e-2)
    for p in masters:
        p.grad = torch.randn(p.shape).to(device)  # drawn on the CPU (randn_like's values there)
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt)
    assert load_file(os.path.join(tmp_path, step_directory_name(1), "model.safetensors"))["embedding.word.weight"].dtype \
        == torch.bfloat16

    other = tiny_gpt(seed=3, dropout=0.0, params_dtype=torch.bfloat16, device=device)
    other_masters = [p.detach().float().clone().requires_grad_() for p in other.parameters()]
    other_opt = torch.optim.AdamW(other_masters, lr=1e-2)
    load_checkpoint(tmp_path, other, other_opt)
    for a, b in zip(masters, other_masters):
        assert torch.equal(a, b)  # fp32 values, not the bf16 weights widened
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state[masters[0]]["exp_avg"], other_opt.state[other_masters[0]]["exp_avg"])


def test_electra_round_trip_keeps_the_shared_embedding_and_the_generator_bias(tmp_path):
    from megacore.models import registry

    def electra(seed):
        torch.manual_seed(seed)
        return registry.build("electra-small", vocab_size=VOCAB, hidden_size=32, num_layers=1, num_attention_heads=2,
                              ffn_hidden_size=64, embedding_size=16)

    model = electra(0)
    save_checkpoint(tmp_path, 1, model, torch.optim.AdamW(model.parameters()))
    meta = read_checkpoint_meta(tmp_path)["parameters"]
    assert meta["generator.mlm_head.bias"]["vocab_size"] == VOCAB  # a vocab table: padded under TP, unpadded here
    other = electra(1)
    load_checkpoint(tmp_path, other, torch.optim.AdamW(other.parameters()))
    for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------ kill -9

_SAVER = textwrap.dedent("""
    import sys, time
    import safetensors.torch
    import torch
    from megacore.models import GPTModel, ModelConfig
    from megacore.training.checkpoint import save_checkpoint

    root = sys.argv[1]
    torch.manual_seed(0)
    model = GPTModel(ModelConfig(vocab_size=1000, hidden_size=256, num_layers=4, num_attention_heads=4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).mean().backward()
    opt.step()
    save_checkpoint(root, 1, model, opt, extra={"marker": "first"})
    real = safetensors.torch.save_file

    def slow_disk(tensors, path, metadata=None):  # the weights are written, then the process is killed
        real(tensors, path, metadata=metadata)
        print("writing", flush=True)
        time.sleep(60)

    safetensors.torch.save_file = slow_disk
    save_checkpoint(root, 2, model, opt, extra={"marker": "second"})
""")


def test_a_save_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    root = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "..", "python"),
                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "writing", proc.stderr.read()
        assert (root / ".tmp-step_00000002" / "model.safetensors").exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (root / "step_00000002").exists()

    from megacore.models import GPTModel, ModelConfig

    model = GPTModel(ModelConfig(vocab_size=1000, hidden_size=256, num_layers=4, num_attention_heads=4))
    opt = torch.optim.AdamW(model.parameters())
    extra = load_checkpoint(root, model, opt)
    assert extra == {"marker": "first", "step": 1}
    # the run resumes: the next save succeeds and clears the killed save's leftovers
    save_checkpoint(root, 2, model, opt)
    assert sorted(os.listdir(root)) == ["latest", "step_00000001", "step_00000002"]


# ------------------------------------------------------------------------------------------------ errors


def test_missing_and_empty_checkpoint_directories_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="load_checkpoint: checkpoint directory .* does not exist"):
        load_checkpoint(tmp_path / "nope", tiny_gpt())
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path, tiny_gpt())


def test_corrupt_files_are_clear_errors(tmp_path):
    model = tiny_gpt()
    path = save_checkpoint(tmp_path, 1, model, adamw(model))
    weights = os.path.join(path, "model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="weights file .*model.safetensors is corrupt"):
        load_checkpoint(tmp_path, tiny_gpt())
    open(weights, "wb").write(data)
    open(os.path.join(path, "meta.json"), "w").write("{not json")
    with pytest.raises(ValueError, match="metadata .*meta.json is corrupt"):
        load_checkpoint(tmp_path, tiny_gpt())
    json.dump({"format": "something-else"}, open(os.path.join(path, "meta.json"), "w"))
    with pytest.raises(ValueError, match="not a megacore checkpoint"):
        load_checkpoint(tmp_path, tiny_gpt())


def test_a_model_shape_mismatch_names_the_parameter_and_both_shapes(tmp_path):
    save_checkpoint(tmp_path, 1, tiny_gpt(hidden_size=32))
    with pytest.raises(ValueError, match=r"parameter embedding\.word\.weight has shape \[101, 32\].*\[101, 64\]"):
        load_checkpoint(tmp_path, tiny_gpt(hidden_size=64))
    with pytest.raises(ValueError, match=r"missing \[.*decoder\.layers\.1\..*\]"):
        load_checkpoint(tmp_path, tiny_gpt(num_layers=2))


def test_an_optimizer_without_saved_state_and_bad_arguments_are_clear_errors(tmp_path):
    model = tiny_gpt()
    save_checkpoint(tmp_path, 1, model)
    with pytest.raises(FileNotFoundError, match="saved without one"):
        load_checkpoint(tmp_path, model, adamw(model))
    with pytest.raises(ValueError, match="save_checkpoint: step=-1"):
        save_checkpoint(tmp_path, -1, model)
    with pytest.raises(ValueError, match="save_checkpoint: keep_last=0"):
        save_checkpoint(tmp_path, 1, model, keep_last=0)
    with pytest.raises(TypeError, match="save_checkpoint: extra must be a dict"):
        save_checkpoint(tmp_path, 1, model, extra=[1])
    with pytest.raises(TypeError, match=r"save_checkpoint: extra\['config'\] is a ModelConfig"):
        save_checkpoint(tmp_path, 1, model, extra={"config": model.config})
    with pytest.raises(ValueError, match="optimizer's 1 parameters"):
        save_checkpoint(tmp_path, 2, model, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]))


# ------------------------------------------------------------------------------------------------ resharding


def _full(model, tensors: dict[str, torch.Tensor], group, world: int) -> dict[str, torch.Tensor]:
    """Test-side unsharding of this rank's ``tensors`` (parameter name -> tensor of the parameter's shape)."""
    from tests.parallel.utils import gather_shards, shard_dims

    dims = shard_dims(model, world)
    out = {}
    for name, t in tensors.items():
        dim = dims[name]
        if world > 1 and dim is not None:
            t = torch.cat(gather_shards(t, group, world), dim)
        out[name] = t[:VOCAB] if name == "embedding.word.weight" else t
    return out


def _save_at_tp2_dp2(rank, world, root, out):
    from megacore.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(2)  # 4 ranks: tensor-parallel 2 x data-parallel 2 (same data on both replicas)
    try:
        model = tiny_gpt(seed=0, dropout=0.0, tensor_parallel=True)
        opt = adamw(model)
        train(model, opt, 0, 2)
        save_checkpoint(root, 2, model, opt, extra={"next_step": 2})
        next_loss = train(model, opt, 2, 1)[0]  # the run without a reload
        if rank == 0:
            torch.save(next_loss, out)
    finally:
        destroy_model_parallel()


def _check_against_files(model, opt, root, group, world):
    step_dir = resolve_checkpoint(root)
    weights = load_file(os.path.join(step_dir, "model.safetensors"))
    saved_opt = torch.load(os.path.join(step_dir, "optimizer.pt"), weights_only=True)
    full = _full(model, dict(model.named_parameters()), group, world)
    assert set(full) == set(weights)
    for name, t in full.items():
        assert torch.equal(t, weights[name]), name
    for key in ("exp_avg", "exp_avg_sq"):
        moments = _full(model, {n: opt.state[p][key] for n, p in model.named_parameters()}, group, world)
        for name, t in moments.items():
            assert torch.equal(t, saved_opt["state"][name][key]), (name, key)
    for name, p in model.named_parameters():
        assert torch.equal(opt.state[p]["step"], saved_opt["state"][name]["step"])


def _load_at_tp4(rank, world, root, expected_loss):
    from megacore.parallel import destroy_model_parallel, get_tensor_parallel_group, initialize_model_parallel

    initialize_model_parallel(4)
    try:
        model = tiny_gpt(seed=5, dropout=0.0, tensor_parallel=True)
        opt = adamw(model)
        extra = load_checkpoint(root, model, opt)
        word = model.embedding.word.weight  # [104 / 4, h]: rows 101..103 are padding, on rank 3
        if rank == 3:
            assert word.shape[0] == 26 and torch.all(word[-3:] == 0)
            assert torch.all(opt.state[word]["exp_avg"][-3:] == 0)
        _check_against_files(model, opt, root, get_tensor_parallel_group(), world)
        loss = train(model, opt, extra["next_step"], 1)[0]
        assert loss == pytest.approx(expected_loss, rel=1e-5, abs=1e-6), (loss, expected_loss)
    finally:
        destroy_model_parallel()


def test_a_checkpoint_saved_at_tp2_loads_at_tp1_and_tp4_and_training_continues_alike(tmp_path):
    root, out = str(tmp_path / "ckpt"), str(tmp_path / "next_loss.pt")
    run_distributed(_save_at_tp2_dp2, 4, root, out, timeout_s=150)
    step_dir = resolve_checkpoint(root)
    # data parallelism: one merged copy; every rank's RNG state
    assert sorted(os.listdir(step_dir)) == ["extra.pt", "meta.json", "model.safetensors", "optimizer.pt"] + \
        [f"rng_rank{r}.pt" for r in range(4)]
    meta = read_checkpoint_meta(root)
    assert (meta["tensor_parallel_size"], meta["data_parallel_size"]) == (2, 2)
    assert meta["parameters"]["embedding.word.weight"]["shape"] == [VOCAB, 32]  # unpadded (TP 2 pads to 102)
    expected_loss = torch.load(out)

    model = tiny_gpt(seed=5, dropout=0.0)  # TP = 1, no process group
    opt = adamw(model)
    extra = load_checkpoint(root, model, opt)
    _check_against_files(model, opt, root, None, 1)
    assert train(model, opt, extra["next_step"], 1)[0] == pytest.approx(expected_loss, rel=1e-5, abs=1e-6)

    run_distributed(_load_at_tp4, 4, root, expected_loss, timeout_s=120)
