"""What the tests of GPU workers share: whether this machine has a CUDA device.

Tests marked ``gpu`` need one. Without it they are skipped, except where the GPU
check demands one (``MORAG_TEST_REQUIRE_GPU=1``, set by ``tests/gpu/gpu_check.sh``):
there a machine whose GPU CTranslate2 cannot see fails, naming why, instead of
passing with every test skipped.
"""

from __future__ import annotations

import os

import pytest

from pipeline import hardware

#: Set by tests/gpu/gpu_check.sh: a missing CUDA device fails the run instead of skipping it.
REQUIRE_GPU = os.environ.get("MORAG_TEST_REQUIRE_GPU") == "1"


def cuda_devices() -> int:
    import ctranslate2

    return ctranslate2.get_cuda_device_count()


@pytest.fixture
def cuda_device() -> None:
    """Skip the test on a machine without a CUDA device (fail it under MORAG_TEST_REQUIRE_GPU=1)."""
    if cuda_devices() > 0:
        return
    if REQUIRE_GPU:
        problems = hardware.cuda_status("cuda")["problems"]
        pytest.fail(f"no CUDA device on this machine, and the GPU check needs one: {problems}")
    pytest.skip("no CUDA device on this machine")
