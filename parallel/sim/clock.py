"""A modelled clock: stands in for the ``time`` module of parallel.trace (the tracer's spans),
parallel.sim.links (``SerialLink`` and the wait that sleeps out a transfer) and parallel.sim.cost
(``add_compute_cost``). Only modelled costs advance it; real compute and real transfers take no modelled
time, so every span is a function of the schedule and the modelled costs alone, the same on any machine
under any load."""
from __future__ import annotations


class ModelledClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
