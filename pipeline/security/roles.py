"""The names of API key roles and worker capabilities, the tokens' issuer and the error of a
refused credential, apart from the stores that hold them.

The CLI offers the names as choices before it knows which command runs, and a
worker checks grants and signs reports without a database, so this module imports
nothing of the database layer: their start-up does not pay for it.
"""

from __future__ import annotations

from pipeline.errors import PipelineError

#: API key roles, least to most allowed.
ROLES = ("readonly", "client", "admin")
#: What a worker token lets a worker do: the queues it may consume.
CAPABILITIES = ("gpu", "cpu")
#: The issuer named in worker tokens and transfer grants.
ISSUER = "morag-pipeline"


class AuthError(PipelineError):
    """A credential was refused; the message says why."""
