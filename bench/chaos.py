"""Chaos matrix: kill the worker and cancel the job in every stage, lose a Ray node, corrupt
the data, ask for too much; every job must reach a terminal state and no worker stay wedged.

The stack is built here, as a deployment runs it on one machine: a two-node Ray cluster
(``ray start --head`` with 2 CPUs and a second ``ray start`` node with 2 CPUs, both with their
dashboard/State API), a SQLite database and a local object store under a temp dir, and
``bird worker`` processes (``BIRD_LEASE_S=5``, ``BIRD_HEARTBEAT_S=1``) that the cases SIGKILL.
Jobs are submitted and cancelled through ``service.queue`` (what the API calls). The dataset is
a small FashionMNIST-S; the first case computes its teacher features, the rest reuse them
(except where a case needs a fresh precompute).

For each case the table shows the fault, the stage it hit, the terminal state, the attempts,
the seconds from the fault (or the cancel) to the terminal state, and the checks that held:

* ``metrics``: no metric row twice (same trial, epoch, split, name); for a succeeded job every
  epoch of every run (trial) is there once, 1..n;
* ``cluster``: afterwards every CPU of the cluster is free again (no placement group, actor or
  task of the job left holding one);
* ``worker``: the surviving worker claims the next case's job (checked by the next case).

When ``cluster`` fails, the row's ``reserved`` names what still holds CPUs (placement groups
not removed, with their bundles and nodes; live actors and running tasks that hold a CPU or
a placement group), and the printed note sums it up.

The stated bounds (seconds): a cancel ends a job within ``heartbeat_s + stop_grace_s + 10``
(1 + 15 + 10 = 26 here) in the stages with a Ray run, ``heartbeat_s + 5`` in the others; a
killed worker's job is reaped after ``lease_s`` (5 s) and its next attempt then runs; a wait for
room fails after ``resource_wait_s``.

    python bench/chaos.py [--cases name,name] [--out bench/results/chaos.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from sqlalchemy import select

from bird_datasets.converters.fashion_mnist_s import prepare_fashion_mnist_s
from bird_datasets.fingerprint import dataset_fingerprint
from service import queue
from service.db import make_engine, session_factory, upgrade
from service.models import Job, JobLog, Metric, Tenant
from service.settings import Settings
from service.storage import LocalStore
from workers.features import MANIFEST_NAME, find_features

LEASE_S = 5
HEARTBEAT_S = 1
STOP_GRACE_S = 15
RESOURCE_WAIT_S = 60
CANCEL_BOUND_RAY_S = HEARTBEAT_S + STOP_GRACE_S + 10
CANCEL_BOUND_S = HEARTBEAT_S + 5
TERMINAL = {"succeeded", "failed", "cancelled"}
# Operator-published (read-only to tenants) datasets, as `shared/` names resolve.
DATASET = "shared/datasets/fm"
FRESH_DATASET = "shared/datasets/fm-fresh"  # features not cached: a precompute to interrupt
SIZES = {"train_size": 400, "test_size": 100, "val_fraction": 0.005}
TEACHER = {"image_size": 32, "probe_epochs": 3}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def spec(
    epochs: int = 2, dataset: str = DATASET, search: int | None = None, **extra: Any
) -> dict[str, Any]:
    """A small job; ``search``: that many trials of one option."""
    body: dict[str, Any] = {
        "dataset": {"uri": dataset},
        "teacher": TEACHER,
        "student": {"model": "small_cnn", "options": {"width": 8, "embed_dim": 32}},
        "method": {"name": "bird"},
        "training": {"epochs": epochs, "batch_size": 16},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }
    if search:
        body["search"] = {
            "space": {"phi_lr": {"kind": "loguniform", "low": 1.0, "high": 1000.0}},
            "num_samples": search,
            "max_concurrent_trials": 2,
            "grace_period": 1,
        }
    body.update(extra)
    return body


class RayNode:
    """One ``ray start --block`` node in a process group of its own."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        self.process = subprocess.Popen(
            [ray_cli, "start", "--block", "--disable-usage-stats", *args],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the node and everything it runs (a lost machine)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


class Stack:
    """The cluster, database, store and worker processes of the bench."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port, self.dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ray_env = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{self.dashboard}",
        }
        os.environ["RAY_AUTH_MODE"] = "disabled"
        self.head = RayNode(
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=2",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=true",
                f"--dashboard-port={self.dashboard}",
                "--dashboard-host=127.0.0.1",
            ],
            root / "head.log",
            self.ray_env,
        )
        self.node: RayNode | None = None
        self.store = LocalStore(root / "store")
        self.settings = Settings(
            data_dir=root,
            database_url=f"sqlite:///{root / 'bird.db'}",
            store_url=str(root / "store"),
            ray_address=self.address,
        )
        upgrade(self.settings.resolved_database_url)
        self.engine = make_engine(self.settings.resolved_database_url)
        self.sessions = session_factory(self.engine)
        with self.sessions() as session:
            tenant = Tenant(name="chaos")
            session.add(tenant)
            session.commit()
            self.tenant_id = tenant.id
        self.workers: list[subprocess.Popen] = []

    def connect(self) -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=self.address, log_to_driver=False, configure_logging=False)
                break
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def add_node(self) -> None:
        """The second node (2 CPUs); waits until the cluster has 4 CPUs."""
        self.node = RayNode(
            [f"--address={self.address}", "--num-cpus=2", "--node-ip-address=127.0.0.1"],
            self.root / "node.log",
            self.ray_env,
        )
        self.wait_cpus(4.0)

    def wait_cpus(self, total: float, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while ray.cluster_resources().get("CPU", 0.0) != total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster CPUs: {ray.cluster_resources()}")
            time.sleep(0.5)

    def worker(self, **settings: str) -> subprocess.Popen:
        """A `bird worker` process (its own process group, killable with its children)."""
        env = {
            **self.ray_env,
            "BIRD_DATABASE_URL": self.settings.resolved_database_url,
            "BIRD_STORE_URL": self.settings.resolved_store_url,
            "BIRD_RAY_ADDRESS": self.address,
            "BIRD_LEASE_S": str(LEASE_S),
            "BIRD_HEARTBEAT_S": str(HEARTBEAT_S),
            "BIRD_STOP_GRACE_S": str(STOP_GRACE_S),
            "BIRD_RESOURCE_WAIT_S": str(RESOURCE_WAIT_S),
            **settings,
        }
        bird = os.path.join(os.path.dirname(sys.executable), "bird")
        log = self.root / f"worker-{len(self.workers)}.log"
        process = subprocess.Popen(
            [bird, "worker"],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(process)
        return process

    def stop_worker(self, process: subprocess.Popen, kill: bool = False) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)

    def submit(self, body: dict[str, Any]) -> int:
        with self.sessions() as session:
            return queue.submit(session, self.tenant_id, body, max_attempts=3).id

    def cancel(self, job_id: int) -> None:
        with self.sessions() as session:
            queue.cancel(session, job_id, self.tenant_id)

    def job(self, job_id: int) -> Job:
        with self.sessions() as session:
            return queue.get_job(session, job_id)

    def logs(self, job_id: int) -> list[str]:
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(JobLog.message).where(JobLog.job_id == job_id).order_by(JobLog.id)
                )
            )

    def val_epochs(self, job_id: int) -> list[tuple[int | None, int | None]]:
        with self.sessions() as session:
            rows = session.execute(
                select(Metric.trial, Metric.epoch).where(
                    Metric.job_id == job_id, Metric.split == "val", Metric.name == "objective"
                )
            )
            return [(trial, epoch) for trial, epoch in rows]

    def stop(self) -> None:
        for process in self.workers:
            self.stop_worker(process, kill=True)
        with contextlib.suppress(Exception):
            ray.shutdown()
        if self.node is not None:
            self.node.stop()
        self.head.stop()
        self.engine.dispose()


@dataclass
class Row:
    """One line of the matrix."""

    case: str
    fault: str
    stage: str
    state: str = "-"
    attempts: int = 0
    seconds: float = 0.0
    bound_s: float | None = None
    metrics_ok: bool = False
    cluster_ok: bool = False
    note: str = ""
    error: str = ""
    checks: dict[str, bool] = field(default_factory=dict)
    reserved: dict[str, Any] = field(default_factory=dict)  # when cluster_ok is False


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_terminal(stack: Stack, job_id: int, timeout_s: float = 900) -> Job:
    return wait_for(
        lambda: (job := stack.job(job_id)).state.value in TERMINAL and job,
        timeout_s,
        f"job {job_id} to end",
    )


def wait_stage(stack: Stack, job_id: int, stage: str, timeout_s: float = 600) -> None:
    def reached() -> bool:
        job = stack.job(job_id)
        if job.state.value in TERMINAL:
            raise RuntimeError(f"job {job_id} ended ({job.state}) before stage {stage}")
        return job.stage is not None and job.stage.value == stage

    wait_for(reached, timeout_s, f"job {job_id} to reach {stage}")


def metrics_ok(stack: Stack, job_id: int, succeeded: bool) -> bool:
    """No metric row twice; a succeeded job has every epoch of every run once, from 1."""
    with stack.sessions() as session:
        rows = session.execute(
            select(Metric.trial, Metric.epoch, Metric.split, Metric.name).where(
                Metric.job_id == job_id
            )
        ).all()
    if any(n > 1 for n in Counter(tuple(row) for row in rows).values()):
        return False
    if not succeeded:
        return True
    runs: dict[int | None, list[int]] = {}
    for trial, epoch in stack.val_epochs(job_id):
        runs.setdefault(trial, []).append(int(epoch or 0))
    return bool(runs) and all(sorted(e) == list(range(1, len(e) + 1)) for e in runs.values())


def cluster_free(timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0.0) >= ray.cluster_resources().get("CPU", 0.0):
            return True
        time.sleep(0.3)
    return False


def reserved() -> dict[str, Any]:
    """What holds CPUs now: placement groups not removed, and live actors and running tasks
    that hold a CPU or run in a placement group (ids shortened; nodes as head/other)."""
    from ray.util.state import list_actors, list_placement_groups, list_tasks

    head = head_node_id()

    def node(node_id: str | None) -> str:
        return "-" if not node_id else ("head" if node_id == head else node_id[:8])

    def holds(resources: dict[str, float] | None, group: str | None) -> bool:
        return bool(group) or any(k.startswith("CPU") and v for k, v in (resources or {}).items())

    table = ray.util.placement_group_table()
    groups = [
        {
            "id": pg["placement_group_id"][:8],
            "name": pg["name"],
            "state": pg["state"],
            "strategy": pg["strategy"],
            "bundles": list(pg["bundles"].values()),
            "nodes": sorted({node(n) for n in pg["bundles_to_node_id"].values()}),
            "creator_job": info.creator_job_id,
        }
        for info in list_placement_groups(limit=1000, detail=True, raise_on_missing_output=False)
        if info.state != "REMOVED" and (pg := table.get(info.placement_group_id))
    ]
    actors = [
        {
            "class": a.class_name,
            "name": a.name,
            "node": node(a.node_id),
            "pid": a.pid,
            "job": a.job_id,
            "detached": a.is_detached,
            "resources": a.required_resources,
            "group": (a.placement_group_id or "")[:8],
        }
        for a in list_actors(
            filters=[("state", "=", "ALIVE")],
            limit=1000,
            detail=True,
            raise_on_missing_output=False,
        )
        if holds(a.required_resources, a.placement_group_id)
    ]
    tasks = [
        {
            "name": t.name,
            "state": t.state,
            "node": node(t.node_id),
            "pid": t.worker_pid,
            "job": t.job_id,
            "resources": t.required_resources,
            "group": (t.placement_group_id or "")[:8],
        }
        for t in list_tasks(
            filters=[("state", "!=", "FINISHED"), ("state", "!=", "FAILED")],
            limit=1000,
            detail=True,
            raise_on_missing_output=False,
        )
        if t.type == "NORMAL_TASK" and holds(t.required_resources, t.placement_group_id)
    ]
    free = {
        node(n): r.get("CPU", 0.0)
        for n, r in ray._private.state.available_resources_per_node().items()
    }
    return {"placement_groups": groups, "actors": actors, "tasks": tasks, "free_cpus": free}


def reserved_note(found: dict[str, Any]) -> str:
    """One line: the reserved groups, actors and tasks by name/class and node."""
    parts = [
        f"pg {g['name'] or g['id']} {g['state']} {g['bundles']}@{','.join(g['nodes'])}"
        for g in found.get("placement_groups", [])
    ]
    parts += [f"actor {a['class']}@{a['node']}" for a in found.get("actors", [])]
    parts += [f"task {t['name']} {t['state']}@{t['node']}" for t in found.get("tasks", [])]
    return (
        "reserved: " + ("; ".join(parts) or "nothing listed") + f"; free {found.get('free_cpus')}"
    )


@contextlib.contextmanager
def occupied(cpus: float, node_id: str | None = None) -> Iterator[Any]:
    """A placement group holding ``cpus`` CPUs (of one node, when given) until the block ends."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if node_id is None:
        # One CPU per bundle: the CPUs of several nodes add up.
        group = placement_group([{"CPU": 1.0}] * int(cpus))
        ray.get(group.ready(), timeout=120)
        try:
            yield group
        finally:
            with contextlib.suppress(Exception):
                remove_placement_group(group)
        return

    @ray.remote(num_cpus=cpus)
    class Hold:
        def ping(self) -> bool:
            return True

    holder = Hold.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    ).remote()
    ray.get(holder.ping.remote(), timeout=120)
    try:
        yield holder
    finally:
        ray.kill(holder)


def head_node_id() -> str:
    return next(
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and "node:__internal_head__" in n["Resources"]
    )


# -- the cases -------------------------------------------------------------------------------


class Bench:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.main = stack.worker()  # the worker that runs every case's job unless killed
        self.rows: list[Row] = []

    def run(self, name: str, fault: str, stage: str, action: Callable[[Row], int]) -> None:
        row = Row(case=name, fault=fault, stage=stage)
        print(f"... {name}", flush=True)
        try:
            job_id = action(row)
            job = self.stack.job(job_id)
            row.state, row.attempts = job.state.value, job.attempts
            row.error = (job.error or "")[:160]
            row.metrics_ok = metrics_ok(self.stack, job_id, job.state.value == "succeeded")
        except Exception as error:  # a case that broke is a row of the matrix too
            row.note = f"{type(error).__name__}: {error}"[:200]
        row.cluster_ok = cluster_free()
        if not row.cluster_ok:
            try:
                row.reserved = reserved()
                note = reserved_note(row.reserved)
            except Exception as error:  # the diagnosis must not end the bench
                note = f"reserved: not listed ({type(error).__name__}: {error})"
            row.note = f"{row.note}; {note}" if row.note else note
        self.rows.append(row)
        print(f"    {row.state} after {row.seconds:.1f} s {row.note}", flush=True)

    def timed_end(self, row: Row, job_id: int, started: float, bound_s: float | None) -> int:
        wait_terminal(self.stack, job_id)
        row.seconds = time.monotonic() - started
        row.bound_s = bound_s
        return job_id

    def ensure_main(self) -> None:
        if self.main.poll() is not None:
            self.main = self.stack.worker()

    # - baseline and cancels

    def baseline(self, row: Row) -> int:
        job_id = self.stack.submit(spec())
        return self.timed_end(row, job_id, time.monotonic(), None)

    def cancel_queued(self, row: Row) -> int:
        with occupied(self.stack_cpus()):  # the main worker waits on another job meanwhile
            blocker = self.stack.submit(spec())
            wait_stage(self.stack, blocker, "waiting_for_resources")
            job_id = self.stack.submit(spec())
            started = time.monotonic()
            self.stack.cancel(job_id)
            self.timed_end(row, job_id, started, 0)
            self.stack.cancel(blocker)
            wait_terminal(self.stack, blocker)
        return job_id

    def stack_cpus(self) -> float:
        return ray.cluster_resources()["CPU"]

    def cancel_in(
        self,
        stage: str,
        body: dict[str, Any],
        bound_s: float,
        ready: Callable[[int], bool] | None = None,
    ) -> Callable[[Row], int]:
        def action(row: Row) -> int:
            job_id = self.stack.submit(body)
            wait_stage(self.stack, job_id, stage)
            if ready is not None:
                wait_for(lambda: ready(job_id), 600, f"job {job_id} ready to cancel")
            started = time.monotonic()
            self.stack.cancel(job_id)
            return self.timed_end(row, job_id, started, bound_s)

        return action

    def cancel_waiting(self, row: Row) -> int:
        with occupied(self.stack_cpus()):
            return self.cancel_in("waiting_for_resources", spec(), CANCEL_BOUND_S)(row)

    def computing(self, job_id: int) -> bool:
        return "computing the teacher's features" in self.stack.logs(job_id)

    def has_epoch(self, job_id: int) -> bool:
        return bool(self.stack.val_epochs(job_id))

    def with_worker(
        self, settings: dict[str, str], action: Callable[[Row], int]
    ) -> Callable[[Row], int]:
        """Run ``action`` with the main worker replaced by one with ``settings``."""

        def wrapped(row: Row) -> int:
            self.stack.stop_worker(self.main)
            self.main = self.stack.worker(**settings)
            try:
                return action(row)
            finally:
                self.stack.stop_worker(self.main, kill=True)
                self.main = self.stack.worker()

        return wrapped

    # - kills

    def kill_in(
        self,
        stage: str,
        body: dict[str, Any],
        ready: Callable[[int], bool] | None = None,
        before_kill: Callable[[], None] | None = None,
        after_kill: Callable[[], None] | None = None,
    ) -> Callable[[Row], int]:
        """Submit; when the job is in ``stage`` SIGKILL its worker (and all it started); a
        second worker takes the job over after the lease expires."""

        def action(row: Row) -> int:
            job_id = self.stack.submit(body)
            wait_stage(self.stack, job_id, stage)
            if ready is not None:
                wait_for(lambda: ready(job_id), 600, f"job {job_id} ready to kill")
            if before_kill is not None:
                before_kill()
            started = time.monotonic()
            self.stack.stop_worker(self.main, kill=True)
            if after_kill is not None:
                after_kill()
            self.main = self.stack.worker()
            return self.timed_end(row, job_id, started, None)

        return action

    def kill_waiting(self, row: Row) -> int:
        """Killed while waiting for room; the room comes right after, for the next attempt."""
        with occupied(self.stack_cpus()):
            job_id = self.stack.submit(spec())
            wait_stage(self.stack, job_id, "waiting_for_resources")
            started = time.monotonic()
            self.stack.stop_worker(self.main, kill=True)
            self.main = self.stack.worker()
        return self.timed_end(row, job_id, started, None)

    # - the rest

    def node_lost(self, row: Row) -> int:
        """Training workers on the second node, which is then killed (SIGKILL of its raylet
        and workers): Ray Train restarts the worker group on the head from the checkpoint."""
        head = head_node_id()
        with occupied(2.0, head):
            job_id = self.stack.submit(spec(epochs=4))
            wait_stage(self.stack, job_id, "training")
            wait_for(lambda: self.has_epoch(job_id), 600, "an epoch on the second node")
            started = time.monotonic()
            assert self.stack.node is not None
            self.stack.node.kill()
        self.stack.wait_cpus(2.0)
        self.timed_end(row, job_id, started, None)
        self.stack.add_node()
        return job_id

    def corrupt_features(self, row: Row) -> int:
        features = self._published_features()
        shard = features.shards[0]
        data = bytearray(self.stack.store.get_bytes(shard))
        data[len(data) // 2] ^= 0xFF
        self.stack.store.put_bytes(shard, bytes(data))
        started = time.monotonic()
        job_id = self.stack.submit(spec(epochs=1))
        self.timed_end(row, job_id, started, None)
        row.note = "recomputed" if any("corrupt" in m for m in self.stack.logs(job_id)) else "?"
        return job_id

    def _published_features(self) -> Any:
        # Feature sets are keyed by content: the bench dataset's are the ones with its fingerprint.
        dataset_sha, _ = dataset_fingerprint(self.stack.store, DATASET)
        for info in self.stack.store.list("features"):
            if info.key.endswith(MANIFEST_NAME):
                key = info.key.split("/")[1]
                found = find_features(self.stack.store, key)
                if found is not None and found.metadata.get("dataset_sha256") == dataset_sha:
                    return found
        raise RuntimeError("no published features of the bench dataset")

    def corrupt_part(self, row: Row) -> int:
        store = self.stack.store
        prefix = "shared/datasets/fm-corrupt"
        for info in sorted(store.list(DATASET), key=lambda i: i.key.endswith("manifest.json")):
            data = bytearray(store.get_bytes(info.key))
            if info.key.endswith(".parquet"):
                data[len(data) // 3] ^= 0xFF
            store.put_bytes(prefix + info.key[len(DATASET) :], bytes(data))
        started = time.monotonic()
        job_id = self.stack.submit(spec(dataset=prefix))
        return self.timed_end(row, job_id, started, None)

    def infeasible(self, row: Row) -> int:
        started = time.monotonic()
        job_id = self.stack.submit(spec(resources={"workers": 64, "cpus_per_worker": 1}))
        return self.timed_end(row, job_id, started, None)

    def input_error(self, row: Row) -> int:
        body = spec(student={"model": "small_cnn", "options": {"width": 8, "embed_dim": None}})
        started = time.monotonic()
        job_id = self.stack.submit(body)
        return self.timed_end(row, job_id, started, None)

    def lease_lost(self, row: Row) -> int:
        from datetime import datetime, timedelta, timezone

        from sqlalchemy import update

        job_id = self.stack.submit(spec(epochs=4))
        wait_stage(self.stack, job_id, "training")
        wait_for(lambda: self.has_epoch(job_id), 600, "an epoch")
        started = time.monotonic()
        with self.stack.sessions() as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(lease_expires_at=datetime.now(timezone.utc) - timedelta(minutes=10))
            )
            session.commit()
            queue.reap(session)
        return self.timed_end(row, job_id, started, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/chaos.json"))
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, db)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bird-chaos-"))
    stack = Stack(root)
    began = time.monotonic()
    try:
        stack.connect()
        stack.add_node()
        for prefix, seed in ((DATASET, 3), (FRESH_DATASET, 4)):
            prepare_fashion_mnist_s(stack.store, prefix, seed=seed, **SIZES)
        bench = Bench(stack)
        slow_eval = {"BIRD_TEST_SLOW_STAGE": "evaluating=30"}
        slow_upload = {"BIRD_TEST_SLOW_STAGE": "uploading=6"}
        cases: list[tuple[str, str, str, Callable[[Row], int]]] = [
            ("baseline", "none (computes the features)", "-", bench.baseline),
            ("cancel-queued", "cancel", "queued", bench.cancel_queued),
            (
                "cancel-precomputing",
                "cancel",
                "precomputing",
                bench.cancel_in(
                    "precomputing", spec(dataset=FRESH_DATASET), CANCEL_BOUND_RAY_S, bench.computing
                ),
            ),
            ("cancel-waiting", "cancel", "waiting_for_resources", bench.cancel_waiting),
            (
                "cancel-training",
                "cancel",
                "training",
                bench.cancel_in("training", spec(epochs=20), CANCEL_BOUND_RAY_S, bench.has_epoch),
            ),
            (
                "cancel-tuning",
                "cancel (keeps the best trial)",
                "tuning",
                bench.cancel_in(
                    "tuning", spec(epochs=20, search=4), CANCEL_BOUND_RAY_S, bench.has_epoch
                ),
            ),
            (
                "cancel-evaluating",
                "cancel",
                "evaluating",
                bench.with_worker(
                    slow_eval, bench.cancel_in("evaluating", spec(epochs=1), CANCEL_BOUND_S)
                ),
            ),
            (
                "cancel-uploading",
                "cancel (observed at the end of the upload)",
                "uploading",
                bench.with_worker(
                    slow_upload, bench.cancel_in("uploading", spec(epochs=1), CANCEL_BOUND_S + 6)
                ),
            ),
            (
                "kill-precomputing",
                "SIGKILL worker",
                "precomputing",
                bench.kill_in("precomputing", spec(dataset=FRESH_DATASET), bench.computing),
            ),
            ("kill-waiting", "SIGKILL worker", "waiting_for_resources", bench.kill_waiting),
            (
                "kill-training",
                "SIGKILL worker",
                "training",
                bench.kill_in("training", spec(epochs=4), bench.has_epoch),
            ),
            (
                "kill-tuning",
                "SIGKILL worker",
                "tuning",
                bench.kill_in("tuning", spec(epochs=3, search=4), bench.has_epoch),
            ),
            (
                "kill-evaluating",
                "SIGKILL worker",
                "evaluating",
                bench.with_worker(slow_eval, bench.kill_in("evaluating", spec(epochs=1))),
            ),
            (
                "kill-uploading",
                "SIGKILL worker",
                "uploading",
                bench.with_worker(slow_upload, bench.kill_in("uploading", spec(epochs=1))),
            ),
            ("node-lost", "SIGKILL a Ray worker node", "training", bench.node_lost),
            ("lease-lost", "lease taken away (fencing)", "training", bench.lease_lost),
            (
                "corrupt-features",
                "flipped byte in a cached feature shard",
                "precomputing",
                bench.corrupt_features,
            ),
            ("corrupt-part", "flipped byte in a dataset part", "precomputing", bench.corrupt_part),
            ("infeasible", "64 workers × 1 CPU on 4 CPUs", "precomputing", bench.infeasible),
            ("input-error", "student without embedding for BIRD", "training", bench.input_error),
        ]
        wanted = set(filter(None, args.cases.split(",")))
        for name, fault, stage, action in cases:
            if wanted and name not in wanted:
                continue
            bench.ensure_main()
            bench.run(name, fault, stage, action)
    finally:
        stack.stop()
    total = time.monotonic() - began
    print_table(bench.rows, total)
    result = {
        "bench": "chaos",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "settings": {
            "lease_s": LEASE_S,
            "heartbeat_s": HEARTBEAT_S,
            "stop_grace_s": STOP_GRACE_S,
            "resource_wait_s": RESOURCE_WAIT_S,
        },
        "total_s": total,
        "rows": [asdict(row) for row in bench.rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


def print_table(rows: list[Row], total: float) -> None:
    header = (
        f"{'case':<20} {'fault':<40} {'stage':<22} {'state':<10} {'att':>3} {'s':>6} "
        f"{'bound':>6} metrics cluster"
    )
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        bound = "-" if row.bound_s is None else f"{row.bound_s:g}"
        print(
            f"{row.case:<20} {row.fault[:40]:<40} {row.stage:<22} {row.state:<10} "
            f"{row.attempts:>3} {row.seconds:6.1f} {bound:>6} "
            f"{'ok' if row.metrics_ok else 'NO':<7} {'ok' if row.cluster_ok else 'NO'}"
            + (f"  {row.note}" if row.note else "")
        )
    terminal = all(r.state in TERMINAL for r in rows)
    print(f"\n{len(rows)} cases in {total:.0f} s; every job terminal: {terminal}")


if __name__ == "__main__":
    main()
