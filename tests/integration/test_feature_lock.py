"""The precompute lock (workers.features.FeatureLock) on both stores: renewed while its run
lives, broken soon after its run dies, never removed from under another run."""

from __future__ import annotations

import json
import time

from service.storage import ObjectStore
from workers.features import FeatureLock

KEY = "features/abc/.lock"


def _holder(store: ObjectStore) -> str:
    return json.loads(store.get_bytes(KEY))["run"]


def test_a_live_run_keeps_its_lock_past_the_stale_time(store: ObjectStore) -> None:
    first = FeatureLock(store, KEY, "first", stale_after_s=0.4)
    assert first.acquire()
    try:
        time.sleep(1.2)  # three stale times: only renewals keep the marker fresh
        second = FeatureLock(store, KEY, "second", stale_after_s=0.4)
        assert not second.acquire()
        assert _holder(store) == "first"
    finally:
        first.release()
    assert not store.exists(KEY)
    assert second.acquire()
    second.release()


def test_the_lock_of_a_killed_run_is_taken_over_once_stale(store: ObjectStore) -> None:
    # What a worker killed with SIGKILL leaves: a marker nobody renews any more.
    store.put_bytes(KEY, json.dumps({"run": "killed", "at": time.time() - 61}).encode())
    lock = FeatureLock(store, KEY, "next", stale_after_s=60)
    assert lock.acquire()
    assert _holder(store) == "next"
    lock.release()

    # A fresh marker of another run is respected; an unreadable one counts as abandoned.
    store.put_bytes(KEY, json.dumps({"run": "alive", "at": time.time()}).encode())
    assert not FeatureLock(store, KEY, "next", stale_after_s=60).acquire()
    store.put_bytes(KEY, b"not json")
    lock = FeatureLock(store, KEY, "next", stale_after_s=60)
    assert lock.acquire()
    lock.release()


def test_release_leaves_a_marker_another_run_has_taken_over(store: ObjectStore) -> None:
    lock = FeatureLock(store, KEY, "slow", stale_after_s=60)
    assert lock.acquire()
    # Its renewals failed long enough for another run to break the lock and take it.
    store.put_bytes(KEY, json.dumps({"run": "other", "at": time.time()}).encode())
    lock.release()
    assert _holder(store) == "other"
