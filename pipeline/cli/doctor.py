"""``morag-pipeline doctor``: is this box ready to serve, or to work, and what to fix if not.

It checks, as the process it stands for would meet them: the broker (reached
with the box's credentials, its queues declared with the server's arguments
and consumed), RabbitMQ's management API (server), the database (server),
ffmpeg and ffprobe, free disk space, and on a worker box the clock against
the server's, the SFTP server's host key against its pin, the worker token,
the Whisper model (loaded, on which device) and, where a GPU is wanted, CUDA
and cuDNN. Each finding is one line; a problem's line ends with its fix. The
exit code is 0 when no problem was found (notes do not count), 1 otherwise.

The role (server, or a gpu or cpu worker) comes from ``--role``, else from the
worker token's capability, else it is the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipeline.config import FileAccess, Settings, redact_url
from pipeline.errors import PipelineError

ROLES = ("server", "gpu", "cpu")
#: The clock difference past which a worker box's clock is a problem: signed messages carry
#: their time, and heartbeats older than MORAG_MESSAGE_MAX_AGE_S (or from the future) are refused.
MAX_CLOCK_SKEW_S = 30.0
#: How to fix a clock.
CLOCK_FIX = "keep both clocks on NTP (timedatectl set-ntp true, or chrony)"


class Status(StrEnum):
    ok = "ok"
    note = "note"  # worth knowing, not a problem: the box is ready
    problem = "PROBLEM"


@dataclass(frozen=True)
class Finding:
    """What one check found.

    Parameters:
      check: what was checked (``broker``, ``ffmpeg``, ...).
      status: ok, a note, or a problem.
      text: what was seen.
      fix: what to do about a problem.
    """

    check: str
    status: Status
    text: str
    fix: str = ""

    def line(self) -> str:
        """The finding on one line: status, check, what was seen and, for a problem, the fix."""
        fix = f" -- fix: {self.fix}" if self.fix and self.status is not Status.ok else ""
        return f"{self.status.value:<7} {self.check}: {self.text}{fix}"


def ok(check: str, text: str) -> Finding:
    return Finding(check, Status.ok, text)


def note(check: str, text: str, fix: str = "") -> Finding:
    return Finding(check, Status.note, text, fix)


def problem(check: str, text: str, fix: str) -> Finding:
    """A problem; ``fix`` may be empty where ``text`` already says what to do."""
    return Finding(check, Status.problem, text, fix)


def token_claims(settings: Settings) -> dict[str, Any] | None:
    """The worker token's claims, read but not verified (the server verifies); None without a token."""
    if settings.worker_token is None:
        return None
    import jwt

    try:
        return dict(jwt.decode(settings.worker_token.get_secret_value(), options={"verify_signature": False}))
    except jwt.InvalidTokenError:
        return {}


def pick_role(settings: Settings, asked: str | None) -> tuple[str, str]:
    """(role, why): ``asked``, else the token's capability, else the server."""
    if asked:
        return asked, "--role"
    claims = token_claims(settings)
    if claims and claims.get("cap") in ("gpu", "cpu"):
        return claims["cap"], f"the token of worker {claims.get('sub', '?')}"
    if claims is not None:
        return "cpu", "a worker token that cannot be read; checking as a cpu worker"
    return "server", "no worker token"


# The checks. Each takes the settings and the role and returns its findings.


def check_broker(settings: Settings, role: str) -> list[Finding]:
    """Connect with the box's credentials, declare its queues as the server does, consume its queue."""
    import pika
    import pika.exceptions
    from dramatiq.common import dq_name, xq_name

    from pipeline.brokers.queue_types import Role, parse_version, queue_arguments
    from pipeline.brokers.rabbitmq import connection_parameters, server_version

    url = redact_url(settings.broker_url.get_secret_value())
    params = connection_parameters(settings)
    where = f"{params.host}:{params.port}"
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.ProbableAuthenticationError:
        return [
            problem(
                "broker",
                f"RabbitMQ at {where} refused the user and password of {url}",
                "correct MORAG_BROKER_URL's credentials (a worker's come from token issue)",
            )
        ]
    except pika.exceptions.ProbableAccessDeniedError:
        return [
            problem(
                "broker",
                f"the user of {url} may not open vhost {params.virtual_host!r}",
                f"rabbitmqctl set_permissions -p {params.virtual_host} USER '.*' '.*' '.*' on the "
                "broker, or use the vhost the server uses",
            )
        ]
    except (pika.exceptions.AMQPError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        return [
            problem(
                "broker",
                f"cannot connect to RabbitMQ at {where} ({url}): {reason}",
                "start RabbitMQ there, or set MORAG_BROKER_URL to where it runs",
            )
        ]
    queues = ("gpu", "cpu", "control") if role == "server" else (role,)
    consumed = "control" if role == "server" else role
    try:
        version = server_version(connection)
        for queue in queues:
            for kind, name in (
                (Role.queue, queue),
                (Role.delay, dq_name(queue)),
                (Role.dead, xq_name(queue)),
            ):
                arguments = queue_arguments(
                    queue,
                    kind,
                    settings.broker_queue_type,
                    parse_version(version),
                    settings.broker_max_priority,
                )
                channel = connection.channel()
                try:
                    channel.queue_declare(name, durable=True, arguments=arguments)
                except pika.exceptions.ChannelClosedByBroker as exc:
                    return [_refused_queue(exc, name, "declare", params.virtual_host, settings)]
                channel.close()
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        try:
            # Whatever is delivered in this instant goes back when the channel closes, unstarted.
            tag = channel.basic_consume(consumed, on_message_callback=lambda *_: None)
            channel.basic_cancel(tag)
        except pika.exceptions.ChannelClosedByBroker as exc:
            return [_refused_queue(exc, consumed, "consume", params.virtual_host, settings)]
        channel.close()
    finally:
        if connection.is_open:
            connection.close()
    return [
        ok("broker", f"RabbitMQ {version} at {url}: declares {', '.join(queues)} and consumes {consumed}")
    ]


def _refused_queue(exc: Any, name: str, action: str, vhost: str, settings: Settings) -> Finding:
    """The finding for RabbitMQ closing the channel on ``action`` (declare, consume) of queue ``name``."""
    from pipeline.brokers.queue_types import mismatch

    if exc.reply_code == 406 and "inequivalent arg" in exc.reply_text:
        return problem("broker", str(mismatch(name, vhost, settings.broker_queue_type, exc.reply_text)), "")
    if exc.reply_code == 403:
        return problem(
            "broker",
            f"the broker user may not {action} queue {name} in vhost {vhost!r}",
            "issue the worker's token again with --broker-user, or grant the user this queue",
        )
    return problem("broker", f"RabbitMQ refused to {action} {name}: {exc.reply_text}", "see RabbitMQ's log")


def check_management(settings: Settings, role: str) -> list[Finding]:
    """The management API answers with the broker user's credentials and sees the vhost."""
    import httpx

    from pipeline.brokers.management import Management

    where = redact_url(settings.broker_management_url)
    try:
        with Management(settings) as api:
            overview = api.overview()
            api.queues(columns="name")
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        fix = (
            "give the broker user the management or monitoring tag (rabbitmqctl set_user_tags)"
            if code in (401, 403)
            else "see RabbitMQ's log"
        )
        return [problem("management", f"RabbitMQ's management API at {where} answered {code}", fix)]
    except httpx.HTTPError as exc:
        return [
            problem(
                "management",
                f"cannot reach RabbitMQ's management API at {where}: {exc}",
                "rabbitmq-plugins enable rabbitmq_management, or set MORAG_BROKER_MANAGEMENT_URL",
            )
        ]
    return [ok("management", f"RabbitMQ {overview.get('rabbitmq_version', '?')}'s management API at {where}")]


def check_database(settings: Settings, role: str) -> list[Finding]:
    """PostgreSQL answers (MORAG_DATABASE_URL), or the SQLite file's folder is writable."""
    if settings.database_url is None:
        folder = _existing(settings.data_dir)
        if not os.access(folder, os.W_OK | os.X_OK):
            return [
                problem(
                    "database",
                    f"{folder} is not writable: the SQLite task store cannot be made",
                    f"give this user {settings.data_dir}, or set MORAG_DATA_DIR",
                )
            ]
        return [ok("database", f"SQLite in {settings.data_dir}")]
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.db import database_url

    written = settings.database_url.get_secret_value()
    shown = redact_url(written)
    engine = create_engine(database_url(written), connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            version = connection.execute(text("SHOW server_version")).scalar()
    except SQLAlchemyError as exc:
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        return [
            problem(
                "database",
                f"cannot open {shown}: {reason}",
                "start PostgreSQL, or correct MORAG_DATABASE_URL",
            )
        ]
    finally:
        engine.dispose()
    return [ok("database", f"PostgreSQL {version} at {shown}")]


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest parent that exists (where it would be made)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_ffmpeg(settings: Settings, role: str) -> list[Finding]:
    """ffmpeg and ffprobe are on PATH and run."""
    found = []
    for tool in ("ffmpeg", "ffprobe"):
        path = shutil.which(tool)
        if path is None:
            found.append(problem(tool, "not found on PATH", "apt-get install ffmpeg (or put it on PATH)"))
            continue
        try:
            out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=20, check=True)
        except (OSError, subprocess.SubprocessError) as exc:
            found.append(problem(tool, f"{path} does not run: {exc}", "reinstall ffmpeg"))
            continue
        version = (out.stdout.split() or ["", "", "?"])[2]
        found.append(ok(tool, f"{path} ({version})"))
    return found


def check_disk(settings: Settings, role: str) -> list[Finding]:
    """Free space where the box keeps its files, against MORAG_MIN_FREE_DISK_MB."""
    folder = settings.files_dir if role == "server" else settings.data_dir
    free_mb = shutil.disk_usage(_existing(folder)).free // 2**20
    text = f"{free_mb} MB free for {folder}"
    if free_mb < settings.min_free_disk_mb:
        return [
            problem(
                "disk",
                f"{text}, below MORAG_MIN_FREE_DISK_MB={settings.min_free_disk_mb}",
                "free space there, or move the folder (MORAG_DATA_DIR, MORAG_FILES_DIR)",
            )
        ]
    return [ok("disk", text)]


def check_clock(settings: Settings, role: str) -> list[Finding]:
    """This clock against the server's, from the Date header of its API."""
    import httpx

    url = settings.server_urls[0]
    verify: ssl.SSLContext | bool = True
    if settings.tls_ca_file is not None:
        verify = ssl.create_default_context(cafile=str(settings.tls_ca_file))
    try:
        sent = time.time()
        response = httpx.get(f"{url}/healthz", timeout=10, verify=verify)
        received = time.time()
    except httpx.HTTPError as exc:
        return [
            note(
                "clock",
                f"not compared: cannot reach the server's API at {url} ({exc})",
                "set MORAG_SERVER_URL to the server's address (token issue writes it)",
            )
        ]
    skew = clock_skew(sent, received, response.headers.get("date"))
    if skew is None:
        return [note("clock", f"not compared: {url} sent no Date header")]
    limit = min(MAX_CLOCK_SKEW_S, settings.message_max_age_s / 2)
    offset, margin = skew
    side = "ahead of" if offset > 0 else "behind"
    if abs(offset) - margin > limit:
        return [
            problem(
                "clock",
                f"this clock is {abs(offset):.0f} s {side} the server's ({url}); signed "
                f"messages are refused past {settings.message_max_age_s:g} s",
                CLOCK_FIX,
            )
        ]
    return [ok("clock", f"within {max(abs(offset), margin):.1f} s of the server's ({url})")]


def clock_skew(sent: float, received: float, date: str | None) -> tuple[float, float] | None:
    """(how far this clock is ahead of the server's, the margin of that reading), from a
    response's ``Date`` header (whole seconds, cut) and when the request went and came back."""
    if not date:
        return None
    try:
        server = parsedate_to_datetime(date).timestamp() + 0.5  # the middle of its second
    except (TypeError, ValueError):
        return None
    return (sent + received) / 2 - server, 0.5 + (received - sent) / 2


def check_sftp(settings: Settings, role: str) -> list[Finding]:
    """The SFTP server's host key matches the pin, and it takes the worker token (valid, unrevoked)."""
    import paramiko

    from pipeline.transfer.sftp_client import HostKeyRefused, open_connection

    if settings.file_access is FileAccess.shared:
        return [ok("sftp", "not used: this worker shares the server's files (MORAG_FILE_ACCESS=shared)")]
    claims = token_claims(settings)
    if claims is not None and "sub" not in claims:
        return [
            problem(
                "token",
                "MORAG_WORKER_TOKEN is not a worker token",
                "put the file `morag-pipeline token issue --env-file` wrote into morag.env",
            )
        ]
    expiry = (claims or {}).get("exp", 0)
    if claims is not None and expiry < time.time():
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(expiry))
        return [problem("token", f"the token of worker {claims['sub']} expired on {when}", _reissue(claims))]
    where = ", ".join(f"{host}:{port}" for host, port in settings.sftp_addresses)
    try:
        open_connection(settings).close()
    except HostKeyRefused as exc:
        fix = "pin the key the server prints at start (MORAG_SFTP_HOST_KEY), from token issue's file"
        return [problem("sftp host key", str(exc), fix)]
    except PipelineError as exc:  # the server refused the login
        if claims is None:
            return [
                problem("sftp login", str(exc), "set MORAG_SFTP_PASSWORD or MORAG_SFTP_KEY_FILE, or enroll")
            ]
        refused = f"the SFTP server refused the token of worker {claims['sub']}: revoked, or unknown to it"
        return [
            ok("sftp host key", f"{where} presented the pinned key"),
            problem("token", refused, _reissue(claims)),
        ]
    except (OSError, EOFError, paramiko.SSHException) as exc:
        return [
            problem(
                "sftp",
                f"cannot reach the SFTP server at {where}: {exc}",
                "start the server, open the port, or set MORAG_SFTP_HOST and MORAG_SFTP_PORT",
            )
        ]
    found = [ok("sftp host key", f"{where} presented the pinned key")]
    if claims is not None:
        until = time.strftime("%Y-%m-%d", time.localtime(expiry))
        found.append(
            ok("token", f"accepted for worker {claims['sub']} ({claims.get('cap')}), valid until {until}")
        )
    return found


def _reissue(claims: dict[str, Any]) -> str:
    return (
        f"on the server host: morag-pipeline token issue --worker {claims.get('sub', 'NAME')} "
        f"--capability {claims.get('cap', 'gpu')} --env-file FILE, and use the new file"
    )


def check_model(settings: Settings, role: str) -> list[Finding]:
    """The Whisper model loads, and on which device."""
    try:
        from pipeline.processors.whisper import load_model
    except ImportError as exc:
        return [
            problem(
                "model", f"faster-whisper is not installed ({exc})", "pip install 'morag-pipeline[worker]'"
            )
        ]
    started = time.monotonic()
    try:
        _, device, compute_type = load_model(
            settings.whisper_model, settings.whisper_device.value, settings.whisper_compute_type
        )
    except (PipelineError, ImportError) as exc:
        return [problem("model", str(exc), "install the model, or set MORAG_WHISPER_MODEL to one that is")]
    took = time.monotonic() - started
    text = f"{settings.whisper_model} loads on {device} ({compute_type}) in {took:.1f} s"
    if role == "gpu" and device != "cuda":
        return [
            note(
                "model",
                f"{text}: this gpu worker transcribes on the CPU",
                "see the cuda line; MORAG_WHISPER_DEVICE=cuda makes a GPU required",
            )
        ]
    return [ok("model", text)]


def check_cuda(settings: Settings, role: str) -> list[Finding]:
    """CUDA (device, cuBLAS) and cuDNN, where this box should transcribe on a GPU."""
    from pipeline.hardware import cuda_status
    from pipeline.processors import cuda_libs

    device = settings.whisper_device.value
    status = cuda_status(device, cuda_libs.dirs_from(settings.cuda_library_path))
    if not status["wanted"]:
        if role == "gpu":
            return [
                note(
                    "cuda",
                    "no GPU seen on this machine (nvidia-smi, CTranslate2)",
                    "install the NVIDIA driver, or run this box as a cpu worker",
                )
            ]
        return []
    if not status["usable"]:
        fix = "install the NVIDIA driver for CUDA 12 and the worker extra; see docs/troubleshooting.md"
        return [problem("cuda", one, fix) for one in status["problems"]]
    return [ok("cuda", f"{status['devices']} CUDA device(s), cuBLAS loads and starts"), check_cudnn()]


def check_cudnn() -> Finding:
    """cuDNN loads, where the installed CTranslate2 opens it (builds up to 4.x link it in or need none)."""
    import ctypes
    import re

    import ctranslate2

    package = Path(ctranslate2.__file__).parent
    names: set[str] = set()
    for library in [*package.parent.glob("ctranslate2.libs/libctranslate2*.so*"), *package.glob("*.so*")]:
        names |= {m.decode() for m in re.findall(rb"libcudnn[a-z_]*\.so\.\d+", library.read_bytes())}
    if not names:
        return ok("cudnn", f"not needed: ctranslate2 {ctranslate2.__version__} opens no cuDNN")
    for name in sorted(names):
        try:
            ctypes.CDLL(name)
        except OSError as exc:
            return problem(
                "cudnn",
                f"{name} does not load: {exc}",
                "install cuDNN 9 for CUDA 12 (nvidia-cudnn-cu12, or a CUDA image with cuDNN)",
            )
    return ok("cudnn", f"{', '.join(sorted(names))} loads")


#: The checks of each role, cheap ones first.
CHECKS: dict[str, tuple[Callable[[Settings, str], list[Finding]], ...]] = {
    "server": (check_broker, check_management, check_database, check_ffmpeg, check_disk),
    "gpu": (check_broker, check_ffmpeg, check_disk, check_clock, check_sftp, check_cuda, check_model),
    "cpu": (check_broker, check_ffmpeg, check_disk, check_clock, check_sftp, check_model),
}


def diagnose(
    settings: Settings, role: str, emit: Callable[[Finding], None] = lambda _: None
) -> list[Finding]:
    """Every check of ``role``, in order; ``emit`` is given each finding as soon as it is known."""
    findings = []
    for check in CHECKS[role]:
        try:
            found = check(settings, role)
        except Exception as exc:  # a check that breaks is a finding, not a crash
            found = [
                problem(
                    check.__name__.removeprefix("check_"),
                    f"{type(exc).__name__}: {exc}",
                    "report this; the other checks ran",
                )
            ]
        for finding in found:
            emit(finding)
        findings += found
    return findings


def add_commands(commands: argparse._SubParsersAction) -> None:
    doctor = commands.add_parser(
        "doctor", help="check that this box is ready to serve or work; say what to fix"
    )
    doctor.add_argument(
        "--role", choices=ROLES, help="what this box is (default: from the worker token, else server)"
    )


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    role, why = pick_role(settings, args.role)
    print(f"morag-pipeline doctor: checking this box as {role} ({why})", flush=True)
    findings = diagnose(settings, role, emit=lambda finding: print(finding.line(), flush=True))
    problems = sum(finding.status is Status.problem for finding in findings)
    print("ready" if not problems else f"{problems} problem{'s' if problems > 1 else ''}: not ready")
    return 1 if problems else 0


COMMANDS = {"doctor": cmd_doctor}
