"""Worker modules that ``bench/broker_throughput.py --whole-worker`` starts with the real commands.

Each declares a no-op actor (task) named ``noop`` on queue ``cpu`` that counts
its runs and, at the ``BENCH_EXPECT``-th, creates the file ``BENCH_DONE``: the
benchmark stops its clock when that file appears.
"""
