"""Structured logs in worker processes."""

from __future__ import annotations

from dramatiq import Broker, Middleware

from pipeline.logs import setup_logging


class StructuredLogs(Middleware):
    """Sets up pipeline logging (JSON lines or text) when a worker process boots.

    Dramatiq configures its own log format for its own messages; pipeline
    loggers write their records, with task and worker fields, to stderr.

    Parameters:
      level: the pipeline loggers' level.
      json_lines: one JSON object per line when true, readable text otherwise.
    """

    def __init__(self, level: str = "INFO", json_lines: bool = True) -> None:
        self.level = level
        self.json_lines = json_lines

    def after_process_boot(self, broker: Broker) -> None:
        setup_logging(self.level, self.json_lines)
