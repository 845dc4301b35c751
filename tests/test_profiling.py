"""Profiling marks: every CUDA launcher opens an NVTX range named after its torch op, docs/profiling.md
lists every name a profile can show, and MEGACORE_PROFILE_STEPS picks the steps the CUDA profiler records.
The phases of the layer and the training step are in tests/transformer/test_profiling.py and
tests/training/test_trainer.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from megacore._profiling import PROFILE_STEPS_ENV, ProfileWindow

ROOT = Path(__file__).resolve().parents[1]

_LAUNCHER_DECL = re.compile(r"^MEGACORE_KERNEL\(\s*(\w+)\s*,", re.M)
_RANGE = re.compile(r"\bNvtxRange\s+\w+\s*\(([^;]*)\)\s*;")
_LITERAL = re.compile(r'"([^"]*)"')


def launchers(header_text: str) -> list[str]:
    """The kernels a cpp/kernels/<family>.h declares with MEGACORE_KERNEL(name, Params): each has a CUDA
    launcher `cudaError_t name(const Params&, cudaStream_t)` in kernels/cuda/<family>.cu."""
    return _LAUNCHER_DECL.findall(header_text)


def _body(source: str, name: str):
    """The body of the definition of `name` in `source` (declarations skipped), or None."""
    for m in re.finditer(rf"^cudaError_t\s+{name}\s*\(", source, re.M):
        end = min((i for i in (source.find("{", m.end()), source.find(";", m.end())) if i >= 0), default=-1)
        if end < 0 or source[end] != "{":
            continue
        depth = 0
        for i in range(end, len(source)):
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            if depth == 0:
                return source[end + 1: i]
    return None


def launcher_problems(headers: dict[str, str], sources: dict[str, str], ops: set[str]) -> list[str]:
    """What is wrong with the NVTX ranges of the launchers declared in `headers` ({file: text}) and defined
    in `sources`: a launcher with no definition, with no `NvtxRange` in its body, or whose range names are
    not "megacore.<op>" for a registered op in `ops`."""
    problems = []
    for header, text in sorted(headers.items()):
        for name in launchers(text):
            bodies = [(f, b) for f, s in sources.items() if (b := _body(s, name)) is not None]
            if not bodies:
                problems.append(f"{header}: {name} has no definition in kernels/cuda/*.cu")
                continue
            file, body = bodies[0]
            ranges = _RANGE.findall(body)
            if not ranges:
                problems.append(f"{file}: launcher {name} opens no NvtxRange")
                continue
            names = [lit for args in ranges for lit in _LITERAL.findall(args)]
            bad = [n for n in names if not (n.startswith("megacore.") and n.removeprefix("megacore.") in ops)]
            if not names or bad:
                problems.append(f"{file}: launcher {name}'s NVTX range names {bad or names} are not "
                                "'megacore.<op>' for an op defined with define_op")
    return problems


def registered_ops() -> set[str]:
    """The ops the C++ sources define (define_op(m, "name(...)...")), from the source text."""
    text = "".join(p.read_text() for p in sorted((ROOT / "cpp").rglob("*.cpp")))
    return set(re.findall(r'define_op\(\s*m,\s*"(\w+)\(', text))


def _read(*patterns: str) -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for pattern in patterns for p in sorted(ROOT.glob(pattern))}


def _cuda_sources() -> dict[str, str]:
    return _read("cpp/kernels/cuda/*.cu")


def nvtx_range_names() -> set[str]:
    """Every NVTX range name in the CUDA kernels."""
    return {lit for text in _cuda_sources().values() for args in _RANGE.findall(text) for lit in _LITERAL.findall(args)}


def test_every_cuda_launcher_opens_an_nvtx_range_named_after_its_op():
    # every family header but the shared ones and the CPU-only kernels (MEGACORE_CPU_KERNEL: kernels/linear.h)
    headers = {f: t for f, t in _read("cpp/kernels/*.h").items()
               if Path(f).name not in ("common.h", "philox.h") and not re.search(r"^MEGACORE_CPU_KERNEL\(", t, re.M)}
    sources = _cuda_sources()
    families = {Path(f).stem for f in sources if Path(f).stem != "common"}
    assert len(families) >= 6 and all(launchers(text) for text in headers.values()), \
        "a kernels/<family>.h declares no kernel: the check would see nothing"
    assert {Path(f).stem for f in headers} == families, "a family's header and CUDA kernels are not paired"
    assert launcher_problems(headers, sources, registered_ops()) == []


def test_the_launcher_check_catches_a_missing_or_misnamed_range():
    header = {"kernels/x.h": "MEGACORE_KERNEL(foo_forward, FooForward)\n"
                             "MEGACORE_KERNEL(foo_backward, FooBackward)\n"
                             "MEGACORE_KERNEL(foo_extra, FooExtra)\n"}
    source = {"kernels/cuda/x.cu": "cudaError_t foo_forward(const void* x, cudaStream_t stream);\n"  # a declaration
                           "cudaError_t foo_forward(const void* x, cudaStream_t stream) {\n"
                           "  if (x) { return launch(x, stream); }\n  return cudaSuccess;\n}\n"
                           "cudaError_t foo_backward(const void* g, cudaStream_t stream) {\n"
                           '  NvtxRange range("megacore.foo_bwd");\n  return launch(g, stream);\n}\n'}
    assert launcher_problems(header, source, {"foo", "foo_backward"}) == [
        "kernels/cuda/x.cu: launcher foo_forward opens no NvtxRange",
        "kernels/cuda/x.cu: launcher foo_backward's NVTX range names ['megacore.foo_bwd'] are not 'megacore.<op>' for an op "
        "defined with define_op",
        "kernels/x.h: foo_extra has no definition in kernels/cuda/*.cu",
    ]
    fixed = {"kernels/cuda/x.cu": source["kernels/cuda/x.cu"].replace("{\n  if (x)", '{\n  NvtxRange range("megacore.foo");\n  if (x)')
             .replace("megacore.foo_bwd", "megacore.foo_backward") + "cudaError_t foo_extra(cudaStream_t s) {\n"
             '  NvtxRange r(s ? "megacore.foo" : "megacore.foo_backward");\n  return cudaSuccess;\n}\n'}
    assert launcher_problems(header, fixed, {"foo", "foo_backward"}) == []


def test_docs_profiling_names_every_range_and_phase():
    doc = (ROOT / "docs" / "profiling.md").read_text()
    layer = "".join(p.read_text() for p in sorted((ROOT / "cpp" / "transformer").glob("*.cpp")))
    phases = set(re.findall(r'"(megacore\.transformer_layer(?:_backward|_decode)?\.\w+)"', layer))
    python = "".join(p.read_text() for p in (ROOT / "python" / "megacore").rglob("*.py"))
    steps = set(re.findall(r'\bphase\("(megacore\.\w+)"\)', python))
    ops = "".join(p.read_text() for p in sorted((ROOT / "cpp" / "ops").glob("*.cpp")))
    op_phases = set(re.findall(r'ProfilePhase \w+\("(megacore\.[\w.]+)"\)', ops))
    assert len(phases) >= 12 and len(steps) >= 8 and op_phases, (phases, steps, op_phases)
    missing = sorted(n for n in nvtx_range_names() | phases | steps | op_phases if f"`{n}`" not in doc)
    assert missing == [], f"docs/profiling.md does not name {missing}"


def test_profile_window_from_the_environment(monkeypatch):
    monkeypatch.delenv(PROFILE_STEPS_ENV, raising=False)
    assert ProfileWindow.from_env() is None
    monkeypatch.setenv(PROFILE_STEPS_ENV, "10-12")
    w = ProfileWindow.from_env()
    assert (w.first, w.last) == (10, 12)
    monkeypatch.setenv(PROFILE_STEPS_ENV, "7")
    assert (ProfileWindow.from_env().first, ProfileWindow.from_env().last) == (7, 7)
    for bad in ("12-10", "0-3", "a-b", "3-"):
        monkeypatch.setenv(PROFILE_STEPS_ENV, bad)
        with pytest.raises(ValueError, match=f"MEGACORE_PROFILE_STEPS='{bad}', expected 'N-M' or 'N'"):
            ProfileWindow.from_env()


def test_profile_window_starts_and_stops_the_cuda_profiler_around_its_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: calls.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: calls.append("stop"))
    w = ProfileWindow(2, 3)
    for step in range(1, 6):
        w.before_step(step)
        calls.append(step)
        w.after_step(step)
    assert calls == [1, "start", 2, 3, "stop", 4, 5]
