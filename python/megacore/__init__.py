"""megacore: Megatron-LM-style transformer training with a C++/CUDA core.

The compiled core (`megacore._C`) registers the fused ops as `torch.ops.megacore.*`; `megacore.ops`
is their public functional API (autograd, fake kernels for torch.compile, pure-PyTorch references).
"""

from __future__ import annotations

__version__ = "0.1.0"

try:
    from megacore import _C  # noqa: F401  (loads the library: registers torch.ops.megacore.*)
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "megacore's compiled core (megacore._C) is missing or does not load. Build it with "
        "`pip install --no-build-isolation -e .` (see README.md). Cause: " + str(e)
    ) from e

from megacore import ops  # noqa: E402


def build_info() -> dict:
    """What this build contains.

    Returns a dict with: ``version``; ``cpu_isas`` (ISAs the CPU kernels were compiled for, e.g.
    ``["DEFAULT", "AVX2", "AVX512"]``) and ``cpu_isa_active`` (the one this process runs, from torch's
    CPU capability, which ``ATEN_CPU_CAPABILITY`` overrides); ``cuda`` (bool) and ``cuda_archs``;
    ``torch_version`` (built against) and ``torch_runtime_version`` (imported now); ``compiler``,
    ``cxx_standard``, ``build_type``, ``openmp``.
    """
    import torch

    info = dict(_C.build_info())
    info["version"] = __version__
    info["torch_runtime_version"] = torch.__version__
    return info


__all__ = ["build_info", "ops", "__version__"]
