"""How a training run's datasets reach its ranks (Ray Train's ``DataConfig``).

Kept apart from :mod:`workers.train` on purpose: Ray Train unpickles the data config in a
dataset-manager actor of its own, and this module imports neither torch nor bird_core, so that
actor starts in a fraction of the time.
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig


class ShardedIngest(DataConfig):
    """``DataConfig`` that splits an in-memory (materialized) dataset into equal fixed shards.

    Ray's default splits every ``datasets_to_split`` entry with ``streaming_split``, which
    starts a coordinator actor per run and hands out blocks as ranks ask for them. For a
    dataset already held in Ray's object store (:func:`workers.train.build_datasets`), one
    equal split is enough: each rank reads its own shard through ``get_dataset_shard`` every
    epoch (shuffled locally), without that actor. Datasets that are still lazy keep Ray's
    streaming split; datasets not named in ``datasets_to_split`` are read whole by every rank.

    ``shards`` holds splits made before the run started (:func:`presplit`): an equal split runs
    Ray tasks that need a CPU each, and once the run's workers hold every CPU of the cluster
    (2 workers x 1 CPU on 2 CPUs) a split made here would wait for ever.
    """

    def __init__(
        self,
        datasets_to_split: Any = "all",
        *,
        shards: dict[str, list[Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(datasets_to_split=datasets_to_split, **kwargs)
        self._shards = dict(shards or {})

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Per rank, a ``DataIterator`` for each dataset (see ``DataConfig.configure``)."""
        from ray.data.dataset import MaterializedDataset

        to_split = (
            set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        )
        in_memory = {
            name: ds
            for name, ds in datasets.items()
            if name in to_split and isinstance(ds, MaterializedDataset)
        }
        output = super().configure(
            {name: ds for name, ds in datasets.items() if name not in in_memory},
            world_size,
            worker_handles,
            worker_node_ids,
            **kwargs,
        )
        for name, ds in in_memory.items():
            shards = self._shards.get(name)
            if shards is None or len(shards) != world_size:
                shards = [ds] if world_size == 1 else ds.split(world_size, equal=True)
            for rank, shard in enumerate(shards):
                output[rank][name] = shard.iterator()
        return output


def presplit(datasets: dict[str, Any], names: list[str], world_size: int) -> dict[str, list[Any]]:
    """Equal splits of the in-memory datasets among ``names`` for ``world_size`` ranks, made
    now, while the cluster still has CPUs for the split's tasks (see :class:`ShardedIngest`)."""
    from ray.data.dataset import MaterializedDataset

    if world_size == 1:
        return {}
    return {
        name: datasets[name].split(world_size, equal=True)
        for name in names
        if isinstance(datasets.get(name), MaterializedDataset)
    }
