"""Web pages: fetch a URL on a worker and extract its main content to Markdown.

Every request goes through ``pipeline.netsafety``: private, loopback and
link-local addresses are refused at every hop, redirects included, unless
``MORAG_FETCH_ALLOW_PRIVATE`` or ``MORAG_FETCH_ALLOW_HOSTS`` allow them. The
body is read as it streams and dropped past its limit: a page past
``MORAG_FETCH_MAX_MB``, any other file past the limit of its kind. A page must
arrive whole within ``MORAG_FETCH_TIMEOUT_S``; redirects are bounded by
``MORAG_FETCH_MAX_REDIRECTS``.

A page (HTML) is extracted with trafilatura: its main content as Markdown, its
title, author, date and links. When trafilatura finds no main content,
docling's HTML converter takes the whole page. A URL that answers with
anything else (a recording, a PDF, an image) hands the file on: the server
takes it as the task's next input and the task goes on as its content's kind.
A page with no main content that embeds media (a ``<video>``, an ``<audio>``, an
HLS playlist) goes on as a media URL (``pipeline.processors.media_urls``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from pipeline import __version__
from pipeline.config import Settings
from pipeline.errors import BadInput, PipelineError, TaskCanceled
from pipeline.kinds import CONVERT, HANDOFF, IMAGE, MEDIA_URL, TRANSCRIBE, WEB, Kind, Outputs
from pipeline.netsafety import safe_client
from pipeline.processors import Progress, documents, no_progress

#: Content types read as a web page; any other file is handed on.
PAGE_TYPES = ("text/html", "application/xhtml+xml")
USER_AGENT = f"morag-pipeline/{__version__}"
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
#: What a page that embeds media holds: a <video> or <audio> element, or a link to an HLS playlist.
_EMBEDDED_MEDIA = re.compile(rb"<(?:video|audio)\b|\.m3u8\b", re.IGNORECASE)


@dataclass
class Fetched:
    """What a URL answered: the body saved to ``path``, and how it came."""

    url: str
    final_url: str
    status: int
    content_type: str
    path: Path
    size: int
    redirects: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def is_page(self) -> bool:
        return self.content_type in PAGE_TYPES

    def summary(self) -> dict[str, Any]:
        found = asdict(self)
        found.pop("path")
        return found


@dataclass
class Page:
    """A page's main content as Markdown, with what is known of it."""

    markdown: str
    title: str | None = None
    author: str | None = None
    date: str | None = None
    sitename: str | None = None
    description: str | None = None
    links: list[dict[str, str]] = field(default_factory=list)
    method: str = "trafilatura"


def kind_for(content_type: str) -> Kind:
    """The kind whose size limit bounds a body of ``content_type`` (a page: web pages)."""
    if content_type in PAGE_TYPES:
        return WEB
    if content_type.startswith(("audio/", "video/")):
        return TRANSCRIBE
    if content_type.startswith("image/"):
        return IMAGE
    return CONVERT


def fetch(
    url: str,
    dest: Path,
    settings: Settings,
    progress: Progress = no_progress,
    should_stop: Callable[[], bool] = lambda: False,
) -> Fetched:
    """GET ``url`` into ``dest`` within the fetch settings; BadInput with the reason when refused.

    A server error (5xx, 429) or a connection cut while reading is a PipelineError:
    the task is retried.
    """
    started = time.monotonic()
    redirects: list[str] = []

    def hop(response: httpx.Response) -> None:
        if response.is_redirect:
            redirects.append(str(response.headers.get("location", "")))

    client = safe_client(
        allow_private=settings.fetch_allow_private,
        allow_hosts=tuple(settings.fetch_allow_hosts),
        timeout_s=settings.fetch_timeout_s,
        max_redirects=settings.fetch_max_redirects,
        headers={"User-Agent": USER_AGENT},
    )
    client.event_hooks["response"] = [hop]
    try:
        with client, client.stream("GET", url) as response:
            _check_status(url, response)
            content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            kind = kind_for(content_type)
            limit = kind.max_bytes(settings)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise BadInput(f"{url}: {kind.too_large(int(declared), settings)}")
            deadline = started + settings.fetch_timeout_s if kind is WEB else None
            size = _save(url, response, dest, kind, settings, deadline, progress, should_stop)
            final_url = str(response.url)
    except httpx.TooManyRedirects:
        raise BadInput(
            f"{url}: more than {settings.fetch_max_redirects} redirects (MORAG_FETCH_MAX_REDIRECTS);"
            " a redirect loop?"
        ) from None
    except httpx.TimeoutException:
        raise BadInput(
            f"{url}: no answer within {settings.fetch_timeout_s:g}s (MORAG_FETCH_TIMEOUT_S)"
        ) from None
    except httpx.ConnectError as exc:
        raise BadInput(f"{url}: cannot connect to {urlsplit(url).netloc}: {exc}") from None
    except httpx.HTTPError as exc:
        raise PipelineError(f"{url}: the fetch failed: {exc}") from None
    return Fetched(
        url, final_url, response.status_code, content_type, dest, size, redirects,
        round(time.monotonic() - started, 3),
    )  # fmt: skip


def _check_status(url: str, response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    answer = f"{url}: the server answered HTTP {status} {response.reason_phrase}".rstrip()
    if status >= 500 or status == 429:
        raise PipelineError(answer)  # the site's trouble, maybe for a while: retried
    raise BadInput(answer)


def _save(
    url: str,
    response: httpx.Response,
    dest: Path,
    kind: Kind,
    settings: Settings,
    deadline: float | None,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> int:
    """Stream the body to ``dest``, stopping past the kind's limit or the deadline; its size."""
    limit = kind.max_bytes(settings)
    declared = response.headers.get("content-length", "")
    expected = int(declared) if declared.isdigit() else None
    size = 0
    with dest.open("wb") as out:
        for chunk in response.iter_bytes():  # as it arrives: the limits are checked on every piece
            size += len(chunk)
            if size > limit:
                raise BadInput(f"{url}: {kind.too_large(size, settings)}")
            if deadline is not None and time.monotonic() > deadline:
                raise BadInput(
                    f"{url}: the page did not arrive within {settings.fetch_timeout_s:g}s"
                    " (MORAG_FETCH_TIMEOUT_S)"
                )
            if should_stop():
                raise TaskCanceled("canceled while fetching")
            out.write(chunk)
            if expected:
                progress("fetching", min(99.0, 100.0 * size / expected))
    if size == 0:
        raise BadInput(f"{url}: the answer is empty")
    return size


def extract(html: bytes, url: str) -> Page:
    """The main content of a page and its metadata, by trafilatura; its ``markdown`` is empty when
    trafilatura finds no main content."""
    import trafilatura

    found = trafilatura.bare_extraction(  # with formatting, its text is Markdown
        html, url=url, with_metadata=True, include_links=True, include_tables=True, include_formatting=True
    ) or trafilatura.extract_metadata(html, default_url=url)  # no main content: what the page says of itself
    if found is None:
        return Page(markdown="")
    body = (found.text or "").strip()
    return Page(
        markdown=body,
        title=found.title,
        author=found.author,
        date=found.date,
        sitename=found.sitename,
        description=found.description,
        links=_links(body, url),
    )


def embeds_media(html: bytes) -> bool:
    """Whether a page embeds media: a ``<video>`` or ``<audio>`` element, or an HLS playlist."""
    return _EMBEDDED_MEDIA.search(html) is not None


def with_docling(path: Path, page: Page, url: str, settings: Settings) -> Page:
    """``page`` with the whole page's content by docling's HTML converter: the fallback when
    trafilatura finds no main content (a form, a page of widgets)."""
    html = path.with_suffix(".html")
    path.rename(html)
    doc = documents.convert(
        html, "html", max_memory_mb=settings.document_max_memory_mb,
        time_limit_s=settings.document_time_limit_s, source=url,
    )  # fmt: skip
    markdown = doc.markdown.strip()
    return replace(page, markdown=markdown, links=_links(markdown, url), method="docling")


def _links(markdown: str, url: str) -> list[dict[str, str]]:
    return [{"text": text.strip(), "url": urljoin(url, href)} for text, href in _LINK.findall(markdown)]


def render(page: Page, fetched: Fetched) -> str:
    """The Markdown output: a title, what is known of the page, then its content."""
    title = f"# {page.title or fetched.final_url}"
    body = page.markdown.removeprefix(title).lstrip("\n")
    facts = {"URL": fetched.final_url, "Author": page.author, "Date": page.date, "Site": page.sitename}
    lines = [title, "", *(f"- {name}: {value}" for name, value in facts.items() if value)]
    return "\n".join([*lines, "", body, ""])


def run(
    job: dict[str, Any],
    local: Path | None,
    folder: Path,
    settings: Settings,
    progress: Progress,
    should_stop: Callable[[], bool],
) -> tuple[Outputs, dict[str, Any]]:
    """The runner of web tasks: the page as Markdown and JSON, or the file it answered with handed on."""
    url = job["input"]["url"]
    progress("fetching", 0.0)
    fetched = fetch(url, folder / "fetched", settings, progress, should_stop)
    summary: dict[str, Any] = {"fetched": fetched.summary()}
    if not fetched.is_page:
        return {HANDOFF: fetched.path}, {**summary, "handed_on": fetched.content_type}
    progress("extracting", 0.0)
    started = time.perf_counter()
    html = fetched.path.read_bytes()
    page = extract(html, fetched.final_url)
    if not page.markdown and embeds_media(html):
        reason = "the page has no article but embeds media"
        return {}, {**summary, "goes_on_as": MEDIA_URL.name, "reason": reason, "title": page.title}
    if not page.markdown:
        page = with_docling(fetched.path, page, fetched.final_url, settings)
    about = {k: v for k, v in asdict(page).items() if k != "markdown"}
    data = {"url": url, "final_url": fetched.final_url, **about, "markdown": page.markdown}
    outputs: Outputs = {"md": render(page, fetched), "json": json.dumps(data, ensure_ascii=False)}
    summary.update(
        method=page.method, title=page.title, links=len(page.links),
        timings={"fetch_s": fetched.seconds, "extract_s": round(time.perf_counter() - started, 3)},
    )  # fmt: skip
    progress("extracting", 100.0)
    return outputs, summary
