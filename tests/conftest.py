"""Fixtures shared by the test suite: samples, a fresh RabbitMQ vhost, and a
running stack (server and workers started as users start them)."""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pika
import pytest

T = TypeVar("T")

#: Settings only the server (and workers on its host) hold; an enrolled box has none of them.
SERVER_ONLY = frozenset(
    {"MORAG_SECRET_KEY", "MORAG_API_KEY", "MORAG_DEV_MODE", "MORAG_DATA_DIR", "MORAG_BROKER_URL",
     "MORAG_SFTP_PORT", "MORAG_SERVER_URL", "MORAG_API_PORT", "MORAG_DATABASE_URL"}
)  # fmt: skip

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
BIN = Path(sys.executable).parent
BROKER = os.environ.get("MORAG_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672")
MANAGEMENT = os.environ.get("MORAG_TEST_RABBITMQ_API", "http://guest:guest@127.0.0.1:15672")
#: A PostgreSQL server the tests may create and drop databases on (ops/setup.sh starts one).
POSTGRES = os.environ.get("MORAG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# Words espeak-ng speaks in samples/talk.mp4 and samples/speech.mp3 (the text is in
# samples/make_samples.sh) that the tiny.en model hears whether it runs in int8 or
# float32 and whatever the speaking rate near the samples' own: int8 kernels differ
# between CPU makers, so a test looks for words with a margin. The whole text is
# checked by its word error rate in tests/unit/test_sample_transcripts.py.
SPOKEN_WORDS = ("remote workers", "recordings", "graphics card")


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float = 120,
    stack: Stack | None = None,
    interval: float = 0.2,
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` (and the logs) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    logs = stack.all_logs() if stack else ""
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


_PORTS_GIVEN: set[int] = set()


def _port_band() -> range:
    """Ports this test process may hand out: outside the kernel's ephemeral range (where every
    outgoing connection takes its local port, so a port found free there may be taken before the
    server binds it), one band per xdist worker so that parallel workers never pick the same."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    start, end = (10000, low) if low - 10000 >= 4000 else (high + 1, 65536)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (end - start) // 16
    first = start + (index % 16) * size
    return range(first, first + size)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on and that no other test was given."""
    band = _port_band()
    offset = random.randrange(len(band))
    for step in range(len(band)):
        port = band[(offset + step) % len(band)]
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port
    raise RuntimeError(f"no free port in {band}")


def management() -> tuple[str, tuple[str, str]]:
    parts = urllib.parse.urlsplit(MANAGEMENT)
    base = f"{parts.scheme}://{parts.hostname}:{parts.port}"
    return base, (parts.username or "guest", parts.password or "guest")


@pytest.fixture(scope="session")
def rabbitmq_available() -> None:
    parts = urllib.parse.urlsplit(BROKER)
    try:
        socket.create_connection((parts.hostname, parts.port or 5672), timeout=2).close()
    except OSError:
        pytest.fail(f"RabbitMQ is not reachable at {parts.hostname}:{parts.port}: run ops/setup.sh")


@pytest.fixture(scope="session")
def postgres_available() -> None:
    import psycopg

    try:
        psycopg.connect(POSTGRES, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES} ({reason}): run ops/setup.sh")


@contextmanager
def fresh_postgres_database(prefix: str = "morag_test") -> Iterator[str]:
    """A new, empty PostgreSQL database (``<prefix>_<random>``); yields its URL, drops it afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = urllib.parse.urlsplit(POSTGRES)._replace(path=f"/{name}").geturl()
    try:
        yield url
    finally:
        from pipeline.db import forget_engine

        forget_engine(url)
        with psycopg.connect(POSTGRES, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_available: None) -> Iterator[str]:
    """A fresh PostgreSQL database per test (``morag_test_<random>``), dropped afterwards."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """The server's database on each backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "tasks.db"
    return request.getfixturevalue("postgres_url")


@contextmanager
def fresh_vhost() -> Iterator[str]:
    """A new RabbitMQ vhost for the broker user; yields its AMQP URL, deletes it afterwards."""
    name = f"morag-test-{uuid.uuid4().hex[:10]}"
    base, auth = management()
    quoted = urllib.parse.quote(name, safe="")
    user = urllib.parse.urlsplit(BROKER).username or "guest"
    with httpx.Client(base_url=base, auth=auth, timeout=10) as api:
        api.put(f"/api/vhosts/{quoted}").raise_for_status()
        api.put(
            f"/api/permissions/{quoted}/{user}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
        ).raise_for_status()
        try:
            yield f"{BROKER.rstrip('/')}/{quoted}"
        finally:
            api.delete(f"/api/vhosts/{quoted}")


@pytest.fixture
def vhost(rabbitmq_available: None) -> Iterator[str]:
    """A fresh RabbitMQ vhost per test, so tests never see each other's messages."""
    with fresh_vhost() as url:
        yield url


def consumers(amqp_url: str, queue: str) -> int:
    """Consumers on a queue, asked of RabbitMQ itself (works without the management plugin)."""

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.consumer_count
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def queue_depth(amqp_url: str, queue: str) -> int:
    """Messages ready in a queue, asked of RabbitMQ itself (the management API lags)."""

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def queue_info(amqp_url: str, queue: str) -> dict:
    """What RabbitMQ's management API says of a queue in the URL's vhost."""
    base, auth = management()
    vhost_name = urllib.parse.urlsplit(amqp_url).path.lstrip("/") or "%2F"
    response = httpx.get(f"{base}/api/queues/{vhost_name}/{queue}", auth=auth, timeout=10)
    response.raise_for_status()
    return response.json()


@dataclass
class Stack:
    """Server and workers of one test, as subprocesses sharing one environment."""

    env: dict[str, str]
    data_dir: Path
    logs: Path
    url: str = ""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    verify: str | bool = True  # the CA file of an HTTPS server
    bundles: dict[str, dict[str, str]] = field(default_factory=dict)  # enrolled workers' settings

    def spawn(
        self,
        name: str,
        args: list[str],
        cwd: Path | None = None,
        base: dict[str, str] | None = None,
        **env: str,
    ) -> subprocess.Popen:
        """Start a process with the stack's environment (or ``base``) and ``env`` on top."""
        log = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            args,
            env={**(self.env if base is None else base), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd or self.data_dir.parent,
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def start_server(self) -> None:
        self.spawn("server", [str(BIN / "morag-pipeline"), "server"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.processes["server"].poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log('server')}")
            try:
                verify = (
                    ssl.create_default_context(cafile=self.verify) if isinstance(self.verify, str) else True
                )
                if httpx.get(f"{self.url}/healthz", timeout=1, verify=verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log('server')}")

    def enroll(self, name: str, capability: str, env_file: Path | None = None) -> dict[str, str]:
        """``morag-pipeline token issue --env-file``: an enrolled worker's settings (once per name)."""
        if name not in self.bundles:
            env_file = env_file or self.data_dir.parent / f"{name}.env"
            proc = self.cli("token", "issue", "--worker", name, "--capability", capability, "--env-file",
                            str(env_file))  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"enrollment failed: {proc.stderr}")
            self.bundles[name] = dict(
                line.split("=", 1) for line in env_file.read_text().splitlines() if line
            )
        return self.bundles[name]

    def worker_env(self) -> dict[str, str]:
        """What a remote box's environment holds: none of the server's settings, the test's tunings."""
        return {k: v for k, v in self.env.items() if k not in SERVER_ONLY}

    def start_worker(
        self,
        capability: str,
        name: str | None = None,
        threads: int = 1,
        enroll: bool = True,
        modules: tuple[str, ...] = (),
        processes: int = 1,
        **env: str,
    ) -> str:
        """``dramatiq pipeline.actors.<capability> --queues <capability>``, as an operator types it.

        By default the worker is enrolled like a remote box: ``token issue``
        writes its settings to ``morag.env`` in its own folder, where it starts
        with none of the server's settings, an empty data directory, and files
        over SFTP only. With ``enroll=False`` it is a worker on the server's
        host, started with the server's settings. Settings in ``env`` win.
        ``modules`` are test-only actor modules to load too (importable from the checkout).
        """
        name = name or f"{capability}-worker"
        args = [str(BIN / "dramatiq"), f"pipeline.actors.{capability}", *modules, "--queues", capability]
        args += ["--processes", str(processes), "--threads", str(threads)]
        if not enroll:
            self.spawn(name, args, **{"MORAG_WORKER_NAME": name, "PYTHONPATH": str(ROOT), **env})
            return name
        own = self.data_dir.parent / f"worker-{name}"
        own.mkdir(exist_ok=True)
        if "MORAG_WORKER_TOKEN" not in env:
            self.enroll(name, capability, own / "morag.env")
        worker_env = {"MORAG_DATA_DIR": str(own), "PYTHONPATH": str(ROOT)}
        self.spawn(name, args, cwd=own, base=self.worker_env(), **{**worker_env, **env})
        return name

    @property
    def headers(self) -> dict[str, str]:
        """The API key of the stack's admin, as the CLI sends it."""
        return {"Authorization": f"Bearer {self.env['MORAG_API_KEY']}"}

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        """``GET`` on the stack's API, as its admin."""
        return httpx.get(f"{self.url}{path}", headers=self.headers, **kwargs)  # type: ignore[arg-type]

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        """``POST`` on the stack's API, as its admin."""
        return httpx.post(f"{self.url}{path}", headers=self.headers, **kwargs)  # type: ignore[arg-type]

    def wait_consumers(self, queue: str, count: int = 1, timeout: float = 60) -> None:
        """Until ``count`` consumers are on ``queue``, asked of RabbitMQ itself (the management
        API's figures lag by its statistics interval, 5 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(pika.exceptions.AMQPError):
                if consumers(self.env["MORAG_BROKER_URL"], queue) >= count:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"no consumer on {queue}:\n{self.all_logs()}")

    def cli(self, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "morag-pipeline"), *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop(self, name: str, sig: int | None = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal ``name`` (``sig`` None: it was signaled already), wait up to ``timeout`` for it
        to exit, then kill what is left of its session."""
        proc = self.processes.pop(name)
        if proc.poll() is None:
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # what it left behind in its session
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        """SIGTERM to every process at once, so that their graceful stops overlap."""
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for name in list(self.processes):
            self.stop(name, sig=None)

    def secrets(self) -> dict[str, str]:
        """Every secret the stack handed out: the server's, the admin key, enrolled workers' own."""
        found = {k: v for k, v in self.env.items() if k in ("MORAG_SECRET_KEY", "MORAG_API_KEY") and v}
        for name, bundle in self.bundles.items():
            for setting in ("MORAG_WORKER_TOKEN", "MORAG_WORKER_KEY"):
                if bundle.get(setting):
                    found[f"{name} {setting}"] = bundle[setting]
        return found

    def leaked_secrets(self) -> list[str]:
        """Which secrets appear in a log of the stack's processes or in its audit log (never any)."""
        files = [*self.logs.glob("*.log"), *self.data_dir.glob("audit.log*")]
        texts = [path.read_text(errors="replace") for path in files]
        return [f"{what} in {path.name}" for what, secret in self.secrets().items() for path, text in
                zip(files, texts, strict=True) if secret in text]  # fmt: skip

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(
            f"--- {p.stem}\n{p.read_text(errors='replace')[-4000:]}" for p in self.logs.glob("*.log")
        )


def stack_env(tmp: Path, broker_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_")}
    env.update(
        MORAG_BROKER_URL=broker_url,
        MORAG_DATA_DIR=str(tmp / "data"),
        MORAG_API_PORT=str(port),
        MORAG_SFTP_PORT=str(free_port()),
        MORAG_SERVER_URL=f"http://127.0.0.1:{port}",
        MORAG_LOG_JSON="true",
        MORAG_MIN_BACKOFF_MS="200",
        MORAG_MAX_BACKOFF_MS="1000",
        MORAG_PROGRESS_INTERVAL_S="0.2",
        # A real secret, and no development mode: the server checks API keys and
        # signatures as it does for users (open_stack makes an admin key).
        MORAG_SECRET_KEY=uuid.uuid4().hex + uuid.uuid4().hex,
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def open_stack(
    folder: Path,
    broker_url: str,
    request: pytest.FixtureRequest | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """A Stack in ``folder`` on ``broker_url`` (``env``: more settings of every process);
    everything it started is stopped afterwards, and its logs are shown when the test failed."""
    port = free_port()
    logs = folder / "logs"
    logs.mkdir()
    (folder / "data").mkdir()
    s = Stack(
        {**stack_env(folder, broker_url, port), **(env or {})},
        folder / "data",
        logs,
        url=f"http://127.0.0.1:{port}",
    )
    key = s.cli("apikey", "create", "--name", "tests", "--role", "admin")
    assert key.returncode == 0, key.stderr
    s.env["MORAG_API_KEY"] = key.stdout.strip().splitlines()[-1]
    try:
        yield s
    finally:
        s.stop_all()
        node = request.node if request is not None else None
        if getattr(node, "rep_call", None) is not None and node.rep_call.failed:
            sys.stderr.write(s.all_logs())
    leaked = s.leaked_secrets()
    assert not leaked, f"secrets written to logs: {leaked}"


@pytest.fixture
def stack(tmp_path: Path, vhost: str, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A server on a fresh vhost and data dir; the test starts the workers it needs."""
    with open_stack(tmp_path, vhost, request) as s:
        yield s


def cpu_seconds() -> float:
    """CPU time of this process and of every process it started and reaped (servers, workers and
    their children, browsers, tools), user and system."""
    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item):  # type: ignore[no-untyped-def]
    item.cpu_started = cpu_seconds()  # type: ignore[attr-defined]
    yield


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    if report.when == "teardown" and hasattr(item, "cpu_started"):
        report.user_properties.append(("cpu_s", cpu_seconds() - item.cpu_started))


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """The test files, and the tests, that took the most CPU, theirs and their processes' (the
    suite is bound by the CPU, not by waits: the ones to make cheaper first)."""
    per_test: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == "cpu_s":  # on teardown reports only
                    per_test[report.nodeid] = value
    if not per_test:
        return
    per_file: dict[str, float] = {}
    for nodeid, seconds in per_test.items():
        path = nodeid.split("::")[0]
        per_file[path] = per_file.get(path, 0.0) + seconds
    for what, table in (("test file", per_file), ("test", per_test)):
        terminalreporter.write_sep("=", f"CPU by {what} ({sum(table.values()):.0f} s in all), the 20 most")
        for name, seconds in sorted(table.items(), key=lambda item: -item[1])[:20]:
            terminalreporter.write_line(f"{seconds:8.1f}s  {name}")


#: The server secret of in-process tests (a real one: no development mode).
TEST_SECRET = "t" * 48


@contextmanager
def in_process_api(services, broker, gpu_workers=lambda: 0, **limits):  # type: ignore[no-untyped-def]
    """The API in-process over ``broker``, reached as users reach it: out of development mode, with
    an admin key in every request. Yields a TestClient."""
    from fastapi.testclient import TestClient

    from pipeline.api.app import create_app
    from pipeline.api.auth import Authenticator
    from pipeline.security.ratelimit import FailureLimiter

    auth = Authenticator(services.apikeys, services.tokens, FailureLimiter(**limits))
    key, _ = services.apikeys.create("tests", "admin")
    with TestClient(create_app(services, broker, gpu_workers=gpu_workers, auth=auth)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client


@pytest.fixture(scope="session")
def stub_broker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Dramatiq's stub broker with every actor registered, for in-process API tests.

    Actors bind to the broker installed when their modules are first imported,
    so one stub broker serves the whole test session.
    """
    from pipeline.brokers import install
    from pipeline.brokers.stub import build_stub_broker
    from pipeline.config import Settings, use_settings

    settings = use_settings(
        Settings(data_dir=tmp_path_factory.mktemp("stub"), secret_key=TEST_SECRET, file_access="shared")
    )
    broker = install(build_stub_broker(settings))
    import pipeline.actors.control  # noqa: F401
    import pipeline.actors.cpu  # noqa: F401

    return broker


@pytest.fixture(scope="session")
def docx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DOCX with a heading, a paragraph and a table, made with python-docx."""
    import docx

    document = docx.Document()
    document.add_heading("Budget review", level=1)
    document.add_paragraph("GPU spending fell this quarter.")
    table = document.add_table(rows=3, cols=2)
    for row, (item, cost) in enumerate([("Item", "Cost"), ("GPU hours", "420"), ("Storage", "35")]):
        table.cell(row, 0).text = item
        table.cell(row, 1).text = cost
    path = tmp_path_factory.mktemp("docs") / "budget.docx"
    document.save(path)
    return path


def looped_speech(path: Path, loops: int) -> Path:
    """The speech sample played ``loops + 1`` times over, written to ``path``."""
    subprocess.run(
        ["ffmpeg", "-v", "error", "-stream_loop", str(loops), "-i", str(SAMPLES / "speech.mp3"),
         "-c", "copy", "-y", str(path)],
        check=True,
    )  # fmt: skip
    return path


@pytest.fixture(scope="session")
def long_audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About a minute of speech: the sample, looped."""
    return looped_speech(tmp_path_factory.mktemp("media") / "long.mp3", 5)


@pytest.fixture(scope="session")
def corrupt_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MP4 whose header is intact (ffprobe reads it) but whose media data is cut short,
    halfway through an audio packet near the middle of the sample."""
    folder = tmp_path_factory.mktemp("media")
    whole = folder / "whole.mp4"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(SAMPLES / "talk.mp4"), "-c", "copy",
         "-movflags", "+faststart", "-y", str(whole)],
        check=True,
    )  # fmt: skip
    packets = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_entries", "packet=pos,size",
         "-of", "csv=p=0", str(whole)],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    pos, size = (int(n) for n in packets[len(packets) // 2].split(","))
    cut = folder / "broken.mp4"
    cut.write_bytes(whole.read_bytes()[: pos + size // 2])
    return cut


def has(binary: str) -> bool:
    return shutil.which(binary) is not None


def make_silent_video(path: Path) -> Path:
    """A one-second video with no audio track."""
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-t", "1",
         "-pix_fmt", "yuv420p", "-y", str(path)],
        check=True,
    )  # fmt: skip
    return path


def make_pdf(lines: list[str]) -> bytes:
    """A one-page PDF with a line of Helvetica text per item."""
    content = "BT /F1 18 Tf 50 750 Td " + " ".join(f"({line}) Tj 0 -30 Td" for line in lines) + " ET"
    objects = [
        "<< /Type /Catalog /Pages 2 0 R >>",
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
        " /Resources << /Font << /F1 5 0 R >> >> >>",
        f"<< /Length {len(content)} >>\nstream\n{content}\nendstream",
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out, offsets = "%PDF-1.4\n", []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n"
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    return out.encode()


@pytest.fixture(scope="session")
def office_files(tmp_path_factory: pytest.TempPathFactory, docx_file: Path) -> dict[str, Path]:
    """One small document of each kind docling converts offline, plus a PDF."""
    import openpyxl
    import pptx

    folder = tmp_path_factory.mktemp("office")
    deck = pptx.Presentation()
    slide = deck.slides.add_slide(deck.slide_layouts[1])
    slide.shapes.title.text = "Roadmap"
    slide.placeholders[1].text = "Second GPU worker in March"
    deck.save(folder / "roadmap.pptx")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Worker", "Tasks"])
    sheet.append(["gpu-1", 420])
    book.save(folder / "load.xlsx")
    (folder / "notes.md").write_text("# Meeting notes\n\n- ship the **SFTP** transfer\n")
    (folder / "report.pdf").write_bytes(make_pdf(["Annual report", "Revenue grew"]))
    return {
        "docx": docx_file,
        "pptx": folder / "roadmap.pptx",
        "xlsx": folder / "load.xlsx",
        "md": folder / "notes.md",
        "pdf": folder / "report.pdf",
        "html": SAMPLES / "report.html",
    }
