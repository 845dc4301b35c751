"""Training that never lies: `megacore train / evaluate / generate` under divergence, changed resumes, lost
`latest` files, full disks, bad configurations and misplaced files. Each test reproduces a failure a user met
(issue 11) and pins what megacore now guarantees (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from megacore.cli import main
from megacore.training import Trainer, TrainingDivergedError, build_optimizer
from megacore.training.checkpoint import CheckpointSaveError, load_checkpoint, save_checkpoint
from megacore.training.config import load_config_file, parse_config
from megacore.training.precision import DynamicLossScaler, MixedPrecision
from megacore.training.run import TrainConfig, train
from tests.training.utils import train_argv

TINY = dict(seq_len=32, vocab_size=1000, micro_batch_size=2, global_batch_size=2, train_steps=10, eval_interval=100,
            eval_batches=2, log_interval=1, save_interval=5, lr=5e-3, min_lr=5e-4, warmup_steps=2, progress=False,
            model_overrides={"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2})


@pytest.fixture(scope="module")
def run10(corpus_cache, tmp_path_factory):
    """A finished 10-step float32 run with checkpoints at steps 5 and 10 (read-only for the tests: copy it).
    float32 whatever --dtype auto would choose on this machine, so that --dtype bfloat16 is a change."""
    out = tmp_path_factory.mktemp("run10") / "run"
    train(TrainConfig(cache_dir=corpus_cache, output=str(out), dtype="float32", **TINY), log=lambda m: None)
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- 1. non-finite losses ----------------------------------------------------------------------------------


def test_a_diverging_run_stops_with_an_error_before_saving_anything(corpus_cache, tmp_path, capsys):
    out = tmp_path / "run"
    options = dict(TINY, lr=1e6, min_lr=1.0, train_steps=20, save_interval=2)
    rc, _, err = _cli(["train", "--cache-dir", corpus_cache, "--output", str(out), *train_argv(options)], capsys)
    line = _one_error_line(err)
    assert rc == 1 and ("the loss is nan" in line or "the gradient norm is" in line), line
    assert "stopping before the optimizer step" in line
    saved = list((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else []
    for step_dir in saved:  # any checkpoint written before the divergence holds finite weights only
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(step_dir / "model.safetensors").values())


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "inf", "--lr=inf: Input should be a finite number"),
    ("--lr", "nan", "--lr=nan: Input should be a finite number"),
    ("--clip-grad", "-1", "--clip-grad=-1: Input should be greater than or equal to 0"),
    ("--hidden-dropout", "1.5", "--hidden-dropout=1.5: Input should be less than 1"),
    ("--loss-spike-factor", "0.5", "--loss-spike-factor=0.5: Input should be greater than 1"),
])
def test_non_finite_and_out_of_range_numbers_are_refused_up_front(flag, value, message, tmp_path, capsys):
    rc, _, err = _cli(["train", "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), flag, value],
                      capsys)
    assert rc == 1 and message in _one_error_line(err)
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()  # refused before anything is made


def _linear_trainer(model, loss_fn, **kwargs):
    optimizer = build_optimizer(kwargs.get("precision") or model, lr=1e-2, weight_decay=0.0)
    return Trainer(model, optimizer, None, loss_fn=loss_fn, **kwargs)


def test_fp16_overflow_skips_are_bounded():
    """A gradient that overflows float16 at every loss scale: a few skipped steps are normal, an endless run
    of them stops the run."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    precision = MixedPrecision(model, torch.float16)
    weights_before = [p.detach().clone() for p in model.parameters()]

    class Huge(torch.autograd.Function):  # d loss / d w = 1e10: inf in float16 even at loss scale 1
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1e10

    def loss(m, batch):
        return Huge.apply(m.weight).float().sum()

    trainer = _linear_trainer(model, loss, precision=precision, scaler=DynamicLossScaler(), max_skipped_steps=20)
    for step in range(20):
        assert trainer.train_step([{}])["skipped"]
    with pytest.raises(TrainingDivergedError, match="step 21: 21 consecutive steps skipped for fp16 overflow"):
        trainer.train_step([{}])
    for before, p in zip(weights_before, model.parameters()):
        assert torch.equal(before.half(), p.detach())  # no update ever reached the weights


def test_a_non_finite_gradient_norm_stops_before_the_optimizer_step():
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = model.weight.detach().clone()
    trainer = _linear_trainer(model, lambda m, b: InfGrad.apply(m.weight).sum())
    with pytest.raises(TrainingDivergedError, match="step 1: the gradient norm is (inf|nan)"):
        trainer.train_step([{}])
    assert torch.equal(model.weight.detach(), before)


def test_loss_spike_detection_is_optional_and_stops_on_a_spike():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)

    def loss(m, batch):
        return ((m(x) - y * batch["scale"]) ** 2).mean()

    quiet = _linear_trainer(torch.nn.Linear(4, 1), loss)  # off by default: a spike is just a large loss
    spiky = _linear_trainer(torch.nn.Linear(4, 1), loss, loss_spike_factor=10.0)
    for _ in range(12):
        quiet.train_step([{"scale": 1.0}])
        spiky.train_step([{"scale": 1.0}])
    quiet.train_step([{"scale": 1000.0}])
    with pytest.raises(TrainingDivergedError, match=r"step 13: loss spike: .* more than 10 x the largest of the last 12"):
        spiky.train_step([{"scale": 1000.0}])


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="refusing to save step 3: parameter weight has 1 non-finite values"):
        save_checkpoint(tmp_path, 3, model)
    assert os.listdir(tmp_path) == []


def test_evaluate_refuses_a_checkpoint_whose_loss_is_not_finite(run10, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = _copy(run10, tmp_path)
    weights_file = run / "checkpoints" / "step_00000010" / "model.safetensors"
    weights = load_file(weights_file)
    weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
    save_file(weights, weights_file)
    rc, out, err = _cli(["evaluate", "--checkpoint", str(run / "checkpoints"), "--batches", "1", "--passages", "2"],
                        capsys)
    assert rc == 1 and out == "" and "validation loss" in _one_error_line(err) and "nan" in err


# ---- 2. resuming with a changed configuration ---------------------------------------------------------------


def test_resume_refuses_what_it_cannot_change_naming_the_option(run10, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    base = ["train", "--output", str(run), "--train-steps", "12"]
    for extra, option in ([["--seq-len", "64"], "--seq-len"], [["--model", "bert-tiny"], "--model"],
                          [["--dtype", "bfloat16"], "--dtype"], [["--seed", "1"], "--seed"],
                          [["--lr", "1e-3"], "--lr"], [["--warmup-steps", "0"], "--warmup-steps"]):
        rc, _, err = _cli(base + extra, capsys)
        line = _one_error_line(err)
        assert rc == 1 and f"{option} is " in line and "checkpoint at step 10" in line, line
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000010"]


def test_resume_with_more_steps_extends_the_schedule_and_says_so(run10, tmp_path):
    run = _copy(run10, tmp_path)
    logs = []
    train(parse_config({"output": str(run), "train_steps": 14}), log=logs.append, explicit={"output", "train_steps"})
    assert any("--train-steps 10 -> 14: the learning-rate schedule now decays over 14 steps" in m for m in logs), logs
    extra = torch.load(run / "checkpoints" / "step_00000014" / "extra.pt", weights_only=True)
    assert extra["schedule"]["total_steps"] == 14 and extra["schedule"]["step_count"] == 14
    assert extra["train_config"]["lr"] == TINY["lr"]  # options not given continue as saved
    lrs = {r["step"]: r["lr"] for r in _metrics(run) if "lr" in r}
    from megacore.training.optim import LRSchedule

    curve = LRSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), TINY["lr"], TINY["min_lr"],
                       TINY["warmup_steps"], 14)
    assert lrs[11] == pytest.approx(curve.lr_at(10)) and lrs[14] == pytest.approx(curve.lr_at(13))


def test_override_lr_schedule_applies_new_rates_from_the_checkpoint_on(run10, tmp_path):
    run = _copy(run10, tmp_path)
    logs = []
    train(parse_config({"output": str(run), "train_steps": 12, "lr": 1e-3, "min_lr": 1e-4,
                        "override_lr_schedule": True}),
          log=logs.append, explicit={"output", "train_steps", "lr", "min_lr", "override_lr_schedule"})
    extra = torch.load(run / "checkpoints" / "step_00000012" / "extra.pt", weights_only=True)
    assert extra["schedule"]["max_lr"] == 1e-3 and extra["schedule"]["min_lr"] == 1e-4
    assert extra["train_config"]["override_lr_schedule"] is False  # not inherited by the next resume
    assert all(r["lr"] <= 1e-3 for r in _metrics(run) if "lr" in r and r["step"] > 10)


def test_resume_with_a_new_global_batch_size_keeps_the_data_position_exact_in_samples(run10, tmp_path):
    run = _copy(run10, tmp_path)
    seen = []
    from megacore.training import trainer as trainer_module

    real_step = trainer_module.Trainer.train_step

    def recording(self, micro):
        seen.append(torch.cat([m["input_ids"] for m in micro]))
        return real_step(self, micro)

    trainer_module.Trainer.train_step = recording
    try:
        logs = []
        train(parse_config({"output": str(run), "train_steps": 13, "global_batch_size": 4}), log=logs.append,
              explicit={"output", "train_steps", "global_batch_size"})
    finally:
        trainer_module.Trainer.train_step = real_step
    assert any("--global-batch-size 2 -> 4: the data continues at the checkpoint's sample position" in m for m in logs)
    extra = torch.load(run / "checkpoints" / "step_00000013" / "extra.pt", weights_only=True)
    assert extra["consumed_samples"] == 10 * 2 + 3 * 4 and sum(extra["data_segments"]) >= 32
    # the samples trained after the resume are samples 20..31 of the original run's order
    from megacore.training.tasks import CausalLMTask

    config = parse_config({**json.loads((run / "train_config.json").read_text())})
    stream = CausalLMTask().datasets(config, 1, [int(n) for n in extra["data_segments"]], lambda m: None).train
    expected = torch.stack([torch.as_tensor(stream[i]["tokens"]).long() for i in range(20, 32)])
    assert torch.equal(torch.cat(seen), expected)


def test_the_training_stream_keeps_its_first_samples_when_a_resume_appends_a_segment(corpus_cache):
    from megacore.training.tasks import CausalLMTask

    config = parse_config(dict(TINY, cache_dir=corpus_cache))
    short = CausalLMTask().datasets(config, 1, [20], lambda m: None).train
    longer = CausalLMTask().datasets(config, 1, [20, 500], lambda m: None).train
    assert len(longer) == 520
    for i in range(20):
        assert torch.equal(torch.as_tensor(short[i]["tokens"]), torch.as_tensor(longer[i]["tokens"]))


def test_a_rerun_without_options_continues_the_checkpoints_configuration(run10, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    rc, _, err = _cli(["train", "--output", str(run), "--train-steps", "11"], capsys)
    assert rc == 0, err
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["seq_len"] == TINY["seq_len"] and saved["train_steps"] == 11 and saved["lr"] == TINY["lr"]


# ---- 3. one rule for finding the checkpoint -----------------------------------------------------------------


def test_a_deleted_latest_resumes_from_the_newest_complete_checkpoint_and_overwrites_nothing(run10, tmp_path):
    run = _copy(run10, tmp_path)
    (run / "checkpoints" / "latest").unlink()
    step10 = run / "checkpoints" / "step_00000010" / "model.safetensors"
    stamp = step10.stat().st_mtime_ns
    logs = []
    train(parse_config({"output": str(run), "train_steps": 12}), log=logs.append, explicit={"output", "train_steps"})
    assert any("resuming from" in m and "step_00000010 at step 10" in m and "'latest' is missing" in m for m in logs)
    assert step10.stat().st_mtime_ns == stamp
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000012"


def test_generate_and_resume_pick_the_same_checkpoint_when_latest_is_stale(run10, tmp_path):
    from megacore.training.checkpoint import resolve_checkpoint

    run = _copy(run10, tmp_path)
    (run / "checkpoints" / "latest").write_text("step_00000005\n")  # hand-edited to an older one
    assert resolve_checkpoint(run / "checkpoints").endswith("step_00000010")
    logs = []
    train(parse_config({"output": str(run)}), log=logs.append, explicit={"output"})
    assert any("at step 10" in m and "'latest' names step_00000005, an older checkpoint" in m for m in logs)


# ---- 6. a full disk ---------------------------------------------------------------------------------------------


def test_a_save_that_fails_midway_cleans_up_and_reports_one_line(tmp_path, monkeypatch):
    import safetensors.torch

    model = torch.nn.Linear(64, 64)
    save_checkpoint(tmp_path, 1, model)

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointSaveError, match=r"^checkpoint step 2: no space left on device \(needed ~\d+ MB, "):
        save_checkpoint(tmp_path, 2, model)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    load_checkpoint(tmp_path, torch.nn.Linear(64, 64))


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_with_one_line_and_the_next_run_cleans_up(corpus_cache, small_disk, capsys):
    out = small_disk / "run"
    big = dict(TINY, model_overrides={"num_layers": 2, "hidden_size": 128, "num_attention_heads": 2})
    rc, _, err = _cli(["train", "--cache-dir", corpus_cache, "--output", str(out), *train_argv(big)], capsys)
    line = _one_error_line(err)
    assert rc == 1 and "checkpoint step 5: no space left on device (needed ~" in line and "MB free in" in line, line
    leftovers = [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [] and not list((out / "checkpoints").glob("step_*"))
    # a killed save's leftovers are removed at start-up, before anything is written
    stale = out / "checkpoints" / ".tmp-step_00000005"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * (2 << 20))
    # (its own save may fail too)
    _cli(["train", "--cache-dir", corpus_cache, "--output", str(out), *train_argv(dict(big, train_steps=1))], capsys)
    assert not stale.exists()


# ---- 8. self-contained checkpoints --------------------------------------------------------------------------


def test_a_checkpoint_carries_its_tokenizer_so_moving_the_data_breaks_nothing(run10, corpus_cache, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    step_dir = run / "checkpoints" / "step_00000010"
    assert (step_dir / "tokenizer").exists()
    moved = tmp_path / "moved-cache"
    shutil.copytree(corpus_cache, moved)
    # the checkpoint's recorded source is irrelevant: hide it by pointing the copy's extra elsewhere
    extra = torch.load(step_dir / "extra.pt", weights_only=True)
    assert extra["tokenizer"] == "tokenizer" and not os.path.isabs(extra["tokenizer"])
    extra["tokenizer_source"] = str(tmp_path / "gone")
    torch.save(extra, step_dir / "extra.pt")
    rc, out, err = _cli(["generate", "--checkpoint", str(run / "checkpoints"), "--prompt", "It is", "--max-new-tokens",
                         "3", "--greedy"], capsys)
    assert rc == 0 and out.startswith("It is"), err


# ---- 9. configurations: typed, one error line each ---------------------------------------------------------


def test_a_yaml_config_is_read_by_type(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\nmin_lr: 1e-4\nseed: '7'\nclip_grad: '1'\nprogress: 'no'\n")
    config = parse_config(load_config_file(str(path)))
    assert (config.lr, config.min_lr, config.seed, config.clip_grad, config.progress) == (1e-3, 1e-4, 7, 1.0, False)


@pytest.mark.parametrize("content, message", [
    ({"num_workers": 1.5}, "--num-workers=1.5 in {path}: Input should be a valid integer"),
    ({"model_overrides": "abc"}, "--model-overrides=abc in {path}: Value error, not a JSON object"),
    ({"model_overrides": {"hidden": 3}}, "--model-overrides: 'hidden' is not a ModelConfig field"),
    ({"model_overrides": {"vocab_size": 3}}, "'vocab_size' cannot be overridden here: it comes from the tokenizer"),
    ({"model_overrides": {"num_layers": "two"}}, "--model-overrides: num_layers='two': Input should be a valid integer"),
    ({"seq_len": True}, "--seq-len=True in {path}: Value error, expected a number, got a boolean"),
    ({"learning_rate": 1}, "unknown option 'learning_rate' in {path}"),
    ([1, 2], "must hold a mapping of option names to values"),
])
def test_bad_config_files_are_one_error_line(content, message, tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    rc, _, err = _cli(["train", "--config", str(path), "--output", str(tmp_path / "r")], capsys)
    assert rc == 1 and message.format(path=path).replace("Value error, ", "") in _one_error_line(err)


def test_an_output_that_is_a_file_is_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    rc, _, err = _cli(["train", "--output", str(tmp_path / "file"), "--cache-dir", str(tmp_path / "c")], capsys)
    assert rc == 1 and "--output" in _one_error_line(err) and "is not a directory" in err
    assert (tmp_path / "file").read_text() == "mine"


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs (root can write through permission bits, so a mode is not enough)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0:
        mnt.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield mnt
        mnt.chmod(stat.S_IRWXU)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("which", ["--output", "--cache-dir"])
def test_a_read_only_output_or_cache_dir_is_one_error_line(which, read_only_dir, corpus_cache, tmp_path, capsys):
    target = read_only_dir / "sub"
    paths = {"--output": str(tmp_path / "r"), "--cache-dir": corpus_cache, which: str(target)}
    rc, _, err = _cli(["train", *[x for kv in paths.items() for x in kv]], capsys)
    assert rc == 1 and f"{which} {target} is not writable" in _one_error_line(err)


def test_evaluate_works_on_a_bert_checkpoint(corpus_cache, tmp_path, capsys):
    out = tmp_path / "bert"
    options = dict(TINY, train_steps=2, save_interval=100, model_overrides={"num_layers": 1, "hidden_size": 32,
                                                                            "num_attention_heads": 2})
    train(parse_config(dict(options, model="bert-tiny", cache_dir=corpus_cache, output=str(out))), log=lambda m: None)
    rc, stdout, err = _cli(["evaluate", "--checkpoint", str(out / "checkpoints"), "--batches", "1"], capsys)
    assert rc == 0, err
    result = json.loads(stdout)
    assert 0 <= result["mlm_accuracy"] <= 1 and result["valid_loss"] > 0


# ---- 11. smaller ones -----------------------------------------------------------------------------------------


def test_a_seq_len_beyond_the_learned_positions_needs_an_explicit_override(tmp_path, capsys):
    rc, _, err = _cli(["train", "--output", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--seq-len",
                       "4096"], capsys)
    assert rc == 1 and "--seq-len 4096 exceeds gpt-tiny's" in _one_error_line(err)
    assert "max_position_embeddings" in err


def test_float16_on_a_cpu_warns_in_the_header(corpus_cache, tmp_path):
    logs = []
    train(parse_config(dict(TINY, train_steps=1, dtype="float16", cache_dir=corpus_cache, output=str(tmp_path / "r"))),
          log=logs.append)
    assert any("warning: float16 on a CPU is emulated" in m for m in logs)


def test_checkpoint_files_get_the_umasks_permissions(run10):
    step_dir = run10 / "checkpoints" / "step_00000010"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in step_dir.iterdir() if p.is_file()}
    assert len(set(modes.values())) == 1, modes  # model.safetensors like the others, not 0600


def test_metrics_are_never_written_through_a_symlink(run10, tmp_path, capsys):
    run = _copy(run10, tmp_path)
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("keep me\n")
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(victim)
    rc, _, err = _cli(["train", "--output", str(run), "--train-steps", "11"], capsys)
    assert rc == 1 and "metrics.jsonl is a symbolic link" in _one_error_line(err)
    assert victim.read_text() == "keep me\n"


def test_a_resumed_run_does_not_repeat_metric_lines(run10, tmp_path):
    run = _copy(run10, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000010")  # killed after logging step 10, before saving it
    train(parse_config({"output": str(run)}), log=lambda m: None, explicit={"output"})
    steps = [r["step"] for r in _metrics(run) if "loss" in r]
    assert steps == list(range(1, 11))


def test_generate_checks_its_arguments_before_printing(run10, capsys):
    rc, out, err = _cli(["generate", "--checkpoint", str(run10 / "checkpoints"), "--prompt", "It is", "--top-p", "2"],
                        capsys)
    assert rc == 1 and out == "" and "top_p" in _one_error_line(err)


def test_a_one_document_dataset_without_valid_data_is_one_clear_error(tmp_path, capsys):
    text = tmp_path / "one.txt"
    text.write_text("It is a truth universally acknowledged. " * 200)
    assert main(["prepare", str(text), "-o", str(tmp_path / "one"), "--vocab-size", "300", "--no-progress"]) == 0
    capsys.readouterr()
    rc, _, err = _cli(["train", "--data", str(tmp_path / "one"), "--output", str(tmp_path / "r"), "--cache-dir",
                       str(tmp_path / "c"), *train_argv(dict(TINY, vocab_size=300))], capsys)
    assert rc == 1 and "holds 1 document(s)" in _one_error_line(err) and "--valid-data" in err


def test_the_train_help_lists_every_guard(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--distributed-timeout-minutes", "--loss-spike-factor", "--max-skipped-steps",
                 "--override-lr-schedule"):
        assert flag in out
