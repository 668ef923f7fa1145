"""One persistent thread for all torch work, so Slicer's main thread never waits on the model.

The main thread submits a Job whose work takes numpy in and gives numpy out; it polls the job's
progress (a QTimer in the panel, a loop or `result()` in tests) and, once the work is done, runs the
job's `finish` itself: that is where the scene is changed, so MRML is only ever touched on the main
thread, and a failed or cancelled job changes nothing. The thread persists, so state such as the
loaded model stays on its device between jobs. Neither Qt nor torch is imported here.

Slicer's main thread holds Python's interpreter lock while it sits in the Qt event loop (PythonQt
releases it only while Python code runs), so a Python thread left alone there gets the lock only at
the brief moments Python runs, and torch work (Python between its kernels) crawls. The panel's
collector therefore spends most of each timer tick in `Job.wait`, which blocks without the lock:
the worker runs then, and the event loop still gets the rest of the tick
(COLLECT_WAIT_SECONDS of every POLL_SECONDS).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

from ..errors import Cancelled

Value = TypeVar("Value")
Outcome = TypeVar("Outcome")
Progress = Callable[[float, str], None]
CancelRequested = Callable[[], bool]

POLL_SECONDS = 0.1  # the panel's timer interval
COLLECT_WAIT_SECONDS = 0.08  # of each tick, the time the collector waits on the job (the worker's share)


class Job(Generic[Value, Outcome]):
    """Work for the worker thread plus the main-thread step that applies its value."""

    def __init__(self, title: str, work: Callable[[Progress, CancelRequested], Value], finish: Callable[[Value], Outcome]) -> None:
        self.title = title
        self._work = work
        self._finish = finish
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._updates: queue.SimpleQueue[tuple[float, str]] = queue.SimpleQueue()
        self._value: Value | None = None
        self._error: BaseException | None = None
        self._outcome: Outcome | None = None
        self._completed = False

    # ---- any thread
    def cancel(self) -> None:
        """Ask the engine to stop at its next check (between windows or tuning steps)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return not self._done.is_set()

    @property
    def collected(self) -> bool:
        """The main thread has applied (or dropped) the outcome: the job is over for the caller."""
        return self._completed

    # ---- worker thread
    def run(self) -> None:
        try:
            self._value = self._work(self._report, self._cancel.is_set)
        except BaseException as exc:  # handed to the main thread, which reports it
            self._error = exc
        finally:
            self._done.set()

    def _report(self, fraction: float, message: str) -> None:
        self._updates.put((float(fraction), str(message)))

    # ---- main thread
    def progress(self) -> list[tuple[float, str]]:
        """(fraction, message) updates reported since the last call."""
        updates = []
        while True:
            try:
                updates.append(self._updates.get_nowait())
            except queue.Empty:
                return updates

    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` seconds without holding the interpreter lock, so the worker thread
        runs meanwhile; True once the job has ended (then `poll()` applies it). Returns early when
        the job ends."""
        return self._done.wait(max(0.0, timeout))

    def tick(self, wait: float = COLLECT_WAIT_SECONDS) -> tuple[list[tuple[float, str]], bool]:
        """One timer tick of the panel's collector: wait on the job (the worker runs meanwhile), then
        the progress updates since the last tick and whether the job has ended (applied, as `poll`)."""
        ended = self.wait(wait)  # read before draining: what the worker posted before it ended is shown too
        updates = self.progress()
        return updates, self.poll() if ended else False

    def poll(self) -> bool:
        """True once the job has ended; its outcome is then applied (once) and `result()` returns at once."""
        if self._done.is_set():
            self._complete()
            return True
        return False

    def result(self, timeout: float | None = None) -> Outcome:
        """Wait for the work, apply it on this (main) thread, return the outcome or raise the job's error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.title} did not finish within {timeout} s.")
        self._complete()
        if self._error is not None:
            raise self._error
        return self._outcome  # type: ignore[return-value]

    def _complete(self) -> None:
        if self._completed:
            return
        self._completed = True
        if self._error is None and self._cancel.is_set():
            # Cancel pressed after the last engine check: still drop the result, as the user asked.
            self._error = Cancelled("cancelled by the user; nothing was changed.")
        if self._error is None:
            try:
                self._outcome = self._finish(self._value)  # type: ignore[arg-type]
            except BaseException as exc:
                self._error = exc


class Worker:
    """A single daemon thread running submitted jobs in order (it never blocks Slicer from exiting)."""

    def __init__(self, name: str = "IrisSegment worker") -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> Job:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        self._jobs.put(job)
        return job

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the thread after the job in hand (cancel it first to stop sooner)."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
        self._thread = None

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            job.run()
