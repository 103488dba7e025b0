"""Fuzzes the server's check of signed ``control`` messages.

Messages with random actors, arguments and signature blocks (random keys and
values, wrong types, huge strings, nesting), and correctly signed messages
altered afterwards, reach the verifier. A message is accepted only when it is
exactly as signed by a known token's key or the server's secret; anything else
is refused with AuthError (or Duplicate for a nonce applied before), never
another exception.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline import control
from pipeline.config import Settings
from pipeline.middleware.message_signing import Duplicate, _Verifier
from pipeline.security import signatures
from pipeline.security.tokens import AuthError
from pipeline.services import Services, build_services
from tests.fuzz.conftest import examples

pytestmark = pytest.mark.fuzz

WORKER = "fuzz-worker"

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.sampled_from(["x" * 100_000, "\x00", "..", "server-host"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
actors = st.sampled_from(sorted(control.OUTCOMES | control.HEARTBEATS)) | st.text(max_size=30)
kwargs_ = st.fixed_dictionaries(
    {},
    optional={
        "worker": st.just(WORKER) | json_values,
        "capability": st.sampled_from(["cpu", "gpu"]) | json_values,
        "task_id": st.text(max_size=20) | json_values,
    },  # fmt: skip
).flatmap(
    lambda base: st.dictionaries(st.text(max_size=10), json_values, max_size=3).map(
        lambda more: {**more, **base}
    )
)
block_fields = {
    "ts": st.floats(allow_nan=True) | st.integers() | json_values,
    "nonce": st.text(max_size=200) | json_values,
    "mac": st.text(max_size=80) | json_values,
    "host": st.just(True) | json_values,
    "token_id": st.text(max_size=200) | json_values,
    "token": json_values,
}
random_blocks = st.none() | json_values | st.fixed_dictionaries({}, optional=block_fields)


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_Verifier, Services, str, str]]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("verifier"), secret_key="x" * 48)
    services = build_services(settings)
    token, record = services.tokens.issue(WORKER, "cpu", 3600)
    yield _Verifier(settings), services, record.id, services.tokens.signing_key(record.id)


def message(actor: str, args: list[Any], kwargs: dict[str, Any], block: Any) -> MessageProxy:
    options = {} if block is None else {signatures.OPTION: block}
    return MessageProxy(
        dramatiq.Message(
            queue_name=control.QUEUE, actor_name=actor, args=tuple(args), kwargs=kwargs, options=options
        )
    )


def refused(verifier: _Verifier, proxy: MessageProxy) -> bool:
    """Whether the verifier refuses the message; any exception but AuthError/Duplicate fails the test."""
    try:
        verifier.verify(proxy)
    except (AuthError, Duplicate):
        return True
    return False


@settings(max_examples=examples(200))
@given(actors, st.lists(json_values, max_size=3), kwargs_, random_blocks)
# Found by a long run: a MAC of non-ASCII text made the comparison raise TypeError.
@example("task_completed", [], {}, {"ts": 0.0, "nonce": "0", "host": True, "mac": "\u00e9"})
def test_random_blocks_are_refused(verifier: Any, actor: str, args: list[Any], kwargs: dict[str, Any],
                                   block: Any) -> None:  # fmt: skip
    check, *_ = verifier
    assert refused(check, message(actor, args, kwargs, block))


@st.composite
def alterations(draw: st.DrawFn) -> tuple[str, Any]:
    """What an attacker changes in a signed message: a field of the block, the actor, an argument."""
    where = draw(st.sampled_from(["block", "drop", "actor", "args", "kwargs"]))
    if where == "block":
        name = draw(st.sampled_from(sorted(block_fields)))
        return where, (name, draw(block_fields[name]))
    if where == "drop":
        return where, draw(st.sampled_from(["ts", "nonce", "mac", "token_id", "host"]))
    if where == "actor":
        return where, draw(actors)
    return where, (draw(st.text(max_size=10)), draw(json_values))


@settings(max_examples=examples(200))
@given(
    st.sampled_from(sorted(control.OUTCOMES | control.HEARTBEATS)),
    st.lists(json_values, max_size=3),
    kwargs_,
    st.booleans(),
    st.none() | alterations(),
)
def test_signed_messages_are_accepted_only_unaltered(
    verifier: Any, actor: str, args: list[Any], kwargs: dict[str, Any], as_host: bool, change: Any
) -> None:
    check, services, token_id, key = verifier
    kwargs = {**kwargs, "worker": WORKER, "capability": "cpu"}
    if as_host:
        block = signatures.sign_as_host(actor, args, kwargs, services.tokens.secret)
    else:
        block = signatures.sign(actor, args, kwargs, token_id, key)
    signed = (actor, copy.deepcopy(args), copy.deepcopy(kwargs), dict(block))
    altered = False
    if change is not None:
        where, what = change
        if where == "block" and block.get(what[0], object()) != what[1]:
            block[what[0]], altered = what[1], True
        elif where == "drop" and what in block:
            del block[what]
            altered = True
        elif where == "actor" and what != actor:
            actor, altered = what, True
        elif where == "args":
            args, altered = [*args, what[1]], True
        elif where == "kwargs" and kwargs.get(what[0], object()) != what[1]:
            kwargs[what[0]], altered = what[1], True
    proxy = message(actor, args, kwargs, block)
    if refused(check, proxy):
        assert altered or not _same(signed, (actor, args, kwargs, block)), (
            "a message signed as sent was refused"
        )
        return
    # Accepted: only a message exactly as signed (a changed field that does not enter the MAC aside).
    assert (actor, args, kwargs) == signed[:3] or _same(signed, (actor, args, kwargs, block))
    assert proxy.options["verified_worker"] == WORKER
    if actor in control.OUTCOMES:
        # The control actor records the nonce with its effect; the verifier hands it on.
        assert proxy.options["nonce"] == block["nonce"]
    else:
        # A heartbeat's nonce is spent at once: the same message again is refused as a replay.
        assert refused(check, message(actor, args, kwargs, block))


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether two messages sign the same payload (JSON equality: 1 == 1.0 == True, for example)."""
    import json

    def dump(m: tuple[Any, ...]) -> str:
        return json.dumps(m[:3], sort_keys=True, default=str)

    return dump(a) == dump(b)


def test_a_heartbeat_signed_long_ago_is_refused(verifier: Any) -> None:
    check, _, token_id, key = verifier
    kwargs = {"worker": WORKER, "capability": "cpu"}
    block = signatures.sign(control.WORKER_HEARTBEAT, [], kwargs, token_id, key, now=time.time() - 10**6)
    assert refused(check, message(control.WORKER_HEARTBEAT, [], kwargs, block))
