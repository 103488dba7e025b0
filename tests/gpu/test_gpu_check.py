"""The GPU check script (tests/gpu/gpu_check.sh), as far as it runs without a GPU: it refuses to
pass on a machine without one, its CUDA report names what is missing, and its test run fails
rather than skips where no CUDA device is seen."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.gpu.conftest import cuda_devices

SCRIPT = ROOT / "tests" / "gpu" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_gpu_the_check_says_nothing_was_checked() -> None:
    proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no NVIDIA GPU on this machine" in proc.stderr and "nothing checked" in proc.stderr


def hardware_report(*args: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.hardware", *args], capture_output=True, text=True, timeout=120
    )
    return proc.returncode, json.loads(proc.stdout)


def test_the_cuda_report_names_the_missing_libraries(tmp_path: Path) -> None:
    code, report = hardware_report("--device", "cuda", "--cuda-library-path", str(tmp_path))
    assert code == 1
    assert report["cuda"]["usable"] is False
    assert report["cuda"]["libraries"]["missing"] == [
        "libnvrtc-builtins.so.12.*", "libnvrtc.so.12", "libcublasLt.so.12", "libcublas.so.12"
    ]  # fmt: skip
    assert any(f"libcublas.so.12 not found in {tmp_path}" in p for p in report["cuda"]["problems"])
    assert report["cpu_cores"] >= 1


@pytest.mark.skipif(cuda_devices() > 0, reason="this machine has a CUDA device")
def test_the_cuda_report_without_a_gpu_wants_nothing() -> None:
    code, report = hardware_report()
    assert code == 0
    assert report["cuda"] == {"wanted": False, "usable": False, "devices": 0, "problems": []}
    assert report["gpus"] == []


@pytest.mark.skipif(cuda_devices() > 0, reason="this machine has a CUDA device")
def test_where_the_check_needs_a_gpu_a_machine_without_one_fails_not_skips() -> None:
    tests = ["tests/gpu/test_cuda.py", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *tests], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "MORAG_TEST_REQUIRE_GPU": "1"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    assert "no CUDA device on this machine, and the GPU check needs one" in proc.stdout
    assert "no CUDA device that CTranslate2 can use" in proc.stdout
    # Each test stops at its fixture (an error, which fails the run); none passes or is skipped.
    assert re.search(r"\b\d+ errors?\b", proc.stdout), proc.stdout
    assert "passed" not in proc.stdout and "skipped" not in proc.stdout
