"""Build of ultimus-kernels: pure Python, plus two optional compiled extensions.

    ultimus_kernels._C       the op schemas and their C++ autograd, and the CPU kernels (always attempted)
    ultimus_kernels._C_cuda  CUDA kernels (attempted when nvcc is found; no GPU needed to build)

A failed or skipped extension never fails the install: the reference and Triton backends need
neither, and `python -m ultimus_kernels` says what was built and why the rest was not (the
reasons are written to ultimus_kernels/_build_info.json at build time).

Environment variables:
    ULTIMUS_SKIP_CUDA=1      do not build the CUDA extension
    ULTIMUS_FORCE_CUDA=1     build it and fail the install if that fails
    ULTIMUS_NO_EXTENSIONS=1  build no compiled extension at all (a pure-Python install)
    ULTIMUS_CPU_ARCH=native  the -march of the CPU kernels on x86-64 (default native: the SIMD of the
                             installing machine; set e.g. x86-64-v3, or "none" for a portable build)
    TORCH_CUDA_ARCH_LIST     GPU architectures (default: the visible GPU's, else "8.0;9.0")
    MAX_JOBS                 parallel compile jobs (ninja)
    CUDA_HOME                CUDA toolkit prefix (default: found from nvcc on PATH)
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent.resolve()
BUILD_INFO = HERE / "ultimus_kernels" / "_build_info.json"


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> str | None:
    """The CUDA toolkit prefix. The `nvcc` on PATH may be a small wrapper script (it is on some
    machines), in which case torch's own guess is wrong: follow the wrapper to the real compiler."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent)
        try:
            text = real.read_text(errors="ignore")[:4096] if real.stat().st_size < 65536 else ""
        except OSError:
            text = ""
        for match in re.findall(r"(/\S+)/bin/nvcc\b", text):  # e.g. `exec /opt/cuda-x/bin/nvcc "$@"`
            candidates.append(Path(match))
    candidates.append(Path("/usr/local/cuda"))
    for prefix in candidates:
        if (prefix / "bin" / "nvcc").is_file() and (prefix / "include" / "cuda_runtime.h").is_file():
            return str(prefix)
    return None


def extensions():
    """(ext_modules, cmdclass, report) for this machine; imports torch only when building."""
    report: dict[str, str] = {}
    if flag("ULTIMUS_NO_EXTENSIONS"):
        report["_C"] = report["_C_cuda"] = "skipped: ULTIMUS_NO_EXTENSIONS=1 was set at install time"
        return [], {}, report
    cuda_home = None if flag("ULTIMUS_SKIP_CUDA") else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # torch.utils.cpp_extension reads it at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # no torch in the build environment
        report["_C"] = report["_C_cuda"] = f"skipped: torch was not importable at build time ({exc})"
        return [], {}, report

    cxx = ["-O3", "-fno-math-errno", "-fno-trapping-math"]  # the C++ standard is torch's choice
    # -fopenmp: at::parallel_for runs serially without it. -march: the CPU kernel's chunk is one SIMD
    # register (AVX-512: 16 floats, AVX2: 8, SSE: 4), so the SIMD width compiled for sets its speed.
    cpu_cxx = cxx + ["-fopenmp"]
    arch = os.environ.get("ULTIMUS_CPU_ARCH", "native").strip()
    if arch and arch != "none" and platform.machine().lower() in ("x86_64", "amd64"):
        cpu_cxx.append(f"-march={arch}")
    ext_modules = [
        CppExtension(
            "ultimus_kernels._C",
            ["csrc/ultimus_ops.cpp", "csrc/ultimus_cpu.cpp"],
            extra_compile_args={"cxx": cpu_cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    force_cuda = flag("ULTIMUS_FORCE_CUDA")
    if flag("ULTIMUS_SKIP_CUDA"):
        report["_C_cuda"] = "skipped: ULTIMUS_SKIP_CUDA=1 was set at install time"
    elif torch.version.cuda is None:
        report["_C_cuda"] = f"skipped: the installed torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        report["_C_cuda"] = "skipped: nvcc (the CUDA toolkit) was not found at install time; set CUDA_HOME"
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # torch's arch detection needs a visible GPU (it fails with IndexError without one).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        ext_modules.append(
            CUDAExtension(
                "ultimus_kernels._C_cuda",
                ["csrc/cuda/ultimus_cuda.cu"],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            )
        )

    class ReportingBuildExtension(BuildExtension):
        """Builds each extension on its own; a failure is recorded instead of failing the install."""

        failed: set = set()

        def copy_extensions_to_source(self):
            # Editable installs copy every extension into the source tree: leave out the failed ones.
            self.extensions = [e for e in self.extensions if e.name not in self.failed]
            super().copy_extensions_to_source()

        def build_extension(self, ext):
            short = ext.name.rsplit(".", 1)[-1]
            try:
                super().build_extension(ext)
                report[short] = "built"
            except Exception as exc:
                if short == "_C_cuda" and force_cuda:
                    raise
                self.failed.add(ext.name)
                report[short] = f"build failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
                print(f"WARNING: ultimus-kernels: building {ext.name} failed; the other backends still work. {exc}")
            write_report(report)

    return ext_modules, {"build_ext": ReportingBuildExtension.with_options(no_python_abi_suffix=False)}, report


def write_report(report: dict[str, str]) -> None:
    try:
        BUILD_INFO.write_text(json.dumps(report, indent=1) + "\n")
    except OSError:
        pass


ext_modules, cmdclass, report = extensions()
write_report(report)

setup(
    name="ultimus-kernels",
    version="0.1.0",
    description="The Ultimus attention block fused into one GPU kernel (Triton, C++/CUDA), with exact gradients",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    # Only the library is installed: model/ and training/ are parts of the checkout that train.py, bench/
    # and the tests use (generic top-level names that must not land in a user's site-packages).
    packages=find_packages(include=["ultimus_kernels", "ultimus_kernels.*"]),
    package_data={"ultimus_kernels": ["_build_info.json"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy>=1.24",
        "tqdm>=4.60",
        "matplotlib>=3.6",
        "pytest>=7",
    ],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
