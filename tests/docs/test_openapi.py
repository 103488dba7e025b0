"""docs/openapi.json is the API's OpenAPI document as ``python -m pipeline.api.openapi`` prints it
(that the server serves the same is checked with the docs' stack, in test_doc_commands.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.api.openapi import openapi_document, render
from tests.conftest import ROOT

EXPORTED = ROOT / "docs" / "openapi.json"
REGENERATE = "python -m pipeline.api.openapi > docs/openapi.json"


def test_docs_openapi_json_is_up_to_date() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "pipeline.api.openapi"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert printed.returncode == 0, printed.stderr
    assert EXPORTED.exists(), f"docs/openapi.json is missing: {REGENERATE}"
    now, kept = (set(json.loads(text)["paths"]) for text in (printed.stdout, EXPORTED.read_text()))
    differ = ", ".join(sorted(now ^ kept)) or "the same paths, other details"
    assert printed.stdout == EXPORTED.read_text(), (
        f"docs/openapi.json is out of date ({differ}): {REGENERATE}"
    )


def test_the_export_ignores_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Whatever the machine's settings, the document is the same: its defaults."""
    monkeypatch.setenv("MORAG_MAX_UPLOAD_MB", "7")
    monkeypatch.setenv("MORAG_DATA_DIR", str(tmp_path / "not-written"))
    assert render(openapi_document()) == EXPORTED.read_text()
    assert not (tmp_path / "not-written").exists()
