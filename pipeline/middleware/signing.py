"""Signs what workers send the server, and checks it on arrival."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq import Broker, Middleware
from dramatiq.broker import MessageProxy
from dramatiq.middleware import SkipMessage

from pipeline.config import Settings
from pipeline.logs import get_logger
from pipeline.security import signatures
from pipeline.security.audit import audit
from pipeline.security.tokens import AuthError

logger = get_logger(__name__)


class MessageSigning(Middleware):
    """Signs ``control`` messages on workers; verifies them on the server.

    A worker holding a token (``MORAG_WORKER_TOKEN`` and ``MORAG_WORKER_KEY``)
    signs every message it publishes to ``control``. The server, consuming
    ``control``, verifies each one and drops (acknowledged, audited) any that
    is unsigned, forged, replayed, too old, from a revoked or wrong-capability
    token, or names another worker. In development mode unsigned messages are
    accepted.

    The verified worker and capability are put in the message's options
    (``verified_worker``, ``verified_capability``) for the control actors.

    Parameters:
      settings: the worker's token and key, or the server's secret and limits.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._verifier: _Verifier | None = None

    def before_enqueue(self, broker: Broker, message: dramatiq.Message, delay: int) -> None:
        s = self.settings
        if message.queue_name != "control" or not (s.worker_token and s.worker_key):
            return
        token = s.worker_token.get_secret_value()
        token_id = _token_id(token)
        message.options[signatures.OPTION] = signatures.sign(
            message.actor_name,
            list(message.args),
            message.kwargs,
            token,
            token_id,
            s.worker_key.get_secret_value(),
        )

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        if message.queue_name != "control":
            return
        if self._verifier is None:
            self._verifier = _Verifier(self.settings)
        try:
            self._verifier.verify(message)
        except AuthError as exc:
            worker = message.kwargs.get("worker")
            audit("message.rejected", actor=message.actor_name, worker=worker, reason=str(exc),
                  message_id=message.message_id)  # fmt: skip
            logger.warning(
                "control message rejected",
                extra={"task_id": message.kwargs.get("task_id"), "worker": worker, "reason": str(exc)},
            )
            raise SkipMessage(str(exc)) from None


def _token_id(token: str) -> str:
    import jwt

    try:
        return str(jwt.decode(token, options={"verify_signature": False})["jti"])
    except (jwt.InvalidTokenError, KeyError):
        raise AuthError("MORAG_WORKER_TOKEN is not a worker token") from None


class _Verifier:
    """The server side: tokens, keys and nonces."""

    def __init__(self, settings: Settings) -> None:
        from pipeline.services import get_services

        self.settings = settings
        self.tokens = get_services().tokens
        self.nonces = signatures.NonceStore(settings.db_path, settings.message_max_age_s)
        self._unsigned_warned = False

    def verify(self, message: MessageProxy) -> None:
        block: dict[str, Any] | None = message.options.get(signatures.OPTION)
        if block is None:
            if self.settings.dev_mode:
                if not self._unsigned_warned:
                    logger.warning("accepting unsigned control messages (development mode)")
                    self._unsigned_warned = True
                return
            raise AuthError("unsigned message")
        if not isinstance(block, dict) or not {"token", "ts", "nonce", "mac"} <= set(block):
            raise AuthError("malformed signature block")
        claims = self.tokens.verify(str(block["token"]))
        key = self.tokens.signing_key(claims["jti"])
        signatures.check_mac(
            message.actor_name, list(message.args), message.kwargs, block, claims["jti"], key
        )
        signatures.check_age(block, self.settings.message_max_age_s)
        if not self.nonces.first_time(str(block["nonce"])):
            raise AuthError("replayed message (nonce seen before)")
        claimed = str(message.kwargs.get("worker", ""))
        if claimed != claims["sub"] and not claimed.startswith(claims["sub"] + ":"):
            raise AuthError(f"token of {claims['sub']} used for worker {claimed!r}")
        capability = message.kwargs.get("capability")
        if capability is not None and capability != claims["cap"]:
            raise AuthError(f"token is for {claims['cap']} workers, the message claims {capability}")
        message.options["verified_worker"] = claims["sub"]
        message.options["verified_capability"] = claims["cap"]
