"""docs/examples/morag_adapter.py, run as MoRAG would run it, on the samples against a real server
and CPU worker: audio, video and a document come back as Markdown cut into chunks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, SPOKEN_WORDS, Stack

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

EXAMPLE = ROOT / "docs" / "examples" / "morag_adapter.py"


def test_the_adapter_turns_audio_video_and_documents_into_markdown(
    stack: Stack, samples: Path, corrupt_mp4: Path
) -> None:
    stack.start_server()
    stack.start_worker("cpu")
    stack.wait_consumers("cpu")
    files = [samples / "talk.mp4", samples / "speech.mp3", samples / "report.html"]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *map(str, files)], env=stack.env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    printed = {block.split(" ", 1)[0]: block for block in proc.stdout.split("=== ")[1:]}
    assert set(printed) == {"talk.mp4", "speech.mp3", "report.html"}
    for name in ("talk.mp4", "speech.mp3"):
        head, _, markdown = printed[name].partition("\n")
        assert head.split("(")[1].split(",")[0] == "morag"  # MoRAG's own layout, where the task has it
        assert "'kind': 'transcribe'" in head and "'language': 'en'" in head
        assert markdown.startswith(f"# Audio Transcription: {name}") and "## Detailed Transcript" in markdown
        assert all(word in markdown.lower() for word in SPOKEN_WORDS)
    head, _, markdown = printed["report.html"].partition("\n")
    assert "(md, 3 chunks)" in head and "'kind': 'convert'" in head
    assert markdown.startswith("# Quarterly ingestion report")
    assert "## Volumes by kind" in markdown and "## Next steps" in markdown

    spec = importlib.util.spec_from_file_location("morag_adapter", EXAMPLE)
    assert spec is not None and spec.loader is not None
    adapter = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = adapter  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(adapter)
    finally:
        del sys.modules[spec.name]
    # In a thread of its own, as MoRAG's server would run it: another test in this process (the
    # browser's) may have left an event loop running in the main thread.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        converting = adapter.convert_async(stack.url, stack.env["MORAG_API_KEY"], [samples / "speech.mp3"])
        [speech] = pool.submit(asyncio.run, converting).result(timeout=300)
    assert speech.metadata["kind"] == "transcribe" and speech.metadata["queue"] == "cpu"
    assert speech.chunks()[-1].startswith("## Detailed Transcript")
    failing = adapter.RemoteConverter(stack.url, stack.env["MORAG_API_KEY"])
    try:
        with pytest.raises(adapter.ConversionFailed, match="broken.mp4: failed: "):
            failing.convert(corrupt_mp4)
    finally:
        failing.close()
