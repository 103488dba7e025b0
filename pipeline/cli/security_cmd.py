"""``morag-pipeline token ...`` and ``morag-pipeline apikey ...``: credentials, run on the server host.

Like ``rabbitmqctl``, these commands work on the server's database directly
(``MORAG_DATA_DIR``), so they need no running server and no API key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from pipeline.cli.display import console
from pipeline.config import Settings
from pipeline.errors import PipelineError
from pipeline.security.audit import audit, open_audit_log
from pipeline.security.roles import CAPABILITIES, ROLES

if TYPE_CHECKING:
    from pipeline.services import Services

out = console()
err = console(stderr=True)

_TTL = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s`` or a plain number of seconds."""
    match = _TTL.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise PipelineError(f"--ttl {text!r}: use a positive number with s, m, h or d (e.g. 30d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


def add_commands(commands: argparse._SubParsersAction) -> None:
    token = commands.add_parser("token", help="worker tokens: issue, list, revoke (on the server host)")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    issue = actions.add_parser("issue", help="enroll a worker: print or write its settings and token")
    issue.add_argument("--worker", required=True, help="the worker's name")
    issue.add_argument("--capability", required=True, choices=CAPABILITIES)
    issue.add_argument("--ttl", default=None, help="lifetime, e.g. 30d (default: MORAG_TOKEN_TTL_DAYS)")
    issue.add_argument("--env-file", type=Path, help="write the worker's settings here (mode 0600)")
    issue.add_argument("--broker-url", help="the broker URL as the worker reaches it (default: ours)")
    issue.add_argument(
        "--sftp-host", help="the SFTP host as the worker reaches it (default: MORAG_SFTP_HOST)"
    )
    issue.add_argument(
        "--server-url", help="the API as the worker reaches it, for doctor's clock check (default: ours)"
    )
    issue.add_argument(
        "--broker-user", action="store_true",
        help="create a RabbitMQ user for this worker, limited to its queues (management API)",
    )  # fmt: skip
    actions.add_parser("list", help="issued tokens and their state")
    revoke = actions.add_parser("revoke", help="revoke a token at once")
    revoke.add_argument("token_id", metavar="ID")

    apikey = commands.add_parser("apikey", help="API keys of clients: create, list, revoke (server host)")
    actions = apikey.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="a new API key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=ROLES, default="client")
    actions.add_parser("list")
    revoke = actions.add_parser("revoke")
    revoke.add_argument("key_id", metavar="ID")
    webhook = actions.add_parser(
        "webhook-secret", help="print (or --rotate) the secret signing a key's webhooks"
    )
    webhook.add_argument(
        "key", metavar="NAME", help="the key's name or id (development: requests without a key)"
    )
    webhook.add_argument(
        "--rotate", action="store_true", help="make a new secret; the old one signs nothing more"
    )


def _services(settings: Settings) -> Services:
    from pipeline.services import build_services  # the store and broker: imported when a command needs them

    services = build_services(settings)
    open_audit_log(settings.data_dir / "audit.log", settings.audit_max_bytes, settings.audit_backups)
    return services


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def _host_key_pin(settings: Settings) -> str | None:
    """The SFTP host key a worker must pin: configured, or the embedded server's (made if missing)."""
    if settings.sftp_host_key:
        return settings.sftp_host_key
    if not settings.sftp_embedded:
        return None  # the operator pins the OpenSSH server's key (docs/sftp.md)
    from pipeline.transfer.sftp_server import host_key_path, load_host_key

    return load_host_key(host_key_path(settings)).fingerprint


def enrollment(settings: Settings, args: argparse.Namespace, token: str, key: str, broker_url: str) -> dict:
    """Everything a worker needs, as MORAG_ settings."""
    bundle = {
        "MORAG_WORKER_NAME": args.worker,
        "MORAG_BROKER_URL": broker_url,
        "MORAG_FILE_ACCESS": "sftp",
        "MORAG_SFTP_HOST": args.sftp_host or settings.sftp_host,
        "MORAG_SFTP_PORT": str(settings.sftp_port),
        "MORAG_WORKER_TOKEN": token,
        "MORAG_WORKER_KEY": key,
        "MORAG_SERVER_URL": args.server_url or settings.server_url,
    }
    pin = _host_key_pin(settings)
    if pin:
        bundle["MORAG_SFTP_HOST_KEY"] = pin
    # The worker declares the same queues as the server: a different type or priority is refused.
    defaults = Settings.model_fields
    if settings.broker_queue_type != defaults["broker_queue_type"].default:
        bundle["MORAG_BROKER_QUEUE_TYPE"] = settings.broker_queue_type.value
    if settings.broker_max_priority != defaults["broker_max_priority"].default:
        bundle["MORAG_BROKER_MAX_PRIORITY"] = str(settings.broker_max_priority)
    return bundle


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    services = _services(settings)
    tokens = services.tokens
    if args.action == "issue":
        ttl = parse_ttl(args.ttl) if args.ttl else settings.token_ttl_days * 86400
        token, record = tokens.issue(args.worker, args.capability, ttl)
        broker_url = args.broker_url or settings.broker_url.get_secret_value()
        if args.broker_user:
            from pipeline.security.broker_users import create_worker_user

            broker_url = create_worker_user(settings, record, broker_url)
            tokens.set_broker_user(record.id, record.worker)
        audit("token.issued", token=record.id, worker=record.worker, capability=record.capability,
              expires=record.expires_at, broker_user=args.broker_user)  # fmt: skip
        bundle = enrollment(settings, args, token, tokens.signing_key(record.id), broker_url)
        text = "".join(f"{k}={v}\n" for k, v in bundle.items())
        if args.env_file:
            fd = os.open(args.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            out.print(f"token {record.id} for {record.worker} ({record.capability}), expires "
                      f"{_when(record.expires_at)}; settings written to {args.env_file}")  # fmt: skip
            out.print(
                f"On the worker: put it in the working directory as morag.env, then run\n"
                f"  dramatiq pipeline.actors.{record.capability} --queues {record.capability}"
            )
        else:
            print(text, end="")
        return 0
    if args.action == "list":
        table = Table("id", "worker", "capability", "state", "issued", "expires", "last used", "broker user")
        for r in tokens.list():
            table.add_row(r.id, r.worker, r.capability, r.state, _when(r.issued_at), _when(r.expires_at),
                          _when(r.last_used_at), r.broker_user or "-")  # fmt: skip
        out.print(table)
        return 0
    record = tokens.revoke(args.token_id)
    if record.broker_user:
        from pipeline.security.broker_users import delete_worker_user

        delete_worker_user(settings, record.broker_user)
    audit("token.revoked", token=record.id, worker=record.worker)
    out.print(f"revoked token {record.id} of {record.worker}")
    return 0


def cmd_apikey(args: argparse.Namespace, settings: Settings) -> int:
    services = _services(settings)
    keys, webhooks = services.apikeys, services.webhook_secrets
    if args.action == "create":
        key, record = keys.create(args.name, args.role)
        audit("apikey.created", key=record.id, name=record.name, role=record.role)
        print(key)
        err.print(
            f"webhook secret (signs this key's webhooks): {webhooks.secret_of(record.id)}", markup=False
        )
        return 0
    if args.action == "webhook-secret":
        key_id = webhooks.key_id(args.key)
        if args.rotate:
            secret = webhooks.rotate(key_id)
            audit("apikey.webhook_secret_rotated", key=key_id, version=webhooks.version(key_id))
        else:
            secret = webhooks.secret_of(key_id)
        print(secret)
        return 0
    if args.action == "list":
        print(json.dumps([vars(k) for k in keys.list()], indent=2))
        return 0
    keys.revoke(args.key_id)
    audit("apikey.revoked", key=args.key_id)
    out.print(f"revoked API key {args.key_id}")
    return 0
