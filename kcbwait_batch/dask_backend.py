"""The Dask backend: the same tasks on an existing ``dask.distributed`` cluster.

Each image is one Dask task.  On the worker the task does what a local job does: it hands
the image to an :class:`~kcbwait_batch.isolation.IsolatedWorker` (one analysis process per
worker thread, kept between tasks), so the per-image timeout, crash isolation and worker
recycling behave exactly as in local mode, and a worker thread is never left running a hung
analysis.  Stage changes travel as Dask events (``Worker.log_event`` -> ``subscribe_topic``).

Requirements on the cluster (see README, "Batch processing"): every worker has this package
(``pip install 'kcbwait[batch-dask]'``, same version as the client) and sees each image and
symbol directory at the same path as the client.  ``dask`` is an optional dependency: this
module imports it only when a cluster is used.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from kcbwait_batch import records
from kcbwait_batch.backend import BackendFailure, BackendUnavailable, Done, Event, Stage
from kcbwait_batch.isolation import IsolatedWorker
from kcbwait_batch.tasks import ImageTask

TOPIC = "kcbwait-batch-progress"

# Worker side: one supervised analysis process per Dask worker thread, reused across tasks.
_worker_local = threading.local()


def analyse_on_worker(
    task_json: dict[str, Any], timeout: float | None, tasks_per_child: int
) -> dict[str, Any]:
    """Runs on a Dask worker: analyses one image in an isolated process, returns the outcome
    as JSON-able data (no framework objects cross the network)."""
    from distributed import get_worker

    worker = get_worker()
    runner: IsolatedWorker | None = getattr(_worker_local, "runner", None)
    if runner is None:
        runner = IsolatedWorker(worker.address, tasks_per_child)
        _worker_local.runner = runner
    task = ImageTask.from_json(task_json)

    def on_stage(stage: str) -> None:
        worker.log_event(TOPIC, {"image": task.image, "stage": stage, "worker": worker.address})

    outcome = runner.run(task, timeout, on_stage)
    outcome.worker = worker.address
    return outcome.to_json()


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise BackendUnavailable(
            "--scheduler needs dask.distributed: pip install 'kcbwait[batch-dask]'"
        ) from None
    return distributed


class DaskCluster:
    """Runs tasks on the cluster whose scheduler listens at ``address`` (tcp://HOST:PORT)."""

    def __init__(self, address: str, tasks_per_child: int = 0) -> None:
        self.address = address
        self.tasks_per_child = tasks_per_child
        self.description = f"Dask cluster at {address}"
        self._client: Any = None

    def start(self) -> None:
        """Connects to the scheduler (before the batch touches its output file)."""
        distributed = _import_distributed()
        try:
            # The connection timeout is Dask's own setting (distributed.comm.timeouts.connect,
            # or DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT), 30 s unless configured.
            self._client = distributed.Client(self.address, set_as_default=False)
        except (OSError, TimeoutError) as error:
            raise BackendUnavailable(
                f"cannot reach the Dask scheduler at {self.address}: {error}"
            ) from None
        workers = self._client.scheduler_info().get("workers", {})
        threads = sum(w.get("nthreads", 0) for w in workers.values())
        # No worker yet is not an error: tasks wait in the scheduler until workers join.
        self.description = (
            f"Dask cluster at {self.address}, {len(workers)} workers, {threads} threads"
        )

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def run(self, tasks: Sequence[ImageTask], timeout: float | None) -> Iterator[Event]:
        if self._client is None:
            self.start()
        client = self._client
        distributed = _import_distributed()
        events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        futures: dict[Any, ImageTask] = {}
        try:
            client.subscribe_topic(
                TOPIC,
                lambda event: events.put(Stage(**event[1])),  # event: (time, message)
            )
            batch = uuid.uuid4().hex[:12]
            for n, task in enumerate(tasks):
                future = client.submit(
                    analyse_on_worker,
                    task.to_json(),
                    timeout,
                    self.tasks_per_child,
                    key=f"kcbwait-batch-{batch}-{n}",
                    pure=False,
                )
                futures[future] = task

            def collect() -> None:
                pending = dict(futures)
                try:
                    for future in distributed.as_completed(list(futures), loop=client.loop):
                        task = pending.pop(future)
                        events.put(Done(task.image, _outcome(future)))
                except Exception as error:  # noqa: BLE001 - the cluster went away mid-batch
                    # Images without a result are left out of the output (no record), so that
                    # --resume runs them again once the cluster is back.
                    events.put(BackendFailure(f"{type(error).__name__}: {error}"))
                finally:
                    events.put(None)

            threading.Thread(target=collect, name="dask-collect", daemon=True).start()
            while (event := events.get()) is not None:
                yield event
        finally:
            # Stopping early (Ctrl-C): queued and running tasks are cancelled; an analysis
            # already running on a worker ends by its own timeout.
            if futures:
                client.cancel(list(futures))
            try:
                client.unsubscribe_topic(TOPIC)
            finally:
                self.close()


def _outcome(future: Any) -> records.ImageOutcome:
    """A finished future's outcome; a task Dask itself gave up on (its worker died
    repeatedly: ``KilledWorker``) or that raised becomes a ``crashed`` outcome."""
    try:
        return records.ImageOutcome.from_json(future.result())
    except Exception as error:  # noqa: BLE001 - whatever went wrong, it is this image's status
        return records.ImageOutcome.failure(
            records.CRASHED, f"Dask task failed: {type(error).__name__}: {error}"
        )
