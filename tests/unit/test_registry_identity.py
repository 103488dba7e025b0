"""The name a worker reports: the processes of one dramatiq command share it."""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import config
from pipeline.config import Settings, use_settings
from pipeline.identity import worker_id


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    before = config._current
    yield use_settings(Settings(data_dir=tmp_path))
    config._current = before


def _report(queue: multiprocessing.Queue) -> None:
    queue.put(worker_id())


def names_of_children(count: int) -> list[str]:
    """``worker_id()`` in ``count`` processes started as dramatiq starts its worker processes."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_report, args=(queue,)) for _ in range(count)]
    for child in children:
        child.start()
    names = [queue.get(timeout=30) for _ in children]
    for child in children:
        child.join(30)
    return names


def test_an_unnamed_commands_processes_share_its_host_and_pid(settings: Settings) -> None:
    expected = f"{socket.gethostname()}:{os.getpid()}"
    assert worker_id() == expected
    assert names_of_children(2) == [expected, expected]


def test_a_named_worker_is_its_name_in_every_process(settings: Settings) -> None:
    use_settings(settings.model_copy(update={"worker_name": "gpu-box-1"}))
    assert worker_id() == "gpu-box-1"
    assert names_of_children(2) == ["gpu-box-1", "gpu-box-1"]
