"""What a worker runs on: CPU cores, memory, and its GPUs where it has any.

Every probe is best effort and never raises: a machine without a GPU, without
``nvidia-smi`` or without CUDA libraries simply reports no GPU. GPUs are read
from ``nvidia-smi`` where present (name, VRAM total and free, driver and CUDA
version); otherwise CTranslate2 counts CUDA devices and torch, if installed,
names them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Any

_SMI_FIELDS = ("index", "name", "memory.total", "memory.free", "driver_version")


def cpu_info() -> dict[str, Any]:
    """CPU cores and memory (MiB) of this machine."""
    info: dict[str, Any] = {"cpu_cores": os.cpu_count() or 1}
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        info["ram_total_mb"] = os.sysconf("SC_PHYS_PAGES") * page // 2**20
        info["ram_free_mb"] = os.sysconf("SC_AVPHYS_PAGES") * page // 2**20
    except (ValueError, OSError, AttributeError):
        pass
    return info


def nvidia_smi(timeout: float = 5.0) -> list[dict[str, Any]] | None:
    """The GPUs ``nvidia-smi`` lists, or None when it is missing or fails."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        listing = subprocess.run(
            [binary, f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        ).stdout
        header = subprocess.run([binary], capture_output=True, text=True, timeout=timeout).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"CUDA Version:\s*([\d.]+)", header)
    cuda = found.group(1) if found else None
    gpus = []
    for line in listing.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != len(_SMI_FIELDS):
            continue
        index, name, total, free, driver = parts
        gpus.append(
            {
                "index": _int(index),
                "name": name,
                "vram_total_mb": _int(total),
                "vram_free_mb": _int(free),
                "driver": driver,
                "cuda": cuda,
            }
        )
    return gpus


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def _from_libraries() -> list[dict[str, Any]]:
    """GPUs as CTranslate2 counts them, named by torch where it is installed."""
    try:
        import ctranslate2

        count = ctranslate2.get_cuda_device_count()
    except Exception:
        return []
    if count <= 0:
        return []
    gpus: list[dict[str, Any]] = [{"index": i, "name": "CUDA device"} for i in range(count)]
    try:
        import torch

        if torch.cuda.is_available():
            for gpu in gpus:
                free, total = torch.cuda.mem_get_info(gpu["index"])
                gpu.update(
                    name=torch.cuda.get_device_name(gpu["index"]),
                    vram_total_mb=total // 2**20,
                    vram_free_mb=free // 2**20,
                    cuda=torch.version.cuda,
                )
    except Exception:
        pass
    return gpus


def gpu_info() -> list[dict[str, Any]]:
    """This machine's GPUs; an empty list when it has none or none can be seen."""
    try:
        gpus = nvidia_smi()
    except Exception:
        gpus = None
    return gpus if gpus is not None else _from_libraries()


def describe() -> dict[str, Any]:
    """CPU, memory and GPUs, as a heartbeat carries them."""
    return {**cpu_info(), "gpus": gpu_info(), "python": sys.version.split()[0]}
