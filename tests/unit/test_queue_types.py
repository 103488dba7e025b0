"""The arguments of the task queues per queue type and RabbitMQ version, and what each costs."""

from __future__ import annotations

import pytest

from pipeline.brokers.queue_types import (
    QueueMismatch,
    Role,
    UnsupportedBroker,
    cost,
    existing_type,
    mismatch,
    parse_version,
    priority_levels,
    queue_arguments,
)
from pipeline.config import QueueType

WEEK_MS = 7 * 86_400_000
DEAD_LETTERING = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "cpu.XQ"}
AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}

#: RabbitMQ 3.10.8's replies when a queue exists as the other type (seen on the broker).
CLASSIC_EXISTS = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'cpu' in vhost 'v': "
    "received none but current is the value '10' of type 'signedint'"
)
QUORUM_EXISTS = (
    "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-strategy' for queue 'cpu' in vhost 'v': "
    "received none but current is the value 'at-least-once' of type 'longstr'"
)
OTHER_PRIORITY = (
    "PRECONDITION_FAILED - inequivalent arg 'x-max-priority' for queue 'cpu' in vhost 'v': "
    "received '5' but current is '10'"
)


@pytest.mark.parametrize("version", ["3.10.8", "4.1.2", "4.3.0"])
def test_classic_queues_keep_dramatiqs_arguments_on_every_version(version: str) -> None:
    v = parse_version(version)
    for role in (Role.queue, Role.delay):
        assert queue_arguments("cpu", role, QueueType.classic, v, 10) == {
            **DEAD_LETTERING,
            "x-max-priority": 10,
        }
    assert queue_arguments("cpu", Role.dead, QueueType.classic, v, 10) == {"x-message-ttl": WEEK_MS}
    assert priority_levels(QueueType.classic, v, 10) == 11


@pytest.mark.parametrize(("version", "levels"), [("3.10.8", 1), ("4.1.2", 2), ("4.3.0", 32)])
def test_quorum_queues_have_no_max_priority_and_dead_letter_at_least_once(version: str, levels: int) -> None:
    v = parse_version(version)
    for role in (Role.queue, Role.delay):
        arguments = queue_arguments("cpu", role, QueueType.quorum, v, 10)
        assert arguments == {"x-queue-type": "quorum", **DEAD_LETTERING, **AT_LEAST_ONCE}
    dead = queue_arguments("cpu", Role.dead, QueueType.quorum, v, 10)
    assert dead == {"x-queue-type": "quorum", "x-message-ttl": WEEK_MS}
    assert priority_levels(QueueType.quorum, v, 10) == levels


def test_quorum_queues_before_3_10_are_refused_with_the_fix() -> None:
    with pytest.raises(UnsupportedBroker) as refused:
        queue_arguments("gpu", Role.queue, QueueType.quorum, parse_version("3.9.29"), 10)
    assert str(refused.value) == (
        "quorum queues need RabbitMQ 3.10 or later (dead letters with a TTL, at-least-once dead-lettering),"
        " and this broker runs 3.9.29: upgrade RabbitMQ or set MORAG_BROKER_QUEUE_TYPE=classic"
    )
    assert queue_arguments("gpu", Role.queue, QueueType.classic, parse_version("3.9.29"), 10)


@pytest.mark.parametrize(
    ("queue_type", "version", "line"),
    [
        (QueueType.quorum, "3.10.8", "queues: quorum on RabbitMQ 3.10.8: replicated, no message priorities"
         " (urgent tasks do not overtake)"),
        (QueueType.quorum, "4.1.2", "queues: quorum on RabbitMQ 4.1.2: replicated, priorities: 2 levels on"
         " quorum queues (high and urgent tasks go before low and normal ones, two for one)"),
        (QueueType.quorum, "4.3.0", "queues: quorum on RabbitMQ 4.3.0: replicated, priorities: 32 strict"
         " levels on quorum queues (urgent tasks overtake)"),
        (QueueType.classic, "3.10.8", "queues: classic on RabbitMQ 3.10.8: not replicated (each queue lives"
         " on one node), message priorities 0-10 (urgent tasks overtake)"),
    ],
)  # fmt: skip
def test_the_start_line_says_what_the_choice_costs(queue_type: QueueType, version: str, line: str) -> None:
    assert cost(queue_type, parse_version(version), 10, version) == line


def test_versions_are_read_leniently() -> None:
    assert parse_version("3.10.8") == (3, 10, 8)
    assert parse_version("4.0") == (4, 0, 0)
    assert parse_version("4.2.0-rc.1") == (4, 2, 0)
    assert parse_version("?") == (0, 0, 0)


def test_the_refusal_names_the_queue_its_type_and_the_fix() -> None:
    assert existing_type(CLASSIC_EXISTS) is QueueType.classic
    assert existing_type(QUORUM_EXISTS) is QueueType.quorum
    assert existing_type(OTHER_PRIORITY) is QueueType.classic
    refusal = mismatch("cpu", "v", QueueType.quorum, CLASSIC_EXISTS)
    assert isinstance(refusal, QueueMismatch)
    text = str(refusal)
    assert "\n" not in text
    assert text.startswith("queue cpu in vhost 'v' is a classic queue, but MORAG_BROKER_QUEUE_TYPE=quorum")
    assert "delete the vhost's queues" in text and "a new vhost" in text
    assert text.endswith("or set MORAG_BROKER_QUEUE_TYPE=classic")
    # Same type, other priority: the settings of every process on the vhost must agree.
    other = str(mismatch("cpu", "v", QueueType.classic, OTHER_PRIORITY))
    assert "MORAG_BROKER_MAX_PRIORITY" in other and "received '5' but current is '10'" in other
