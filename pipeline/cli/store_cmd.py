"""``morag-pipeline store``: what the server's file store holds, pruning it, its SFTP host key.

These commands work on the server's data directory directly, so they run on
the server's machine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from typing import TYPE_CHECKING

from pipeline.config import Settings

if TYPE_CHECKING:
    from pipeline.store import TaskStore
    from pipeline.transfer.local import LocalStore


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``store`` and its actions to the CLI's subcommands."""
    store = commands.add_parser("store", help="the server's file store: usage, prune, SFTP host key")
    actions = store.add_subparsers(dest="store_action", required=True, metavar="ACTION")
    usage = actions.add_parser("usage", help="how much the store holds, by task state")
    usage.add_argument("--json", action="store_true")
    prune = actions.add_parser("prune", help="remove the files of tasks finished long enough ago")
    prune.add_argument(
        "--older-than", type=float, metavar="HOURS",
        help="finished more than HOURS ago (default: MORAG_STORE_RETENTION_HOURS)",
    )  # fmt: skip
    prune.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    prune.add_argument("--json", action="store_true")
    actions.add_parser(
        "host-key", help="the embedded SFTP server's host key (made if missing), to pin on workers"
    )


def _stores(settings: Settings) -> tuple[TaskStore, LocalStore]:
    """The server's task and file stores (no secret needed: nothing here signs or checks tokens)."""
    from pipeline.errors import PipelineError
    from pipeline.store import TaskStore
    from pipeline.transfer.local import LocalStore

    if settings.database_url is None and not settings.db_path.exists():
        raise PipelineError(f"no task store in {settings.data_dir} (is MORAG_DATA_DIR the server's?)")
    return TaskStore(settings), LocalStore(settings.files_dir)


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def cmd_usage(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.transfer.retention import expired, task_folders

    tasks, files = _stores(settings)
    folders = task_folders(tasks, files)
    total_files, total_bytes = files.usage()
    retention_h = settings.store_retention_hours
    cutoff = time.time() - retention_h * 3600
    prunable = [f for f in folders if retention_h > 0 and expired(f, cutoff)]
    by_state: Counter[str] = Counter()
    bytes_by_state: Counter[str] = Counter()
    for folder in folders:
        by_state[folder.state] += 1
        bytes_by_state[folder.state] += folder.bytes
    report = {
        "root": str(files.root),
        "files": total_files,
        "bytes": total_bytes,
        "tasks": len(folders),
        "by_state": {
            state: {"tasks": n, "bytes": bytes_by_state[state]} for state, n in sorted(by_state.items())
        },
        "retention_hours": retention_h,
        "prunable": {"tasks": len(prunable), "bytes": sum(f.bytes for f in prunable)},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['root']}: {total_files} files, {human(total_bytes)} in {len(folders)} task folders")
    for state, item in report["by_state"].items():
        print(f"  {state:<9} {item['tasks']:>6} tasks  {human(item['bytes']):>10}")
    if retention_h > 0:
        print(
            f"retention {retention_h:g} h: {len(prunable)} task folders "
            f"({human(report['prunable']['bytes'])}) can be pruned now"
        )
    else:
        print("retention off (MORAG_STORE_RETENTION_HOURS=0): files are kept")
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.errors import PipelineError
    from pipeline.transfer.retention import prune_store

    hours = settings.store_retention_hours if args.older_than is None else args.older_than
    if hours < 0:
        raise PipelineError("--older-than must not be negative")
    if hours == 0 and args.older_than is None:
        raise PipelineError("retention is off (MORAG_STORE_RETENTION_HOURS=0): give --older-than HOURS")
    tasks, files = _stores(settings)
    report = prune_store(tasks, files, hours * 3600, dry_run=args.dry_run)
    if args.json:
        print(
            json.dumps(
                {"dry_run": args.dry_run, "tasks": report.tasks, "files": report.files, "bytes": report.bytes}
            )
        )
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"{verb} {report.files} files, {human(report.bytes)} "
        f"of {len(report.tasks)} tasks finished over {hours:g} h ago"
    )
    return 0


def cmd_host_key(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.transfer.sftp_server import host_key_path, load_host_key, public_key_line

    key = load_host_key(host_key_path(settings))
    print(f"fingerprint: {key.fingerprint}")
    print(f"public key:  {public_key_line(key)}")
    print(f"pin it on workers: MORAG_SFTP_HOST_KEY={key.fingerprint}")
    return 0


ACTIONS = {"usage": cmd_usage, "prune": cmd_prune, "host-key": cmd_host_key}


def cmd_store(args: argparse.Namespace, settings: Settings) -> int:
    return ACTIONS[args.store_action](args, settings)


COMMANDS = {"store": cmd_store}
