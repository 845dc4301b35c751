"""`--dtype auto` (the default of `megacore train`): bf16 with fp32 master weights where the CPU (AVX512-BF16,
AMX) or GPU (compute capability 8.0 on) computes bf16 natively, fp32 elsewhere; the run's header line and
`megacore info` say which and why, checkpoints record the resolved dtype, and a plain rerun never refuses
a checkpoint because of auto (issue 12)."""

from __future__ import annotations

import json

import pytest
import torch

from megacore import _machine
from megacore._machine import auto_dtype, cpu_bf16_flags, cuda_devices
from megacore.cli import main
from megacore.training.config import parse_config
from megacore.training.run import train
from tests.training.utils import train_argv

TINY = dict(seq_len=32, vocab_size=1000, micro_batch_size=2, global_batch_size=2, train_steps=2, eval_interval=100,
            eval_batches=1, log_interval=1, save_interval=100, lr=5e-3, min_lr=5e-4, warmup_steps=1, progress=False,
            model_overrides={"num_layers": 1, "hidden_size": 32, "num_attention_heads": 2})


def _cpu(monkeypatch, **flags):
    """This CPU, as megacore._machine sees it, has exactly ``flags`` (torch itself is left alone)."""
    monkeypatch.setattr(_machine, "_torch_cpu_capabilities", lambda: dict(flags))


def _extra(run, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"step_{step:08d}" / "extra.pt", weights_only=True)


# ---- detection --------------------------------------------------------------------------------------------


def test_a_cpu_with_avx512_bf16_or_amx_gets_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert auto_dtype("cpu") == ("bfloat16", "this CPU has AVX512-BF16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": True})
    assert auto_dtype(torch.device("cpu")) == ("bfloat16", "this CPU has AVX512-BF16 and AMX-BF16")
    assert cpu_bf16_flags() == ["avx512_bf16", "amx_bf16"]


def test_a_cpu_without_native_bf16_gets_float32(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_f": True})
    assert auto_dtype("cpu") == ("float32", "this CPU has no native bf16 instructions")
    assert cpu_bf16_flags() == []


def test_a_torch_with_only_the_old_private_probes_is_asked_through_them(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert auto_dtype("cpu") == ("bfloat16", "this CPU has AMX-BF16")


@pytest.mark.parametrize("flags, expected", [("fpu sse avx2 avx512f avx512_bf16", ("bfloat16", ["avx512_bf16"])),
                                             ("fpu sse avx2 amx_tile amx_bf16", ("bfloat16", ["amx_bf16"])),
                                             ("fpu sse avx2 avx512f", ("float32", []))])
def test_a_torch_without_probes_reads_the_proc_cpuinfo_flags(monkeypatch, tmp_path, flags, expected):
    for probe in ("get_capabilities", "_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, probe, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(_machine, "_CPUINFO", str(cpuinfo))
    assert (auto_dtype("cpu")[0], cpu_bf16_flags()) == expected
    monkeypatch.setattr(_machine, "_CPUINFO", str(tmp_path / "none"))  # no /proc: no flags, fp32
    assert auto_dtype("cpu")[0] == "float32"


def test_a_cpu_torchs_probe_cannot_read_falls_back_to_proc_cpuinfo(monkeypatch, tmp_path):
    def unreadable():
        raise RuntimeError("cpuinfo: failed to initialize")

    monkeypatch.setattr(torch.cpu, "get_capabilities", unreadable)
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu avx512f avx512_bf16\n")
    monkeypatch.setattr(_machine, "_CPUINFO", str(tmp_path / "cpuinfo"))
    assert auto_dtype("cpu") == ("bfloat16", "this CPU has AVX512-BF16")


def _gpus(monkeypatch, gpus: list[tuple[str, tuple[int, int]]]):
    """Visible CUDA devices (name, compute capability), the first one current."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: gpus[i][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: gpus[i][1])
    monkeypatch.setattr(torch.version, "hip", None)


def test_a_gpu_from_compute_capability_8_gets_bfloat16_an_older_one_float32(monkeypatch):
    _gpus(monkeypatch, [("NVIDIA H200", (9, 0)), ("Tesla V100", (7, 0))])
    assert auto_dtype("cuda") == ("bfloat16", "GPU 0 (NVIDIA H200, compute capability 9.0) computes bf16 natively")
    assert auto_dtype("cuda:1") == ("float32", "GPU 1 (Tesla V100, compute capability 7.0) has no native bf16")
    assert [(d["index"], d["bf16_native"]) for d in cuda_devices()] == [(0, True), (1, False)]


def test_no_cuda_means_no_cuda_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_devices() == []


# ---- megacore info -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, dtype", [({"avx512_bf16": True}, "bfloat16"), ({}, "float32")])
def test_megacore_info_reports_what_the_machine_computes_natively(monkeypatch, capsys, flags, dtype):
    _cpu(monkeypatch, **flags)
    assert main(["info"]) == 0
    machine = json.loads(capsys.readouterr().out)["machine"]
    assert machine["cpu_bf16_native"] == bool(flags) and machine["cpu_flags_bf16"] == list(flags)
    assert machine["auto_dtype"] == dtype and machine["why"] == auto_dtype("cpu")[1]
    assert isinstance(machine["cuda_devices"], list)


# ---- megacore train ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, shown, dtype", [
    ({"avx512_bf16": True}, "bfloat16 (auto: this CPU has AVX512-BF16) on cpu", "bfloat16"),
    ({}, "float32 (auto: this CPU has no native bf16 instructions) on cpu", "float32"),
])
def test_the_default_dtype_is_auto_and_the_header_says_the_choice_and_why(monkeypatch, corpus_cache, tmp_path, flags,
                                                                          shown, dtype):
    _cpu(monkeypatch, **flags)
    logs = []
    config = parse_config(dict(TINY, cache_dir=corpus_cache, output=str(tmp_path / "run")))
    assert config.dtype == "auto"
    train(config, log=logs.append)
    assert any(m.startswith("megacore train: gpt-tiny, steps 1-2") and shown in m for m in logs), logs
    extra = _extra(tmp_path / "run", 2)  # the checkpoint and train_config.json hold the resolved dtype
    assert extra["train_config"]["dtype"] == dtype and extra["model_config"]["params_dtype"] == dtype
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["dtype"] == dtype


@pytest.mark.parametrize("saved", ["float32", "bfloat16"])
@pytest.mark.parametrize("native", [True, False])
def test_a_plain_rerun_continues_the_checkpoints_dtype_whatever_auto_chooses_here(monkeypatch, corpus_cache, tmp_path,
                                                                                   capsys, saved, native):
    run = tmp_path / "run"
    assert main(["train", *train_argv(dict(TINY, cache_dir=corpus_cache, output=str(run), dtype=saved))]) == 0
    _cpu(monkeypatch, **({"amx_bf16": True} if native else {}))
    here = auto_dtype("cpu")
    capsys.readouterr()
    assert main(["train", *train_argv(dict(TINY, cache_dir=corpus_cache, output=str(run), train_steps=3))]) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert _extra(run, 3)["train_config"]["dtype"] == saved
    if here[0] == saved:
        assert f"{saved} (auto: {here[1]}) on cpu" in out and "--dtype auto:" not in out
    else:  # the checkpoint moved to a machine where auto chooses otherwise: it keeps its dtype and says so
        assert f"{saved} (the checkpoint's; auto would choose {here[0]}: {here[1]}) on cpu" in out
        assert f"resume: --dtype auto: the checkpoint's {saved} continues (auto would choose {here[0]}" in out
    # the same through the Python API, where every option counts as given (--dtype auto included)
    train(parse_config(dict(TINY, cache_dir=corpus_cache, output=str(run), train_steps=4)), log=lambda m: None)
    assert _extra(run, 4)["train_config"]["dtype"] == saved


def test_an_explicit_dtype_other_than_the_checkpoints_is_still_refused(monkeypatch, corpus_cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *train_argv(dict(TINY, cache_dir=corpus_cache, output=str(run), dtype="float32"))]) == 0
    capsys.readouterr()
    again = dict(TINY, cache_dir=corpus_cache, output=str(run), train_steps=3, dtype="bfloat16")
    assert main(["train", *train_argv(again)]) == 1
    assert "--dtype is 'bfloat16' but the checkpoint at step 2 was trained with 'float32'" in capsys.readouterr().err
