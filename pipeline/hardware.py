"""What a worker runs on: CPU cores, memory, and its GPUs where it has any.

Every probe is best effort and never raises: a machine without a GPU, without
``nvidia-smi`` or without CUDA libraries simply reports no GPU. GPUs are read
from ``nvidia-smi`` where present (name, VRAM total and free, driver and CUDA
version); otherwise CTranslate2 counts CUDA devices and torch, if installed,
names them.

``cuda_status`` says whether transcription can run on CUDA here, and when a GPU
is seen (or CUDA is asked for) but cannot be used, why: no device that
CTranslate2 sees, its CUDA libraries missing, or cuBLAS refusing to start.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
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


def cuda_status(
    device: str = "auto",
    library_dirs: Sequence[Path] | None = None,
    gpus: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Whether faster-whisper can run on CUDA on this machine, and if not, why.

    Returns ``wanted`` (CUDA is asked for: ``device`` is ``cuda``, or ``auto``
    on a machine where a GPU is seen), ``usable``, ``devices`` (CUDA devices
    CTranslate2 counts), ``libraries`` (``cuda_libs.preload``'s findings) and
    ``problems``, one line each. Wanted but not usable: the worker's GPU sits
    idle while its tasks move to CPU, which its boot log and heartbeat say.
    Nothing is probed for ``device`` ``cpu``.

    Parameters:
      device: the worker's Whisper device (``MORAG_WHISPER_DEVICE``).
      library_dirs: where to load the CUDA libraries from (``MORAG_CUDA_LIBRARY_PATH``);
        None: the environment's NVIDIA packages, then the system loader.
      gpus: the GPUs ``nvidia-smi`` lists (default: asked here).
    """
    if device == "cpu":
        return {"wanted": False, "usable": False, "devices": 0, "problems": []}
    from pipeline.processors import cuda_libs

    problems: list[str] = []
    try:
        import ctranslate2

        devices = ctranslate2.get_cuda_device_count()
    except Exception as exc:
        devices = 0
        problems.append(f"CTranslate2 cannot count CUDA devices: {exc}")
    listed = (nvidia_smi() if gpus is None else gpus) or []
    if devices <= 0 and device != "cuda" and not listed:
        return {"wanted": False, "usable": False, "devices": 0, "problems": []}
    if devices <= 0 and not problems:
        problem = "no CUDA device that CTranslate2 can use"
        if listed:
            driver = listed[0].get("driver") or "?"
            problem += (
                f", though nvidia-smi lists {len(listed)} GPU(s) (driver {driver}, CUDA "
                f"{listed[0].get('cuda') or '?'}): CTranslate2 is built for CUDA 12 and needs a driver for it"
            )
        problems.append(problem)
    libraries = cuda_libs.preload(library_dirs)
    if not libraries.ok:
        problems.append(str(libraries.problem))
    elif devices > 0:
        refused = cuda_libs.cublas_probe()
        if refused:
            problems.append(refused)
    return {
        "wanted": True,
        "usable": not problems,
        "devices": max(devices, 0),
        "libraries": libraries.to_dict(),
        "problems": problems,
    }


def describe() -> dict[str, Any]:
    """CPU, memory and GPUs, as a heartbeat carries them."""
    return {**cpu_info(), "gpus": gpu_info(), "python": sys.version.split()[0]}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.hardware``: print what a worker on this machine reports, as JSON.

    Its hardware and, under ``cuda``, ``cuda_status``. Exits 1 when CUDA is wanted
    (a GPU is seen, or ``--device cuda``) but cannot be used, else 0.
    """
    import argparse
    import json

    from pipeline.processors import cuda_libs

    parser = argparse.ArgumentParser(prog="python -m pipeline.hardware", description=main.__doc__)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument(
        "--cuda-library-path", default="", help="folders separated by ':' (default: packages)"
    )
    args = parser.parse_args(argv)
    cuda = cuda_status(args.device, cuda_libs.dirs_from(args.cuda_library_path))
    print(json.dumps({**describe(), "cuda": cuda}, indent=2))
    return 1 if cuda["wanted"] and not cuda["usable"] else 0


if __name__ == "__main__":
    sys.exit(main())
