"""What an execution backend (local pool, Dask cluster) promises the command line.

A backend takes the batch's tasks and yields events as they happen: a :class:`Stage` when an
image enters a new stage on some worker, a :class:`Done` once per task with its outcome
(failures included: a backend never raises because of an image).  Only when the backend
itself fails (a cluster gone) does it yield a :class:`BackendFailure` and stop; the tasks
without a ``Done`` then have no record, so that ``--resume`` runs them later.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from kcbwait_batch.records import ImageOutcome
from kcbwait_batch.tasks import ImageTask


@dataclass(frozen=True)
class Stage:
    image: str
    stage: str
    worker: str


@dataclass(frozen=True)
class Done:
    image: str
    outcome: ImageOutcome


@dataclass(frozen=True)
class BackendFailure:
    """The backend lost its workers mid-batch; the images it has not reported stay unrun."""

    message: str


class BackendUnavailable(Exception):
    """The backend cannot start (e.g. no scheduler at the given address)."""


Event = Stage | Done | BackendFailure


class Backend(Protocol):
    """Runs tasks somewhere; ``run`` is a generator, closing it stops the work."""

    description: str

    def start(self) -> None:
        """Acquires what the backend needs (a cluster connection); BackendUnavailable if not."""

    def run(self, tasks: Sequence[ImageTask], timeout: float | None) -> Iterator[Event]: ...

    def close(self) -> None:
        """Releases what ``start`` acquired, if ``run`` did not."""
