"""The worker process: claim jobs from the SQL queue and run each on Ray, with heartbeats.

Several workers (threads, processes, machines) can run against one database and one Ray
cluster: a claim is one SQL statement, so each job goes to exactly one worker. While a job runs,
a heartbeat thread renews its lease every ``heartbeat_s`` and reports stage and progress; the
heartbeat's answer carries cancellation, which is passed to the training loop through a
``StopFlag`` actor (training stops within a step and writes a final checkpoint). A worker that
dies stops heartbeating; once the lease expires the reaper (run by every worker before it
claims) queues the job again and the next attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from typing import Any

import ray
from pydantic import ValidationError
from sqlalchemy import Engine, func, select

from service import queue
from service.db import make_engine, session_factory
from service.models import Metric
from service.settings import Settings
from service.spec import JobSpec
from service.storage import ObjectStore, store_from_settings
from workers.pipeline import JobCancelled, JobControl, JobInputError, run_job
from workers.train import stop_flag

__all__ = ["Worker", "connect_ray"]

log = logging.getLogger("bird.worker")


def connect_ray(settings: Settings) -> None:
    """Join the Ray cluster of ``settings.ray_address``, or start a local one (embedded mode)."""
    if ray.is_initialized():
        return
    # A local cluster gets Ray's dashboard: Ray Train's clean-up of the placement groups of a
    # trial that Tune stopped asks the State API it serves.
    ray.init(
        # Without an address, a cluster of our own: "auto" would join whatever Ray happens to
        # run on this machine.
        address=settings.ray_address or "local",
        log_to_driver=settings.log_level == "debug",
        configure_logging=False,
    )


class _Heartbeat(threading.Thread):
    """Renews the lease, reports stage/progress, and turns a cancel request into a stop."""

    def __init__(self, worker: Worker, job: Any, control: JobControl, flag: Any) -> None:
        super().__init__(name=f"heartbeat-{job.id}", daemon=True)
        self.worker, self.job, self.control, self.flag = worker, job, control, flag
        self.done = threading.Event()
        self.lease_lost = threading.Event()
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
        return 0.1 + 0.8 * min(1.0, (done or 0) / max(self.epochs_total, 1))

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
            )
        if cancel and not self.control.cancel.is_set():
            log.info("job %s: cancellation requested", self.job.id)
            self.control.cancel.set()
            ray.get(self.flag.set.remote())

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
                log.warning("job %s: lease lost, stopping", self.job.id)
                self.lease_lost.set()
                self.control.cancel.set()
                ray.get(self.flag.set.remote())
                return
            except Exception:  # a database hiccup: the next beat tries again
                log.exception("job %s: heartbeat failed", self.job.id)


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
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.engine = engine or make_engine(settings.resolved_database_url)
        self.sessions = session_factory(self.engine)
        self.store = store or store_from_settings(settings)
        self.poll_s = poll_s

    def run_forever(self, stop: threading.Event | None = None, max_jobs: int | None = None) -> int:
        """Claim and run jobs until ``stop`` is set (or ``max_jobs`` ran); return how many ran."""
        stop = stop or threading.Event()
        connect_ray(self.settings)
        ran = 0
        while not stop.is_set() and (max_jobs is None or ran < max_jobs):
            if self.run_one():
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

    def _log(self, job_id: int, level: str, message: str) -> None:
        try:
            with self.sessions() as session:
                queue.append_log(session, job_id, level, message)
        except Exception:
            log.exception("job %s: could not write a log line", job_id)

    def _run(self, job: Any) -> None:
        try:
            spec = JobSpec.model_validate(job.spec)
        except ValidationError as error:
            self._end(job, "fail", f"the stored spec is not valid: {error}")
            return
        connect_ray(self.settings)
        flag_name = f"bird-stop-{job.id}-{uuid.uuid4().hex[:8]}"
        flag = stop_flag(flag_name)
        control = JobControl(stop_flag_name=flag_name)
        heartbeat = _Heartbeat(self, job, control, flag)
        heartbeat.start()
        self._log(job.id, "info", f"attempt {job.attempts} on {self.worker_id}")
        outcome: tuple[str, str] = ("finish", "")
        started = time.monotonic()
        try:
            result = run_job(
                job.id,
                spec,
                settings=self.settings,
                store=self.store,
                control=control,
                tenant_id=job.tenant_id,
            )
            if result.cancelled:
                outcome = ("cancel", "cancelled during training")
            else:
                auroc = (result.test or {}).get("auroc")
                outcome = ("finish", f"test AUROC {auroc}")
        except JobCancelled:
            outcome = ("cancel", "cancelled between stages")
        except JobInputError as error:
            outcome = ("fail", str(error))
        except Exception as error:
            detail = f"{type(error).__name__}: {error}"
            self._log(job.id, "error", traceback.format_exc(limit=20))
            if job.attempts >= job.max_attempts:
                outcome = ("fail", f"attempt {job.attempts} of {job.max_attempts} failed: {detail}")
            else:
                outcome = ("retry", detail)
                # Back off before giving the job back, so that a passing failure (a Ray node
                # restarting) does not use up every attempt within seconds. The lease is still
                # ours: the heartbeat keeps renewing it while we wait.
                control.cancel.wait(min(2.0**job.attempts, self.settings.lease_s / 2))
        finally:
            heartbeat.done.set()
            control.changed.set()  # wake it to exit
            heartbeat.join(timeout=30)
            try:
                ray.kill(flag)
            except Exception:
                log.debug("stop flag %s already gone", flag_name)
        if heartbeat.lease_lost.is_set():
            return  # another worker owns the job now
        if control.cancel.is_set() and outcome[0] == "retry":
            outcome = ("cancel", "cancelled")
        seconds = time.monotonic() - started
        self._log(job.id, "info", f"{outcome[0]} after {seconds:.1f} s: {outcome[1]}")
        self._end(job, *outcome)

    def _end(self, job: Any, how: str, message: str) -> None:
        with self.sessions() as session:
            try:
                if how == "finish":
                    queue.heartbeat(
                        session, job.id, self.worker_id, self.settings.lease_s, progress=1.0
                    )
                    queue.finish(session, job.id, self.worker_id)
                elif how == "cancel":
                    queue.finish_cancelled(session, job.id, self.worker_id)
                elif how == "retry":
                    queue.retry(session, job.id, self.worker_id, message)
                else:
                    queue.fail(session, job.id, self.worker_id, message)
            except queue.LeaseLost:
                log.warning("job %s: lease lost before %s", job.id, how)
        log.info("job %s: %s (%s)", job.id, how, message)
