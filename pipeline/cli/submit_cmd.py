"""``morag-pipeline submit``: send every file, follow every task, report every result.

A file the server refuses (its content, its size) is said on stderr and the
rest go on. A failure that every later file would meet too (no answer from the
server, a key it refuses) stops the sending; the tasks sent before it are still
followed, through the server's event stream (a task is read on its own only while the
stream is cut). While a task does not move, the wait says why; ``--timeout`` bounds it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import display
from pipeline.cli.client import ApiClient, ClientError
from pipeline.cli.speech_args import speech_options
from pipeline.cli.waiting import WaitReasons

TaskDict = dict[str, Any]


def add_options(parser: argparse.ArgumentParser) -> None:
    """The options only ``submit`` has (the task options are shared with ``run``)."""
    parser.add_argument("--no-wait", action="store_true", help="print the task ids and return")
    parser.add_argument(
        "--timeout", type=_seconds, metavar="SECONDS",
        help="stop waiting after this long (default: until every task ends); the tasks go on",
    )  # fmt: skip
    parser.add_argument(
        "--callback-url", metavar="URL",
        help="POST a signed summary here when each task ends (docs/webhooks.md)",
    )  # fmt: skip


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def name_of(item: Path | str) -> str:
    """How a file (its name) or a URL (whole) is called in messages."""
    return item if isinstance(item, str) else item.name


def not_sent(path: Path | str, state: str, reason: str) -> TaskDict:
    """The record of a file (or URL) that never became a task: ``refused`` or ``unsent``, and why."""
    return {"id": None, "filename": name_of(path), "file": str(path), "state": state, "error": reason}


def _about(path: Path | str, reason: str) -> str:
    """The server's reason without the file's name in front when it already starts with it."""
    prefix = f"{name_of(path)}: "
    return reason[len(prefix) :] if reason.startswith(prefix) else reason


def send(
    client: ApiClient, paths: list[Path | str], form: dict[str, str | None], quiet: bool
) -> list[TaskDict]:
    """Upload each file; one entry per file, in order: the task record, or ``not_sent``.

    A refusal of one file is said on stderr and the next file goes. An error every
    later file would meet too stops the sending: raised when nothing was sent yet,
    else said, with the files left marked ``unsent``.
    """
    entries: list[TaskDict] = []
    for index, path in enumerate(paths):
        try:
            task = client.submit(path, **form).record
        except ClientError as exc:
            if exc.about_the_request:
                reason = _about(path, str(exc))
                display.err.print(f"morag-pipeline: {name_of(path)}: refused: {reason}", markup=False)
                entries.append(not_sent(path, "refused", reason))
                continue
            if not any(e.get("id") for e in entries):
                raise
            left = paths[index:]
            display.err.print(
                f"morag-pipeline: {exc}; not sent: {', '.join(name_of(p) for p in left)}", markup=False
            )
            entries += [not_sent(p, "unsent", str(exc)) for p in left]
            break
        entries.append(task)
        if not quiet:
            route = task["route"]
            display.err.print(
                f"{name_of(path)}: task {task['id']} -> queue {route['queue']} ({route['reasons'][0]})",
                markup=False,
            )
    return entries


def cmd_submit(args: argparse.Namespace, client: ApiClient) -> int:
    """Send ``args.files``, wait for their tasks (unless ``--no-wait``), report; the exit code.

    0: every file's task is done (sent, with ``--no-wait``). 1: a task failed, a
    file was refused, or a task had not ended at ``--timeout``. 2: no file became
    a task.
    """
    form = {"priority": args.priority, "gpu": args.gpu, "model": args.model,
            "callback_url": args.callback_url, **speech_options(args)}  # fmt: skip
    entries = send(client, args.files, form, quiet=args.json)
    sent = {e["id"]: e for e in entries if e.get("id")}
    if args.no_wait or not sent:
        if args.json:
            json.dump(entries if len(entries) > 1 else entries[0], sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            for task_id in sent:
                print(task_id)
        if len(sent) == len(entries):
            return 0
        if len(entries) > 1:
            display.err.print(display.summary(entries), markup=False)
        return display.exit_code(entries)
    # The tasks' events come through one stream; a task is read on its own only while it is cut.
    watch = client.watch(sent).start()
    reasons = WaitReasons(client)

    def why(task: TaskDict) -> str:
        if watch.unreachable is not None:
            return f"no answer from the server: {watch.unreachable}"
        return reasons(task)

    names = {tid: task["filename"] for tid, task in sent.items()}
    try:
        followed = display.follow(
            list(sent), names, watch.get, timeout=args.timeout, diagnose=why, pause=watch.wait_change
        )
    finally:
        watch.stop()
    ended = {task["id"]: task for task in followed}
    for task in ended.values():
        if task["state"] not in display.FINAL:
            task["waiting"] = why(task)
    entries = [ended.get(e["id"], e) if e.get("id") else e for e in entries]
    return display.report(
        entries,
        lambda t, f: client.result(t["id"], f),
        as_json=args.json,
        output=args.output,
        fmt=args.format,
    )
