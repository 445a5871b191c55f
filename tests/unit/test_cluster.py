"""What a run needs of the Ray cluster: feasibility, fitted concurrency, the bounded wait."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from service.spec import JobSpec
from workers.cluster import (
    ClusterCapacity,
    ClusterUnfit,
    NodeResources,
    NoRoom,
    RunDemand,
    check_feasible,
    check_state_api,
    fit_concurrency,
    wait_for_room,
)


def _spec(workers: int = 1, cpus: float = 1, gpus: float = 0, search: bool = False) -> JobSpec:
    body: dict = {
        "dataset": {"uri": "datasets/x"},
        "resources": {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus},
    }
    if search:
        body["search"] = {"num_samples": 4, "max_concurrent_trials": 4}
    return JobSpec.model_validate(body)


def _cluster(*nodes: tuple[float, float], free_cpus: float | None = None) -> ClusterCapacity:
    node_list = tuple(NodeResources(cpus, gpus) for cpus, gpus in nodes)
    total = sum(cpus for cpus, _ in nodes)
    return ClusterCapacity(
        nodes=node_list,
        available_cpus=total if free_cpus is None else free_cpus,
        available_gpus=sum(gpus for _, gpus in nodes),
    )


def test_a_search_trial_reserves_its_workers_and_a_sliver_for_its_driver() -> None:
    assert RunDemand.of(_spec()).cpus == 1
    trial = RunDemand.of(_spec(search=True))
    assert trial.cpus == pytest.approx(1.01)
    assert trial.describe() == "1 worker × 1 CPU (1.01 CPUs)"
    assert RunDemand.of(_spec()).describe() == "1 worker × 1 CPU (1 CPU)"


def test_a_request_beyond_the_cluster_is_infeasible_and_the_message_says_what_it_has() -> None:
    embedded = _cluster((2, 0))
    problem = check_feasible(RunDemand.of(_spec(workers=64)), embedded)
    assert problem == (
        "resources: 64 workers × 1 CPU (64 CPUs) can never run on this Ray cluster: it has "
        "2 CPUs and 0 GPUs in total (1 node; at most 2 CPUs and 0 GPUs on one)"
    )
    assert check_feasible(RunDemand.of(_spec(workers=2)), embedded) is None
    assert check_feasible(RunDemand.of(_spec(gpus=1)), embedded) is not None
    # Four CPUs in total, but no node holds a 3-CPU worker.
    assert check_feasible(RunDemand.of(_spec(cpus=3)), _cluster((2, 0), (2, 0))) is not None
    # Bundles spread over nodes: 4 workers of 1 CPU on two 2-CPU nodes fit.
    assert check_feasible(RunDemand.of(_spec(workers=4)), _cluster((2, 0), (2, 0))) is None
    # A search trial needs 2.01 CPUs with two 1-CPU workers: more than 2 CPUs.
    assert check_feasible(RunDemand.of(_spec(workers=2, search=True)), embedded) is not None
    three_halves = RunDemand.of(_spec(workers=3, cpus=1 / 3))
    assert check_feasible(three_halves, _cluster((1, 0))) is None  # float sums


def test_concurrency_is_fitted_to_what_the_cluster_holds_side_by_side() -> None:
    trial = RunDemand.of(_spec(search=True))
    assert fit_concurrency(4, trial, _cluster((2, 0))) == 1  # 2 × 1.01 > 2
    half = RunDemand.of(_spec(cpus=0.5, search=True))
    assert fit_concurrency(4, half, _cluster((2, 0))) == 3
    assert fit_concurrency(2, half, _cluster((2, 0))) == 2
    gpu = RunDemand.of(_spec(gpus=1, search=True))
    assert fit_concurrency(8, gpu, _cluster((16, 2), (16, 2))) == 4


def test_the_wait_for_room_is_visible_bounded_and_stoppable() -> None:
    demand = RunDemand.of(_spec())
    busy = _cluster((2, 0), free_cpus=0.5)
    waited: list[ClusterCapacity] = []
    with pytest.raises(
        NoRoom, match=r"waited 0\.3 s for room for 1 worker × 1 CPU .* had 0\.5 CPUs"
    ):
        wait_for_room(
            demand,
            timeout_s=0.3,
            should_stop=lambda: False,
            on_wait=waited.append,
            poll_s=0.05,
            capacity=lambda: busy,
        )
    assert waited == [busy]  # told once

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert not wait_for_room(
        demand, timeout_s=30, should_stop=stop.is_set, poll_s=0.05, capacity=lambda: busy
    )
    free = _cluster((2, 0))
    assert wait_for_room(demand, timeout_s=0, should_stop=lambda: False, capacity=lambda: free)


def test_a_cluster_without_a_state_api_is_refused_saying_how_to_start_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No dashboard at all, or one whose State API does not answer: ClusterUnfit, with advice
    for a joined cluster and none about `ray start` for bird's own Ray. The address the
    environment names (a shell's RAY_API_SERVER_ADDRESS) is restored after the check (that
    the check asks the cluster's own dashboard even then: tests/integration/test_cli_worker.py)."""
    import workers.cluster as cluster

    with pytest.raises(ClusterUnfit, match=r"at 10\.0\.0\.1:6379 runs without its dashboard"):
        check_state_api(None, "10.0.0.1:6379")
    with pytest.raises(ClusterUnfit, match=r"^bird's own Ray started without its dashboard"):
        check_state_api("", "local")
    check_state_api("10.0.0.1:8265", "ray://10.0.0.1:10001", probe=False)  # present: enough

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(cluster, "STATE_API_WAIT_S", 0.2)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    with pytest.raises(ClusterUnfit) as joined:
        check_state_api(dead, "10.0.0.1:6379")
    message = str(joined.value)
    assert message.startswith(
        f"the State API of the Ray cluster at 10.0.0.1:6379 (its dashboard at http://{dead}) "
        "does not answer after 0 s ("
    ), message
    assert "--dashboard-host=0.0.0.0" in message and "search" in message
    with pytest.raises(ClusterUnfit) as embedded:
        check_state_api(dead, "local")
    assert str(embedded.value).startswith(
        f"the State API of bird's own Ray (its dashboard at http://{dead})"
    )
    assert "ray start" not in str(embedded.value)
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1"  # restored
