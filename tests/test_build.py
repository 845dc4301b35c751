"""What the build produced: build_info, the per-ISA CPU kernels, and CUDA code that compiles even on
a machine without a GPU (so it cannot rot unseen)."""

from __future__ import annotations

import concurrent.futures
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megacore

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "cpp" / "kernels" / "cuda").glob("*.cu"))
# What a CUDA build compiles with MEGACORE_WITH_CUDA and nvcc cannot check: the op families (their CUDA
# registrations and launches).
CUDA_GLUE = sorted((ROOT / "cpp" / "ops").glob("*.cpp"))


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


# ---- what is registered into the `megacore` namespace ----------------------------------------------
# The op list is read from the dispatcher, never kept by hand, so a new op that lacks a kernel fails here.
# Three kinds of op live in the namespace (docs/architecture.md, "Who registers into `megacore`"):
#   fused ops      one file per family, cpp/ops/<family>.cpp: the schema (define_op, which adds the device
#                  check at BackendSelect) and the CPU and CUDA kernels; fake + autograd from
#                  python/megacore/ops/<family>.py.
#   composite ops  one CompositeExplicitAutograd kernel for every device, built from other ops or c10d:
#                  the transformer layer (cpp/transformer/layer.cpp) and the collectives
#                  (cpp/parallel/collectives.cpp); their fakes come from Python.
#   Python ops     torch.library.custom_op in Python (the tensor-parallel mappings): custom_op registers
#                  CompositeExplicitAutograd, Meta and Autograd itself.
# The DDP reducer (cpp/parallel/reducer.cpp) registers a TorchBind class, torch.classes.megacore.Reducer,
# not an op: the dispatcher does not list it.

PYTHON_ROOT = ROOT / "python"
CPP_REGISTRATION = re.compile(r"\bTORCH_LIBRARY(?:_FRAGMENT|_IMPL)?\(\s*megacore\b")
PY_REGISTRATION = re.compile(r"torch\.library\.\w+\(\s*\"megacore::")


def _python_registrants():
    """The modules of python/megacore that register into the namespace (found in the source, not listed)."""
    for path in sorted((PYTHON_ROOT / "megacore").rglob("*.py")):
        if PY_REGISTRATION.search(path.read_text()):
            yield ".".join(path.relative_to(PYTHON_ROOT).with_suffix("").parts)


def _megacore_ops():
    for module in _python_registrants():
        importlib.import_module(module)
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("megacore::"))


OPS = _megacore_ops()


def _has(op, key):
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def _is_fused(op):
    return _has(op, "CPU") or _has(op, "CUDA")


def _is_composite(op):
    return _has(op, "CompositeExplicitAutograd")


def test_the_namespace_holds_every_kind_of_op():
    fused = [op for op in OPS if _is_fused(op)]
    composite = [op for op in OPS if _is_composite(op)]
    assert "megacore::layer_norm" in fused
    assert {"megacore::transformer_layer", "megacore::all_reduce", "megacore::tp_copy"} <= set(composite)


@pytest.mark.parametrize("op", OPS)
def test_every_op_is_a_fused_op_or_a_composite_op(op):
    assert _is_fused(op) != _is_composite(op), (
        f"{op}: expected either per-device kernels (CPU, CUDA) or one CompositeExplicitAutograd kernel; "
        f"has CPU={_has(op, 'CPU')} CUDA={_has(op, 'CUDA')} "
        f"CompositeExplicitAutograd={_is_composite(op)}"
    )


@pytest.mark.parametrize("op", [op for op in OPS if _is_fused(op)])
def test_every_fused_op_has_a_cpu_kernel(op):
    assert _has(op, "CPU"), f"{op} has no CPU kernel: register it with MEGACORE_REGISTER_KERNELS in cpp/ops/<family>.cpp"


@pytest.mark.skipif(not megacore.build_info()["cuda"], reason="built without CUDA")
@pytest.mark.parametrize("op", [op for op in OPS if _is_fused(op)])
def test_every_fused_op_has_a_cuda_kernel_in_a_cuda_build(op):
    assert _has(op, "CUDA"), f"{op} has no CUDA kernel: register it with MEGACORE_REGISTER_KERNELS in cpp/ops/<family>.cpp"


@pytest.mark.parametrize("op", [op for op in OPS if _is_fused(op)])
def test_every_fused_op_checks_its_devices_at_backend_select(op):
    assert _has(op, "BackendSelect"), f"{op}: define it with ops::define_op (cpp/ops/op.h)"


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_fake_kernel_for_torch_compile(op):
    assert _has(op, "Meta"), f"{op} has no fake kernel: add torch.library.register_fake for it"


def test_every_registering_file_is_in_the_architecture_table():
    """docs/architecture.md names every file that registers into the namespace."""
    files = [p for p in sorted((ROOT / "cpp").rglob("*.cpp")) if CPP_REGISTRATION.search(p.read_text())]
    files += [PYTHON_ROOT / Path(*m.split(".")).with_suffix(".py") for m in _python_registrants()]
    doc = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in files if f"`{p.relative_to(ROOT)}`" not in doc]
    assert not missing, f"registrants missing from docs/architecture.md's table: {missing}"


def _nvcc():
    return shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")


needs_nvcc = pytest.mark.skipif(not Path(_nvcc()).exists(), reason="nvcc not found")


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_kernel_compiles_for_sm80_and_sm90(source, tmp_path):
    cmd = [
        str(_nvcc()), "-std=c++17", "-O3", "--use_fast_math", "-Werror", "all-warnings",
        f"-I{ROOT / 'cpp'}",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "--threads", "0",  # the two architectures compile in parallel (one thread per CPU)
        "-c", str(source), "-o", str(tmp_path / "out.o"),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed on {source.name}:\n{r.stderr[-4000:]}"


_KERNEL_DECL = re.compile(r"^MEGACORE_KERNEL\(\s*(\w+)\s*,\s*(\w+)\s*\)", re.M)


def test_every_declared_kernel_is_defined_with_its_params_on_both_devices():
    """A CUDA launcher whose signature drifted from its MEGACORE_KERNEL declaration compiles (it is an
    overload) and fails only when a CUDA build links, on a GPU machine; so the signatures are read here.
    (A CPU kernel that drifted fails the CPU build's link already, but is checked the same way.)"""
    headers = [h for h in sorted((ROOT / "cpp" / "kernels").glob("*.h")) if h.name != "common.h"]
    declared = [(h, name, params) for h in headers for name, params in _KERNEL_DECL.findall(h.read_text())]
    assert len(declared) >= 2
    problems = []
    for header, name, params in declared:
        family = header.stem
        for path, signature in [
            (ROOT / "cpp" / "kernels" / "cuda" / f"{family}.cu",
             rf"^cudaError_t {name}\(const kernels::{params}& p, cudaStream_t stream\) {{"),
            (ROOT / "cpp" / "kernels" / "cpu" / f"{family}.cpp", rf"^void {name}\(const kernels::{params}& p\) {{"),
        ]:
            if not path.exists() or not re.search(signature, path.read_text(), re.M):
                problems.append(f"{path.relative_to(ROOT)} does not define {name}(const kernels::{params}& p, ...)")
    assert problems == []


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
def test_cuda_glue_passes_a_syntax_check_against_the_cpu_torch(tmp_path):
    """Every file in CUDA_GLUE, each checked by its own compiler process, as many at once as there are cores
    (parsing torch's headers is most of each check's ~12 s)."""
    # The CPU wheel ships c10/cuda headers but not the one header CMake generates for a CUDA build;
    # an empty stand-in is enough for a syntax check.
    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    tinc = Path(torch.__file__).parent / "include"
    cxx = os.environ.get("CXX", "g++")
    flags = [
        cxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-unused-parameter", "-DMEGACORE_WITH_CUDA",
        f"-I{tmp_path}", f"-I{tinc}",
        f"-I{tinc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{_cuda_include()}", f"-I{ROOT / 'cpp'}",
    ]  # fmt: skip
    assert len(CUDA_GLUE) >= 6

    def check(source: Path) -> str:
        r = subprocess.run([*flags, str(source)], capture_output=True, text=True)
        return "" if r.returncode == 0 else f"{source.relative_to(ROOT)} does not compile:\n{r.stderr[-4000:]}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        failures = [f for f in pool.map(check, CUDA_GLUE) if f]
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_each_forced_cpu_isa_matches_the_references(capability, tmp_path):
    """Re-runs the reference tests marked `isa` with ATEN_CPU_CAPABILITY forced, so every per-ISA build
    of the kernels is exercised (the native one, AVX512 here, runs in the main session)."""
    if capability.upper() not in megacore.build_info()["cpu_isas"]:
        pytest.skip(f"{capability} kernels not built on this platform")
    # Inductor's on-disk cache is not keyed by ATEN_CPU_CAPABILITY: kernels compiled for the native width
    # would be reused at another width and read and write past their buffers. A cache of its own per level.
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, CUDA_VISIBLE_DEVICES="",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
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
