"""The CUDA libraries CTranslate2 opens on a GPU, loaded from the Python packages that ship them.

CTranslate2's Linux wheel (4.x, built for CUDA 12) carries the CUDA runtime
inside its own library and opens cuBLAS with ``dlopen("libcublas.so.12")``
the first time a model is placed on ``cuda``; ``libcuda.so.1`` comes with the
NVIDIA driver. It opens no cuDNN. cuBLAS needs cuBLASLt, which opens NVRTC
(``libnvrtc.so.12``), which opens its builtins (``libnvrtc-builtins.so.12.N``).
The ``nvidia-cublas-cu12`` package (in the ``gpu`` extra, with the
``nvidia-cuda-nvrtc-cu12`` it requires) installs them under
``site-packages/nvidia/{cublas,cuda_nvrtc}/lib``, folders the dynamic loader
never searches, so on its own the model fails to load on CUDA unless
``LD_LIBRARY_PATH`` names them.

``preload`` opens each library by its full path with ``RTLD_GLOBAL`` before a
model is loaded on CUDA: a later ``dlopen`` of the same soname is given the
library already in the process. ``cublas_probe`` asks the loaded cuBLAS for a
handle, which needs a working driver and device. Nothing else here needs a GPU:
the libraries load on any Linux machine.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The sonames CTranslate2's library opens itself (tests/processors/test_cuda_libs.py
#: reads them from the installed ctranslate2 and fails when they differ).
CTRANSLATE2_OPENS = ("libcublas.so.12",)
#: What ``preload`` opens, in order: each library after those it opens or needs.
#: A name with ``*`` is a file pattern (NVRTC's builtins carry the minor version).
LIBRARIES = ("libnvrtc-builtins.so.12.*", "libnvrtc.so.12", "libcublasLt.so.12", "libcublas.so.12")
#: How an operator gets them.
INSTALL_HINT = "pip install 'morag-pipeline[gpu]' brings them (nvidia-cublas-cu12, nvidia-cuda-nvrtc-cu12)"


@dataclass(frozen=True)
class CudaLibraries:
    """What ``preload`` found.

    Parameters:
      loaded: soname -> the file it was loaded from ("" when the system loader found it).
      missing: sonames found in none of the folders searched (nor by the system loader).
      failed: soname -> the loader's error, for files found that would not load.
      searched: the folders searched, in order.
      system: whether the system loader (``LD_LIBRARY_PATH``, ldconfig) was asked too.
    """

    loaded: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)
    searched: tuple[str, ...] = ()
    system: bool = True

    @property
    def ok(self) -> bool:
        """Every library CTranslate2 needs is in this process."""
        return not self.missing and not self.failed

    @property
    def problem(self) -> str | None:
        """One line saying what is wrong, naming the libraries and where they were looked for."""
        if self.ok:
            return None
        parts = []
        if self.missing:
            where = ", ".join(self.searched) or "no folder"
            also = " nor by the system loader" if self.system else ""
            parts.append(f"{', '.join(self.missing)} not found in {where}{also}")
        parts += [f"{soname} would not load: {error}" for soname, error in self.failed.items()]
        return f"CUDA libraries for CTranslate2: {'; '.join(parts)}; {INSTALL_HINT}"

    def to_dict(self) -> dict[str, Any]:
        """As a heartbeat carries it."""
        return {
            "ok": self.ok,
            "loaded": dict(self.loaded),
            "missing": list(self.missing),
            "failed": dict(self.failed),
            "searched": list(self.searched),
        }


def package_dirs(paths: Iterable[str] | None = None) -> list[Path]:
    """The ``nvidia/<package>/lib`` folders of the Python environment, in ``sys.path`` order.

    Parameters:
      paths: the import path to look in (default: ``sys.path``).
    """
    found: list[Path] = []
    for entry in sys.path if paths is None else paths:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            found += [lib for lib in sorted(root.glob("*/lib")) if lib.is_dir() and lib not in found]
    return found


def find(soname: str, dirs: Sequence[Path]) -> Path | None:
    """The first file named ``soname`` in ``dirs`` (for a pattern: the last match of the first
    folder with one); None when none has it."""
    for folder in dirs:
        if "*" in soname:
            matches = sorted(path for path in folder.glob(soname) if path.is_file())
            if matches:
                return matches[-1]
        elif (folder / soname).is_file():
            return folder / soname
    return None


def dirs_from(path: str) -> list[Path] | None:
    """The folders of a ``:``-separated list (``MORAG_CUDA_LIBRARY_PATH``); None when it is empty."""
    folders = [Path(part).expanduser() for part in path.split(":") if part.strip()]
    return folders or None


def preload(dirs: Sequence[Path | str] | None = None) -> CudaLibraries:
    """Load every library of ``LIBRARIES`` into this process, globally, so CTranslate2 finds them.

    Parameters:
      dirs: the folders to load them from, and only those. None: the NVIDIA
        packages of this Python environment (``package_dirs``), then, for a
        library none of them holds, the system loader (a CUDA toolkit on
        ``LD_LIBRARY_PATH`` or in ldconfig's cache).

    Loading is done once per process for each set of folders; a library already
    loaded stays loaded.
    """
    return _preload(None if dirs is None else tuple(str(Path(d)) for d in dirs))


@functools.cache
def _preload(dirs: tuple[str, ...] | None) -> CudaLibraries:
    system = dirs is None
    folders = package_dirs() if dirs is None else [Path(d) for d in dirs]
    loaded: dict[str, str] = {}
    missing: list[str] = []
    failed: dict[str, str] = {}
    for soname in LIBRARIES:
        path = find(soname, folders)
        if path is None and "*" in soname and system:
            continue  # a toolkit's own NVRTC finds its builtins where the system loader finds it
        if path is None and not system:
            missing.append(soname)
            continue
        try:
            ctypes.CDLL(str(path) if path else soname, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            if path is None:
                missing.append(soname)
            else:
                failed[soname] = str(exc)
            continue
        loaded[path.name if path else soname] = str(path) if path else ""
    return CudaLibraries(loaded, tuple(missing), failed, tuple(str(f) for f in folders), system)


def cublas_probe() -> str | None:
    """Ask the loaded cuBLAS for a handle and give it back: None when it works, else why not.

    Needs a CUDA device and its driver; call it after ``preload`` succeeded. The
    handle's CUDA context stays for the process, as the model's would.
    """
    try:
        cublas = ctypes.CDLL("libcublas.so.12", mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return f"libcublas.so.12 would not load: {exc}"
    handle = ctypes.c_void_p()
    status = cublas.cublasCreate_v2(ctypes.byref(handle))
    if status != 0:
        reason = _CUBLAS_STATUS.get(status, str(status))
        return f"cuBLAS cannot start on this machine: cublasCreate returned {reason}"
    cublas.cublasDestroy_v2(handle)
    return None


# cublasStatus_t values (cublas_api.h).
_CUBLAS_STATUS = {
    1: "CUBLAS_STATUS_NOT_INITIALIZED (no usable CUDA driver or device)",
    3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE",
    8: "CUBLAS_STATUS_ARCH_MISMATCH",
    13: "CUBLAS_STATUS_EXECUTION_FAILED",
    14: "CUBLAS_STATUS_INTERNAL_ERROR",
    15: "CUBLAS_STATUS_NOT_SUPPORTED",
}
