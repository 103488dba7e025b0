"""A command run without the extra of its role says which extra to install (docs/deploy.md)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_server_without_the_server_extra_names_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # fastapi made unimportable, as in an environment installed without the server extra.
    code = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from pipeline.cli.main import main; sys.exit(main(['server']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env={"PATH": "/usr/bin:/bin", "MORAG_DATA_DIR": str(tmp_path), "MORAG_DEV_MODE": "true"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == (
        "morag-pipeline: the server needs the server extra (fastapi is not installed): "
        "pip install 'morag-pipeline[server]'\n"
    )
