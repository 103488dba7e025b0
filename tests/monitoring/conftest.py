"""A real Prometheus server (Debian's ``prometheus``) for the monitoring tests, started on a free port."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "ops" / "prometheus"


def needs(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.fail(f"{binary} is missing: ops/setup.sh installs it")


@dataclass
class Prometheus:
    """A Prometheus server scraping one target, queried through its HTTP API."""

    url: str
    process: subprocess.Popen
    log: Path

    def query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The one value ``expr`` gives now, None when it gives none."""
        found = self.query(expr)
        assert len(found) <= 1, found
        return float(found[0]["value"][1]) if found else None

    def wait_scraped(self, job: str, after: float, timeout: float = 60) -> None:
        """Until Prometheus has scraped ``job`` successfully after ``after`` (Unix time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.query(f'timestamp(up{{job="{job}"}} == 1)')
            if found and float(found[0]["value"][1]) > after:
                return
            time.sleep(0.5)
        raise AssertionError(f"Prometheus did not scrape {job}:\n{self.log.read_text()[-3000:]}")


@contextmanager
def prometheus(folder: Path, target: str, key: str, job: str = "morag") -> Iterator[Prometheus]:
    """Prometheus scraping ``target``'s /metrics every second, sending ``key`` as its bearer token."""
    needs("prometheus")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key").write_text(key)
    config = folder / "prometheus.yml"
    config.write_text(
        f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES / "rules.yml"}
scrape_configs:
  - job_name: {job}
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials_file: {folder / "key"}
    static_configs:
      - targets: ["{target}"]
"""
    )
    port = free_port()
    log = folder / "prometheus.log"
    process = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
