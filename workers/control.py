"""How a worker steers the job it runs: stage reports, cancellation, and Ray runs it can stop.

* :class:`JobControl` is what the pipeline and the worker's heartbeat thread share in the
  worker process: the stage, progress, the cancel request and the loss of the lease.
* :class:`RunControl` is a Ray actor, one per job attempt, that the job's Ray processes poll:
  the training loop stops after the current step when it says *stop* (writing a final
  checkpoint) and at once when it says *abort* (a lost lease: the attempt must write nothing
  more), a search ends when it says either, and a training loop that finds the job's inputs
  at fault reports it there, and rank 0 reports how far it has trained (epochs, fractions
  within an epoch included) for the heartbeat's progress. It also keeps what reserves the
  job's CPUs: the placement groups of its search's trials (made by Tune) and the Ray Train
  controllers of its training runs (which make the runs' placement groups), so that
  :func:`release_placement_groups` frees whatever a killed or stopped run leaves behind.
* :func:`run_on_ray` runs a function as a Ray task that the worker owns and can kill: a
  cancelled run gets ``grace_s`` seconds to stop on its own, then the task is force-cancelled,
  which ends everything it started (Tune, the Train controller and its workers, Ray Data
  actors) because they are owned by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

from service.models import JobStage
from workers.cluster import (
    head_node_resource,
    placement_group_of,
    release_orphaned_placement_groups,
    reserved_placement_group_records,
)
from workers.errors import JobCancelled, JobInputError

__all__ = [
    "ABORT",
    "RUN",
    "STOP",
    "JobControl",
    "RunControl",
    "RunInputFailure",
    "RunKilled",
    "release_placement_groups",
    "run_control",
    "run_control_name",
    "run_on_ray",
]

log = logging.getLogger("bird.worker")

RUN, STOP, ABORT = 0, 1, 2  # what RunControl.mode() answers


@dataclass
class JobControl:
    """What the pipeline and the runner share while a job runs (in the worker process)."""

    job_id: int = 0
    attempt: int | None = None  # the claim's attempt number: every write is fenced with it
    stage: JobStage | None = None
    progress: float = 0.0
    cancel: threading.Event = field(default_factory=threading.Event)
    lease_lost: threading.Event = field(default_factory=threading.Event)
    run_control: str | None = None  # the RunControl actor's name
    changed: threading.Event = field(default_factory=threading.Event)  # report now, not later

    def stopping(self) -> bool:
        """Whether the job must stop (cancelled, or the lease was lost)."""
        return self.cancel.is_set() or self.lease_lost.is_set()

    def check(self) -> None:
        """Raise :class:`JobCancelled` if the job must stop."""
        if self.stopping():
            raise JobCancelled()

    def enter(self, stage: JobStage, progress: float) -> None:
        """Move to ``stage``; raise :class:`JobCancelled` if a cancel arrived meanwhile."""
        self.check()
        self.stage = stage
        self.progress = max(self.progress, progress)
        self.changed.set()


@ray.remote(num_cpus=0)
class RunControl:
    """Stop / abort requests and the placement groups of one job attempt (see module doc)."""

    def __init__(self) -> None:
        self._mode = RUN
        self._input_error: tuple[str, str] | None = None
        self._epochs: dict[int | None, float] = {}
        self._groups: list[tuple[str, int | None, PlacementGroup]] = []
        self._controllers: list[tuple[int | None, str, Any]] = []

    def stop(self) -> None:
        """Ask training to stop after the current step (final checkpoint) and a search to end."""
        self._mode = max(self._mode, STOP)

    def abort(self) -> None:
        """Ask every run to end at once without writing anything more."""
        self._mode = ABORT

    def mode(self) -> int:
        """:data:`RUN`, :data:`STOP` or :data:`ABORT`."""
        return self._mode

    def is_set(self) -> bool:
        """Whether a stop (or an abort) was asked for."""
        return self._mode != RUN

    def report_input_error(self, message: str, report: str = "") -> None:
        """A run found the job's inputs at fault: a one-line ``message`` and the traceback
        where it did (``report``); the first report is kept."""
        if self._input_error is None:
            self._input_error = (message, report)

    def input_error(self) -> tuple[str, str] | None:
        """The first input error a run reported (message, traceback), if any."""
        return self._input_error

    def report_epochs(self, trial: int | None, epochs: float) -> None:
        """Rank 0 of a run (of ``trial``, None outside a search) has trained ``epochs`` epochs,
        a fraction of the current one included; never goes back (a restored run repeats)."""
        self._epochs[trial] = max(self._epochs.get(trial, 0.0), float(epochs))

    def epochs_trained(self) -> float:
        """The epochs trained so far, summed over a search's trials."""
        return sum(self._epochs.values())

    def register(self, kind: str, trial: int | None, group: PlacementGroup) -> None:
        """Remember a placement group of the job (``kind``: ``trial``, a Tune trial's)."""
        self._groups.append((kind, trial, group))

    def register_controller(self, trial: int | None, actor_id: str, controller: Any) -> None:
        """Remember a Ray Train controller of the job (of ``trial``; its actor id, hex, and
        handle), registered before it reserves anything: the placement groups it makes are
        the job's."""
        self._controllers.append((trial, actor_id, controller))

    def controllers(self, trial: int | None = None) -> list[tuple[str, Any]]:
        """(actor id, handle) of the registered Train controllers (of ``trial``)."""
        return [(a, c) for t, a, c in self._controllers if trial is None or t == trial]

    def placement_groups(
        self, kind: str | None = None, trial: int | None = None
    ) -> list[PlacementGroup]:
        """The placement groups registered (of ``kind``, of ``trial``), oldest first."""
        return [
            group
            for k, t, group in self._groups
            if (kind is None or k == kind) and (trial is None or t == trial)
        ]


def run_control_name(database_url: str, job_id: int) -> str:
    """The name of job ``job_id``'s RunControl actor (the database keeps deployments sharing
    a Ray cluster apart). The same for every attempt: a search that a new attempt restores
    finds the new attempt's control under the name its saved state holds."""
    deployment = hashlib.sha256(database_url.encode()).hexdigest()[:8]
    return f"bird-{deployment}-job-{job_id}"


def run_control(name: str, *, timeout_s: float = 30) -> Any:
    """A fresh RunControl actor named ``name``, owned by the calling process.

    An actor left under that name by an earlier attempt (a worker that lost the lease and still
    runs) is killed first: its runs, which poll it, take its disappearance for an abort.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            old = ray.get_actor(name)
        except ValueError:
            old = None
        if old is not None:
            ray.kill(old, no_restart=True)
        try:
            actor = RunControl.options(  # type: ignore[attr-defined]
                name=name, resources=head_node_resource()
            ).remote()
            ray.get(actor.mode.remote())
            return actor
        except ValueError:  # the killed actor's name is not free yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def release_placement_groups(
    control: Any, kind: str | None = None, trial: int | None = None, *, wait_s: float = 10
) -> int:
    """End the job's runs' leftovers; return how many placement groups were still reserved.

    Called once the job's runs are over (or killed). The registered placement groups (of
    ``kind``, of ``trial``) are removed; unless ``kind`` is given, the registered Train
    controllers (of ``trial``) are killed too, and every placement group one of them made is
    removed. Ray removes a placement group that an actor made only when the actor *and* its job
    have ended, and the job here is the worker process, which outlives every run: a controller
    that Tune's stop of its trial ended while it was starting its workers (before Ray Train's
    own clean-up knew of its group) left its group reserved until the worker exited. A
    controller also outlives a run that ended well (the process that ran the trainer keeps a
    handle to it), idle but a process of its own. Each is waited for, up to ``wait_s`` seconds
    in all, so that none makes a group after the look for its groups.
    """
    try:
        groups = ray.get(control.placement_groups.remote(kind, trial), timeout=10)
        controllers = ray.get(control.controllers.remote(trial), timeout=10) if kind is None else []
    except Exception:  # the control is gone: nothing to release from here
        log.debug("no placement groups to release", exc_info=True)
        return 0
    if controllers:
        for _, controller in controllers:
            with contextlib.suppress(Exception):  # ended already
                ray.kill(controller, no_restart=True)
        actor_ids = [actor_id for actor_id, _ in controllers]
        try:
            _wait_ended(actor_ids, wait_s)
            groups = groups + _placement_groups_made_by(set(actor_ids))
        except Exception:  # the GCS did not answer: the registered groups are still removed
            log.warning("could not look up the Train controllers' placement groups", exc_info=True)
    released = 0
    for group in groups:
        try:
            if placement_group_table(group).get("state") in (None, "REMOVED"):
                continue
            remove_placement_group(group)
            released += 1
        except Exception:  # removed meanwhile, or its node is gone
            log.debug("placement group %s already gone", group.id, exc_info=True)
    return released


def _wait_ended(actor_ids: list[str], timeout_s: float) -> None:
    """Wait until the actors are dead (GCS actor table), at most ``timeout_s`` seconds."""
    from ray._private.state import state

    deadline = time.monotonic() + timeout_s
    living = list(actor_ids)
    while living:
        living = [a for a in living if state.actor_table(a).get("State", "DEAD") != "DEAD"]
        if not living:
            return
        if time.monotonic() > deadline:
            log.warning("Train controllers %s still alive after a kill", living)
            return
        time.sleep(0.1)


def _placement_groups_made_by(actor_ids: set[str]) -> list[PlacementGroup]:
    """The placement groups not removed that one of ``actor_ids`` (hex) made."""
    return [
        placement_group_of(record)
        for record in reserved_placement_group_records()
        if record.creator_actor_id.hex() in actor_ids
    ]


class RunKilled(Exception):
    """The worker killed the job's Ray run (a cancel past its grace, or a lost lease)."""


class RunInputFailure(JobInputError):
    """A Ray run reported an input error; the run was killed. ``report`` is the traceback
    where the run found it (for the job's log)."""

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.report = report


@ray.remote(num_cpus=0, max_retries=0)
def _drive(function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return function(*args, **kwargs)


def run_on_ray(
    function: Callable[..., Any],
    *args: Any,
    control: JobControl,
    grace_s: float,
    name: str,
    poll_s: float = 0.25,
    **kwargs: Any,
) -> Any:
    """``function(*args, **kwargs)`` in a Ray task on the head node, stoppable by the worker.

    Returns what the function returns and raises what it raises (wrapped by Ray). When the job
    is cancelled, the run has ``grace_s`` seconds to end on its own (the RunControl told it to
    stop), then it is killed and :class:`JobCancelled` is raised; when the lease is lost it is
    killed at once (:class:`RunKilled`). A training loop's report of an input error kills the
    run at once too (:class:`RunInputFailure`, a :class:`~workers.errors.JobInputError`).
    """
    handle = ray.get_actor(control.run_control) if control.run_control else None
    ref = _drive.options(resources=head_node_resource(), name=name).remote(function, args, kwargs)
    stop_seen: float | None = None
    next_check = 0.0
    while True:
        ready, _ = ray.wait([ref], timeout=poll_s)
        if ready:
            return ray.get(ref)
        if control.lease_lost.is_set():
            _kill(ref, handle)
            raise RunKilled("the worker lost the job's lease")
        if control.cancel.is_set():
            stop_seen = stop_seen or time.monotonic()
            if time.monotonic() - stop_seen >= grace_s:
                log.info(
                    "job %s: %s did not stop within %g s; killing it",
                    control.job_id,
                    name,
                    grace_s,
                )
                _kill(ref, handle)
                raise JobCancelled()
        if handle is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + 1.0
            reported = ray.get(handle.input_error.remote())
            if reported is not None:
                _kill(ref, handle)
                raise RunInputFailure(*reported)


def _kill(ref: Any, control: Any, timeout_s: float = 30) -> None:
    """Force-cancel the task (and what it owns), wait for it to end, release its groups."""
    ray.cancel(ref, force=True, recursive=True)
    # TaskCancelledError, WorkerCrashedError, or the run's own error: it ended either way.
    with contextlib.suppress(Exception):
        ray.get(ref, timeout=timeout_s)
    if control is not None:
        release_placement_groups(control)
    # The safety net for what the registration above cannot cover: a controller killed before
    # its registration reached the RunControl may have reserved a group already. Its maker is
    # dead by now (it was owned by the task), unless Ray has yet to record that: then the next
    # job's wait for room releases it.
    with contextlib.suppress(Exception):
        release_orphaned_placement_groups()
