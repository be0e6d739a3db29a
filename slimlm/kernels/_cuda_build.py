"""Compile slimlm's CUDA C++ kernels (``csrc/*.cu``) with ``nvcc`` into cached shared
libraries that ``ctypes`` loads (no PyTorch C++ headers, no ABI coupling).

A library is built once per source and GPU architecture, into ``$SLIMLM_CACHE`` (default
``~/.cache/slimlm``)``/cuda`` under a name that hashes the source and the ``.cuh`` headers
beside it (``csrc/common.cuh``: helpers the kernels share), written under a
temporary name and renamed: concurrent and interrupted builds never leave a broken file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["arch_of", "build_library", "cache_dir", "load_library", "nvcc_path", "tried"]

_LIBS: dict[tuple[str, str], Any] = {}  # (source, arch) -> library, or a failure's message
_LOCK = threading.Lock()


def nvcc_path() -> str | None:
    """The ``nvcc`` to build with: ``$CUDA_HOME/bin/nvcc``, else the one on ``PATH``."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cache_dir() -> Path:
    root = os.environ.get("SLIMLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "slimlm")
    return Path(root) / "cuda"


def arch_of(device: torch.device) -> str:
    """``"90"`` for an sm_90 GPU."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def build_library(source: Path, arch: str, *, who: str, nvcc: str | None = None,
                  out_dir: Path | None = None) -> Path:
    """Compile ``source`` for ``sm_<arch>`` unless a build of this exact source is cached;
    returns the library's path. ``who`` names the caller in error messages."""
    nvcc = nvcc or nvcc_path()
    if nvcc is None:
        raise RuntimeError(f"{who}: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    if not arch.isdigit():
        raise ValueError(f"{who}: arch={arch!r}: expected digits such as '90'")
    src = source.read_bytes()
    for header in sorted(source.parent.glob("*.cuh")):  # the headers it may include
        src += header.name.encode() + header.read_bytes()
    digest = hashlib.sha256(src + arch.encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"{source.stem}-{digest}-sm{arch}.so"
    if lib.is_file():
        return lib
    fd, tmp = tempfile.mkstemp(prefix=lib.name, suffix=".tmp", dir=out_dir)
    os.close(fd)
    cmd = [nvcc, "-O3", "--use_fast_math", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", tmp, str(source)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(f"{who}: nvcc failed ({res.returncode}):\n{res.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load_library(source: Path, device: torch.device, *, who: str,
                 configure: Callable[[ctypes.CDLL], None],
                 params: tuple[str, type[ctypes.Structure]] | None = None) -> ctypes.CDLL:
    """The library of ``source`` for ``device``'s architecture, built on first use and
    passed to ``configure`` (argument types) once; ``params`` = (name of the library's
    ``int f()`` returning sizeof its parameter struct, the ctypes mirror) is checked then.
    A failure is remembered (not retried per call) and raised as RuntimeError."""
    arch = arch_of(device)
    key = (str(source), arch)
    with _LOCK:
        got = _LIBS.get(key)
        if got is None:
            try:
                lib = ctypes.CDLL(str(build_library(source, arch, who=who)))
                configure(lib)
                if params is not None and getattr(lib, params[0])() != ctypes.sizeof(params[1]):
                    raise RuntimeError(f"{who}: {params[1].__name__} does not match the size "
                                       f"of the struct in {source.name}")
                got = lib
            except Exception as e:
                got = f"{type(e).__name__}: {e}"
            _LIBS[key] = got
    if isinstance(got, str):
        raise RuntimeError(got)
    return got


def tried(source: Path, device: torch.device) -> bool:
    """Whether :func:`load_library` already ran for this source and device architecture."""
    return (str(source), arch_of(device)) in _LIBS
