"""Multipart uploads read as they stream in: hashed on the way, refused the moment they are too big.

The file part goes straight to a temporary file with its SHA-256 computed
while written. Its first bytes tell its kind (``pipeline.kinds``), and each
kind has its own size limit, enforced during the upload, not after it.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import parse_qsl

from fastapi import HTTPException, Request
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from pipeline.routing import kind_of_head
from pipeline.store import TaskStore

#: Form fields other than the file, and the largest value each may have.
MAX_FIELD_BYTES = 1024
MAX_FIELDS = 16
SNIFF_BYTES = 8192
#: The largest ``application/x-www-form-urlencoded`` body (a URL to fetch and its options).
MAX_FORM_BYTES = 16 * 1024
FORM_URLENCODED = b"application/x-www-form-urlencoded"
#: Free disk space is checked again after every this many bytes received.
DISK_CHECK_BYTES = 8 * 1024 * 1024
MIB = 1024 * 1024


@dataclass
class Upload:
    """A received file and the form fields sent with it."""

    path: Path
    filename: str
    sha256: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class Limits:
    """What an upload may be.

    Parameters:
      kind_bytes: the largest file of each kind, by kind name (``Kind.max_bytes``).
      min_free_bytes: free space the data directory's disk keeps; an upload that would
        leave less is refused with 507, before it starts and while it streams in.
      check_field: called with each form field's name and value as soon as the field
        has arrived; raises HTTPException to refuse the upload.
    """

    kind_bytes: dict[str, int]
    min_free_bytes: int = 0
    check_field: Callable[[str, str], None] | None = None

    def for_head(self, head: bytes) -> tuple[int, str]:
        """The limit of a file whose first bytes are ``head``, and what the limit is for."""
        kind = kind_of_head(head)
        return self.kind_bytes[kind.name], kind.accepts

    @property
    def largest(self) -> int:
        return max(self.kind_bytes.values())


class _Receiver:
    """Collects one multipart body through the parser's callbacks."""

    def __init__(self, folder: Path, limits: Limits, max_bytes: tuple[int, str] | None = None) -> None:
        self.folder = folder
        self.limits = limits
        self.max_bytes = max_bytes
        self._disk_checked_at = 0
        self.fields: dict[str, str] = {}
        self.file: IO[bytes] | None = None
        self.path: Path | None = None
        self.filename: str | None = None
        self.digest = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.limit: tuple[int, str] | None = None
        self._header_field = b""
        self._header_value = b""
        self._disposition: dict[bytes, bytes] = {}
        self._field_name: str | None = None
        self._field_value = bytearray()
        self.error: HTTPException | None = None

    # Parser callbacks.
    def on_part_begin(self) -> None:
        self._disposition = {}
        self._field_name = None
        self._field_value = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            _, self._disposition = parse_options_header(self._header_value)
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        name = self._disposition.get(b"name", b"").decode(errors="replace")
        if b"filename" in self._disposition and name == "file":
            if self.file is not None:
                raise HTTPException(400, "send one file per task")
            self.filename = self._disposition[b"filename"].decode(errors="replace") or "upload"
            fd, name = tempfile.mkstemp(dir=self.folder, prefix="upload-")
            self.file, self.path = open(fd, "wb"), Path(name)  # noqa: SIM115 (closed in receive_upload)
        else:
            if len(self.fields) >= MAX_FIELDS:
                raise HTTPException(400, "too many form fields")
            self._field_name = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._field_name is not None:
            self._field_value += chunk
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise HTTPException(400, f"form field {self._field_name!r} is too long")
            return
        if self.file is None:
            return
        self.size += len(chunk)
        if self.size - self._disk_checked_at >= DISK_CHECK_BYTES:
            self._disk_checked_at = self.size
            check_free_space(self.folder, self.limits.min_free_bytes)
        if self.max_bytes is not None and self.size > self.max_bytes[0]:
            raise HTTPException(429, f"{self.filename}: {self.max_bytes[1]}")
        if self.limit is None:
            self.head += chunk[: SNIFF_BYTES - len(self.head)]
            if len(self.head) >= SNIFF_BYTES:
                self.limit = self.limits.for_head(self.head)
        limit = self.limit or self.limits.for_head(self.head)
        if self.size > limit[0]:
            raise HTTPException(
                413,
                f"{self.filename}: larger than the {limit[0] // (1024 * 1024)} MiB allowed for {limit[1]}",
            )
        self.digest.update(chunk)
        self.file.write(chunk)

    def on_part_end(self) -> None:
        if self._field_name is not None:
            value = self._field_value.decode(errors="replace")
            self.fields[self._field_name] = value
            if self.limits.check_field is not None:
                self.limits.check_field(self._field_name, value)
            self._field_name = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def check_free_space(folder: Path, min_free_bytes: int, incoming: int = 0) -> None:
    """HTTPException 507 when ``folder``'s disk would keep under ``min_free_bytes`` after ``incoming``."""
    if min_free_bytes <= 0:
        return
    free = shutil.disk_usage(folder).free
    if free - incoming < min_free_bytes:
        raise HTTPException(
            507,
            f"the server is short of disk space: {free // MIB} MiB free, and it keeps "
            f"{min_free_bytes // MIB} MiB free (MORAG_MIN_FREE_DISK_MB); try again later",
        )


async def receive_upload(
    request: Request, folder: Path, limits: Limits, max_bytes: tuple[int, str] | None = None
) -> Upload:
    """Read a ``multipart/form-data`` body with one ``file`` part; 4xx HTTPException when refused.

    ``max_bytes``, when given, is the most the file may hold and the reason
    given when it holds more (HTTP 429: a quota).
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise HTTPException(415, "send the file as multipart/form-data with a 'file' part")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.largest + 65536:
        raise HTTPException(413, "upload larger than the server accepts")
    check_free_space(folder, limits.min_free_bytes, int(declared) if declared and declared.isdigit() else 0)
    receiver = _Receiver(folder, limits, max_bytes)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        receiver.discard()
        raise
    except Exception as exc:
        receiver.discard()
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    if receiver.file is None or receiver.path is None or receiver.filename is None:
        receiver.discard()
        raise HTTPException(400, "no 'file' part in the upload")
    receiver.file.close()
    try:
        check_free_space(folder, limits.min_free_bytes)
    except HTTPException:
        receiver.discard()
        raise
    return Upload(
        receiver.path, receiver.filename, receiver.digest.hexdigest(), receiver.size, receiver.fields
    )


def is_form(request: Request) -> bool:
    """Whether the request's body is an urlencoded form (a URL to fetch), not an upload."""
    content_type, _ = parse_options_header(request.headers.get("content-type", ""))
    return bool(content_type == FORM_URLENCODED)


async def receive_form(request: Request, limits: Limits) -> dict[str, str]:
    """The fields of an urlencoded form body, each checked by ``limits.check_field``; 4xx when refused."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, f"form larger than {MAX_FORM_BYTES // 1024} KiB")
    try:
        fields = dict(parse_qsl(body.decode("utf-8"), max_num_fields=MAX_FIELDS, strict_parsing=bool(body)))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HTTPException(400, f"malformed form: {exc}") from None
    if limits.check_field is not None:
        for name, value in fields.items():
            limits.check_field(name, value)
    return fields


class DailyQuota:
    """Bytes each API key may upload per day (UTC), counted in the task store.

    A restarted server still knows what each key uploaded today.

    Parameters:
      bytes_per_day: the quota of each key; 0: none.
      store: where each key's bytes of the day are counted.
      clock: the time source (seconds since the epoch).
    """

    def __init__(self, bytes_per_day: int, store: TaskStore, clock: Callable[[], float] = time.time) -> None:
        self.bytes_per_day = bytes_per_day
        self._store = store
        self._clock = clock

    def _today(self) -> int:
        return int(self._clock() // 86400)

    def used(self, key: str) -> int:
        """The bytes ``key`` uploaded today."""
        return self._store.uploaded_bytes(key, self._today())

    def left(self, key: str) -> tuple[int, str] | None:
        """The bytes ``key`` may still upload today and the reason past them; None: no quota.

        HTTPException 429 when nothing is left.
        """
        if self.bytes_per_day <= 0:
            return None
        left = self.bytes_per_day - self.used(key)
        reason = (
            f"over the daily upload quota of {self.bytes_per_day // MIB} MiB for this API key "
            "(MORAG_QUOTA_MB_PER_DAY); it renews at midnight UTC"
        )
        if left <= 0:
            raise HTTPException(429, reason)
        return left, reason

    def charge(self, key: str, size: int) -> None:
        """Count ``size`` bytes uploaded by ``key``."""
        if self.bytes_per_day > 0:
            self._store.add_uploaded_bytes(key, self._today(), size)
