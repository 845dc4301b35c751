"""Build megacore's C++/CUDA core with CMake + Ninja.

`pip install --no-build-isolation -e .` and `pip wheel --no-build-isolation .` both go through
`CMakeBuild` below. The CMake build directory is fixed per environment (a hash of the Python, torch,
cmake and the CMake arguments), so rebuilds are incremental even though pip builds editable installs
from a fresh temporary directory each time.

Environment variables:
  MEGACORE_CUDA=0|1        force the CUDA kernels off/on (default: on when torch has CUDA and nvcc is found)
  MEGACORE_CUDA_ARCH=...   CUDA architectures, CMake syntax (default "80;90")
  MEGACORE_BUILD_TYPE=...  CMake build type (default Release)
  MEGACORE_BUILD_DIR=...   override the build directory
  MAX_JOBS=N               parallel compile jobs
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _cmake_executable() -> str:
    # pip's cmake (>= 3.26) knows CUDA 13's include/cccl layout; fall back to the one on PATH.
    try:
        import cmake

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("megacore build: cmake not found; `pip install cmake ninja` first")
    return exe


def _want_cuda(torch) -> bool:
    flag = os.environ.get("MEGACORE_CUDA")
    if flag is not None:
        if flag not in ("0", "1"):
            raise RuntimeError(f"megacore build: MEGACORE_CUDA must be 0 or 1, got {flag!r}")
        if flag == "1" and torch.version.cuda is None:
            raise RuntimeError(
                "megacore build: MEGACORE_CUDA=1 but the installed torch "
                f"{torch.__version__} has no CUDA; the CUDA glue needs a CUDA build of torch"
            )
        return flag == "1"
    nvcc = shutil.which("nvcc") or (
        os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None
    )
    return torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        cmake = _cmake_executable()
        cuda = _want_cuda(torch)
        build_type = os.environ.get("MEGACORE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={os.path.realpath(sys.executable)}",
            f"-DMEGACORE_TORCH_VERSION={torch.__version__}",
            f"-DMEGACORE_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if cuda:
            args.append(f"-DMEGACORE_CUDA_ARCH={os.environ.get('MEGACORE_CUDA_ARCH', '80;90')}")
        if shutil.which("ninja") or _has_module("ninja"):
            args += ["-G", "Ninja"]
            if _has_module("ninja"):
                import ninja

                args.append(f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}")

        key = "|".join([os.path.realpath(sys.executable), torch.__version__, cmake, *args])
        build_dir = Path(
            os.environ.get("MEGACORE_BUILD_DIR")
            or ROOT / "build" / hashlib.sha256(key.encode()).hexdigest()[:12]
        )
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"megacore build: CMake build directory {build_dir} ({key})", file=sys.stderr)

        if not (build_dir / "CMakeCache.txt").exists():
            subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--target", "_C", "--parallel", jobs], check=True
        )

        built = sorted(build_dir.glob("_C*.so")) + sorted(build_dir.glob("_C*.pyd"))
        if not built:
            raise RuntimeError(f"megacore build: CMake produced no _C library in {build_dir}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Copy to a temporary name and rename: a Python process that has the old library mapped
        # keeps working, and an interrupted copy never leaves a truncated _C in place.
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(built[0], tmp)
        os.replace(tmp, dest)


def _has_module(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


setup(
    package_dir={"": "python"},
    packages=find_packages(where="python"),
    # The embedded corpora: Jane Austen's novels (megacore.data.corpus) and the Spanish-English Bible verses
    # (megacore.data.parallel), xz-compressed, with their READMEs.
    package_data={"megacore.data": ["corpus/austen/*", "corpus/bible/*"]},
    ext_modules=[CMakeExtension("megacore._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
