"""Checks on the session's Ray cluster shared by the Ray tests: every CPU free again, and, when
not, what holds them (so that a leak names its holder in the failure instead of stalling the
next test that needs the whole cluster)."""

from __future__ import annotations

import time


def cpu_holders() -> str:
    """One line: placement groups not removed, live actors holding a CPU, free CPUs."""
    import ray
    from ray.util.state import list_actors

    groups = [
        f"pg {group.get('name') or group_id[:8]} {group['state']} {list(group['bundles'].values())}"
        for group_id, group in ray.util.placement_group_table().items()
        if group["state"] != "REMOVED"
    ]
    try:
        actors = [
            f"actor {actor.class_name} pid {actor.pid}"
            for actor in list_actors(
                filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False
            )
            if actor.placement_group_id
            or any(k == "CPU" and v for k, v in (actor.required_resources or {}).items())
        ]
    except Exception as error:  # the State API is best effort here: the groups still tell
        actors = [f"(actors unknown: {error})"]
    free = ray.available_resources().get("CPU", 0.0)
    return f"free CPUs {free:g}; " + ("; ".join(groups + actors) or "nothing listed")


def wait_for_free_cpus(timeout_s: float = 60) -> None:
    """Wait until every CPU of the cluster is free: no run, placement group or actor holds one.
    Fails after ``timeout_s`` with what holds them."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < total - 1e-6:
        if time.monotonic() >= deadline:
            raise AssertionError(f"{total:g} CPUs not free after {timeout_s:g} s: {cpu_holders()}")
        time.sleep(0.2)
