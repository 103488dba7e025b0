"""Fuzzes the grant parser: any token either opens exactly its own task's files or is refused.

``verify_grant`` (and ``GrantCheck``) get random strings, JWTs signed with
the server's secret over random claims (wrong types, missing fields, paths
with ``..``, absolute paths, NUL), tokens signed with another key or another
algorithm. A grant returned names only its own task's inputs and output
folder; anything else is refused with AuthError, never another exception.
"""

from __future__ import annotations

import posixpath
import time
from typing import Any

import jwt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.security.grants import GrantCheck, GrantRefused, TaskGrant, issue_grant, verify_grant
from pipeline.security.tokens import ISSUER, AuthError
from tests.fuzz.conftest import examples

pytestmark = pytest.mark.fuzz

SECRET = b"f" * 48

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
task_ids = st.text(max_size=40) | st.sampled_from(["t1", "..", "../t2", "/abs", "t\x00", "", "t1/input", " "])
paths = (
    st.text(max_size=60)
    | st.builds(lambda t, n: f"tasks/{t}/input/{n}", task_ids, st.text(max_size=20))
    | st.sampled_from(["tasks/t1/input/../../t2/input/x", "/etc/passwd", "tasks/t1/input/\x00", "x" * 5000])
)


@st.composite
def grant_claims(draw: st.DrawFn) -> dict[str, Any]:
    """Claims near a real grant's, each field present or not, of the right type or not."""
    task = draw(task_ids)
    fields: dict[str, st.SearchStrategy[Any]] = {
        "iss": st.just(ISSUER) | json_values,
        "typ": st.just("grant") | json_values,
        "task": st.just(task) | json_values,
        "read": st.lists(paths, max_size=4) | json_values,
        "write": st.just(f"tasks/{task}/output") | paths | json_values,
        "iat": st.integers(0, 2**40) | json_values,
        "exp": st.just(int(time.time()) + 3600) | st.integers(-(2**40), 2**40) | json_values,
    }
    # Most often a well-formed grant with one field replaced or dropped; otherwise any mix.
    claims: dict[str, Any] = {name: draw(strategy) for name, strategy in fields.items()}
    if draw(st.booleans()):
        claims = {"iss": ISSUER, "typ": "grant", "task": task, "read": [f"tasks/{task}/input/a"],
                  "write": f"tasks/{task}/output", "exp": int(time.time()) + 3600}  # fmt: skip
        name = draw(st.sampled_from(sorted(claims)))
        if draw(st.booleans()):
            del claims[name]
        else:
            claims[name] = draw(fields.get(name, json_values))
    claims.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return claims


@st.composite
def tokens(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["text", "claims", "other key", "other alg", "none alg", "real"]))
    if kind == "text":
        return draw(st.text(max_size=300) | st.just("a.b.c") | st.just("x" * 100_000))
    if kind == "real":
        task = draw(task_ids)
        return issue_grant(SECRET, task, draw(st.lists(paths, max_size=3)), 3600)
    claims = draw(grant_claims())
    try:
        if kind == "claims":
            return jwt.encode(claims, SECRET, algorithm="HS256")
        if kind == "other key":
            return jwt.encode(claims, b"g" * 48, algorithm="HS256")
        if kind == "other alg":
            return jwt.encode(claims, SECRET, algorithm=draw(st.sampled_from(["HS384", "HS512"])))
        return jwt.encode(claims, None, algorithm="none")
    except (TypeError, ValueError):  # claims PyJWT itself cannot encode: a random string instead
        return draw(st.text(max_size=50))


def assert_confined(grant: TaskGrant) -> None:
    """A grant names its own task's inputs for reading and its own output folder for writing.

    The task id is one path segment, and every path, once ``..`` is resolved, still lies under it.
    """
    task = grant.task
    assert task and "/" not in task and task not in (".", "..") and "\x00" not in task, task
    assert grant.write == f"tasks/{task}/output"
    for path in grant.read:
        assert isinstance(path, str) and "\x00" not in path, path
        assert posixpath.normpath(path).startswith(f"tasks/{task}/input/"), path


def _signed(**claims: Any) -> str:
    grant = {"iss": ISSUER, "typ": "grant", "task": "t1", "read": [], "write": "tasks/t1/output",
             "exp": int(time.time()) + 3600}  # fmt: skip
    return jwt.encode({**grant, **claims}, SECRET, algorithm="HS256")


@settings(max_examples=examples(200))
@given(tokens())
# Inputs the fuzzer found, kept so that every run tries them.
@example(_signed(read=5))
@example(_signed(read=["tasks/t1/input/../../t2/input/x"]))
@example(_signed(task="..", write="tasks/../output"))
def test_verify_grant_confines_or_refuses(token: str) -> None:
    try:
        grant = verify_grant(SECRET, token)
    except AuthError:
        return
    assert_confined(grant)


@settings(max_examples=examples(100))
@given(tokens(), st.sampled_from([None, "queued", "running", "done", "failed", "canceled", "weird"]))
def test_grant_check_confines_or_refuses(token: str, state: str | None) -> None:
    check = GrantCheck(SECRET, lambda task_id: state)
    try:
        grant = check.verify(token)
    except GrantRefused:
        return
    assert_confined(grant)
    assert state not in ("done", "failed", "canceled")
