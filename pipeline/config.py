"""The one configuration model of morag-pipeline.

Every setting comes from, in order of precedence: keyword arguments, the
environment (prefix ``MORAG_``), a TOML file named by ``MORAG_CONFIG``, and the
defaults below. No other module reads the environment.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "MORAG_CONFIG"
#: The sweep's default schedule (``sweep_cron``), periodiq's finest grain.
EVERY_MINUTE = "* * * * *"


class Device(StrEnum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


class Batching(StrEnum):
    """Whether transcriptions decode in batches (faster-whisper's BatchedInferencePipeline)."""

    auto = "auto"  # batched on CUDA, one chunk after the other on the CPU
    on = "on"
    off = "off"


#: CTranslate2's compute types (``auto``: float16 on CUDA, int8 on the CPU).
COMPUTE_TYPES = (
    "auto", "default", "int8", "int8_float16", "int8_bfloat16", "int8_float32", "int16", "float16",
    "bfloat16", "float32",
)  # fmt: skip


class QueueType(StrEnum):
    """The kind of RabbitMQ queue the task queues are declared as."""

    classic = "classic"  # one node; message priorities on every version
    quorum = "quorum"  # replicated over a cluster; few or no priority levels (docs)


class FileAccess(StrEnum):
    """How a worker reaches the server's task store."""

    shared = "shared"  # the worker sees the server's data directory (same host)
    sftp = "sftp"  # the worker fetches and returns files over SFTP (any host)


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "morag-pipeline"


class Settings(BaseSettings):
    """All settings of server, workers and CLI."""

    # A worker's enrollment file, morag.env in the working directory, is read too.
    model_config = SettingsConfigDict(env_prefix="MORAG_", extra="forbid", env_file="morag.env")

    # Where the server keeps its task store (SQLite), audit log and SFTP host key.
    data_dir: Path = Field(default_factory=_default_data_dir)
    # Where the task files live (default: data_dir/files). Server replicas share
    # one: a folder every replica mounts (NFS), docs/replicas.md.
    files_dir: Path = Field(default=None, validate_default=True)  # type: ignore[assignment]
    # The task store's database: empty, the SQLite file in data_dir; a
    # postgresql:// URL puts every table on PostgreSQL (several server replicas).
    database_url: SecretStr | None = None

    # Broker.
    broker_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/%2F")
    broker_max_priority: int = Field(10, ge=1, le=255)
    # classic: today's queues, with priorities; quorum: replicated queues for a
    # RabbitMQ cluster (the server says at start what they cost on its broker).
    broker_queue_type: QueueType = QueueType.classic
    broker_connect_timeout: float = Field(5.0, gt=0)
    # RabbitMQ's consumer_timeout (30 min by default): a delivery held unacked
    # longer than this closes the worker's channel and the message is
    # delivered again. Every task time limit and every retry backoff (a retried
    # message waits, unacked, in the worker's delay queue) must stay below it.
    broker_consumer_timeout_s: int = Field(30 * 60, ge=60)

    # API server and the CLI's view of it.
    api_host: str = "127.0.0.1"
    api_port: int = Field(8470, ge=1, le=65535)
    # Where the CLI finds the server; several replicas' URLs, comma-separated, are tried in turn.
    server_url: str = "http://127.0.0.1:8470"
    # Upload limits, enforced while the upload streams in: audio and video, and documents.
    max_upload_mb: int = Field(4096, ge=1)
    max_document_mb: int = Field(256, ge=1)
    # The largest image (PNG, JPEG, TIFF, WebP), uploaded or fetched from a URL.
    max_image_mb: int = Field(64, ge=1)
    # What one client may cost the server; each limit is refused with a 4xx and the reason.
    # A ZIP container (DOCX, PPTX, XLSX) is refused before it is parsed when its
    # directory holds more than max_zip_entries entries, or when its entries unpack
    # to more than max_zip_uncompressed_mb in all.
    max_zip_entries: int = Field(10_000, ge=1)
    max_zip_uncompressed_mb: int = Field(1024, ge=1)
    # The Whisper models a client may ask for (a list, or names separated by commas);
    # empty: only whisper_model. Any other is refused at submit (HTTP 400).
    whisper_allowed_models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # An upload is refused (HTTP 507) when the data directory's disk has less free
    # space than this, checked before and while the file streams in.
    min_free_disk_mb: int = Field(1024, ge=0)
    # Megabytes each API key may upload per day (UTC); 0: no quota. Past it: HTTP 429.
    quota_mb_per_day: int = Field(0, ge=0)
    # Document conversion runs in a child process capped at this much memory and
    # this many seconds; past either the document is refused as bad input.
    document_max_memory_mb: int = Field(4096, ge=256)
    document_time_limit_s: int = Field(600, ge=10)
    # Whisper models a worker process keeps loaded; the least recently used is
    # dropped when another is needed.
    whisper_max_loaded_models: int = Field(1, ge=1, le=8)
    # Seconds an OpenAI-compatible request (/v1/audio/*) waits for its task to end; past it
    # the answer is HTTP 504 with the task's id, and the task goes on (docs/openai.md).
    openai_wait_s: float = Field(600.0, gt=0, le=3600)

    # Workers.
    worker_name: str | None = None
    # Workers fetch and return files over SFTP unless told they share the
    # server's data directory (a CPU worker on the server's host).
    file_access: FileAccess = FileAccess.sftp
    # A failed attempt is retried max_retries times (bad input never), after
    # min_backoff * 2^n ms with jitter, capped by max_backoff: 10-20 s, 20-40 s,
    # 40-80 s by default. Then the message is dead-lettered to <queue>.XQ.
    max_retries: int = Field(3, ge=0, le=20)
    min_backoff_ms: int = Field(10_000, ge=0)
    max_backoff_ms: int = Field(300_000, ge=0)
    # A message delivered this many times without being acknowledged (its
    # worker died: OOM, SIGKILL) is dead-lettered as poison on the next delivery.
    max_deliveries: int = Field(4, ge=1, le=100)
    # The longest any task may run; each task's own limit comes from its media
    # duration (routing), capped by this, below broker_consumer_timeout_s.
    max_time_limit_s: int = Field(25 * 60, ge=10)
    progress_interval_s: float = Field(1.0, ge=0)

    # SFTP transfer. Workers with file_access=sftp reach the store over SFTP;
    # the server runs the embedded SFTP server unless sftp_embedded is false
    # (an OpenSSH server serves the store instead, see docs/sftp.md).
    sftp_embedded: bool = True
    sftp_listen_host: str = "127.0.0.1"  # where the embedded server listens
    # Where workers connect: "host" or "host:port"; several replicas, comma-separated, are
    # tried in turn (a host without a port uses sftp_port).
    sftp_host: str = "127.0.0.1"
    sftp_port: int = Field(2222, ge=1, le=65535)
    # The store's root folder as the SFTP server names it ("/" on the embedded server).
    sftp_root: str = "/"
    # Pinned server key: its "SHA256:..." fingerprint or its "ssh-ed25519 AAAA..." line.
    sftp_host_key: str | None = None
    # The embedded server's private host key (default: data_dir/sftp_host_ed25519_key, made on
    # first start). Server replicas name one file, so that workers see one key whichever they reach.
    sftp_server_key_file: Path | None = None
    sftp_known_hosts: Path | None = None
    # Worker credentials; the embedded server accepts the same password, or the
    # public keys listed in sftp_authorized_keys.
    sftp_username: str = "morag-worker"
    sftp_password: SecretStr | None = None
    sftp_key_file: Path | None = None
    sftp_authorized_keys: Path | None = None
    sftp_attempts: int = Field(5, ge=1, le=50)
    sftp_backoff_s: float = Field(1.0, ge=0)
    sftp_max_backoff_s: float = Field(30.0, ge=0)
    sftp_timeout_s: float = Field(30.0, gt=0)
    # Worker side: SSH connections one worker process keeps to the SFTP server,
    # shared by its threads (one SFTP channel each), closed after sftp_pool_idle_s unused.
    sftp_pool_connections: int = Field(2, ge=1, le=16)
    sftp_pool_idle_s: float = Field(60.0, gt=0)
    # Server side (embedded SFTP server): connections served at once; handshakes not yet
    # logged in, per peer address; failed logins per peer address before it must wait
    # (doubling, up to sftp_login_backoff_max_s); a logged-in connection with no
    # request for sftp_idle_timeout_s is closed.
    sftp_max_connections: int = Field(1024, ge=1)
    sftp_max_preauth_per_peer: int = Field(16, ge=1)
    sftp_login_failures_per_peer: int = Field(5, ge=1)
    sftp_login_backoff_max_s: float = Field(300.0, ge=1)
    sftp_idle_timeout_s: float = Field(600.0, ge=1)
    # The shared password/key account (sftp_username) reaches the whole store; it is
    # served only when this is true (see docs/sftp.md for the risk).
    sftp_shared_account: bool = False
    # Files of finished tasks are removed after this many hours; 0 keeps them.
    store_retention_hours: float = Field(7 * 24.0, ge=0)

    # Transcription.
    whisper_model: str = "tiny.en"
    whisper_device: Device = Device.auto
    # auto: float16 on CUDA, int8 on the CPU; int8_float16 halves a model's VRAM on CUDA
    # (int8 weights, float16 compute); any CTranslate2 compute type (docs/worker-sizing.md).
    whisper_compute_type: str = "auto"
    whisper_beam_size: int = Field(5, ge=1, le=20)
    # Batched decoding (faster-whisper's BatchedInferencePipeline: the speech cut on VAD, chunks
    # decoded together): auto, on CUDA only; on; off. whisper_batch_size chunks at once; 0
    # chooses from the free VRAM with the model loaded (8 where it cannot be read, and on the CPU).
    whisper_batched: Batching = Batching.auto
    whisper_batch_size: int = Field(0, ge=0, le=256)
    # CTranslate2's threads per transcription on the CPU; 0: the cores this process may use
    # divided by whisper_concurrency (0 counting as 1).
    whisper_cpu_threads: int = Field(0, ge=0)
    # A GPU worker that does not hold the model a task asks for, while a live worker does,
    # puts the task back once, this many seconds later, for a holder to take; 0: never.
    whisper_affinity_delay_s: float = Field(3.0, ge=0, le=60)
    whisper_language: str | None = None
    # Transcriptions a GPU-queue worker process runs at once on its model (its slots; the
    # process holds one message more, decoding the next while the model works). 0 decides at
    # boot: on CUDA from the free VRAM and the model's size, on CPU one; never more than the
    # worker's threads - 1. A CUDA out-of-memory error lowers it by one (docs/worker-sizing.md).
    whisper_concurrency: int = Field(0, ge=0, le=64)
    # Load the default model at a GPU-queue worker's boot and transcribe one second of
    # silence, so the first task finds it ready. Off by default: on the CPU, a model warmed
    # in the boot thread made a worker's first long transcription run for minutes under
    # load (docs/worker-sizing.md); not yet measured on a GPU.
    whisper_warmup: bool = False
    # Folders, separated by ':', to load CTranslate2's CUDA libraries from (cuBLAS 12 and what
    # it opens); empty: the NVIDIA packages of the Python environment, then the system loader.
    cuda_library_path: str = ""

    # Long recordings (docs/user-guide.md, "Long recordings"): media longer than split_over_s
    # seconds is first cut on silence by a CPU worker (faster-whisper's Silero VAD), into
    # chunks of about split_chunk_s seconds, each transcribed as its own message by whichever
    # worker takes it; the server stitches one transcript. 0 for split_over_s turns it off.
    split_over_s: float = Field(1200.0, ge=0)
    split_chunk_s: float = Field(300.0, gt=0)

    # Cost model: seconds of processing per second of media.
    gpu_realtime_factor: float = Field(0.02, gt=0)
    cpu_realtime_factor: float = Field(0.25, gt=0)
    # Seconds per document page on a CPU worker.
    cpu_seconds_per_page: float = Field(1.5, gt=0)
    # Seconds to read one image (OCR and metadata) on a GPU worker and on a CPU worker.
    gpu_seconds_per_image: float = Field(1.0, gt=0)
    cpu_seconds_per_image: float = Field(5.0, gt=0)

    # Liveness and rerouting. Workers send a heartbeat every
    # heartbeat_interval seconds (0: none); the server calls a worker stale
    # after worker_stale_after seconds without one, dead after
    # worker_dead_after. When a queue has had no live worker for reroute_after
    # seconds, the sweep (periodiq cron sweep_cron, one minute at the finest)
    # moves its waiting fallback-eligible tasks to the other queue. A task that
    # requires a GPU fails after waiting gpu_max_wait seconds with no GPU worker.
    heartbeat_interval: float = Field(10.0, ge=0)
    worker_stale_after: float = Field(30.0, gt=0)
    worker_dead_after: float = Field(120.0, gt=0)
    reroute_after: float = Field(60.0, ge=0)
    gpu_max_wait: float = Field(3600.0, gt=0)
    sweep_cron: str = EVERY_MINUTE
    # Every task ends. Submit tries to publish a task for publish_wait_s (a broker
    # restart); a task still unpublished then is published by the reconciler, which
    # runs with every sweep. A running task that no report has touched for
    # task_lost_after_s and that no live worker holds is delivered again, up to
    # max_deliveries times, then failed with the reason.
    publish_wait_s: float = Field(30.0, ge=0)
    task_lost_after_s: float = Field(600.0, ge=10)
    # A queued task whose queue (with its delay queue and control) has held no message at
    # all for this long, on two sweeps this far apart, lost its message: it is sent again.
    vanished_after_s: float = Field(120.0, ge=1)

    # Fetching URLs (web pages, media links) and delivering webhooks: private,
    # loopback and link-local addresses are refused unless this is on (tests, intranets).
    fetch_allow_private: bool = False
    fetch_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list
    )  # comma-separated host names
    fetch_max_redirects: int = Field(5, ge=0, le=30)
    # Seconds a web page may take to arrive, whole (a recording a URL answers with gets this
    # long between two reads, and the task's time limit in all).
    fetch_timeout_s: float = Field(30.0, gt=0)
    # The largest web page fetched: its body is read as it streams and dropped past this.
    # A URL that answers with a file other than a page is bounded by the limit of that
    # file's kind (MORAG_MAX_UPLOAD_MB for a recording).
    fetch_max_mb: int = Field(16, ge=1)
    # Media URLs (YouTube and every site yt-dlp supports): a CPU worker downloads the media
    # with yt-dlp, through a local proxy that applies the fetch_allow_* rule to every request,
    # within media_timeout_s in all (the task's time limit follows from it) and
    # MORAG_MAX_UPLOAD_MB. Media longer than media_max_duration_s is refused from its metadata
    # before the download where the site states its duration, else once downloaded.
    media_timeout_s: float = Field(600.0, gt=0)
    media_max_duration_s: float = Field(4 * 3600.0, gt=0)
    # Webhooks (docs/webhooks.md): a task submitted with a callback_url is POSTed, signed, to it
    # when it ends (the fetch_allow_* settings above say which addresses it may reach). A try
    # waits webhook_timeout_s for an answer; a failed try is sent again after webhook_backoff_s,
    # doubling up to webhook_backoff_max_s, until webhook_max_age_s after the task ended. The
    # server looks for due deliveries every webhook_poll_s (at once when a task ends in its process).
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_backoff_s: float = Field(10.0, gt=0)
    webhook_backoff_max_s: float = Field(3600.0, gt=0)
    webhook_max_age_s: float = Field(24 * 3600.0, gt=0)
    webhook_poll_s: float = Field(2.0, gt=0)

    # Documents: folder with docling's layout models for PDF; without it PDFs
    # are converted as text only, and the result says so.
    docling_artifacts_path: Path | None = None
    # Images: a folder holding a Hugging Face image-captioning model (BLIP, ViT-GPT2…, saved
    # with save_pretrained: its config, weights, image processor and tokenizer); each image's
    # result then has a caption. Unset: no caption. A folder that is missing or holds no
    # loadable model fails image tasks with the reason, and the worker says so at boot.
    caption_model_path: Path | None = None

    # Security. secret_key signs worker tokens, transfer grants and the keys
    # workers sign their messages with; the server refuses to start without
    # one unless dev_mode is on. api_key is what the CLI sends; worker_token and
    # worker_key are what `morag-pipeline token issue` gives a worker.
    secret_key: SecretStr | None = None
    dev_mode: bool = False
    api_key: SecretStr | None = None
    worker_token: SecretStr | None = None
    worker_key: SecretStr | None = None
    token_ttl_days: float = Field(30.0, gt=0)
    # A transfer grant stays open while its task is queued or running; its expiry
    # decides only for tasks the server no longer knows.
    grant_ttl_s: int = Field(6 * 3600, ge=60)
    # Authentication failures from one client within the window before it is refused (HTTP 429).
    auth_max_failures: int = Field(10, ge=1)
    auth_failure_window_s: float = Field(60.0, gt=0)
    # Heartbeats older than this (or from the future by more) are refused as replays;
    # task reports are never refused for their age.
    message_max_age_s: float = Field(600.0, gt=0)
    # HTTPS for the API (server side: certificate and key; CLI side: the CA to trust).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    # AMQPS: the CA that signed RabbitMQ's certificate (with an amqps:// broker URL).
    broker_ca_file: Path | None = None
    # RabbitMQ's management API, for per-worker broker users (token issue --broker-user);
    # its credentials default to those of broker_url.
    broker_management_url: str = "http://127.0.0.1:15672"
    audit_max_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    audit_backups: int = Field(5, ge=0)

    # Logging.
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("whisper_compute_type")
    @classmethod
    def _compute_type(cls, value: str) -> str:
        if value not in COMPUTE_TYPES:
            raise ValueError(f"must be one of {', '.join(COMPUTE_TYPES)}")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return level

    @field_validator("whisper_allowed_models", "fetch_allow_hosts", mode="before")
    @classmethod
    def _model_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [name.strip() for name in text.split(",") if name.strip()]
        return value

    @field_validator("max_time_limit_s", "max_backoff_ms")
    @classmethod
    def _below_consumer_timeout(cls, value: int, info: ValidationInfo) -> int:
        timeout = info.data.get("broker_consumer_timeout_s")
        seconds = value / 1000 if info.field_name == "max_backoff_ms" else value
        if timeout is not None and seconds >= timeout:
            raise ValueError(
                f"must stay below RabbitMQ's consumer timeout (MORAG_BROKER_CONSUMER_TIMEOUT_S={timeout}"
                " s), or a message would be delivered twice; raise consumer_timeout by policy first"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("amqp://", "amqps://")):
            raise ValueError("must start with amqp:// or amqps://")
        return value

    @field_validator("files_dir", mode="before")
    @classmethod
    def _files_in_data_dir(cls, value: Any, info: ValidationInfo) -> Any:
        if value in (None, ""):
            return Path(info.data.get("data_dir") or _default_data_dir()) / "files"
        return value

    @field_validator("server_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        urls = [url.strip().rstrip("/") for url in value.split(",") if url.strip()]
        if not urls:
            raise ValueError("must name at least one URL")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must start with http:// or https://")
        return ",".join(urls)

    @field_validator("sftp_host")
    @classmethod
    def _host_list(cls, value: str) -> str:
        hosts = [host.strip() for host in value.split(",") if host.strip()]
        if not hosts:
            raise ValueError("must name at least one host")
        for host in hosts:
            _split_address(host, 22)  # raises on a bad port
        return ",".join(hosts)

    @field_validator("worker_dead_after")
    @classmethod
    def _dead_after_stale(cls, value: float, info: Any) -> float:
        stale = info.data.get("worker_stale_after")
        if stale is not None and value <= stale:
            raise ValueError(f"must be longer than MORAG_WORKER_STALE_AFTER ({stale})")
        return value

    @field_validator("sweep_cron")
    @classmethod
    def _five_field_cron(cls, value: str) -> str:
        if value == EVERY_MINUTE:
            return value  # the default: every process loads settings, few need periodiq
        from periodiq import cron

        if len(value.split()) != 5 and not value.strip().startswith("@"):
            raise ValueError("must be a five-field cron spec, e.g. '* * * * *' (every minute)")
        try:
            cron(value)
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"not a cron spec: {exc}") from None
        return value

    @field_validator("docling_artifacts_path")
    @classmethod
    def _artifacts_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"{value} is not a directory")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"{CONFIG_ENV}={config_file}: no such file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # Derived paths.
    @property
    def db_path(self) -> Path:
        return self.data_dir / "tasks.db"

    @property
    def server_urls(self) -> list[str]:
        """The server's URLs, in the order the CLI tries them."""
        return self.server_url.split(",")

    @property
    def sftp_addresses(self) -> list[tuple[str, int]]:
        """The SFTP servers' (host, port), in the order workers try them."""
        return [_split_address(host, self.sftp_port) for host in self.sftp_host.split(",")]

    def redacted(self) -> dict[str, Any]:
        """The settings as plain values, with secrets and passwords hidden."""
        data = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            if field.annotation is SecretStr or "SecretStr" in str(field.annotation):
                data[name] = "**********" if data[name] else None
        url = self.broker_url.get_secret_value()
        data["broker_url"] = redact_url(url)
        for name, value in data.items():
            if isinstance(value, str) and "://" in value:  # a URL's password (broker_management_url)
                data[name] = redact_url(value)
        return data


class ConfigError(Exception):
    """A setting is missing or wrong; the message says which and why."""


def _split_address(address: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` as (host, port)."""
    host, port = address, ""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, port = address.split(":")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r}: the port must be a number from 1 to 65535")
    return host, int(port)


def redact_url(url: str) -> str:
    """``url`` with the password of its credentials hidden (with or without a scheme)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:****@{host}"


def _shown(name: str, value: Any, kind: str) -> str:
    """How a refused value is echoed: a secret never, a URL without its password."""
    field = Settings.model_fields.get(name)
    secret = field is not None and "SecretStr" in str(field.annotation)
    if isinstance(value, dict) or kind == "extra_forbidden" or (secret and name != "broker_url"):
        return ""  # a secret, or an unknown setting that may be a misspelt one
    if isinstance(value, str) and (name == "broker_url" or "://" in value):
        value = redact_url(value)
    return f" (got {value!r})"


def describe_errors(error: ValidationError) -> list[str]:
    """One line per bad setting, naming the environment variable to fix; secrets are not echoed."""
    lines = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"])
        shown = _shown(name, item.get("input"), item["type"])
        label = name.upper() if name.upper().startswith("MORAG_") else f"MORAG_{name.upper()}"
        if item["type"] == "extra_forbidden":
            item["msg"] = "no such setting"
        lines.append(f"{label}: {item['msg']}{shown}")
    return lines


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning validation errors into one ConfigError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError("bad configuration:\n  " + "\n  ".join(describe_errors(exc))) from None


_current: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, read once."""
    global _current
    if _current is None:
        _current = load_settings()
    return _current


def use_settings(settings: Settings) -> Settings:
    """Make ``settings`` the process-wide settings (the embedded mode and tests do this)."""
    global _current
    _current = settings
    return settings
