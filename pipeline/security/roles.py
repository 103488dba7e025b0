"""The names of API key roles and worker capabilities, apart from the stores that hold them.

The CLI offers them as choices before it knows which command runs, so this
module imports nothing: its start-up does not pay for the database layer.
"""

from __future__ import annotations

#: API key roles, least to most allowed.
ROLES = ("readonly", "client", "admin")
#: What a worker token lets a worker do: the queues it may consume.
CAPABILITIES = ("gpu", "cpu")
