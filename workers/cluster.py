"""The Ray cluster jobs run on: joining it, what it has, and what a job's run needs of it.

* :func:`connect_ray` joins ``BIRD_RAY_ADDRESS`` or starts the embedded local cluster, and
  tells every Ray process of the job where its cluster's State API is. Ray Train frees the
  placement group of a run whose controller died (a trial that Tune stopped) from a helper actor
  that asks the State API whether the controller is alive; inside a Ray worker process that API
  finds its cluster by scanning the machine for Ray instances, which fails ("Found multiple
  active Ray instances") or picks the newest other cluster as soon as a second Ray runs on the
  machine. The helper then never frees the group, and the next trial waits for ever for CPUs
  that nothing uses. Naming the cluster in the job's runtime environment removes the guess.
* :class:`RunDemand` is what one run of a job reserves: the training workers'
  ``workers × (cpus_per_worker, gpus_per_worker)`` bundles, plus, in a search, the sliver of a
  CPU that each trial's driver holds in Tune's placement group (the Ray Train controller and
  the job's own driver task reserve nothing).
* :func:`release_orphaned_placement_groups` frees the groups whose creating actor is dead. A
  Ray Train run killed while it starts (a cancel in its first seconds) leaves the group its
  controller had just reserved: nothing registered it yet (Ray Train's own cleaner and the
  job's RunControl learn of it only once the workers run), and a group outlives the actor that
  made it for as long as the worker's Ray job (the ``bird worker`` process) lives.
* :func:`connect_ray` also refuses a cluster whose State API does not answer
  (:class:`ClusterUnfit`): without it the first trial of a search keeps its CPUs after it
  ends, and the search waits for ever for the second.
* :func:`check_feasible` fails a job at once when the cluster can never hold one run;
  :func:`fit_concurrency` caps a search's concurrent trials at what the cluster holds;
  :func:`wait_for_room` waits, boundedly and cancellably, until the cluster has room now.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from unittest import mock

import ray

from service.settings import Settings
from service.spec import JobSpec

__all__ = [
    "STATE_API_WAIT_S",
    "ClusterCapacity",
    "ClusterUnfit",
    "NoRoom",
    "RunDemand",
    "check_feasible",
    "check_state_api",
    "cluster_capacity",
    "connect_ray",
    "fit_concurrency",
    "head_node_resource",
    "release_orphaned_placement_groups",
    "wait_for_room",
]

# What a Tune trial's driver function reserves (it only waits on its TorchTrainer; Tune refuses
# a trial that reserves nothing).
TRIAL_DRIVER_CPU = 0.01
# Ray's resource of the head node (every cluster has exactly one); a tiny share of it pins a
# task or actor there.
_HEAD_NODE_RESOURCE = "node:__internal_head__"
# Slack for float sums of fractional CPUs (3 × 0.33 must fit in 1).
_EPSILON = 1e-6
# How long a just-started dashboard may take to answer its State API.
STATE_API_WAIT_S = 30.0


class ClusterUnfit(RuntimeError):
    """The Ray cluster lacks something every search needs (its State API); the message says
    how to start it."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connect_ray(settings: Settings) -> None:
    """Join the Ray cluster at ``settings.ray_address``, or start the embedded local one
    (address unset or ``local``; never a Ray that merely happens to run on the machine).

    The embedded cluster serves Ray's dashboard (and with it the State API) on a free loopback
    port, and every process of the job gets ``RAY_API_SERVER_ADDRESS`` pointing at it. A joined
    cluster given as ``host:port`` is named to the job's processes as ``RAY_ADDRESS``. (See the
    module docstring for why both matter; ``auto`` and ``ray://`` addresses are used as given.)
    """
    if ray.is_initialized():
        return
    # A Ray call after ray.shutdown() (a worker thread still running while the process exits)
    # would otherwise start or join whatever Ray runs on the machine. Ray reads the switch
    # (RAY_ENABLE_AUTO_CONNECT) once, when it is imported, hence the module attribute.
    ray._private.auto_init_hook.enable_auto_connect = False
    common: dict[str, Any] = {
        "log_to_driver": settings.log_level == "debug",
        "configure_logging": False,
    }
    address = settings.ray_address
    if address in (None, "local"):
        port = _free_port()
        context = ray.init(
            # "local": a cluster of our own; "auto" would join whatever Ray runs on the machine.
            address="local",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
            **common,
        )
    elif address != "auto" and "://" not in address:
        context = ray.init(
            address=address, runtime_env={"env_vars": {"RAY_ADDRESS": address}}, **common
        )
    else:
        context = ray.init(address=address, **common)
    try:
        check_state_api(
            context.dashboard_url,
            address or "local",
            # Through Ray Client the job's processes run on the cluster's side, which reaches
            # the dashboard; this machine may well not: only its presence is checked here.
            probe=not ray.util.client.ray.is_connected(),
        )
    except ClusterUnfit:
        ray.shutdown()  # a later connect_ray checks again instead of using this cluster
        raise


def check_state_api(dashboard_url: str | None, address: str, *, probe: bool = True) -> None:
    """Raise :class:`ClusterUnfit` unless the cluster has a dashboard (``dashboard_url``, as
    the cluster registered it) whose State API answers within :data:`STATE_API_WAIT_S`
    (``probe=False``: only that it has one). ``address`` is ``local`` for bird's own Ray.

    Ray Train frees the CPUs of a trial that ended from a helper that asks this API whether the
    trial's controller is alive; where the API does not answer, it never frees them, and the
    next trial of the search waits for ever with nothing in any log.
    """
    why = (
        "Ray Train asks it to free the CPUs of each trial a search ends, so a search would "
        "wait for ever after its first trial"
    )
    embedded = address == "local"
    cluster = "bird's own Ray" if embedded else f"the Ray cluster at {address}"
    if not dashboard_url:
        if embedded:
            raise ClusterUnfit(f"{cluster} started without its dashboard: {why}")
        raise ClusterUnfit(
            f"{cluster} runs without its dashboard, which serves Ray's State API: {why}. Start "
            "its head with the dashboard (ray start --head --include-dashboard=true, which "
            "needs ray[default]; add --dashboard-host=0.0.0.0 where workers run on other hosts)"
        )
    if not probe:
        return
    url = dashboard_url if "://" in dashboard_url else f"http://{dashboard_url}"
    advice = (
        ""
        if embedded
        else ". Make the dashboard reachable from every node (ray start --head "
        "--dashboard-host=0.0.0.0)"
    )
    deadline = time.monotonic() + STATE_API_WAIT_S
    while True:
        problem = _state_api_problem(url)
        if problem is None:
            return
        if time.monotonic() > deadline:
            raise ClusterUnfit(
                f"the State API of {cluster} (its dashboard at {url}) does not answer after "
                f"{STATE_API_WAIT_S:.0f} s ({problem}): {why}{advice}"
            )
        time.sleep(0.5)


def _state_api_problem(url: str) -> str | None:
    """None when the State API at ``url`` lists the cluster's nodes, else what went wrong.

    Asked with Ray's own client, as Ray Train's helper asks it: it sends the cluster's auth
    token where token authentication is on (Ray's default: a plain request gets HTTP 401). That
    client takes its address from RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, before its
    argument; the first is set to ``url`` for the call, so that a variable exported in the
    shell never makes it ask another cluster.
    """
    from ray.util.state import list_nodes

    # (connect_ray runs before any worker thread starts: nothing else reads it meanwhile.)
    with mock.patch.dict(os.environ, {"RAY_API_SERVER_ADDRESS": url}):
        try:
            list_nodes(address=url, limit=1, timeout=5, raise_on_missing_output=False)
        except Exception as error:  # refused while it starts, an HTTP error, ...
            return " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return None


def head_node_resource() -> dict[str, float]:
    """Resources that pin a task or actor to the head node (which lives as long as the cluster)."""
    return {_HEAD_NODE_RESOURCE: 0.001}


@dataclass(frozen=True)
class RunDemand:
    """What one run (a training, or one trial of a search) reserves on the cluster."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    driver_cpus: float = 0.0  # a search trial's driver

    @classmethod
    def of(cls, spec: JobSpec) -> RunDemand:
        """The demand of one run of ``spec`` (one trial, for a search)."""
        resources = spec.resources
        return cls(
            workers=resources.workers,
            cpus_per_worker=resources.cpus_per_worker,
            gpus_per_worker=resources.gpus_per_worker,
            driver_cpus=TRIAL_DRIVER_CPU if spec.search is not None else 0.0,
        )

    @property
    def cpus(self) -> float:
        """CPUs of the whole run."""
        return self.workers * self.cpus_per_worker + self.driver_cpus

    @property
    def gpus(self) -> float:
        """GPUs of the whole run."""
        return self.workers * self.gpus_per_worker

    def describe(self) -> str:
        """E.g. ``64 workers × 1 CPU (64 CPUs)``."""
        per = f"{_number(self.cpus_per_worker)} CPU"
        if self.gpus_per_worker:
            per += f" + {_number(self.gpus_per_worker)} GPU"
        total = _count(self.cpus, "CPU")
        if self.gpus:
            total += f", {_count(self.gpus, 'GPU')}"
        noun = "worker" if self.workers == 1 else "workers"
        return f"{self.workers} {noun} × {per} ({total})"


@dataclass(frozen=True)
class NodeResources:
    """CPUs and GPUs of one alive node."""

    cpus: float
    gpus: float


@dataclass(frozen=True)
class ClusterCapacity:
    """The alive nodes of the cluster, and what is free on the whole cluster right now."""

    nodes: tuple[NodeResources, ...]
    available_cpus: float
    available_gpus: float

    @property
    def cpus(self) -> float:
        """CPUs of all alive nodes."""
        return sum(node.cpus for node in self.nodes)

    @property
    def gpus(self) -> float:
        """GPUs of all alive nodes."""
        return sum(node.gpus for node in self.nodes)

    def describe(self) -> str:
        """E.g. ``2 CPUs and 0 GPUs in total (1 node; at most 2 CPUs and 0 GPUs on one)``."""
        nodes = len(self.nodes)
        most_cpus = max((node.cpus for node in self.nodes), default=0.0)
        most_gpus = max((node.gpus for node in self.nodes), default=0.0)
        return (
            f"{_count(self.cpus, 'CPU')} and {_count(self.gpus, 'GPU')} in total "
            f"({_count(nodes, 'node')}; at most {_count(most_cpus, 'CPU')} and "
            f"{_count(most_gpus, 'GPU')} on one)"
        )

    def describe_free(self) -> str:
        """E.g. ``1 CPU and 0 GPUs free of 2 CPUs and 0 GPUs in total (…)``."""
        return (
            f"{_count(self.available_cpus, 'CPU')} and {_count(self.available_gpus, 'GPU')} "
            f"free of {self.describe()}"
        )

    def workers_that_fit(self, demand: RunDemand) -> int:
        """How many of the demand's worker bundles the nodes hold at once (each on one node)."""
        total = 0
        for node in self.nodes:
            by_cpu = math.floor((node.cpus + _EPSILON) / demand.cpus_per_worker)
            if demand.gpus_per_worker > 0:
                by_gpu = math.floor((node.gpus + _EPSILON) / demand.gpus_per_worker)
                total += min(by_cpu, by_gpu)
            else:
                total += by_cpu
        return total


def _number(value: float) -> str:
    return f"{value:g}"


def _count(value: float, noun: str) -> str:
    """``1 CPU``, ``2 CPUs``, ``1.01 CPUs``."""
    return f"{_number(value)} {noun}{'' if value == 1 else 's'}"


def cluster_capacity() -> ClusterCapacity:
    """What the connected cluster has (alive nodes) and what it has free right now."""
    nodes = tuple(
        NodeResources(
            cpus=float(node["Resources"].get("CPU", 0.0)),
            gpus=float(node["Resources"].get("GPU", 0.0)),
        )
        for node in ray.nodes()
        if node.get("Alive")
    )
    available = ray.available_resources()
    return ClusterCapacity(
        nodes=nodes,
        available_cpus=float(available.get("CPU", 0.0)),
        available_gpus=float(available.get("GPU", 0.0)),
    )


def check_feasible(demand: RunDemand, capacity: ClusterCapacity) -> str | None:
    """Why the cluster can never hold one run of ``demand`` (None when it can)."""
    fits = capacity.workers_that_fit(demand)
    if (
        fits >= demand.workers
        and demand.cpus <= capacity.cpus + _EPSILON
        and demand.gpus <= capacity.gpus + _EPSILON
    ):
        return None
    return (
        f"resources: {demand.describe()} can never run on this Ray cluster: it has "
        f"{capacity.describe()}"
    )


def fit_concurrency(wanted: int, demand: RunDemand, capacity: ClusterCapacity) -> int:
    """How many runs of ``demand`` to run at once: ``wanted``, at most what the cluster holds
    side by side (at least one: a feasible run always fits alone)."""
    by_cpu = math.floor((capacity.cpus + _EPSILON) / demand.cpus) if demand.cpus else wanted
    by_gpu = math.floor((capacity.gpus + _EPSILON) / demand.gpus) if demand.gpus else wanted
    by_bundles = capacity.workers_that_fit(demand) // max(demand.workers, 1)
    return max(1, min(wanted, by_cpu, by_gpu, by_bundles))


def reserved_placement_group_records() -> list[Any]:
    """The GCS records (``PlacementGroupTableData``) of every placement group not removed.

    Ray's public views (``ray.util.placement_group_table()``, the State API) leave out who made
    a group and whether its maker is dead; the GCS record, read the way Ray reads it for those
    views, holds both. An internal API of Ray's: callers must survive its failure."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    records = (
        table.FromString(raw)
        for raw in state._connect_and_get_accessor().get_placement_group_table()
    )
    return [record for record in records if record.state != table.REMOVED]


def placement_group_of(record: Any) -> Any:
    """The :class:`~ray.util.placement_group.PlacementGroup` of a GCS record."""
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(ray.PlacementGroupID(record.placement_group_id))


def release_orphaned_placement_groups() -> int:
    """Remove every placement group still reserved whose creating actor is dead; return how
    many. Groups made by a driver or a task (no creating actor, e.g. Tune's trial groups) and
    detached ones are left alone: only an actor's own group dies with it in meaning.

    The job's own runs are released through its RunControl (``workers.control``); this is the
    cluster-wide safety net a job's wait for room uses."""
    if not ray.is_initialized():
        return 0
    try:
        records = reserved_placement_group_records()
    except Exception:  # an internal API of Ray's: never let it break the caller
        return 0
    released = 0
    for record in records:
        creator = ray.ActorID(record.creator_actor_id) if record.creator_actor_id else None
        if (
            record.is_detached
            or creator is None
            or creator.is_nil()
            or not record.creator_actor_dead
        ):
            continue
        try:
            ray.util.remove_placement_group(placement_group_of(record))
            released += 1
        except Exception:  # removed meanwhile
            continue
    return released


class NoRoom(TimeoutError):
    """The cluster did not have room for a run within the wait bound."""


def has_room(demand: RunDemand, capacity: ClusterCapacity) -> bool:
    """Whether the cluster's free resources hold one run of ``demand`` right now."""
    return (
        demand.cpus <= capacity.available_cpus + _EPSILON
        and demand.gpus <= capacity.available_gpus + _EPSILON
    )


def wait_for_room(
    demand: RunDemand,
    *,
    timeout_s: float,
    should_stop: Callable[[], bool],
    on_wait: Callable[[ClusterCapacity], None] | None = None,
    poll_s: float = 1.0,
    capacity: Callable[[], ClusterCapacity] = cluster_capacity,
) -> bool:
    """Wait until the cluster has room for one run of ``demand``; True when it has.

    Returns False as soon as ``should_stop()`` says so (a cancel, a lost lease). Calls
    ``on_wait`` once, with what the cluster had, when it has to wait at all. Raises
    :class:`NoRoom` after ``timeout_s`` seconds without room.
    """
    deadline = time.monotonic() + timeout_s
    waited = False
    while True:
        if should_stop():
            return False
        current = capacity()
        if has_room(demand, current):
            return True
        if release_orphaned_placement_groups():
            continue  # what a killed run left reserved is free again: look again
        if not waited:
            waited = True
            if on_wait is not None:
                on_wait(current)
        if time.monotonic() >= deadline:
            raise NoRoom(
                f"waited {timeout_s:g} s for room for {demand.describe()}: the Ray cluster "
                f"had {current.describe_free()}"
            )
        time.sleep(poll_s)
