"""What a killed run leaves reserved on the real Ray cluster, and who frees it."""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

from workers.cluster import RunDemand, cluster_capacity, wait_for_room


@ray.remote(num_cpus=0)
class _Reserver:
    """Stands for a Ray Train controller: it reserves a group, then is killed before anything
    else learns of the group (a run cancelled while it starts)."""

    def reserve(self, cpus: float) -> str:
        group = placement_group([{"CPU": cpus}])
        ray.get(group.ready(), timeout=60)
        return group.id.hex()


def _state(group_id: str) -> str:
    return placement_group_table()[group_id]["state"]


def test_the_group_of_a_killed_actor_is_freed_when_a_job_waits_for_room(ray_local: str):
    # A group of the driver's own (no creating actor) and one of a live actor are in use.
    own = placement_group([{"CPU": 0.001}])
    ray.get(own.ready(), timeout=60)
    alive = _Reserver.remote()  # type: ignore[attr-defined]
    kept = ray.get(alive.reserve.remote(0.001))
    free = cluster_capacity().available_cpus
    assert free >= 1, "the session cluster is busy"
    reserver = _Reserver.remote()  # type: ignore[attr-defined]
    orphan = ray.get(reserver.reserve.remote(free))  # every free CPU
    ray.kill(reserver, no_restart=True)
    try:
        assert _state(orphan) == "CREATED"
        demand = RunDemand(workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0)
        # Without the release the killed actor's group held the CPUs for as long as this Ray
        # job lives, and the wait ended in NoRoom.
        assert wait_for_room(demand, timeout_s=15, should_stop=lambda: False, poll_s=0.2)
        assert _state(orphan) == "REMOVED"
        assert _state(own.id.hex()) == "CREATED" and _state(kept) == "CREATED"
    finally:
        # Remove every group here, the live actor's too: killing the actor would leave its
        # group reserved for the rest of the session (the very leak under test), and even a
        # sliver of a CPU keeps a later 1-CPU task off a 2-CPU cluster.
        ray.util.remove_placement_group(own)
        for group_id in (kept, orphan):
            if _state(group_id) != "REMOVED":
                ray.util.remove_placement_group(
                    PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
                )
        ray.kill(alive, no_restart=True)
