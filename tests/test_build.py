"""What the build produced: build_info, the per-ISA CPU kernels, and CUDA code that compiles even on
a machine without a GPU (so it cannot rot unseen)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megacore

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "cuda").rglob("*.cu"))
CUDA_GLUE = sorted((ROOT / "cpp" / "cuda").glob("*.cpp"))


def test_build_info_describes_this_build():
    info = megacore.build_info()
    assert info["version"] == megacore.__version__
    assert "DEFAULT" in info["cpu_isas"]
    assert info["cpu_isa_active"] in info["cpu_isas"]
    assert info["torch_version"] == torch.__version__
    assert info["torch_runtime_version"] == torch.__version__
    assert info["cuda"] == bool(info["cuda_archs"])
    assert info["openmp"], "built without OpenMP: at::parallel_for would be serial"
    assert info["compiler"]


def test_every_op_has_a_cpu_kernel():
    ops = [
        "bias_gelu", "bias_gelu_backward", "bias_dropout_add", "bias_dropout_add_backward",
        "layer_norm", "layer_norm_backward", "rms_norm", "rms_norm_backward",
        "scaled_masked_softmax", "scaled_causal_softmax", "scaled_softmax_backward",
        "apply_rotary_emb", "apply_rotary_emb_backward",
        "cross_entropy", "cross_entropy_backward", "vocab_parallel_cross_entropy_stats",
    ]  # fmt: skip
    for name in ops:
        op = getattr(torch.ops.megacore, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name


def _nvcc():
    return shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")


needs_nvcc = pytest.mark.skipif(not Path(_nvcc()).exists(), reason="nvcc not found")


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(ROOT / "cuda")))
def test_cuda_kernel_compiles_for_sm80_and_sm90(source, tmp_path):
    cmd = [
        str(_nvcc()), "-std=c++17", "-O3", "--use_fast_math", "-Werror", "all-warnings",
        f"-I{ROOT / 'cuda'}",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-c", str(source), "-o", str(tmp_path / "out.o"),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed on {source.name}:\n{r.stderr[-4000:]}"


def _cuda_include():
    nvcc = Path(_nvcc()).resolve()
    for cand in [nvcc.parents[1] / "include", Path("/usr/local/cuda/include")]:
        if (cand / "cuda_runtime_api.h").exists():
            return cand
    for cand in sorted(Path("/usr/local").glob("cuda*/include")):
        if (cand / "cuda_runtime_api.h").exists():
            return cand
    return None


@pytest.mark.skipif(_cuda_include() is None, reason="CUDA headers not found")
@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch builds the glue for real")
@pytest.mark.parametrize("source", CUDA_GLUE, ids=lambda p: p.name)
def test_cuda_glue_passes_a_syntax_check_against_the_cpu_torch(source, tmp_path):
    # The CPU wheel ships c10/cuda headers but not the one header CMake generates for a CUDA build;
    # an empty stand-in is enough for a syntax check.
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    tinc = Path(torch.__file__).parent / "include"
    cxx = os.environ.get("CXX", "g++")
    cmd = [
        cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unused-parameter", f"-I{tmp_path}", f"-I{tinc}",
        f"-I{tinc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{_cuda_include()}",
        f"-I{ROOT / 'cpp'}", f"-I{ROOT / 'cuda'}", str(source),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{source.name} does not compile:\n{r.stderr[-4000:]}"


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_each_forced_cpu_isa_matches_the_references(capability, tmp_path):
    """Re-runs the reference tests marked `isa` with ATEN_CPU_CAPABILITY forced, so every per-ISA build
    of the kernels is exercised (the native one, AVX512 here, runs in the main session)."""
    if capability.upper() not in megacore.build_info()["cpu_isas"]:
        pytest.skip(f"{capability} kernels not built on this platform")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, CUDA_VISIBLE_DEVICES="")
    probe = subprocess.run(
        [sys.executable, "-c", "import megacore; print(megacore.build_info()['cpu_isa_active'])"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert probe.stdout.strip() == capability.upper()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", str(ROOT / "tests" / "ops"), "-m", "isa", "-q", "-x",
         "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t")],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, f"ATEN_CPU_CAPABILITY={capability}:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}"
