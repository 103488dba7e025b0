"""Web pages fetched by a worker: the main content as Markdown with its title, author, date and
links; a recording handed on; every bad URL refused with its reason, within its bounds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.errors import BadInput, PipelineError
from pipeline.kinds import HANDOFF
from pipeline.netsafety import UnsafeURL
from pipeline.processors import no_progress, web
from tests.conftest import free_port
from tests.web_pages import Reply, local_site

#: 127.0.0.1 allowed by name; ``localhost`` (where /to-localhost leads) is not.
SETTINGS = Settings(
    fetch_allow_hosts=["127.0.0.1"], fetch_max_mb=1, fetch_max_redirects=3, fetch_timeout_s=10
)


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    with local_site() as base:
        yield base


def run(url: str, folder: Path, settings: Settings = SETTINGS) -> tuple[dict, dict]:
    job = {"task_id": "t1", "kind": "web", "filename": "page", "input": {"url": url}, "media": {}}
    return web.run(job, None, folder, settings, no_progress, lambda: False)


def test_an_article_comes_back_as_markdown_with_its_title_author_date_and_links(
    site: str, tmp_path: Path
) -> None:
    outputs, summary = run(f"{site}/news/gpu-farms.html", tmp_path)
    markdown = outputs["md"]
    assert markdown.startswith("# GPU farms for ingestion\n")
    assert "- Author: Ada Lovelace" in markdown and "- Date: 2024-03-05" in markdown
    assert "shared pool of graphics cards" in markdown
    assert f"[routing guide]({site}/docs/routing.html)" in markdown
    assert "Copyright" not in markdown and "About" not in markdown  # the page's frame is left out
    data = json.loads(outputs["json"])
    assert data["title"] == "GPU farms for ingestion" and data["author"] == "Ada Lovelace"
    assert {"text": "FAQ", "url": "https://example.org/faq"} in data["links"]
    assert summary["method"] == "trafilatura" and summary["fetched"]["status"] == 200


def test_a_page_with_no_main_content_goes_to_docling(tmp_path: Path) -> None:
    aside = b"<html><head><title>Queue status</title></head><body><aside><p>Queues: gpu and cpu</p>"
    aside += b"</aside></body></html>"  # trafilatura takes an aside for a frame, and leaves it out
    with local_site(lambda path, base: Reply(body=aside, headers={"Content-Type": "text/html"})) as base:
        outputs, summary = run(f"{base}/status.html", tmp_path)
    assert summary["method"] == "docling"
    assert outputs["md"].startswith("# Queue status\n") and "Queues: gpu and cpu" in outputs["md"]


def test_a_recording_is_handed_on_as_a_file(site: str, tmp_path: Path, samples: Path) -> None:
    outputs, summary = run(f"{site}/talks/speech.mp3", tmp_path)
    assert set(outputs) == {HANDOFF}
    assert outputs[HANDOFF].read_bytes() == (samples / "speech.mp3").read_bytes()
    assert summary["handed_on"] == "audio/mpeg"


@pytest.mark.parametrize(
    ("path", "error", "reason"),
    [
        ("/big.html", BadInput, r"larger than the 1 MiB allowed for web pages \(MORAG_FETCH_MAX_MB\)"),
        ("/loop", BadInput, r"more than 3 redirects \(MORAG_FETCH_MAX_REDIRECTS\); a redirect loop"),
        ("/missing", BadInput, r"the server answered HTTP 404 Not Found"),
        (
            "/to-localhost",
            UnsafeURL,
            r"localhost resolves to a private address .*MORAG_FETCH_ALLOW_PRIVATE=true",
        ),
    ],
)
def test_a_bad_url_is_refused_with_its_reason(
    site: str, tmp_path: Path, path: str, error: type, reason: str
) -> None:
    with pytest.raises(error, match=reason):
        run(f"{site}{path}", tmp_path)
    fetched = tmp_path / "fetched"
    assert not fetched.exists() or fetched.stat().st_size <= 1024 * 1024  # stopped at the limit


def test_a_page_of_a_gigabyte_is_dropped_at_its_limit(site: str, tmp_path: Path) -> None:
    """1 GiB of HTML with no declared length, under the default limit (16 MiB): refused once the
    limit is passed, with no more than the limit kept, long before the page could have arrived."""
    default = Settings(fetch_allow_hosts=["127.0.0.1"])
    assert default.fetch_max_mb == 16
    refused = r"larger than the 16 MiB allowed for web pages \(MORAG_FETCH_MAX_MB\)"
    with pytest.raises(BadInput, match=refused):
        run(f"{site}/gigabyte.html", tmp_path, default)
    fetched = tmp_path / "fetched"
    assert not fetched.exists() or fetched.stat().st_size <= 16 * 1024 * 1024


def test_a_page_must_arrive_whole_within_the_fetch_timeout(site: str, tmp_path: Path) -> None:
    quick = SETTINGS.model_copy(update={"fetch_timeout_s": 2.0})
    with pytest.raises(BadInput, match=r"did not arrive within 2s \(MORAG_FETCH_TIMEOUT_S\)"):
        run(f"{site}/slow.html", tmp_path, quick)


def test_a_busy_site_is_tried_again_later(site: str, tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="HTTP 503 Service Unavailable") as busy:
        run(f"{site}/busy", tmp_path)
    assert not isinstance(busy.value, BadInput)  # retried with backoff, not failed at once


def test_an_unreachable_url_and_a_private_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"cannot connect to 127.0.0.1:\d+"):
        run(f"http://127.0.0.1:{free_port()}/page.html", tmp_path)
    with pytest.raises(UnsafeURL, match="MORAG_FETCH_ALLOW_PRIVATE=true"):
        run(f"http://127.0.0.1:{free_port()}/page.html", tmp_path, Settings())
