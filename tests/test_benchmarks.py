"""Every benchmark under bench/ runs as committed, at a tiny size, and prints its ratios.

Each module in bench/ is run the way bench/README.md says to run it
(``python -m bench.<name>`` from the repository root), with the arguments of
``TINY`` below, and must exit 0 and print the lines that quote its ratios
against its baseline. The figures themselves are not checked: speed belongs to
the benchmarks, and at this size they mean nothing. A new benchmark without
tiny arguments in ``TINY`` fails ``test_every_benchmark_has_tiny_arguments``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT

BENCH = ROOT / "bench"

#: Seconds one tiny benchmark may run; they take seconds to tens of seconds.
TIMEOUT = 240

NUMBER = r"-?\d+(?:\.\d+)?"
RATIO = r"\d+\.\d\d"

#: The seconds and real-time factor of one line of bench/gpu_vs_cpu.py.
GPU_VS_CPU_TIMES = rf"{NUMBER} s   RTF {NUMBER}  "

#: Configurations bench/sftp_tuning.py compares, one ratio line each per server.
SFTP_TUNINGS = [
    "tuned",
    "32 KiB requests",
    "4 requests in flight",
    "16 requests in flight",
    "64 requests in flight",
    "2 MiB window",
    "256 KiB packets received",
    "32 KiB packets both ways",
    "aes128-ctr + hmac",
    "stock paramiko",
]


@dataclass(frozen=True)
class Tiny:
    """How to run one benchmark small enough for the test suite.

    Parameters:
      args: its command-line arguments.
      lines: regular expressions, each matching one line it prints to stdout,
        with the number of times the line must appear.
      marks: pytest marks beyond the module's own (e.g. the services it needs).
    """

    args: tuple[str, ...]
    lines: tuple[tuple[str, int], ...]
    marks: tuple[pytest.MarkDecorator, ...] = ()


TINY: dict[str, Tiny] = {
    "broker_throughput": Tiny(
        ("--messages", "50", "--threads", "2", "--rounds", "1"),
        (
            (rf"^  ratio ours/bare: publish {RATIO}, consume {RATIO}$", 1),
            (rf"^  ratio ours/bare \(whole worker\): {RATIO}$", 1),
            (rf"^  ratio ours/celery \(whole worker\): (?:{RATIO}|not measured \(.+\))$", 1),
        ),
    ),
    "submit_overhead": Tiny(
        ("--rounds", "1"),
        (
            (rf"^  ratio submit / direct warm: {RATIO}; overhead {NUMBER} s$", 1),
            (rf"^  client submit\+wait\+result, (stream|polling) +{NUMBER} s  \(overhead -?{NUMBER} s\)$", 2),
            (rf"^  ratio stream / polling: {RATIO}; overhead change [+-]{NUMBER} s per task$", 1),
            # where the seconds go: each stage the worker timed, among the others
            (rf"^  worker: (download|decode|load|transcribe|render|upload|manifest|report) +{NUMBER} s$", 8),
        ),
    ),
    "dashboard_cost": Tiny(
        ("--workers", "20", "--tasks", "300", "--rounds", "2"),
        (
            (rf"^  baseline: GET /api/v1/tasks \(newest 50, counts\) +{NUMBER} ms$", 1),
            (rf"^  GET /api/v1/dashboard\S* +{NUMBER} ms   ratio +{RATIO}x$", 3),
            (rf"^  GET /api/v1/dashboard/history \(6 h\) +{NUMBER} ms   ratio +{RATIO}x$", 1),
            (rf"^  reading every worker record \(Registry.list\) +{NUMBER} ms   ratio +{RATIO}x$", 1),
            (rf"^  writing one history sample +{NUMBER} ms   ratio +{RATIO}x$", 1),
        ),
    ),
    "sftp_throughput": Tiny(
        ("--size-mb", "1", "--rounds", "1"),
        (
            *(
                (rf"^  {re.escape(row)} +\d+ +\d+   {RATIO} / {RATIO}$", 1)
                for row in (
                    "ours/openssh",
                    "ours/openssh unhashed",
                    "ours/embedded",
                    "ours/embedded unhashed",
                )
            ),
            *(
                (rf"^  checksum cost, ours/{server}: download [+-]{NUMBER}%, upload [+-]{NUMBER}%", 1)
                for server in ("embedded", "openssh")
            ),
        ),
        (pytest.mark.openssh,),
    ),
    "sftp_tuning": Tiny(
        ("--size-mb", "1", "--rounds", "1"),
        tuple(
            (rf"^    {re.escape(name)} +download +\d+ \({RATIO}\)   upload +\d+ \({RATIO}\)$", 2)
            for name in SFTP_TUNINGS
        ),
        (pytest.mark.openssh,),
    ),
    "store_throughput": Tiny(
        ("--submits", "30", "--tasks", "10", "--rounds", "1"),
        (
            (r"^  sqlite +\d+ +\d+ +\d+$", 1),
            (
                rf"^  ratio postgresql/sqlite: (?:submits {RATIO}, outcomes 1 thread {RATIO}, "
                rf"outcomes 4 threads {RATIO}|skipped \(PostgreSQL .+\))$",
                1,
            ),
        ),
    ),
    "replicas": Tiny(
        ("--uploads", "10", "--notes", "20", "--rounds", "1", "--replicas", "1,2"),
        (
            (r"^  sqlite x1 +\d+ +\d+$", 1),
            *((rf"^  ratio postgresql x{n}/sqlite x1: submits {RATIO}, control {RATIO}$", 1) for n in (1, 2)),
        ),
        (pytest.mark.postgresql,),
    ),
    "monitoring_cost": Tiny(
        ("--workers", "20", "--tasks", "500", "--seconds", "2", "--scrape-every", "0.5", "--rounds", "1"),
        (
            (r"^  /metrics render: median \d+ ms \(\d+ lines, 1 rounds\)$", 1),
            (rf"^  ratio scraped/alone: {RATIO} \(cost {NUMBER}%, goal at most 5%\)$", 1),
        ),
        (pytest.mark.rabbitmq,),
    ),
    "long_media": Tiny(
        ("--minutes", "1", "--chunk-s", "15", "--rounds", "1"),
        (
            (rf"^  one worker, whole file +{NUMBER} s$", 1),
            (rf"^  2 workers, split in \d+ chunks +{NUMBER} s   \(workers: .+\)$", 1),
            (rf"^  ratio split/whole: {RATIO} \(speed-up {RATIO}x\)$", 1),
            (rf"^  word error rate, split against whole: {NUMBER}% \(\d+ words; goal at most 1%\)$", 1),
            (rf"^  word error rate, whole against the whole of the same recording 0.5 s later: {NUMBER}%", 1),
            (
                rf"^  word error rate against the spoken text \(\d+ words\): "
                rf"whole {NUMBER}%, split {NUMBER}%",
                1,
            ),
        ),
        (pytest.mark.rabbitmq,),
    ),
    "gpu_vs_cpu": Tiny(
        ("--rounds", "1", "--loops", "0", "--files", "speech.mp3", "--max-seconds", "60"),
        (
            (rf"^gpu_vs_cpu: model tiny\.en, 1 files, {NUMBER} s of audio, 1 rounds$", 1),
            (rf"^  cpu int8 +{GPU_VS_CPU_TIMES} speed-up 1\.00x   \(cpu_threads \d+; \d+ words\)$", 1),
            (rf"^  cpu int8 batched +{GPU_VS_CPU_TIMES} speed-up {RATIO}x   \(batched True, batch_size 8", 1),
            # Where CUDA runs, its two lines; elsewhere, the line that says why they are missing.
            (rf"^  (cuda float16 batched +{GPU_VS_CPU_TIMES} speed-up {RATIO}x|cuda: not measured: .+)", 1),
        ),
    ),
    "stream": Tiny(
        ("--clips", "2", "--rounds", "1"),
        (
            (
                rf"^  stack, worker (2 threads \(streaming\)|1 thread \(one at a time\)) +{NUMBER} s   "
                rf"ratio stack/direct {RATIO}   busy \d+%   CPU ratio {RATIO}$",
                2,
            ),
            (rf"^  ratio stack/direct: {RATIO} \(goal at most 1\.10\); transcriber busy \d+%$", 1),
        ),
        (pytest.mark.rabbitmq,),
    ),
    "sweep_and_reroute": Tiny(
        ("--workers", "40", "--messages", "100", "--rounds", "1"),
        (
            (rf"^  sweep writing transitions +{NUMBER} ms +ratio +{NUMBER}x", 1),
            (rf"^  sweep with nothing to change +{NUMBER} ms +ratio +{NUMBER}x$", 1),
            (rf"^  sweep \(pipelined confirms, moves recorded on tasks\) .* speed ratio +{NUMBER}x$", 1),
            (r"^  tasks with their move recorded: 100 of 100 ", 1),
            (r"^  lost 0, doubled 0, left in gpu 0, errors 0 ", 1),
        ),
    ),
}


def bench_modules() -> list[str]:
    """The benchmarks in bench/, by module name."""
    return sorted(path.stem for path in BENCH.glob("*.py") if path.stem != "__init__")


def bench_env() -> dict[str, str]:
    """This environment without the product's settings (the test broker's address stays)."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("MORAG_") or name.startswith("MORAG_TEST_")
    }


def run_bench(name: str, args: tuple[str, ...]) -> subprocess.CompletedProcess:
    """``python -m bench.<name> <args>`` from the repository root; everything it started is
    killed if it runs past ``TIMEOUT``."""
    command = [sys.executable, "-m", f"bench.{name}", *args]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=bench_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"bench.{name} ran past {TIMEOUT} s\n{stdout}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def test_every_benchmark_has_tiny_arguments() -> None:
    assert bench_modules(), "no benchmark found in bench/"
    missing = [name for name in bench_modules() if name not in TINY]
    assert not missing, f"benchmarks without tiny arguments in tests/test_benchmarks.py TINY: {missing}"
    stale = sorted(set(TINY) - set(bench_modules()))
    assert not stale, f"TINY names benchmarks that are not in bench/: {stale}"


@pytest.mark.slow
@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=TINY[name].marks if name in TINY else ()) for name in bench_modules()],
)
def test_benchmark_runs_and_prints_its_ratios(name: str, rabbitmq_available: None) -> None:
    if name not in TINY:
        pytest.fail(f"bench/{name}.py has no tiny arguments in TINY")
    tiny = TINY[name]
    result = run_bench(name, tiny.args)
    shown = f"$ {' '.join(result.args[1:])}\n{result.stdout}\n--- stderr (end)\n{result.stderr[-4000:]}"
    assert result.returncode == 0, shown
    for pattern, times in tiny.lines:
        found = re.findall(pattern, result.stdout, flags=re.MULTILINE)
        assert len(found) == times, f"expected {times} line(s) matching {pattern!r}\n{shown}"
