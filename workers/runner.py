"""The worker process: claim jobs from the SQL queue and run each on Ray, with heartbeats.

Several workers (threads, processes, machines) can run against one database and one Ray
cluster: a claim is one SQL statement, so each job goes to exactly one worker. While a job runs,
a heartbeat thread renews its lease every ``heartbeat_s`` and reports stage and progress; the
heartbeat's answer carries cancellation, which reaches the job's Ray runs through its
``RunControl`` actor (training stops within a step and writes a final checkpoint; a run that
does not stop within ``stop_grace_s`` is killed). A worker whose lease was taken away kills its
Ray run at once and reports nothing; the database refuses whatever that attempt still tries to
write (fencing on the attempt number). A worker that dies stops heartbeating; once the lease
expires the reaper (run by every worker before it claims) queues the job again and the next
attempt resumes from the last checkpoint.

What a tenant reads of a failure (the job's ``error``, its events and log) is redacted
(:mod:`service.redaction`): one line in ``error``, the traceback in the job's log, no internal
endpoint, host, bucket or server path; the server's own log keeps everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import ray
from pydantic import ValidationError
from sqlalchemy import Engine, func, select

from bird_core.metrics import predicts_one_class
from bird_datasets.location import tenant_prefix
from service import queue
from service.db import make_engine, session_factory
from service.models import Metric
from service.redaction import Redactor, error_report, error_summary
from service.settings import Settings
from service.spec import JobSpec
from service.storage import ObjectStore, store_from_settings
from workers.cluster import NoRoom, connect_ray
from workers.control import (
    JobControl,
    release_placement_groups,
    run_control,
    run_control_name,
)
from workers.errors import JobCancelled, input_error_in, root_cause
from workers.pipeline import run_job

__all__ = ["Worker", "connect_ray", "finish_summary"]

log = logging.getLogger("bird.worker")


class _Heartbeat(threading.Thread):
    """Renews the lease, reports stage/progress, and turns a cancel request into a stop (and a
    lost lease into an abort)."""

    def __init__(self, worker: Worker, job: Any, control: JobControl, run: Any) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.worker, self.job, self.control, self.run_control = worker, job, control, run
        self.done = threading.Event()
        self.epochs_total = self._planned_epochs()

    def _planned_epochs(self) -> int:
        spec = self.job.spec
        epochs = int(spec.get("training", {}).get("epochs", 1))
        search = spec.get("search") or {}
        return epochs * int(search.get("num_samples", 1)) if search else epochs

    def _training_progress(self, session: Any) -> float | None:
        if self.control.stage is None or self.control.stage.value not in ("training", "tuning"):
            return None
        done = session.scalar(
            select(func.count())
            .select_from(Metric)
            .where(
                Metric.job_id == self.job.id,
                Metric.split == "val",
                Metric.name == "objective",
            )
        )
        # The epochs reported (whole ones) and, between reports, how far the run's rank 0 got
        # within the current epoch (its RunControl), so the bar moves during an epoch.
        trained = float(done or 0)
        if self.run_control is not None:
            with contextlib.suppress(Exception):  # a control gone or slow: epochs suffice
                trained = max(
                    trained, float(ray.get(self.run_control.epochs_trained.remote(), timeout=5))
                )
        return 0.1 + 0.8 * min(1.0, trained / max(self.epochs_total, 1))

    def _tell_run(self, method: str) -> None:
        with contextlib.suppress(Exception):  # the control may be gone already
            ray.get(getattr(self.run_control, method).remote(), timeout=10)

    def beat(self) -> None:
        """One heartbeat (also called once right after the job ends its stage changes)."""
        with self.worker.sessions() as session:
            trained = self._training_progress(session)
            if trained is not None:
                self.control.progress = max(self.control.progress, trained)
            cancel = queue.heartbeat(
                session,
                self.job.id,
                self.worker.worker_id,
                self.worker.settings.lease_s,
                progress=min(self.control.progress, 1.0),
                stage=self.control.stage,
                attempt=self.control.attempt,
            )
        if cancel and not self.control.cancel.is_set():
            log.info("job %s: cancellation requested", self.job.id)
            self.control.cancel.set()
            self._tell_run("stop")

    def run(self) -> None:
        while True:
            # A stage change is reported at once; otherwise every heartbeat_s.
            self.control.changed.wait(self.worker.settings.heartbeat_s)
            self.control.changed.clear()
            if self.done.is_set():
                return
            try:
                self.beat()
            except queue.LeaseLost:
                # The reaper gave the job away: stop at once and report nothing.
                log.warning("job %s: lease lost, stopping its Ray run", self.job.id)
                self.control.lease_lost.set()
                self._tell_run("abort")
                return
            except Exception:  # a database hiccup: the next beat tries again
                log.exception("job %s: heartbeat failed", self.job.id)


def finish_summary(test: dict[str, Any] | None) -> str:
    """The message of a job's finish (its event, its last log line): the test AUROC, rounded
    as everywhere a user reads it (it was printed with every digit of the float), and a warning
    when the student predicts a single class."""
    auroc = (test or {}).get("auroc")
    if not isinstance(auroc, int | float) or isinstance(auroc, bool):
        return "no test AUROC"
    summary = f"test AUROC {auroc:.2f}"
    if predicts_one_class(test or {}):
        summary += (
            "; the student predicts one class for every test row, so its Δ-DEO says nothing"
            " about fairness (train longer, or on more data)"
        )
    return summary


class Worker:
    """Claims and runs jobs until told to stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_id: str | None = None,
        engine: Engine | None = None,
        store: ObjectStore | None = None,
        poll_s: float = 1.0,
    ) -> None:
        self.settings = settings
        # Opaque: the id is shown to tenants (job events and logs), the host is not.
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:12]}"
        log.info("worker %s is pid %s on %s", self.worker_id, os.getpid(), socket.gethostname())
        self.engine = engine or make_engine(settings.resolved_database_url)
        self.sessions = session_factory(self.engine)
        self.store = store or store_from_settings(settings)
        self.poll_s = poll_s
        self.redact = Redactor.for_deployment(settings)

    def run_forever(self, stop: threading.Event | None = None, max_jobs: int | None = None) -> int:
        """Claim and run jobs until ``stop`` is set (or ``max_jobs`` ran); return how many ran."""
        stop = stop or threading.Event()
        connect_ray(self.settings)
        ran = 0
        while not stop.is_set() and (max_jobs is None or ran < max_jobs):
            try:
                claimed = self.run_one()
            except Exception:
                # The database or Ray away for a moment: this worker must not die of it (its
                # job, if any, is reaped once its lease expires).
                log.exception("worker %s: claiming or running a job failed", self.worker_id)
                claimed = False
            if claimed:
                ran += 1
            else:
                stop.wait(self.poll_s)
        return ran

    def run_one(self) -> bool:
        """Reap expired leases, claim one job and run it; False when nothing was queued."""
        with self.sessions() as session:
            for job_id in queue.reap(session):
                log.info("job %s: lease expired, requeued or failed", job_id)
        job = queue.claim(
            self.engine,
            self.worker_id,
            self.settings.lease_s,
            max_running_per_tenant=self.settings.max_running_per_tenant,
        )
        if job is None:
            return False
        log.info("job %s: claimed (attempt %s of %s)", job.id, job.attempts, job.max_attempts)
        self._run(job)
        return True

    def _redactor(self, job: Any) -> Redactor:
        """The redactor of ``job``'s tenant-visible text: the deployment's, and the tenant's
        own space written away (its names read as they are in its specs)."""
        tenant_id = getattr(job, "tenant_id", None)
        if tenant_id is None:
            return self.redact
        own = tenant_prefix(tenant_id)
        return self.redact.stripping(self.store.uri(own).rstrip("/") + "/", own + "/")

    def _log(self, job: Any, level: str, message: str) -> None:
        """A line in the job's log (tenant-visible: redacted; fenced on the attempt)."""
        try:
            with self.sessions() as session:
                queue.append_log(
                    session, job.id, level, self._redactor(job)(message), attempt=job.attempts
                )
        except queue.StaleAttempt:
            log.info("job %s: attempt %s is stale; log line dropped", job.id, job.attempts)
        except Exception:
            log.exception("job %s: could not write a log line", job.id)

    def _run(self, job: Any) -> None:
        try:
            spec = JobSpec.model_validate(job.spec)
        except ValidationError as error:
            message = error_summary(error, self._redactor(job), with_type=False)
            self._end(job, "fail", f"the stored spec is not valid: {message}")
            return
        name = run_control_name(self.settings.resolved_database_url, job.id)
        try:
            connect_ray(self.settings)
            handle = run_control(name)
        except Exception as error:  # Ray unreachable: the deployment's fault, not the job's
            log.exception("job %s: cannot reach Ray", job.id)
            detail = error_summary(error, self._redactor(job))
            how = "retry" if job.attempts < job.max_attempts else "fail"
            self._end(job, how, detail)
            return
        control = JobControl(job_id=job.id, attempt=job.attempts, run_control=name)
        heartbeat = _Heartbeat(self, job, control, handle)
        heartbeat.start()
        self._log(job, "info", f"attempt {job.attempts} on worker {self.worker_id}")
        outcome: tuple[str, str] = ("finish", "")
        started = time.monotonic()
        try:
            result = run_job(
                job.id,
                spec,
                settings=self.settings,
                store=self.store,
                control=control,
                log=lambda level, message: self._log(job, level, message),
                tenant_id=job.tenant_id,
            )
            if result.cancelled:
                # The stage the cancel stopped (training, or tuning for a search).
                outcome = ("cancel", f"cancelled during {control.stage or 'the run'}")
            else:
                outcome = ("finish", finish_summary(result.test))
        except JobCancelled:
            outcome = ("cancel", "cancelled")
        except NoRoom as error:
            # The wait for room is bounded: the job ends here rather than holding a worker.
            outcome = ("fail", error_summary(error, self._redactor(job), with_type=False))
        except Exception as error:
            outcome = self._failure(job, control, error)
        finally:
            heartbeat.done.set()
            control.changed.set()  # wake it to exit
            heartbeat.join(timeout=30)
            # Whatever a killed, stopped or crashed run left reserved; then the control itself.
            released = release_placement_groups(handle)
            if released:
                log.warning(
                    "job %s: removed %d placement group(s) its runs left reserved", job.id, released
                )
            with contextlib.suppress(Exception):
                ray.kill(handle)
        if control.lease_lost.is_set():
            return  # another worker owns the job now
        if control.cancel.is_set() and outcome[0] in ("retry", "fail"):
            outcome = ("cancel", "cancelled")
        seconds = time.monotonic() - started
        self._log(job, "info", f"{outcome[0]} after {seconds:.1f} s: {outcome[1]}")
        self._end(job, *outcome)

    def _failure(self, job: Any, control: JobControl, error: Exception) -> tuple[str, str]:
        """The outcome of a job that raised: fail at once (its inputs are at fault, or no
        attempt is left) or retry. The traceback goes to the job's log, redacted, and to the
        server's log as it is, unless the job's inputs are at fault (one warning line then)."""
        if control.lease_lost.is_set():
            log.info(
                "job %s: attempt %s ended after losing its lease: %r", job.id, job.attempts, error
            )
            return ("retry", "")
        cause = input_error_in(error)
        remote = getattr(error, "report", "")  # where inside the Ray run the error was found
        if cause is None:
            log.error("job %s: attempt %s failed", job.id, job.attempts, exc_info=error)
            if remote:
                log.error("job %s: in its Ray run:\n%s", job.id, remote)
        else:
            # The job's own inputs are at fault, not the server: one line in the server's log;
            # the traceback still goes to the job's log for whoever submitted it.
            log.warning("job %s: attempt %s failed on its inputs: %s", job.id, job.attempts, cause)
        self._log(job, "error", error_report(error, self._redactor(job)))
        if remote:
            self._log(job, "error", f"in the Ray run:\n{remote}")
        if cause is not None:
            return ("fail", error_summary(cause, self._redactor(job), with_type=False))
        detail = error_summary(root_cause(error), self._redactor(job))
        if job.attempts >= job.max_attempts:
            return ("fail", f"attempt {job.attempts} of {job.max_attempts} failed: {detail}")
        # Back off before giving the job back, so that a passing failure (a Ray node
        # restarting) does not use up every attempt within seconds. The lease is still ours:
        # the heartbeat keeps renewing it while we wait.
        control.cancel.wait(min(2.0**job.attempts, self.settings.lease_s / 2))
        return ("retry", detail)

    def _end(self, job: Any, how: str, message: str) -> None:
        attempt = job.attempts
        with self.sessions() as session:
            try:
                if how == "finish":
                    queue.heartbeat(
                        session,
                        job.id,
                        self.worker_id,
                        self.settings.lease_s,
                        progress=1.0,
                        attempt=attempt,
                    )
                    queue.finish(session, job.id, self.worker_id, attempt=attempt)
                elif how == "cancel":
                    queue.finish_cancelled(session, job.id, self.worker_id, attempt=attempt)
                elif how == "retry":
                    queue.retry(session, job.id, self.worker_id, message, attempt=attempt)
                else:
                    queue.fail(session, job.id, self.worker_id, message, attempt=attempt)
            except queue.LeaseLost:
                log.warning("job %s: lease lost before %s", job.id, how)
        log.info("job %s: %s (%s)", job.id, how, message)
