"""A randomized soak: tasks flow steadily while faults strike at random moments (workers killed
and restarted, one process of the two-process box killed, the server restarted, SFTP connections
cut, the broker restarted). Then the faults stop, everything drains, and every task is counted
by id: none stuck, none with doubled outputs, every failure with its reason.

Two minutes in CI; ``python -m tests.soak.run --minutes 30 --tasks 1000`` runs it longer
(docs/soak.md). The seed is printed; ``--seed`` (``SOAK_SEED``) replays the same choices.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from tests.soak.conftest import PLAN, Plan, Rig
from tests.soak.ledger import count, drain
from tests.soak.nemesis import Nemesis
from tests.soak.workload import Inputs, Submitter

pytestmark = [pytest.mark.soak, pytest.mark.slow, pytest.mark.rabbitmq]


@pytest.mark.timeout(int(60 * (PLAN.minutes + PLAN.drain_minutes + 10)))
def test_soak(rig: Rig, plan: Plan, tmp_path: Path, docx_file: Path, corrupt_mp4: Path) -> None:
    shape = rig.shape
    print(f"\nsoak seed {plan.seed}: {plan.minutes} min of faults, {plan.tasks} tasks "
          f"(replay: SOAK_SEED={plan.seed} or --seed {plan.seed})")  # fmt: skip
    rng = random.Random(plan.seed)
    workload_rng, fault_rng = random.Random(rng.getrandbits(64)), random.Random(rng.getrandbits(64))
    shape.wait_box_alive()

    window = plan.minutes * 60
    start = time.time()
    submitter = Submitter(shape.stack, Inputs(tmp_path / "inputs", docx_file, corrupt_mp4), workload_rng,
                          plan.tasks, interval=window / plan.tasks)  # fmt: skip
    nemesis = Nemesis(shape, rig.rabbit, rig.proxy, fault_rng, until=time.monotonic() + window)
    submitter.start()
    nemesis.start()
    nemesis.join()
    if nemesis.error is not None:
        submitter.stop.set()
    submitter.join()
    for thread in (nemesis, submitter):
        if thread.error is not None:
            raise AssertionError(f"{thread.name} stopped: {thread.error!r}\n{shape.stack.all_logs()}")

    # The faults have stopped: everything runs again, and the tasks may end.
    shape.ensure()
    drained = drain(shape, plan.drain_minutes * 60)
    tally = count(shape, submitter.submissions, nemesis.strikes)
    tally.drained = drained
    text = f"soak seed {plan.seed}, {plan.minutes} min, {plan.tasks} tasks\n{tally.table(start)}"
    print(text)
    if plan.report:
        plan.report.write_text(text + "\n")

    assert len({s.fault for s in nemesis.strikes}) == len(nemesis.faults), f"not every fault struck:\n{text}"
    assert tally.tasks, f"no task was recorded:\n{text}"
    assert not tally.findings, f"{len(tally.findings)} task(s) broke a promise (seed {plan.seed}):\n{text}"
    assert tally.stuck == 0 and drained, f"left over after {plan.drain_minutes} min:\n{text}"
