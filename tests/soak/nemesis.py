"""The soak's faults, struck at random moments from a seeded random number generator.

Faults strike one at a time: each breaks something, holds it broken for a few seconds, and
heals it, then the nemesis waits a random while before the next. The kinds are dealt from
shuffled decks, so every kind strikes once before any strikes a second time. Every strike is
logged with its time, what it did, and the tasks in flight when it struck.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from tests.chaos.conftest import PrivateRabbitmq
from tests.conftest import wait_for
from tests.shapes.conftest import Shape
from tests.transfer.proxy import CuttingProxy


@dataclass
class Strike:
    """One fault as it happened.

    Parameters:
      fault: the kind.
      at: when it struck (epoch seconds).
      healed: when what it broke was whole again.
      detail: what it did.
      in_flight: ids of the tasks queued or running when it struck.
    """

    fault: str
    at: float
    healed: float = 0.0
    detail: str = ""
    in_flight: list[str] = field(default_factory=list)

    def line(self, start: float) -> str:
        return (f"{self.at - start:8.1f}s  {self.fault:<18} {len(self.in_flight):4} in flight  "
                f"healed after {self.healed - self.at:5.1f}s  {self.detail}")  # fmt: skip


class Nemesis(threading.Thread):
    """Strikes faults at random moments until ``until`` (monotonic), and on until every kind has
    struck once, or until ``stop``.

    Parameters:
      shape: the server, the CPU worker and the GPU box.
      rabbit: the private RabbitMQ node.
      proxy: the cutting proxy between the box and the SFTP server.
      rng: the run's seeded random numbers.
      until: when the last fault may strike (``time.monotonic()``).
      gap: the range of seconds between one fault healed and the next.
    """

    def __init__(
        self, shape: Shape, rabbit: PrivateRabbitmq, proxy: CuttingProxy, rng: random.Random, until: float,
        gap: tuple[float, float] = (2.0, 10.0),
    ) -> None:  # fmt: skip
        super().__init__(name="soak-nemesis", daemon=True)
        self.shape, self.rabbit, self.proxy, self.rng = shape, rabbit, proxy, rng
        self.until, self.gap = until, gap
        self.strikes: list[Strike] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.faults: dict[str, Callable[[], str]] = {
            "cpu-worker-kill": self.kill_cpu_worker,
            "box-process-kill": self.kill_box_process,
            "box-kill": self.kill_box,
            "server-restart": self.restart_server,
            "sftp-cut": self.cut_sftp,
            "broker-restart": self.restart_broker,
        }
        self._deck: list[str] = []

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(*self.gap)) and (
                time.monotonic() < self.until or len({s.fault for s in self.strikes}) < len(self.faults)
            ):
                if not self._deck:
                    self._deck = sorted(self.faults)
                    self.rng.shuffle(self._deck)
                name = self._deck.pop()
                strike = Strike(name, time.time(), in_flight=self.in_flight())
                self.strikes.append(strike)
                strike.detail = self.faults[name]()
                strike.healed = time.time()
        except BaseException as exc:  # shown by the test, not lost in a thread
            self.error = exc

    def in_flight(self) -> list[str]:
        ids: list[str] = []
        for state in ("queued", "running"):
            with contextlib.suppress(httpx.HTTPError):
                response = self.shape.stack.get("/api/v1/tasks", params={"state": state, "limit": 1000},
                                                timeout=30)  # fmt: skip
                ids += [t["id"] for t in response.json()["tasks"]]
        return ids

    def down(self) -> float:
        """How long a fault holds: a random few seconds."""
        seconds = self.rng.uniform(1.0, 12.0)
        time.sleep(seconds)
        return seconds

    # The faults: each breaks one thing, waits, heals it, and says what it did.

    def kill_cpu_worker(self) -> str:
        self.shape.stack.stop("cpu-worker", signal.SIGKILL)
        seconds = self.down()
        self.shape.start_cpu_worker()
        return f"SIGKILL, restarted after {seconds:.1f}s"

    def box_pair(self, without: int | None = None) -> list[int] | None:
        """The box's two worker processes, once it runs two (and ``without`` is not one of them)."""
        processes = self.shape.box_processes()
        return processes if len(processes) == 2 and without not in processes else None

    def kill_box_process(self) -> str:
        processes = wait_for("the box's two processes", self.box_pair, 180, self.shape.stack, 0.5)
        victim = self.rng.choice(sorted(processes))
        os.kill(victim, signal.SIGKILL)
        # The box's master stops the other process, and its supervisor starts the box again.
        wait_for("the box back with two processes", lambda: self.box_pair(without=victim), 180,
                 self.shape.stack, 0.5)  # fmt: skip
        return f"SIGKILL to process {victim} of 2"

    def kill_box(self) -> str:
        self.shape.kill_box()
        seconds = self.down()
        self.shape.start_box()
        return f"whole box SIGKILLed, started again after {seconds:.1f}s"

    def restart_server(self) -> str:
        sig = self.rng.choice([signal.SIGTERM, signal.SIGKILL])
        self.shape.stack.stop("server", sig)
        seconds = self.down()
        self.shape.start_server()
        return f"{sig.name}, started again after {seconds:.1f}s"

    def cut_sftp(self) -> str:
        return f"{self.proxy.cut_now()} connection(s) cut"

    def restart_broker(self) -> str:
        self.rabbit.ctl("stop_app")
        seconds = self.down()
        self.rabbit.ctl("start_app")
        return f"stop_app, start_app after {seconds:.1f}s"


def box_settings(shape: Shape, **settings: str) -> None:
    """Sets ``MORAG_<NAME>=value`` in the box's ``morag.env``, as its operator would edit it."""
    env_file = shape.box_dir / "morag.env"
    names = {f"MORAG_{name.upper()}" for name in settings}
    lines = [line for line in env_file.read_text().splitlines() if line.split("=", 1)[0] not in names]
    lines += [f"MORAG_{name.upper()}={value}" for name, value in settings.items()]
    env_file.write_text("\n".join(lines) + "\n")


def sftp_proxy(shape: Shape) -> CuttingProxy:
    """Puts a cutting proxy between the box and the SFTP server (on 127.0.0.1): it listens on the
    box's network, and the box's ``morag.env`` names its port. The box's way to the broker is a
    proxy that outlives a broker restart. Call before the box is enrolled; the caller closes the
    SFTP proxy (the shape closes its broker proxy)."""
    proxy = CuttingProxy(int(shape.stack.env["MORAG_SFTP_PORT"]), listen_host=shape.network.host_address)
    if shape.network.namespace:  # the box's way to the broker, which restarts too
        shape.forwarder = CuttingProxy(shape.broker_port, listen_host=shape.network.host_address)
    shape.enroll_box()
    box_settings(shape, sftp_port=str(proxy.port))
    return proxy
