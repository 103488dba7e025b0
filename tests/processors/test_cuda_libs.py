"""The CUDA libraries CTranslate2 needs, as installed by the ``gpu`` extra: each loads, from the
environment's own NVIDIA packages, without LD_LIBRARY_PATH, and the list matches what the
installed ctranslate2 and each library actually open (read from the real files).

None of this needs a GPU: loading a shared library does not touch the device. A ctranslate2
built for another CUDA (libcublas.so.13) or one that starts opening cuDNN fails here, loudly.
"""

from __future__ import annotations

import ctypes
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import hardware
from pipeline.processors import cuda_libs

#: How a shared library names another (NEEDED entries and dlopen strings alike).
SONAME = re.compile(rb"lib[A-Za-z0-9_+-]+\.so(?:\.\d+)+")
#: The CUDA families: toolkit libraries (cu*, nv*, NCCL) and the driver.
CUDA_FAMILY = re.compile(r"^lib(cu|nv|nccl)")
#: What CTranslate2 names but the worker must not load from the packages, and why.
NOT_PRELOADED = {
    "libcuda.so.1": "the NVIDIA driver's own library, installed with the driver",
    "libnccl.so.2": "opened only for tensor parallelism over several GPUs (tensor_parallel=True), unused",
}


def ctranslate2_library() -> Path:
    """The installed ctranslate2's shared library (the wheel keeps it in ctranslate2.libs)."""
    import ctranslate2

    package = Path(ctranslate2.__file__).parent
    found = sorted(package.parent.glob("ctranslate2.libs/libctranslate2*.so*"))
    found += sorted(package.glob("libctranslate2*.so*"))
    assert found, f"no libctranslate2 shared library beside {package}"
    return found[0]


def cuda_names(path: Path) -> set[str]:
    """The CUDA sonames a shared library needs or opens, other than its own."""
    names = {m.decode() for m in SONAME.findall(path.read_bytes())}
    return {n for n in names if CUDA_FAMILY.match(n) and n != path.name}


def package_file(soname: str) -> Path:
    path = cuda_libs.find(soname, cuda_libs.package_dirs())
    assert path is not None, f"{soname} is not in this environment's NVIDIA packages; pip install -e '.[gpu]'"
    return path


def matches(name: str, pattern: str) -> bool:
    return bool(re.fullmatch(re.escape(pattern).replace(r"\*", r"[0-9.]+"), name))


def test_ctranslate2_opens_the_cuda_libraries_listed_and_no_other() -> None:
    opened = cuda_names(ctranslate2_library())
    assert opened - set(NOT_PRELOADED) == set(cuda_libs.CTRANSLATE2_OPENS), (
        f"the installed ctranslate2 opens {sorted(opened)}: update cuda_libs.CTRANSLATE2_OPENS and "
        "LIBRARIES, and the gpu extra's packages, to what this build needs"
    )
    assert set(cuda_libs.CTRANSLATE2_OPENS) <= set(cuda_libs.LIBRARIES)


def test_every_library_preloaded_opens_only_libraries_preloaded_too() -> None:
    for pattern in cuda_libs.LIBRARIES:
        path = package_file(pattern)
        for name in cuda_names(path) - {"libcuda.so.1"}:
            assert any(matches(name, p) for p in cuda_libs.LIBRARIES), (
                f"{path.name} opens {name}, which cuda_libs.LIBRARIES does not load"
            )
    # Each comes after every library it opens.
    order = [package_file(p).name for p in cuda_libs.LIBRARIES]
    for position, name in enumerate(order):
        for needed in cuda_names(package_file(cuda_libs.LIBRARIES[position])) - {"libcuda.so.1"}:
            assert order.index(needed) < position, f"{name} is loaded before {needed}, which it opens"


def test_ctypes_loads_each_library_from_the_environment() -> None:
    for pattern in cuda_libs.LIBRARIES:
        path = package_file(pattern)
        assert Path(sys.prefix) in path.parents, f"{path} is not in this environment ({sys.prefix})"
        ctypes.CDLL(str(path))  # raises OSError when the file or one it needs cannot load


PRELOAD_THEN_OPEN_BY_SONAME = """
import ctypes, json, sys
from pipeline.processors import cuda_libs
found = cuda_libs.preload()
ctypes.CDLL("libcublas.so.12")  # what CTranslate2 does when a model is placed on cuda
maps = open("/proc/self/maps").read()
mapped = [p for p in found.loaded.values() if p in maps]
print(json.dumps({"ok": found.ok, "loaded": found.loaded, "mapped": mapped}))
"""


def test_after_preload_the_bare_soname_resolves_to_the_package_file() -> None:
    env = {"PATH": "/usr/bin:/bin"}  # no LD_LIBRARY_PATH
    proc = subprocess.run(
        [sys.executable, "-c", PRELOAD_THEN_OPEN_BY_SONAME],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is True
    assert set(result["loaded"]) == {package_file(p).name for p in cuda_libs.LIBRARIES}
    assert sorted(result["mapped"]) == sorted(str(package_file(p)) for p in cuda_libs.LIBRARIES)


def test_without_preload_the_system_loader_does_not_find_cublas_12() -> None:
    """Why preloading is needed: the packages' folders are not on the loader's path."""
    cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True).stdout
    if "libcublas.so.12" in cache:
        pytest.skip("this machine has cuBLAS 12 installed system-wide")
    proc = subprocess.run(
        [sys.executable, "-c", "import ctypes; ctypes.CDLL('libcublas.so.12')"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "libcublas.so.12" in proc.stderr


def test_preload_from_a_folder_without_them_names_each_missing_library(tmp_path: Path) -> None:
    found = cuda_libs.preload([tmp_path])
    assert not found.ok
    assert found.missing == cuda_libs.LIBRARIES
    assert found.loaded == {}
    assert "libcublas.so.12" in str(found.problem) and str(tmp_path) in str(found.problem)
    assert "pip install 'morag-pipeline[gpu]'" in str(found.problem)


def test_preload_names_the_one_library_missing_and_loads_the_rest(tmp_path: Path) -> None:
    for pattern in cuda_libs.LIBRARIES[:-1]:
        (tmp_path / package_file(pattern).name).symlink_to(package_file(pattern))
    found = cuda_libs.preload([tmp_path])
    assert found.missing == ("libcublas.so.12",)
    assert set(found.loaded) == {package_file(p).name for p in cuda_libs.LIBRARIES[:-1]}
    assert found.problem.startswith(
        f"CUDA libraries for CTranslate2: libcublas.so.12 not found in {tmp_path};"
    )


def test_a_file_that_will_not_load_is_named_with_the_loaders_error(tmp_path: Path) -> None:
    for pattern in cuda_libs.LIBRARIES[:-1]:
        (tmp_path / package_file(pattern).name).symlink_to(package_file(pattern))
    (tmp_path / "libcublas.so.12").write_text("not a shared library\n")
    found = cuda_libs.preload([tmp_path])
    assert not found.ok and found.missing == ()
    assert list(found.failed) == ["libcublas.so.12"]
    assert "libcublas.so.12 would not load" in str(found.problem)


def test_the_library_path_setting_lists_folders() -> None:
    assert cuda_libs.dirs_from("") is None
    assert cuda_libs.dirs_from("/a:/b/lib:") == [Path("/a"), Path("/b/lib")]


def cuda_devices() -> int:
    import ctranslate2

    return ctranslate2.get_cuda_device_count()


needs_no_gpu = pytest.mark.skipif(cuda_devices() > 0, reason="this machine has a CUDA device (tests/gpu)")


@needs_no_gpu
def test_without_a_device_cublas_says_it_cannot_start() -> None:
    assert cuda_libs.preload().ok
    refused = cuda_libs.cublas_probe()
    assert refused is not None and "CUBLAS_STATUS_NOT_INITIALIZED" in refused


@needs_no_gpu
def test_cuda_status_on_a_machine_without_gpu() -> None:
    # Not asked for and no GPU seen: nothing to report.
    assert hardware.cuda_status("auto", gpus=[]) == {
        "wanted": False, "usable": False, "devices": 0, "problems": []
    }  # fmt: skip
    assert hardware.cuda_status("cpu")["wanted"] is False
    # Asked for: the libraries load, but there is no device.
    status = hardware.cuda_status("cuda", gpus=[])
    assert status["wanted"] is True and status["usable"] is False
    assert status["libraries"]["ok"] is True
    assert status["problems"] == ["no CUDA device that CTranslate2 can use"]


@needs_no_gpu
def test_cuda_status_names_a_gpu_that_ctranslate2_cannot_use(tmp_path: Path) -> None:
    # What nvidia-smi would list on a box whose driver is too old for CUDA 12.
    listed = [{"index": 0, "name": "NVIDIA T4", "driver": "470.256.02", "cuda": "11.4"}]
    status = hardware.cuda_status("auto", [tmp_path], gpus=listed)
    assert status["wanted"] is True and status["usable"] is False
    first, second = status["problems"]
    assert "nvidia-smi lists 1 GPU(s) (driver 470.256.02, CUDA 11.4)" in first
    assert "CTranslate2 is built for CUDA 12" in first
    assert second.startswith("CUDA libraries for CTranslate2: libnvrtc-builtins.so.12.*, libnvrtc.so.12,")
