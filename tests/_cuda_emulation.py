"""Builds csrc/cuda/emulation.cpp: the CUDA extension's kernels and launchers compiled with the C++
compiler for the CPU emulation of CUDA in csrc/cuda/emulation.h (see there). One build per source
version, cached under the system temp folder; about a minute on two cores."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
NAME = "ultimus_cuda_emulation"


def _command(source: Path, out: Path) -> list[str]:
    import torch.utils.cpp_extension as ce

    cxx = os.environ.get("CXX", "c++")
    includes = [*ce.include_paths(), sysconfig.get_paths()["include"]]
    libs = ce.library_paths()
    abi = int(getattr(__import__("torch")._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return [
        cxx, "-std=c++20", "-O1", "-g0", "-shared", "-fPIC", "-pthread", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DTORCH_EXTENSION_NAME={NAME}", "-DTORCH_API_INCLUDE_EXTENSION_H",
        *[f"-I{p}" for p in includes], str(source), "-o", str(out),
        *[f"-L{p}" for p in libs], "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
        *[f"-Wl,-rpath,{p}" for p in libs],
    ]  # fmt: skip


class NoCompiler(RuntimeError):
    """There is no C++ compiler to build the emulation with (the tests skip: nothing to check it on)."""


def build():
    """The compiled emulation module, built if this version of the sources has not been."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise NoCompiler(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) to build the CUDA emulation with")
    digest = hashlib.sha256()
    for path in sorted(CSRC.rglob("*")):
        if path.suffix in (".h", ".cuh", ".cpp"):
            digest.update(path.name.encode() + path.read_bytes())
    digest.update(sys.version.encode() + __import__("torch").__version__.encode())
    folder = Path(tempfile.gettempdir()) / f"{NAME}_{digest.hexdigest()[:16]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    library = folder / f"{NAME}{suffix}"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f"building-{os.getpid()}{suffix}"
        run = subprocess.run(_command(CSRC / "cuda" / "emulation.cpp", partial), capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation failed:\n{run.stderr[-6000:]}")
        os.replace(partial, library)  # atomic: a concurrent test process sees the whole file or none
    spec = importlib.util.spec_from_file_location(NAME, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    import time

    t0 = time.time()
    print(build(), f"{time.time() - t0:.1f} s")
