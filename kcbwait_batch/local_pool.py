"""The local backend: ``jobs`` isolated analysis processes on this machine.

Each job is a thread owning an :class:`~kcbwait_batch.isolation.IsolatedWorker`; the thread
only waits on its child, so the threads cost nothing while Volatility runs in the children
(one core each).  A dead or hung child is replaced by its worker and the job goes on with
the next image: no pool-wide "broken" state exists to stop the batch.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator, Sequence

from kcbwait_batch.backend import Done, Event, Stage
from kcbwait_batch.isolation import IsolatedWorker, LogSink
from kcbwait_batch.tasks import ImageTask


def default_jobs() -> int:
    """The cores this process may use (a container's CPU set, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LocalPool:
    """Runs tasks on ``jobs`` supervised local processes."""

    def __init__(
        self,
        jobs: int | None = None,
        tasks_per_child: int = 0,
        verbose: bool = False,
        log_sink: LogSink | None = None,
    ) -> None:
        self.jobs = jobs or default_jobs()
        self.tasks_per_child = tasks_per_child
        self.verbose = verbose
        self.log_sink = log_sink
        self.description = f"local, {self.jobs} worker process{'es' if self.jobs > 1 else ''}"

    def start(self) -> None:
        """Nothing to acquire: analysis processes start with the first task of each job."""

    def close(self) -> None:
        """Nothing held between runs: ``run`` ends its processes itself."""

    def run(self, tasks: Sequence[ImageTask], timeout: float | None) -> Iterator[Event]:
        todo: queue.SimpleQueue[ImageTask] = queue.SimpleQueue()
        for task in tasks:
            todo.put(task)
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        stop = threading.Event()
        workers = [
            IsolatedWorker(f"local-{n + 1}", self.tasks_per_child, self.verbose, self.log_sink)
            for n in range(min(self.jobs, len(tasks)))
        ]

        def job(worker: IsolatedWorker) -> None:
            try:
                while not stop.is_set():
                    try:
                        task = todo.get_nowait()
                    except queue.Empty:
                        return
                    outcome = worker.run(
                        task,
                        timeout,
                        lambda stage, t=task: events.put(Stage(t.image, stage, worker.name)),
                    )
                    events.put(Done(task.image, outcome))
            finally:
                worker.close()
                events.put(None)  # this job has finished

        threads = [
            threading.Thread(target=job, args=(w,), name=w.name, daemon=True) for w in workers
        ]
        for thread in threads:
            thread.start()
        running = len(threads)
        try:
            while running:
                event = events.get()
                if event is None:
                    running -= 1
                else:
                    yield event
        finally:
            # Reached on normal completion and when the consumer stops early (Ctrl-C, a
            # write error): no job takes another image, and the children go.
            stop.set()
            for worker in workers:
                worker.terminate()
            for thread in threads:
                thread.join(timeout=10)
