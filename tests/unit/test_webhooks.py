"""Webhooks without a running server: signatures, claims on each database, tries against a local
receiver (an address refused at delivery, a redirect, the max age), and the webhook secrets."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.config import Settings
from pipeline.netsafety import UnsafeURL
from pipeline.security.tokens import AuthError
from pipeline.security.webhook_secrets import WebhookSecrets
from pipeline.services import Services, build_services
from pipeline.store import State, Task, TaskStore, new_task_id
from pipeline.webhooks.courier import Courier, backoff, check_target
from pipeline.webhooks.deliveries import Callback, Delivery, DeliveryStore, WebhookState
from pipeline.webhooks.signing import BadSignature, sign, verify
from tests.conftest import TEST_SECRET
from tests.integration.webhook_receiver import Receiver
from tests.unit.test_cli import run_cli

HOOK = "https://ingest.example.org/hooks/morag"


def test_a_signature_matches_only_its_body_secret_and_time() -> None:
    header = sign("whsec_a", b'{"task_id":"t1"}', timestamp=1_000_000)
    assert header.startswith("t=1000000,v1=")
    assert verify("whsec_a", b'{"task_id":"t1"}', header, now=1_000_010) == 1_000_000
    refusals = [
        ("whsec_b", b'{"task_id":"t1"}', 1_000_000, "does not match"),
        ("whsec_a", b'{"task_id":"t2"}', 1_000_000, "does not match"),
        ("whsec_a", b'{"task_id":"t1"}', 1_000_301, "301s from now"),
    ]
    for secret, body, now, why in refusals:
        with pytest.raises(BadSignature, match=why):
            verify(secret, body, header, now=now)
    with pytest.raises(BadSignature, match="malformed"):
        verify("whsec_a", b"{}", "v1=00", now=1_000_000)


def test_tries_wait_longer_each_time_up_to_the_cap() -> None:
    settings = Settings(webhook_backoff_s=10, webhook_backoff_max_s=60)
    assert [backoff(n, settings) for n in range(1, 6)] == [10, 20, 40, 60, 60]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://ingest.example.org/hooks", "only http and https"),
        ("http:///hooks", "no host"),
        ("http://[ingest/hooks", "is not a URL: Invalid IPv6 URL"),
        ("http://ingest.example.org:port/hooks", "is not a URL: Port could not be cast"),
        ("http://ingest.example.org:99999/hooks", "is not a URL: Port out of range"),
    ],
)
def test_a_callback_url_of_the_wrong_form_is_refused_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(UnsafeURL, match=re.escape(why)):
        check_target(url, Settings(), resolve=False)


def task_with_webhook(store: TaskStore, url: str = HOOK, key_id: str | None = "k1") -> str:
    task = Task(new_task_id(), "transcribe", State.queued, "talk.mp4", {}, {}, {"queue": "cpu"})
    return store.create(task, Callback(url, key_id)).id


def test_one_server_claims_each_due_delivery(database: Path | str) -> None:
    """Servers claiming at once take each due delivery once; a claim held keeps it from the
    others until it runs out, and only its holder records the try."""
    store, deliveries = TaskStore(database), DeliveryStore(database)
    ids = [task_with_webhook(store) for _ in range(8)]
    assert deliveries.claim("a", time.time(), 60, 100) == []  # waiting: no task ended
    for task_id in ids:
        assert store.mark_canceled(task_id, "not needed")
    now = time.time()
    assert {deliveries.get(i).state for i in ids} == {WebhookState.pending}

    with ThreadPoolExecutor(4) as pool:
        claims = list(pool.map(lambda name: deliveries.claim(name, now + 1, 60, 100), "abcd"))
    taken = [d.task_id for claim in claims for d in claim]
    assert sorted(taken) == sorted(ids)  # each once
    assert deliveries.claim("e", now + 2, 60, 100) == []

    held = next(d for claim in claims for d in claim)
    others = "abcd".replace(held.claimed_by or "", "")
    assert deliveries.finish(held, others[0], now + 3, status=200, error=None, next_attempt_at=None) is None
    assert deliveries.finish(held, held.claimed_by or "", now + 3, status=200, error=None,
                             next_attempt_at=None) is WebhookState.delivered  # fmt: skip
    again = deliveries.claim("e", now + 62, 60, 100)  # the other claims ran out
    assert sorted(d.task_id for d in again) == sorted(set(ids) - {held.task_id})
    assert deliveries.counts() == {"waiting": 0, "pending": 7, "delivered": 1, "gave_up": 0}


def test_a_requeued_task_s_webhook_waits_for_its_next_end(database: Path | str) -> None:
    store, deliveries = TaskStore(database), DeliveryStore(database)
    task_id = task_with_webhook(store)
    store.mark_failed(task_id, "worker lost", None)
    [first] = deliveries.claim("a", time.time(), 60, 10)
    assert store.requeue(task_id, {"reason": "dead letter retried"})
    assert deliveries.get(task_id).state is WebhookState.waiting
    # The try of the failed end, under way while the task was requeued, records nothing.
    assert deliveries.finish(first, "a", time.time(), status=200, error=None, next_attempt_at=None) is None
    assert deliveries.claim("a", time.time(), 60, 10) == []
    store.mark_running(task_id, "cpu-1", 2)
    store.mark_done(task_id, [], {}, "cpu-1")
    [second] = deliveries.claim("a", time.time(), 60, 10)
    assert second.state is WebhookState.pending and second.attempts == 0
    assert second.id != first.id


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def services_for(tmp_path: Path, **settings: object) -> Services:
    return build_services(Settings(data_dir=tmp_path, secret_key=TEST_SECRET, **settings))  # type: ignore[arg-type]


def courier_of(services: Services) -> Courier:
    s = services
    return Courier(s.settings, s.deliveries, s.store, s.webhook_secrets, name="test")


def ended_task(services: Services, url: str) -> str:
    task_id = task_with_webhook(services.store, url)
    services.store.mark_canceled(task_id, "not needed")
    return task_id


def one_try(services: Services, url: str) -> Delivery:
    """The webhook of a task that ended, after one try to ``url``."""
    task_id = ended_task(services, url)
    courier = courier_of(services)
    try:
        assert courier.tick() == 1
    finally:
        courier.stop()
    found = services.deliveries.get(task_id)
    assert found is not None
    return found


def test_a_private_address_is_refused_again_at_delivery(tmp_path: Path, receiver: Receiver) -> None:
    """A callback whose host resolves to a private address now (whatever it resolved to at
    submit) is not sent to: the try records why, and the delivery is tried again later."""
    webhook = one_try(services_for(tmp_path, webhook_backoff_s=60), receiver.url)
    assert receiver.received == []
    assert webhook.state is WebhookState.pending and webhook.attempts == 1
    assert "127.0.0.1 resolves to a private address" in (webhook.last_error or "")
    assert (webhook.next_attempt_at or 0) > time.time() + 30


def test_a_redirect_is_not_followed(tmp_path: Path, receiver: Receiver) -> None:
    redirecting = Receiver(redirect_to=receiver.url)
    services = services_for(tmp_path, fetch_allow_private=True, webhook_backoff_s=60)
    try:
        webhook = one_try(services, redirecting.url)
    finally:
        redirecting.close()
    assert len(redirecting.received) == 1 and receiver.received == []
    assert (webhook.state, webhook.last_status, webhook.last_error) == (
        WebhookState.pending, 302, "HTTP 302 Found"
    )  # fmt: skip


def test_a_delivery_is_given_up_after_its_max_age(tmp_path: Path) -> None:
    receiver = Receiver(answers=[500] * 5)
    services = services_for(tmp_path, fetch_allow_private=True, webhook_backoff_s=0.1, webhook_max_age_s=0.5)
    task_id = ended_task(services, receiver.url)
    courier = courier_of(services)
    try:
        deadline = time.monotonic() + 30
        while services.deliveries.get(task_id).state is WebhookState.pending:
            assert time.monotonic() < deadline, services.deliveries.get(task_id)
            if not courier.tick():
                time.sleep(0.05)
    finally:
        courier.stop()
        receiver.close()
    webhook = services.deliveries.get(task_id)
    assert (webhook.state, webhook.last_status) == (WebhookState.gave_up, 500)
    assert webhook.attempts == len(receiver.received) >= 1
    assert services.deliveries.claim("test", time.time() + 3600, 60, 10) == []  # never tried again
    post = receiver.received[-1]
    secret = services.webhook_secrets.secret_of("k1")
    verify(secret, post.body, post.headers["Morag-Signature"])
    assert json.loads(post.body)["state"] == "canceled"


def test_webhook_secrets_are_printed_and_rotated_by_the_cli(tmp_path: Path) -> None:
    env = {"MORAG_DATA_DIR": str(tmp_path), "MORAG_SECRET_KEY": TEST_SECRET}
    created = run_cli("apikey", "create", "--name", "ingest", **env)
    assert created.returncode == 0, created.stderr
    first = created.stderr.strip().rsplit(" ", 1)[-1]
    assert first.startswith("whsec_") and first not in created.stdout
    secrets = WebhookSecrets(tmp_path / "tasks.db", TEST_SECRET.encode())
    key_id = secrets.key_id("ingest")
    assert secrets.secret_of(key_id) == first
    rotated = run_cli("apikey", "webhook-secret", "ingest", "--rotate", **env).stdout.strip()
    assert rotated.startswith("whsec_") and rotated != first
    assert run_cli("apikey", "webhook-secret", key_id, **env).stdout.strip() == rotated
    assert secrets.secret_of(key_id) == rotated  # what signs its webhooks from now on
    assert WebhookSecrets(tmp_path / "tasks.db", b"another-server-secret" * 2).secret_of(key_id) != rotated
    with pytest.raises(AuthError, match="no active API key with the id or name 'nobody'"):
        secrets.key_id("nobody")
    services_for(tmp_path).apikeys.create("ingest", "client")
    with pytest.raises(AuthError, match="several active API keys are named 'ingest'"):
        secrets.key_id("ingest")
    assert secrets.key_id(key_id) == key_id  # its id still names it
