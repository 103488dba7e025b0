"""A worker process boots without the server's database layer, and without what only the
server or a few tasks use.

``dramatiq pipeline.actors.cpu`` (or ``.gpu``) imports the actors and the whole
middleware stack; the store (SQLAlchemy), the registry and the server's services
belong to the server, an HTTP client to the tasks that fetch, PyJWT (and the
cryptography it loads) to whoever issues or checks a transfer grant, file-type
sniffing to the server's classification, and periodiq (with pendulum) to the server's
scheduled sweep. Each of them costs a worker some
hundredths of a second or more at every start (measured in
``bench/broker_throughput.py``'s whole-worker mode, bench/README.md).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SERVER_ONLY = (
    "sqlalchemy",
    "pipeline.store",
    "pipeline.services",
    "pipeline.fleet.registry",
    "pipeline.db",
    "httpx",
    "jwt",
    "cryptography",
    "filetype",
    "periodiq",
    "pendulum",
)


@pytest.mark.parametrize("module", ["pipeline.actors.cpu", "pipeline.actors.gpu"])
def test_a_worker_boots_without_the_database_layer_or_the_servers_libraries(module: str) -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout.split()  # fmt: skip
    assert "pipeline.middleware.message_signing" in loaded  # the worker's stack is there
    assert [name for name in SERVER_ONLY if name in loaded] == []
