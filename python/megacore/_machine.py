"""What this machine computes natively, and the dtype ``--dtype auto`` picks from it.

bf16 training is about twice as fast as fp32 where the hardware has bf16 instructions (measured on this
project's machines: gpt-tiny 7,727 vs 3,805 tokens/s on a Zen 4 CPU with AVX512-BF16) and slower where it
is emulated. The detection lives here once; ``megacore train`` (its header line) and ``megacore info``
(its ``"machine"`` section) both read it.
"""

from __future__ import annotations

from typing import Optional

import torch

# The CPU instruction sets that compute bf16 natively, as /proc/cpuinfo and torch.cpu.get_capabilities()
# name them, with the names people know them by.
CPU_BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
_CPUINFO = "/proc/cpuinfo"


def _proc_cpuinfo_flags() -> set:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    try:
        with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def _torch_cpu_capabilities() -> Optional[dict]:
    """torch's own CPU probe (cpuinfo, so it works without /proc too): torch.cpu.get_capabilities() where
    this torch has it, its older private probes otherwise, None where neither exists."""
    cpu = torch.cpu
    try:
        if hasattr(cpu, "get_capabilities"):
            return dict(cpu.get_capabilities())
        if hasattr(cpu, "_is_avx512_bf16_supported") and hasattr(cpu, "_is_amx_tile_supported"):
            # Every CPU with AMX tiles so far has AMX-BF16; the old probes only ask about the tiles.
            return {"avx512_bf16": cpu._is_avx512_bf16_supported(), "amx_bf16": cpu._is_amx_tile_supported()}
    except RuntimeError:  # cpuinfo could not read this CPU: /proc/cpuinfo may still tell
        pass
    return None


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 instruction sets of this CPU: the keys of ``CPU_BF16_FLAGS`` it has (e.g.
    ``["avx512_bf16", "amx_bf16"]``; ``[]`` on CPUs without them, and on other architectures)."""
    caps = _torch_cpu_capabilities()
    if caps is None:
        caps = dict.fromkeys(_proc_cpuinfo_flags(), True)
    return [flag for flag in CPU_BF16_FLAGS if caps.get(flag)]


def cuda_devices() -> list[dict]:
    """Each visible CUDA (or ROCm) device: ``{"index", "name", "compute_capability", "bf16_native"}``;
    ``[]`` without CUDA. bf16 is native from compute capability 8.0 (Ampere) on, and on every ROCm GPU:
    the rule of ``torch.cuda.is_bf16_supported(including_emulation=False)``, asked of each device rather
    than only the current one."""
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        devices.append({"index": index, "name": torch.cuda.get_device_name(index),
                        "compute_capability": f"{major}.{minor}",
                        "bf16_native": bool(torch.version.hip) or major >= 8})
    return devices


def auto_dtype(device) -> tuple[str, str]:
    """(``"bfloat16"`` or ``"float32"``, why) for training on ``device`` (a torch.device or its name):
    bf16 (with fp32 master weights) where the device computes it natively, fp32 elsewhere. ``why`` is a
    short phrase for logs, e.g. ``"this CPU has AVX512-BF16 and AMX-BF16"``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = next((d for d in cuda_devices() if d["index"] == index), None)
        if gpu is None:
            return "float32", f"CUDA device {index} is not visible"
        where = f"GPU {index} ({gpu['name']}, compute capability {gpu['compute_capability']})"
        if gpu["bf16_native"]:
            return "bfloat16", f"{where} computes bf16 natively"
        return "float32", f"{where} has no native bf16"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return "bfloat16", "this CPU has " + " and ".join(CPU_BF16_FLAGS[f] for f in flags)
        return "float32", "this CPU has no native bf16 instructions"
    return "float32", f"no check of native bf16 for {device.type} devices"


def machine_info(device=None) -> dict:
    """What ``megacore info`` reports about this machine: ``cpu_bf16_native``, ``cpu_flags_bf16``,
    ``cuda_devices`` (see :func:`cuda_devices`), and ``auto_dtype`` / ``why`` for ``device`` (default:
    torch's default device, where ``megacore train`` builds its model)."""
    flags = cpu_bf16_flags()
    dtype, why = auto_dtype(torch.get_default_device() if device is None else device)
    return {"cpu_bf16_native": bool(flags), "cpu_flags_bf16": flags, "cuda_devices": cuda_devices(),
            "auto_dtype": dtype, "why": why}


__all__ = ["CPU_BF16_FLAGS", "auto_dtype", "cpu_bf16_flags", "cuda_devices", "machine_info"]
