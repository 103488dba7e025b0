"""``morag-pipeline``: submit files, follow tasks, run the server or one file in-process.

Every error is one line on stderr and a non-zero exit code: 1 when a task
failed (for ``submit``: or a file was refused, or a task had not ended at
``--timeout``), 2 when the command could not do its work (bad input, no
server, no file became a task).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pipeline.cli.doctor as doctor
from pipeline import __version__
from pipeline.brokers import PRIORITIES
from pipeline.cli import db_cmd, failures_cmd, monitor_cmd, security_cmd, store_cmd, submit_cmd, workers_cmd
from pipeline.cli.speech_args import add_speech_options, speech_options
from pipeline.config import ConfigError, Settings, get_settings
from pipeline.errors import PipelineError
from pipeline.kinds import KINDS
from pipeline.routing import GPU_PREFERENCES

FORMATS = ("json", "srt", "vtt", "txt", "md", "morag")


def _task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files", nargs="+", type=_file_or_url, metavar="FILE|URL",
        help="files to upload, or http(s) URLs a worker fetches (web pages, recordings, documents)",
    )  # fmt: skip
    parser.add_argument("--priority", choices=list(PRIORITIES), default="normal")
    parser.add_argument(
        "--gpu", choices=GPU_PREFERENCES, default="prefer",
        help="prefer: GPU when one is there (default); require: wait for one; never: CPU",
    )  # fmt: skip
    parser.add_argument(
        "--model",
        help="Whisper model (default: the server's MORAG_WHISPER_MODEL; the server accepts only"
        " the models in its MORAG_WHISPER_ALLOWED_MODELS)",
    )
    add_speech_options(parser)
    _result_options(parser)


def _result_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, metavar="DIR", help="write every output format here")
    parser.add_argument("--format", "-f", choices=FORMATS, help="which output to print")
    parser.add_argument("--json", action="store_true", help="print the task and its result as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="morag-pipeline",
        description="Run MoRAG's heavy ingestion work on GPU and CPU workers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    server = commands.add_parser("server", help="run the API and the control consumer")
    server.add_argument("--host")
    server.add_argument("--port", type=int)

    submit = commands.add_parser("submit", help="upload files, show progress, print results")
    _task_options(submit)
    submit_cmd.add_options(submit)

    run = commands.add_parser("run", help="process files in this process: no broker, no server")
    _task_options(run)

    status = commands.add_parser("status", help="a task's state, route and events")
    status.add_argument("task_id", metavar="ID")
    status.add_argument("--json", action="store_true")

    result = commands.add_parser("result", help="a finished task's output")
    result.add_argument("task_id", metavar="ID")
    _result_options(result)

    tasks = commands.add_parser("tasks", help="list recent tasks")
    tasks.add_argument("--state", choices=["queued", "running", "done", "failed", "canceled"])
    tasks.add_argument("--kind", choices=list(KINDS), help="only tasks of this kind")
    tasks.add_argument("--worker", help="only tasks this worker ran or runs")
    tasks.add_argument("--queue", choices=["gpu", "cpu"], help="only tasks routed to this queue")
    tasks.add_argument("--limit", type=int, default=20)
    tasks.add_argument("--json", action="store_true")

    config = commands.add_parser("config", help="show or check the configuration")
    config.add_argument("action", choices=["show", "check"])

    security_cmd.add_commands(commands)
    failures_cmd.add_commands(commands)
    workers_cmd.add_commands(commands)
    monitor_cmd.add_commands(commands)
    store_cmd.add_commands(commands)
    db_cmd.add_commands(commands)
    doctor.add_commands(commands)
    return parser


def _file_or_url(text: str) -> Path | str:
    """A URL stays text (a worker fetches it); anything else is a file's path."""
    return text if text.startswith(("http://", "https://")) else Path(text)


def _check_files(items: list[Path | str]) -> None:
    for path in items:
        if isinstance(path, str):
            continue  # a URL: the server checks it
        if not path.exists():
            raise PipelineError(f"{path}: no such file")
        if not path.is_file():
            raise PipelineError(f"{path}: not a regular file")
        if path.stat().st_size == 0:
            raise PipelineError(f"{path}: the file is empty")


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli.client import ApiClient

    _check_files(args.files)
    return submit_cmd.cmd_submit(args, ApiClient.from_settings(settings))


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display
    from pipeline.embedded import embedded_pipeline, run_file
    from pipeline.submission import SubmitOptions

    _check_files(args.files)
    options = SubmitOptions(priority=args.priority, gpu=args.gpu, model=args.model, **speech_options(args))
    finished: list[dict[str, Any]] = []
    with embedded_pipeline(settings) as (services, broker):
        for path in args.files:
            task = run_file(services, broker, path, options)
            names = {task.id: task.filename}
            finished += display.follow([task.id], names, lambda tid: services.store.get(tid).to_dict())

        def output(task: dict[str, Any], fmt: str) -> bytes:
            for item in task["outputs"]:
                if item["format"] == fmt:
                    return services.files.resolve(item["path"]).read_bytes()
            raise PipelineError(f"no {fmt} output for {task['filename']}")

        return display.report(finished, output, as_json=args.json, output=args.output, fmt=args.format)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display
    from pipeline.cli.client import ApiClient

    display.emit(ApiClient.from_settings(settings).task(args.task_id), args.json, display.show_status)
    return 0


def cmd_result(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display
    from pipeline.cli.client import ApiClient

    client = ApiClient.from_settings(settings)
    task = client.task(args.task_id)
    return display.report(
        [task], lambda t, f: client.result(t["id"], f), as_json=args.json, output=args.output, fmt=args.format
    )


def cmd_tasks(args: argparse.Namespace, settings: Settings) -> int:
    from pipeline.cli import display
    from pipeline.cli.client import ApiClient

    filtered = bool(args.kind or args.worker or args.queue)
    # The filters other than state are applied here, over the most the API lists at once.
    listing = ApiClient.from_settings(settings).tasks(args.state, 1000 if filtered else args.limit)
    listing["tasks"] = select_tasks(listing["tasks"], args.kind, args.worker, args.queue)[: args.limit]
    display.emit(listing, args.json, lambda x: display.show_tasks(x["tasks"], x["counts"]))
    return 0


def select_tasks(
    tasks: list[dict[str, Any]], kind: str | None, worker: str | None, queue: str | None
) -> list[dict[str, Any]]:
    """The tasks of ``kind``, run by ``worker``, routed to ``queue`` (None: any)."""
    return [
        t
        for t in tasks
        if (kind is None or t["kind"] == kind)
        and (worker is None or t.get("worker") == worker)
        and (queue is None or t["route"].get("queue") == queue)
    ]


def cmd_server(args: argparse.Namespace, settings: Settings) -> int:
    try:
        from pipeline.api.server import serve
    except ModuleNotFoundError as exc:
        raise PipelineError(
            f"the server needs the server extra ({exc.name} is not installed): "
            "pip install 'morag-pipeline[server]'"
        ) from None

    serve(settings, args.host, args.port)
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "show":
        print(json.dumps(settings.redacted(), indent=2))
    else:
        broker = settings.redacted()["broker_url"]
        print(f"configuration is valid (data in {settings.data_dir}, broker {broker})")
    return 0


COMMANDS = {
    "submit": cmd_submit,
    "run": cmd_run,
    "status": cmd_status,
    "result": cmd_result,
    "tasks": cmd_tasks,
    "server": cmd_server,
    "config": cmd_config,
    "token": security_cmd.cmd_token,
    "apikey": security_cmd.cmd_apikey,
    **failures_cmd.COMMANDS,
    **workers_cmd.COMMANDS,
    **monitor_cmd.COMMANDS,
    **store_cmd.COMMANDS,
    **db_cmd.COMMANDS,
    **doctor.COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
        from pipeline.logs import setup_logging

        # Only the server logs at the configured level; user commands say what
        # matters on their own and keep warnings for the rest.
        level = settings.log_level if args.command == "server" else "WARNING"
        setup_logging(level, settings.log_json)
        return COMMANDS[args.command](args, settings)
    except ConfigError as exc:
        print(f"morag-pipeline: {exc}", file=sys.stderr)
        return 2
    except (PipelineError, OSError) as exc:
        print(f"morag-pipeline: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("morag-pipeline: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
