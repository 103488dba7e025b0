"""Who this worker is."""

from __future__ import annotations

import os
import socket

from pipeline.config import get_settings


def worker_id() -> str:
    """``MORAG_WORKER_NAME``, or host and process id."""
    name = get_settings().worker_name
    return name or f"{socket.gethostname()}:{os.getpid()}"
