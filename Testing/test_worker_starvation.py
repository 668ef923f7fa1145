"""The worker thread under Slicer's event loop, which holds Python's interpreter lock between timer ticks.

PythonQt takes the lock when Slicer calls into Python and keeps it while the main thread sits in the
Qt event loop, so a Python worker thread only runs at the brief moments Python runs on the main thread
(the panel's 100 ms timer tick), about one switch interval (5 ms) each. Here that loop is reproduced: between ticks the main thread sleeps in
C through ctypes.PyDLL, which keeps the lock held, as Qt's C++ event loop under PythonQt does. Torch
work, Python between kernels, then nearly stops with a collector that only polls (what the panel did),
and runs close to its unstarved speed with the panel's collector, which waits on the job (lock
released) for most of each tick.

Counts, not times, carry the comparison: work units done per tick under each collector.
"""
from __future__ import annotations

import ctypes
import itertools
import sys
import time

import pytest
import torch

from IrisSegmentLib.errors import Cancelled
from IrisSegmentLib.slicer_logic.worker import COLLECT_WAIT_SECONDS, POLL_SECONDS, Job, Worker

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs the C library through ctypes.PyDLL(None)")

UNITS = 3000  # tensor steps of the job; unstarved they take a fraction of a second


def _event_loop_holding_the_lock():
    """A function sleeping `seconds` in C with the interpreter lock held (PyDLL does not release it)."""
    usleep = ctypes.PyDLL(None).usleep
    usleep.argtypes = [ctypes.c_uint]
    return lambda seconds: usleep(int(seconds * 1e6))


def _tensor_job(done: itertools.count) -> Job:
    """UNITS small tensor steps with Python in between, like the engine's windows and tuning steps;
    each step counts itself in `done` and checks Cancel."""

    def work(progress, cancel):
        x = torch.ones(48, 48)
        w = torch.full((48, 48), 1.0 / 48)
        for _ in range(UNITS):
            if cancel():
                raise Cancelled("cancelled")
            for _ in range(4):
                x = torch.tanh(x @ w + 0.1)
            next(done)
        return float(x.sum())

    return Job("tensor steps", work, lambda value: value)


def _run_ticks(job: Job, ticks: int, collect) -> int:
    """The Qt event loop for `ticks` timer ticks: `collect(job)` (Python, the panel's QTimer callback),
    then the rest of the tick in C with the lock held. Returns the ticks used until the job was collected."""
    hold = _event_loop_holding_the_lock()
    for tick in range(1, ticks + 1):
        start = time.perf_counter()
        if collect(job):
            return tick
        hold(max(0.0, POLL_SECONDS - (time.perf_counter() - start)))
    return ticks


def _poll_only(job: Job) -> bool:
    """The collector before the fix: progress and poll, then back to the event loop."""
    job.progress()
    return job.poll()


def _panel_collector(job: Job) -> bool:
    """The panel's collector (IrisSegmentWidget._collectJob calls Job.tick): it waits on the job for
    most of the tick first."""
    return job.tick()[1]


def test_the_panels_collector_keeps_the_worker_running_under_the_event_loops_lock() -> None:
    worker = Worker("starvation test")
    try:
        # Unstarved: the job on its own.
        start = time.perf_counter()
        done = itertools.count()
        worker.submit(_tensor_job(done)).result(timeout=120)
        unstarved_ticks = (time.perf_counter() - start) / COLLECT_WAIT_SECONDS  # ticks it needs at the worker's share

        # The panel's collector under the event loop: the job finishes, within a generous bound of its own time.
        fixed_done = itertools.count()
        fixed = worker.submit(_tensor_job(fixed_done))
        budget = max(10, int(4 * unstarved_ticks) + 3)
        fixed_ticks = _run_ticks(fixed, budget, _panel_collector)
        fixed_units = next(fixed_done)
        assert fixed.collected and fixed_units == UNITS, f"{fixed_units} of {UNITS} steps in {fixed_ticks} ticks (unstarved: {unstarved_ticks:.1f})"

        # A collector that only polls: the worker gets the lock for about one switch interval (5 ms) a
        # tick, when the tick's Python hands it over; the starvation the fix removes.
        starved_done = itertools.count()
        starved = worker.submit(_tensor_job(starved_done))
        starved_ticks = _run_ticks(starved, 10, _poll_only)
        starved_units = next(starved_done)
        starved.cancel()
        with pytest.raises(Cancelled):
            starved.result(timeout=60)
        fixed_rate, starved_rate = UNITS / fixed_ticks, starved_units / starved_ticks
        assert starved_units < UNITS and starved_rate * 4 < fixed_rate, (
            f"steps per tick: {starved_rate:.0f} polling only, {fixed_rate:.0f} with the panel's collector"
        )
    finally:
        worker.shutdown(timeout=30)


def test_wait_returns_as_soon_as_the_job_ends() -> None:
    """Waiting costs the panel nothing once the work is done, and never applies the result itself."""
    job = Worker("wait test").submit(Job("quick", lambda progress, cancel: 7, lambda value: value * 6))
    assert job.wait(30.0)
    assert not job.collected  # the scene is only changed when the main thread collects
    assert job.poll() and job.result() == 42
