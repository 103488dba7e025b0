"""Whether RabbitMQ's topology on the server's vhost is what the server expects, and what differs.

Expected: the ``morag`` topic exchange; each task queue (``gpu``, ``cpu``,
``control``), its delay queue and its dead letters, durable, of the configured
type, with the arguments ``queue_types.queue_arguments`` builds, each bound to
``morag`` under its own name. Policies must not undo what the pipeline relies
on: no message TTL or expiry on a task or delay queue (waiting tasks would
vanish into the dead letters), a length limit only with ``reject-publish``
overflow (else the oldest tasks are dropped), and a TTL on every dead-letter
queue. A queue of the vhost that the pipeline never uses is named too.

``differences`` lists what differs, one sentence each; ``check_topology``
logs them as one line when the server starts (``topology matches`` when none).
"""

from __future__ import annotations

import re
from typing import Any

from dramatiq.common import dq_name, xq_name

from pipeline.brokers import QUEUES
from pipeline.brokers.cancellations import STREAM
from pipeline.brokers.management import Management
from pipeline.brokers.queue_types import Role, parse_version, queue_arguments
from pipeline.brokers.rabbitmq import EXCHANGE
from pipeline.config import Settings
from pipeline.logs import get_logger
from pipeline.replicas import REPLICAS_QUEUE, SINGLE_QUEUE

logger = get_logger(__name__)

#: Queues of the vhost the pipeline uses besides the task queues: the sweep's, the server's place
#: (a single server's, the replicas'), the cancellation stream; and the prefixes of the workers'
#: start marks and of each replica group's queue.
OTHER_QUEUES = ("liveness", dq_name("liveness"), xq_name("liveness"), SINGLE_QUEUE, REPLICAS_QUEUE, STREAM)
START_MARKS = "morag.started."
REPLICA_GROUPS = f"{REPLICAS_QUEUE}."
#: Policy keys that make waiting tasks leave a task queue on their own.
_EXPIRING = ("message-ttl", "expires")


def expected_queues(settings: Settings, version: str) -> dict[str, dict[str, Any]]:
    """Each queue the server declares, with its arguments, for a broker of ``version``."""
    found = {}
    for queue in QUEUES:
        for role in Role:
            name = {Role.queue: queue, Role.delay: dq_name(queue), Role.dead: xq_name(queue)}[role]
            found[name] = queue_arguments(
                queue, role, settings.broker_queue_type, parse_version(version), settings.broker_max_priority
            )
    return found


def differences(settings: Settings, api: Management) -> list[str]:
    """What differs between the vhost's topology and the server's expectations (empty: nothing)."""
    version = str(api.overview().get("rabbitmq_version", "?"))
    expected = expected_queues(settings, version)
    found: list[str] = []
    exchange = api.exchange(EXCHANGE)
    if exchange is None:
        found.append(f"exchange {EXCHANGE} is missing: workers publish through it")
    elif exchange.get("type") != "topic" or not exchange.get("durable"):
        found.append(
            f"exchange {EXCHANGE} is {'durable' if exchange.get('durable') else 'transient'}"
            f" {exchange.get('type')}, expected durable topic"
        )
    bound = (
        {(b.get("destination"), b.get("routing_key")) for b in api.bindings(EXCHANGE)} if exchange else set()
    )
    queues = {q["name"]: q for q in api.queues()}
    policies = api.policies()
    wanted_type = str(settings.broker_queue_type)
    for name, arguments in expected.items():
        queue = queues.get(name)
        if queue is None:
            found.append(f"queue {name} is missing")
            continue
        if not queue.get("durable"):
            found.append(f"queue {name} is not durable: its messages are lost when RabbitMQ restarts")
        shown_type = queue.get("type") or "classic"
        if shown_type != wanted_type:
            found.append(f"queue {name} is {shown_type}, expected {wanted_type} (MORAG_BROKER_QUEUE_TYPE)")
        have = {k: v for k, v in (queue.get("arguments") or {}).items() if k.startswith("x-")}
        for key in sorted(set(have) | set(arguments)):
            if have.get(key) != arguments.get(key):
                found.append(
                    f"queue {name}: argument {key} is {have.get(key)!r}, expected {arguments.get(key)!r}"
                )
        if exchange is not None and (name, name) not in bound:
            found.append(f"queue {name} is not bound to exchange {EXCHANGE} under its name")
        found += _policy_problems(name, _effective(policies, name), arguments)
    for name, queue in sorted(queues.items()):
        if name in expected or name in OTHER_QUEUES or name.startswith((START_MARKS, REPLICA_GROUPS, "amq.")):
            continue
        found.append(
            f"queue {name} is not one the pipeline uses ({queue.get('messages', 0)} messages,"
            f" {queue.get('consumers', 0)} consumers)"
        )
    return found


def _effective(policies: list[dict[str, Any]], name: str) -> tuple[str | None, dict[str, Any]]:
    """The policy RabbitMQ applies to queue ``name``: the highest priority of those matching it.

    Read from the vhost's policies rather than from the queue's statistics, which lag behind.
    """
    matching = [
        p
        for p in policies
        if p.get("apply-to", "all") in ("all", "queues") and re.search(p.get("pattern", "(?!)"), name)
    ]
    if not matching:
        return None, {}
    chosen = max(matching, key=lambda p: p.get("priority", 0))
    return chosen.get("name"), dict(chosen.get("definition") or {})


def _policy_problems(
    name: str, applied: tuple[str | None, dict[str, Any]], arguments: dict[str, Any]
) -> list[str]:
    policy, effective = applied
    problems = []
    if name.endswith(".XQ"):
        if "x-message-ttl" not in arguments and "message-ttl" not in effective:
            problems.append(
                f"queue {name} keeps dead letters forever: no message TTL (ops/rabbitmq/definitions.json)"
            )
        return problems
    for key in _EXPIRING:
        if key in effective:
            problems.append(
                f"queue {name}: policy {policy} sets {key}={effective[key]}:"
                " waiting tasks would leave it unrun"
            )
    limited = [key for key in ("max-length", "max-length-bytes") if key in effective]
    if limited and effective.get("overflow") != "reject-publish":
        problems.append(
            f"queue {name}: policy {policy} limits it ({', '.join(limited)}) with overflow"
            f" {effective.get('overflow', 'drop-head')}: the oldest tasks would be dropped;"
            " use reject-publish"
        )
    return problems


def check_topology(settings: Settings) -> list[str]:
    """Log, once when the server starts, whether the broker's topology is as expected, and what differs.

    Returns the differences. A management API that cannot be asked is logged and skipped.
    """
    try:
        with Management(settings) as api:
            found = differences(settings, api)
            vhost = api.vhost
    except Exception as exc:
        logger.info("broker topology not checked: management API unreachable", extra={"error": str(exc)})
        return []
    if found:
        logger.warning(
            "broker topology differs from what the server expects: " + "; ".join(found),
            extra={"vhost": vhost, "differences": found},
        )
    else:
        logger.info("broker topology matches what the server expects", extra={"vhost": vhost})
    return found
