"""``morag-pipeline dead list|show|retry|purge [QUEUE]`` and ``morag-pipeline cancel ID``.

Both go through the server's API, like ``submit`` and ``status``.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from rich.table import Table

from pipeline.brokers import QUEUES
from pipeline.config import Settings
from pipeline.errors import PipelineError

DEAD_ACTIONS = ("list", "show", "retry", "purge")


def add_commands(commands: argparse._SubParsersAction) -> None:
    dead = commands.add_parser(
        "dead",
        help="dead letters: tasks that failed for good",
        description="List, show, retry or purge the dead letters of a queue (all queues by default). "
        "Retried tasks run again with their history kept.",
    )
    dead.add_argument("action", choices=DEAD_ACTIONS)
    dead.add_argument(
        "target", nargs="?", metavar="QUEUE|ID",
        help=f"a queue ({', '.join(QUEUES)}) or a task or message id",
    )  # fmt: skip
    dead.add_argument("--id", dest="ids", action="append", metavar="ID", help="only this task or message")
    dead.add_argument("--json", action="store_true")

    cancel = commands.add_parser("cancel", help="cancel a queued or running task")
    cancel.add_argument("task_id", metavar="ID")
    cancel.add_argument("--json", action="store_true")


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _show_letters(letters: list[dict[str, Any]], counts: dict[str, int]) -> None:
    from pipeline.cli import display

    if not letters:
        display.out.print("no dead letters")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("QUEUE", "TASK / MESSAGE", "FILE", "DIED", "DELIVERIES", "RETRIES", "REASON"):
        table.add_column(column, overflow="fold" if column == "REASON" else None)
    for letter in letters:
        table.add_row(
            letter["queue"],
            letter["task_id"] or letter["message_id"],
            letter["filename"] or letter["actor"],
            _when(letter["dead_at"]),
            str(letter["deliveries"]),
            str(letter["retries"]),
            letter["reason"],
        )
    display.out.print(table)
    display.out.print(", ".join(f"{queue}.XQ: {n}" for queue, n in counts.items()))


def _show_full(letter: dict[str, Any]) -> None:
    from pipeline.cli import display

    for key in ("queue", "message_id", "actor", "task_id", "filename", "worker"):
        display.out.print(f"{key:11} {letter[key] or '-'}")
    display.out.print(f"{'died':11} {_when(letter['dead_at'])}")
    display.out.print(f"{'deliveries':11} {letter['deliveries']}   retries {letter['retries']}")
    display.out.print(f"{'reason':11} {letter['reason']}")
    if letter.get("traceback"):
        display.out.print("last traceback:\n" + letter["traceback"].rstrip())


def cmd_dead(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display
    from pipeline.cli.client import ApiClient

    client = ApiClient.from_settings(settings)
    queue = args.target if args.target in QUEUES else None
    ids = list(args.ids or [])
    if args.target and queue is None:
        if args.action == "list":
            raise PipelineError(f"no queue {args.target!r}; queues are {', '.join(QUEUES)}")
        ids.append(args.target)

    if args.action == "list":
        listing = client.dead(queue)
        if ids:
            listing["letters"] = [x for x in listing["letters"] if {x["message_id"], x["task_id"]} & set(ids)]
        display.emit(listing, args.json, lambda x: _show_letters(x["letters"], x["counts"]))
        return 0

    if args.action == "show":
        if not ids:
            ids = [x["message_id"] for x in client.dead(queue)["letters"]]
        found = {}
        for i in ids:
            for letter in client.dead_letter(i, queue)["letters"]:
                found[letter["queue"], letter["message_id"]] = letter
        display.emit(list(found.values()), args.json, _show_all)
        return 0

    answer = client.dead_action(args.action, queue, ids or None)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    if args.action == "purge":
        display.out.print(f"purged {answer['purged']} dead letter(s)")
        return 0
    for letter in answer["retried"]:
        name = letter["filename"] or letter["actor"]
        display.out.print(
            f"retried {letter['task_id'] or letter['message_id']} ({name}) on {letter['queue']}"
        )
    for letter in answer["skipped"]:
        display.err.print(f"not retried {letter['task_id'] or letter['message_id']}: {letter['why']}")
    if not answer["retried"] and not answer["skipped"]:
        display.out.print("no dead letters to retry")
    return 1 if answer["skipped"] else 0


def _show_all(letters: list[dict[str, Any]]) -> None:
    from pipeline.cli import display

    if not letters:
        display.out.print("no dead letters")
    for n, letter in enumerate(letters):
        if n:
            display.out.print()
        _show_full(letter)


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display
    from pipeline.cli.client import ApiClient

    task = ApiClient.from_settings(settings).cancel(args.task_id)
    if args.json:
        print(json.dumps(task, indent=2))
        return 0
    was = next((e for e in reversed(task["events"]) if e["event"] == "started"), None)
    where = f"; its worker {task['worker']} stops it" if was and task.get("worker") else ""
    display.out.print(f"task {task['id']} canceled{where}")
    if not task.get("notified", True):
        display.err.print("workers were not told (broker unreachable); a worker that runs it is ignored")
    return 0


COMMANDS = {"dead": cmd_dead, "cancel": cmd_cancel}
