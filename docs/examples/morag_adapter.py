"""MoRAG's ingestion hands audio, video and documents to morag-pipeline and takes Markdown back.

The adapter replaces MoRAG's in-process conversion (Whisper, docling) with one
call to ``pipeline.client``: it uploads the file, follows the task through the
server's event stream, and returns the Markdown ready for MoRAG's chunking,
with the facts MoRAG stores beside the chunks (task, kind, language, pages...).

Transcripts come back in the ``morag`` layout where the server makes it, else
in ``md``; documents in ``md``. Run it on a stack::

    python docs/examples/morag_adapter.py talk.mp4 speech.mp3 report.html
    python docs/examples/morag_adapter.py --asyncio speech.mp3

with ``MORAG_SERVER_URL`` and ``MORAG_API_KEY`` set (as for the CLI). docs/morag-adapter.md
explains each step; tests/integration/test_morag_adapter.py runs this file on the samples.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.client import AsyncClient, Client, ClientError

#: The Markdown outputs of each kind of task, best first: the ``morag`` layout of a transcript
#: where the server makes it, else the plain ``md`` one.
MARKDOWN = {"transcribe": ("morag", "md"), "convert": ("md",)}


class ConversionFailed(Exception):
    """The server ran the task and it did not end done; the message says why."""


@dataclass
class Converted:
    """One file as MoRAG ingests it: Markdown, and the facts kept with its chunks."""

    source: str
    markdown: str
    format: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def chunks(self) -> list[str]:
        """The Markdown cut at its second-level headings: where MoRAG's chunker starts."""
        parts = re.split(r"(?m)^(?=## )", self.markdown)
        return [part.strip() for part in parts if part.strip()]


def markdown_format(task: dict[str, Any]) -> str:
    """The best Markdown output the done ``task`` has."""
    made = {output["format"] for output in task["outputs"]}
    for fmt in MARKDOWN[task["kind"]]:
        if fmt in made:
            return fmt
    raise ConversionFailed(f"{task['filename']}: no Markdown output (it has {', '.join(sorted(made))})")


def converted(task: dict[str, Any], fmt: str, markdown: bytes) -> Converted:
    """What MoRAG keeps of a done task."""
    result = task.get("result") or {}
    facts = {k: result[k] for k in ("language", "duration", "pages", "model", "device") if k in result}
    metadata = {"task_id": task["id"], "kind": task["kind"], "queue": task["route"]["queue"], **facts}
    return Converted(task["filename"], markdown.decode("utf-8"), fmt, metadata)


def ended(task: dict[str, Any]) -> dict[str, Any]:
    """The final record of a task, or ConversionFailed with the server's reason."""
    if task["state"] != "done":
        raise ConversionFailed(f"{task['filename']}: {task['state']}: {task.get('error')}")
    return task


class RemoteConverter:
    """MoRAG's converter for audio, video and documents, run by morag-pipeline's workers.

    Parameters:
      server_url: the server (``MORAG_SERVER_URL``; several replicas, comma-separated).
      api_key: a ``client`` key (``morag-pipeline apikey create --role client``).
      timeout: seconds to wait for one file's task.
      callback_url: where the server POSTs each task's end, signed (docs/webhooks.md); None: none.
    """

    def __init__(
        self, server_url: str, api_key: str, timeout: float = 3600.0, callback_url: str | None = None
    ) -> None:
        self.client = Client(server_url, api_key=api_key)
        self.timeout = timeout
        self.callback_url = callback_url

    def close(self) -> None:
        self.client.close()

    def convert(self, path: Path, language: str | None = None) -> Converted:
        """One file, start to end."""
        return self.convert_many([path], language)[0]

    def convert_many(self, paths: list[Path], language: str | None = None) -> list[Converted]:
        """Several files: all are sent first, so the workers run them side by side."""
        tasks = [
            self.client.submit(path, language=language, callback_url=self.callback_url) for path in paths
        ]
        out = []
        for task in tasks:
            record = ended(task.wait(timeout=self.timeout))
            fmt = markdown_format(record)
            out.append(converted(record, fmt, task.result(fmt)))
        return out


async def convert_async(server_url: str, api_key: str, paths: list[Path]) -> list[Converted]:
    """The same from asyncio code (MoRAG's FastAPI server): every file followed at once."""
    async with AsyncClient(server_url, api_key=api_key) as client:

        async def one(path: Path) -> Converted:
            task = await client.submit(path)
            record = ended(await task.wait(timeout=3600))
            fmt = markdown_format(record)
            return converted(record, fmt, await task.result(fmt))

        return list(await asyncio.gather(*(one(path) for path in paths)))


def main(argv: list[str]) -> int:
    """Convert the files named in ``argv`` (``--asyncio``: with the asyncio client) and print them."""
    server_url = os.environ.get("MORAG_SERVER_URL", "http://127.0.0.1:8470")
    api_key = os.environ.get("MORAG_API_KEY", "")
    paths = [Path(arg) for arg in argv if arg != "--asyncio"]
    converter = RemoteConverter(server_url, api_key)
    try:
        if "--asyncio" in argv:
            results = asyncio.run(convert_async(server_url, api_key, paths))
        else:
            results = converter.convert_many(paths)
    except (ClientError, ConversionFailed) as exc:
        print(f"morag_adapter: {exc}", file=sys.stderr)
        return 1
    finally:
        converter.close()
    for item in results:
        print(f"=== {item.source} ({item.format}, {len(item.chunks())} chunks) {item.metadata}")
        print(item.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
