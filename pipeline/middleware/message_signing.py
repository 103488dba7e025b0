"""Signs what workers send the server, and checks it on arrival."""

from __future__ import annotations

import sys
from typing import Any, TypeGuard

import dramatiq
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.middleware import SkipMessage

from pipeline import control
from pipeline.config import Settings
from pipeline.errors import PipelineError, TaskNotFound, UnsupportedSchema
from pipeline.logs import get_logger
from pipeline.security import signatures
from pipeline.security.audit import audit
from pipeline.security.keys import differs_from_server, server_secret
from pipeline.security.roles import AuthError

logger = get_logger(__name__)

#: What a worker that can sign nothing is told at boot.
CANNOT_SIGN = (
    "this worker cannot sign its reports, so the server would drop every result it sends: enroll it"
    " (`morag-pipeline token issue --worker NAME --capability gpu|cpu --env-file morag.env` on the"
    " server, the file in the worker's working directory) or, on the server's host, start it with the"
    " server's MORAG_SECRET_KEY"
)


class Duplicate(PipelineError):
    """A message whose nonce was applied before: a redelivery, acknowledged as a no-op."""


def signer(settings: Settings) -> str | None:
    """How this process signs ``control`` messages: ``token``, ``host`` (the server's secret) or None."""
    if settings.worker_token and settings.worker_key:
        return "token"
    if settings.secret_key:
        try:
            server_secret(settings)
        except PipelineError:
            return None
        return "host"
    return None


WRONG_SECRET = (
    "MORAG_SECRET_KEY is not the secret of the server whose data directory this worker shares"
    " (MORAG_DATA_DIR), so the server would drop every result it sends and it could open no task's"
    " files: start it with the server's settings"
)


class MessageSigning(Middleware):
    """Signs ``control`` messages on workers; verifies them on the server.

    A worker holding a token (``MORAG_WORKER_TOKEN`` and ``MORAG_WORKER_KEY``)
    signs with its token's key, and the message names the token by its id
    only: the token, which is also the worker's SFTP password, never travels
    in a message. A worker on the server's host, holding the
    server's ``MORAG_SECRET_KEY`` and no token, signs with a key derived from
    that secret. A worker process with neither refuses to boot
    (``CANNOT_SIGN``), rather than take tasks whose results would be dropped;
    in development mode it sends them unsigned.

    The server, consuming ``control``, verifies each message. One that is
    unsigned (outside development mode), forged, from a revoked or
    wrong-capability token, or names another worker is dropped, audited, and
    noted on its task (``report rejected``), so ``status`` shows why the task
    did not move. So is one written in a schema the server does not read
    (``control.check_schema``). Outcomes (``control.OUTCOMES``) are never refused for their
    age; their nonce is put in ``options["nonce"]`` for the control actors,
    which record it in the transaction of their effect. A message whose nonce
    was applied before is acknowledged as a no-op. Heartbeats older than
    ``message_max_age_s`` are refused, and their nonce recorded at once.

    The verified worker and capability are put in the message's options
    (``verified_worker``, ``verified_capability``) for the control actors.

    Parameters:
      settings: the worker's token and key or the server's secret, and the server's limits.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._verifier: _Verifier | None = None

    def after_process_boot(self, broker: Broker) -> None:
        """A ``dramatiq`` worker process: refuse to start when nothing it reports could be believed
        (it can sign nothing, or holds another secret than the server whose data directory it shares)."""
        if self.settings.dev_mode:
            return
        how = signer(self.settings)
        refusal = None
        if how is None:
            refusal = CANNOT_SIGN
        elif how == "host" and differs_from_server(self.settings):
            refusal = WRONG_SECRET
        if refusal:
            sys.stderr.write(f"morag-pipeline: {refusal}\n")
            sys.stderr.flush()
            raise SystemExit(2)

    def before_enqueue(self, broker: Broker, message: dramatiq.Message, delay: int) -> None:
        if message.queue_name != control.QUEUE:
            return
        s = self.settings
        how = signer(s)
        args, kwargs = list(message.args), message.kwargs
        if how == "token":
            assert s.worker_token and s.worker_key
            token = s.worker_token.get_secret_value()
            message.options[signatures.OPTION] = signatures.sign(
                message.actor_name, args, kwargs, _token_id(token), s.worker_key.get_secret_value()
            )
        elif how == "host":
            message.options[signatures.OPTION] = signatures.sign_as_host(
                message.actor_name, args, kwargs, server_secret(s)
            )

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if message.queue_name != control.QUEUE:
            return
        if self._verifier is None:
            self._verifier = _Verifier(self.settings)
        try:
            control.check_schema(
                message.options.get(control.SCHEMA_OPTION), f"the {message.actor_name} report",
                control.SCHEMA, control.OLDEST_SCHEMA, "the server",
            )  # fmt: skip
            self._verifier.verify(message)
        except Duplicate as exc:
            logger.info(
                "control message already applied",
                extra={"task_id": message.kwargs.get("task_id"), "actor": message.actor_name},
            )
            raise SkipMessage(str(exc)) from None
        except (AuthError, UnsupportedSchema) as exc:
            self._verifier.rejected(broker, message, str(exc))
            raise SkipMessage(str(exc)) from None


def _token_id(token: str) -> str:
    import jwt

    try:
        return str(jwt.decode(token, options={"verify_signature": False})["jti"])
    except (jwt.InvalidTokenError, KeyError):
        raise AuthError("MORAG_WORKER_TOKEN is not a worker token") from None


def _well_formed(block: object) -> TypeGuard[dict[str, Any]]:
    """Whether a signature block has the fields every block has, of the types they have."""
    if not isinstance(block, dict) or not {"ts", "nonce", "mac"} <= set(block):
        return False
    ts, nonce, mac = block["ts"], block["nonce"], block["mac"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts != ts:
        return False
    if not isinstance(nonce, str) or not isinstance(mac, str) or not 0 < len(nonce) <= 128:
        return False
    token_id = block.get(signatures.TOKEN_ID)
    return token_id is None or (isinstance(token_id, str) and 0 < len(token_id) <= 128)


class _Verifier:
    """The server side: tokens, keys and nonces."""

    def __init__(self, settings: Settings) -> None:
        from pipeline.config import get_settings
        from pipeline.services import build_services, get_services

        self.settings = settings
        # The server's stores, as the rest of the process sees them, for the settings given.
        self.services = services = get_services() if settings is get_settings() else build_services(settings)
        self.tokens = services.tokens
        self.store = services.store
        self._unsigned_warned = False

    def verify(self, message: MessageProxy) -> None:
        block: object = message.options.get(signatures.OPTION)
        if block is None:
            if self.settings.dev_mode:
                if not self._unsigned_warned:
                    logger.warning("accepting unsigned control messages (development mode)")
                    self._unsigned_warned = True
                return
            raise AuthError("unsigned message: the worker holds neither a token nor the server's secret")
        if not _well_formed(block):
            raise AuthError("malformed signature block")
        actor, args, kwargs = message.actor_name, list(message.args), message.kwargs
        claimed = str(kwargs.get("worker", ""))
        capability = kwargs.get("capability")
        if block.get("host") is True:
            key = signatures.host_key(self.tokens.secret)
            signatures.check_mac(actor, args, kwargs, block, signatures.HOST_SIGNER, key)
            worker, verified_capability = claimed, capability
        elif signatures.TOKEN_ID in block:
            # The block names the token by its id: the key is recomputed from the id, so only the
            # holder of that key gets past the signature, and only then is the record read.
            token_id = str(block[signatures.TOKEN_ID])
            signatures.check_mac(actor, args, kwargs, block, token_id, self.tokens.signing_key(token_id))
            record = self.tokens.check_id(token_id)
            if claimed != record.worker and not claimed.startswith(record.worker + ":"):
                raise AuthError(f"token of {record.worker} used for worker {claimed!r}")
            if capability is not None and capability != record.capability:
                raise AuthError(f"token is for {record.capability} workers, the message claims {capability}")
            worker, verified_capability = record.worker, record.capability
        elif "token" in block:
            raise AuthError(
                "the signature block carries a whole token, which messages no longer do: upgrade the worker"
            )
        else:
            raise AuthError("malformed signature block")
        nonce = str(block["nonce"])
        if actor in control.OUTCOMES:
            if self.store.seen(nonce):
                raise Duplicate("already applied")
            message.options["nonce"] = nonce
        else:
            signatures.check_age(block, self.settings.message_max_age_s)
            if not self.store.remember(nonce):
                raise AuthError("replayed message (nonce seen before)")
        message.options["verified_worker"] = worker
        message.options["verified_capability"] = verified_capability

    def rejected(self, broker: Broker, message: MessageProxy, reason: str) -> None:
        """Audit and log a refused message, and note it on its task so that ``status`` says why.

        A refused completion or failure would leave its task waiting for ever:
        the task is delivered again (to any worker), and failed with the reason
        once it had ``MORAG_MAX_DELIVERIES`` messages.
        """
        from pipeline.fleet.reconciler import deliver_again

        worker = message.kwargs.get("worker")
        task_id = message.kwargs.get("task_id")
        audit("message.rejected", actor=message.actor_name, worker=worker, reason=reason,
              message_id=message.message_id)  # fmt: skip
        logger.warning(
            "control message rejected", extra={"task_id": task_id, "worker": worker, "reason": reason}
        )
        # The server's registry and store: a worker process, which only signs, never loads them.
        from pipeline.fleet.registry import get_registry
        from pipeline.store import FINAL_STATES

        get_registry(self.settings).refused(str(worker or "(unnamed)"), reason, message.actor_name)
        if not isinstance(task_id, str) or message.actor_name not in control.OUTCOMES:
            return
        try:
            task = self.store.get(task_id, events=False)
        except TaskNotFound:
            return
        self.store.add_event(task_id, "report rejected", {"report": message.actor_name, "worker": worker,
                                                           "reason": reason})  # fmt: skip
        if (
            message.actor_name in (control.TASK_COMPLETED, control.TASK_FAILED)
            and task.state not in FINAL_STATES
        ):
            why = f"the {message.actor_name} report of {worker} could not be verified ({reason})"
            deliver_again(self.services, broker, task, why, by="server")
