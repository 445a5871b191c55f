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
    """

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
            shards = [ds] if world_size == 1 else ds.split(world_size, equal=True)
            for rank, shard in enumerate(shards):
                output[rank][name] = shard.iterator()
        return output
