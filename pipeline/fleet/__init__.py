"""The worker fleet, as the server keeps it.

- ``registry``: every worker (a name with its processes), from heartbeats.
- ``sweep``: once a minute, workers' states advance and tasks of a queue with
  no live worker move to the other queue.
- ``reconciler``: with every sweep, every task that is not final gets an end.
- ``capacity``: what submit knows of the workers when it routes a task.
- ``scheduler``: the liveness process that runs the sweep, kept running by the server.
"""
