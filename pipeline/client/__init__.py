"""A Python client of ``morag-pipeline server``: synchronous (``Client``) and asyncio (``AsyncClient``).

Submit a file, follow its task through the server's event stream, fetch its outputs::

    from pipeline.client import Client

    with Client("http://127.0.0.1:8470", api_key="mpk_...") as client:
        task = client.submit("talk.mp4", language="en", priority="high")
        task.wait(timeout=600, on_progress=lambda t: print(t["state"], t["progress"]))
        print(task.result("srt").decode())

Safe retries (connection errors, 503, 429 with ``Retry-After``) and an
``Idempotency-Key`` on every submit: a retried upload makes one task. See docs/client.md.
"""

from pipeline.client.aio import AsyncClient, AsyncTask
from pipeline.client.errors import ClientError, WaitTimeout
from pipeline.client.policy import RetryPolicy
from pipeline.client.sse import Event
from pipeline.client.sync import Client, Task, Watch

__all__ = [
    "AsyncClient",
    "AsyncTask",
    "Client",
    "ClientError",
    "Event",
    "RetryPolicy",
    "Task",
    "WaitTimeout",
    "Watch",
]
