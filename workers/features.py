"""Teacher features, precomputed once with Ray Data and shared through the object store.

Layout under the store (content-addressed; docs/architecture.md, "Teacher features")::

    features/<key>/run-<id>/part-*.parquet   shards written by one precompute run
    features/<key>/manifest.json             written last; names the shards of ONE run

``key`` hashes the teacher's identity (architecture + weights sha256 + probe settings), the
dataset's manifest and the preprocessing, so any job asking for the same key reuses the shards
without running the teacher. Each run writes under its own ``run-<id>/`` prefix and the manifest
is a single atomic PUT, so two concurrent runs can never interleave into a half set: readers
see either no manifest or a complete one. A run that finds a fresh ``.lock`` marker of another
run waits for that run's manifest instead of computing the same features again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bird_core.methods.base import Batch
from bird_core.preprocess import Preprocessor
from bird_core.train import train_linear_probe
from bird_datasets.codec import decode_images
from bird_datasets.fingerprint import dataset_fingerprint
from bird_datasets.format import parse_metadata
from service.storage import (
    MANIFEST_NAME,
    ChecksumMismatchError,
    Manifest,
    ManifestEntry,
    ManifestError,
    ObjectNotFoundError,
    ObjectStore,
    StorageError,
    fetch_verified,
    join_key,
    read_manifest,
)
from workers.rows import (
    decode_stage,
    dense,
    table_for_write,
)
from workers.teachers import TeacherSource

FEATURES_PREFIX = "features"
LOCK_NAME = ".lock"


class FeatureError(RuntimeError):
    """Precomputed features are missing or corrupt; the message names the URI."""


@dataclass(frozen=True)
class FeatureSet:
    """A published feature set: where it is and what its manifest says."""

    key: str
    prefix: str
    manifest: Manifest

    @property
    def shards(self) -> list[str]:
        """Shard keys relative to the store, in a stable order."""
        return [join_key(self.prefix, name) for name in sorted(self.manifest.files)]

    @property
    def metadata(self) -> dict[str, Any]:
        """Dimensions, teacher identity, probe metrics, counts per split."""
        return self.manifest.metadata


def feature_key(
    teacher: TeacherSource,
    dataset_sha: str,
    preprocessing: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> str:
    """The content address of a feature set."""
    payload = {
        "teacher": teacher.identity(),
        "dataset": dataset_sha,
        "preprocessing": preprocessing,
        "extra": extra or {},
        "format_version": 1,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


# -- the Ray Data stage ------------------------------------------------------------------------


def match_teacher_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Images ``[N, C, H, W]`` with the ``channels`` a teacher was built for.

    Images are decoded with the dataset's declared channels (``bird_datasets.codec``); a
    pretrained RGB teacher (EfficientNet, CLIP) gets a grayscale image on three equal channels
    and an RGBA image without its alpha, which is what Pillow's ``convert("RGB")`` gives. Any
    other mismatch is left for the teacher's preprocessing to report.
    """
    have = x.shape[1]
    if have == channels or channels != 3:
        return x
    if have == 1:
        return x.expand(-1, 3, -1, -1)
    if have == 4:
        return x[:, :3]
    return x


class TeacherEmbedder:
    """Ray Data callable class: loads the teacher once per actor, then embeds batches."""

    def __init__(
        self,
        source: TeacherSource,
        dataset_preprocessing: dict[str, Any],
        attention_size: int | None,
        device: str | None = None,
        torch_threads: int | None = None,
        image_shape: Sequence[int] | None = None,
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch_threads:
            # Ray pins OMP/torch to the actor's CPU reservation (1); the teacher forward is the
            # heavy part of the pipeline and may use more cores while reads stay light.
            torch.set_num_threads(torch_threads)
        self.net, self.preprocess = source.build(dataset_preprocessing)
        self.net.to(self.device)
        self.preprocess.to(self.device)
        self.attention_size = attention_size
        self.image_shape = image_shape
        # The channels the teacher's input preprocessing is for (images only).
        self.channels = int(self.preprocess.mean.shape[1]) if self.preprocess.kind == "image" else 0
        self.batches_seen = 0

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Add ``embedding``, ``logits`` and ``attention`` columns to a batch of rows."""
        from bird_core.losses import attention_map

        if "pixels" in batch:  # decoded upstream by decode_stage, in parallel with this actor
            x = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))
        elif "image" in batch:
            x = torch.from_numpy(decode_images(batch["image"], self.image_shape))
        else:
            x = torch.from_numpy(np.stack(batch["x"]).astype(np.float32))
        if x.dim() == 4:
            x = match_teacher_channels(x, self.channels)
        out = self.net(self.preprocess(x.to(self.device)), features=True)
        batch = {k: v for k, v in batch.items() if k != "pixels"}
        batch["embedding"] = out.embedding.float().cpu().numpy()
        batch["logits"] = out.logits.float().cpu().numpy()
        if self.attention_size and out.feature_map is not None:
            size = (self.attention_size, self.attention_size)
            att = attention_map(out.feature_map.float(), size=size)
            batch["attention"] = att.cpu().numpy()
        self.batches_seen += 1
        return batch


_PARQUET_READ_LOCK = threading.Lock()


def read_parquet_files(paths: list[str], filesystem: Any):  # noqa: ANN201
    """``ray.data.read_parquet`` of ``paths`` through Ray Data's V1 Parquet datasource.

    The V2 datasource (Ray Data's default) lists files through a pool of footer-reading actors
    started for each read: seconds of actor start-up on every read of a dataset or feature set
    that is a handful of files (V1 reads the footers in the calling process, in a fraction of a
    second). The datasource is chosen when the read is created, so the context is switched for
    this call only (under a lock: worker threads share the process's context).
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    with _PARQUET_READ_LOCK:
        previous = context.use_datasource_v2
        context.use_datasource_v2 = False
        try:
            return ray.data.read_parquet(paths, filesystem=filesystem)
        finally:
            context.use_datasource_v2 = previous


def _read_dataset(store: ObjectStore, dataset_prefix: str, manifest: Manifest):
    filesystem, base = store.pyarrow_filesystem()
    parts = [
        f"{base}/{join_key(dataset_prefix, n)}"
        for n in sorted(manifest.files)
        if n.endswith(".parquet")
    ]
    if not parts:
        raise FeatureError(f"the dataset at {store.uri(dataset_prefix)} lists no Parquet parts")
    return read_parquet_files(parts, filesystem)


class FeatureLock:
    """The marker that makes one run the one computing a feature key, renewed while it computes.

    The marker names its run and when it was last renewed. While held, a daemon thread rewrites
    it every ``stale_after_s / 4`` seconds, so a marker not renewed for ``stale_after_s`` belongs
    to a run that died (a worker killed with SIGKILL, a lost node): another run breaks it at once
    instead of waiting out a fixed time far longer than any precompute. Even if two runs ever
    compute together, each writes under its own run prefix and publishes a complete manifest.
    """

    def __init__(
        self, store: ObjectStore, key: str, run_id: str, *, stale_after_s: float = 60
    ) -> None:
        self.store = store
        self.key = key
        self.run_id = run_id
        self.stale_after_s = stale_after_s
        self._released = threading.Event()
        self._renewer: threading.Thread | None = None

    def _payload(self) -> bytes:
        return json.dumps({"run": self.run_id, "at": time.time()}).encode()

    def _holder(self) -> tuple[str | None, float]:
        """(run, seconds since its last renewal) of the marker; a missing or unreadable one has
        no run and is stale. Other storage errors (the store unreachable) propagate: they say
        nothing about the marker, so they must not break a live run's lock."""
        try:
            held = json.loads(self.store.get_bytes(self.key))
            return held.get("run"), time.time() - float(held.get("at", 0))
        except (ObjectNotFoundError, ValueError, TypeError, AttributeError):
            return None, float("inf")

    def acquire(self) -> bool:
        """Take the marker if it is free or stale; True if this run now holds it (and renews it)."""
        taken = self.store.put_if_absent(self.key, self._payload())
        if not taken:
            _, age = self._holder()
            if age <= self.stale_after_s:
                return False
            self.store.delete(self.key)
            taken = self.store.put_if_absent(self.key, self._payload())
        if taken:
            self._renewer = threading.Thread(
                target=self._renew, name=f"feature-lock-{self.run_id}", daemon=True
            )
            self._renewer.start()
        return taken

    def _renew(self) -> None:
        while not self._released.wait(self.stale_after_s / 4):
            try:
                if self._holder()[0] != self.run_id:
                    return  # broken (and maybe taken) by another run: not ours any more
                self.store.put_bytes(self.key, self._payload())
            except StorageError:
                continue  # a transient store error; the next renewal tries again

    def release(self) -> None:
        """Stop renewing and remove the marker, unless another run has taken it over since."""
        self._released.set()
        if self._renewer is not None:
            self._renewer.join()
        # Unreadable now: leave the marker; unrenewed, it goes stale for the next run.
        with contextlib.suppress(StorageError):
            if self._holder()[0] == self.run_id:
                self.store.delete(self.key)


def find_features(store: ObjectStore, key: str) -> FeatureSet | None:
    """The published feature set for ``key``, or None if there is none yet."""
    prefix = join_key(FEATURES_PREFIX, key)
    try:
        manifest = read_manifest(store, prefix)
    except ManifestError:
        return None
    return FeatureSet(key, prefix, manifest)


def precompute_features(
    store: ObjectStore,
    dataset_prefix: str,
    teacher: TeacherSource,
    *,
    dataset_preprocessing: dict[str, Any],
    batch_size: int = 256,
    concurrency: int = 1,
    num_gpus: float = 0,
    torch_threads: int | None = None,
    attention_size: int | None = 4,
    probe_epochs: int = 30,
    seed: int = 0,
    wait_timeout_s: float = 3600,
    lock_stale_after_s: float = 60,
    recompute_corrupt: bool = False,
    on_progress: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    compute: Callable[..., FeatureSet] | None = None,
    cache_store: ObjectStore | None = None,
) -> FeatureSet:
    """Features of ``teacher`` for every row of the dataset: reused if published, else computed.

    The dataset is read from ``store`` at ``dataset_prefix``; the features are published under
    ``features/<key>`` of ``cache_store`` (default: ``store``) — jobs pass the deployment's
    store, so derived data never lands inside a dataset's location, and the key (a hash of the
    dataset's content and the teacher) lets every job with the same inputs reuse it.

    Returns the published :class:`FeatureSet`. A cached set whose shard is missing or fails its
    checksum raises :class:`FeatureError` naming the shard's URI, or, with
    ``recompute_corrupt``, is invalidated (its manifest deleted) and computed again, once: a
    second corrupt set raises. ``should_stop`` is asked while waiting for another run's
    precompute (True: raise :class:`~workers.errors.JobCancelled`). ``compute``, when given,
    runs the computation instead of this process (it receives the arguments of
    :func:`compute_features` after the two stores; the job pipeline runs it as a Ray task it
    can kill).
    """
    data_store = store
    store = cache_store if cache_store is not None else data_store
    dataset_sha, dataset_manifest = dataset_fingerprint(data_store, dataset_prefix)
    key = feature_key(
        teacher,
        dataset_sha,
        dataset_preprocessing,
        {"attention_size": attention_size, "probe_epochs": probe_epochs, "seed": seed},
    )
    prefix = join_key(FEATURES_PREFIX, key)
    deadline = time.monotonic() + wait_timeout_s
    run_id = uuid.uuid4().hex[:12]
    lock = FeatureLock(store, join_key(prefix, LOCK_NAME), run_id, stale_after_s=lock_stale_after_s)
    invalidated = waiting = False
    while True:
        existing = find_features(store, key)
        if existing is not None:
            try:
                verify_features(store, existing)
                return existing
            except (ChecksumMismatchError, FeatureError) as error:
                if not recompute_corrupt or invalidated:
                    raise
                # Self-healing: readers trust only manifests, so deleting it invalidates the
                # set; this run (or a concurrent one) computes it again.
                invalidated = True
                store.delete(join_key(prefix, MANIFEST_NAME))
                if on_progress:
                    on_progress(f"cached teacher features are corrupt ({error}); recomputing them")
        if lock.acquire():
            break
        if should_stop is not None and should_stop():
            from workers.errors import JobCancelled

            raise JobCancelled()
        if time.monotonic() > deadline:
            raise FeatureError(f"timed out waiting for another run to publish {store.uri(prefix)}")
        if on_progress and not waiting:
            on_progress("waiting for a concurrent precompute of the same features")
        waiting = True
        time.sleep(1.0)

    try:
        # Another run may have published between our last look and taking the lock.
        existing = find_features(store, key)
        if existing is not None:
            return existing
        if compute is None:
            compute = functools.partial(compute_features, store, data_store)
        return compute(
            dataset_prefix,
            dataset_manifest,
            teacher,
            key,
            prefix,
            run_id,
            dataset_preprocessing=dataset_preprocessing,
            batch_size=batch_size,
            concurrency=concurrency,
            num_gpus=num_gpus,
            torch_threads=torch_threads,
            attention_size=attention_size,
            probe_epochs=probe_epochs,
            seed=seed,
            dataset_sha=dataset_sha,
        )
    finally:
        lock.release()


def compute_features_at(
    store_url: str, data_store_url: str, settings: Any, *args: Any, **kwargs: Any
) -> FeatureSet:
    """:func:`compute_features` publishing to the store at ``store_url`` from the dataset in
    the store at ``data_store_url`` (for a Ray task: a store object does not travel, its URL
    does)."""
    from service.storage import open_store

    cache = open_store(store_url, settings)
    data = cache if data_store_url == store_url else open_store(data_store_url, settings)
    return compute_features(cache, data, *args, **kwargs)


def compute_features(
    store: ObjectStore,
    data_store: ObjectStore,
    dataset_prefix: str,
    dataset_manifest: Manifest,
    teacher: TeacherSource,
    key: str,
    prefix: str,
    run_id: str,
    *,
    dataset_preprocessing: dict[str, Any],
    batch_size: int,
    concurrency: int,
    num_gpus: float,
    torch_threads: int | None,
    attention_size: int | None,
    probe_epochs: int,
    seed: int,
    dataset_sha: str,
) -> FeatureSet:
    """Run the teacher over the dataset with Ray Data and publish the shards under the run's
    own prefix, then the manifest (the caller holds the key's lock)."""
    import ray.data

    dataset_meta, _ = parse_metadata(dataset_manifest.metadata)
    # Decoded with the channels the dataset declares, as everywhere (bird_datasets.codec).
    image_shape = dataset_meta.image_shape if dataset_meta is not None else None
    ds = _read_dataset(data_store, dataset_prefix, dataset_manifest)
    ds = ds.map_batches(
        decode_stage,
        fn_kwargs={"image_shape": image_shape},
        batch_format="numpy",
        batch_size=batch_size,
    )
    embedded = ds.map_batches(
        TeacherEmbedder,
        fn_constructor_kwargs={
            "source": teacher,
            "dataset_preprocessing": dataset_preprocessing,
            "attention_size": attention_size,
            "torch_threads": torch_threads,
            "image_shape": image_shape,
        },
        batch_size=batch_size,
        batch_format="numpy",
        # A pool of `concurrency` actors, each loading the teacher once.
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus or None,
    )
    if teacher.needs_probe:
        # The probe needs every train embedding before any logits can be written: keep the
        # teacher's outputs instead of running it twice. Without a probe, one streaming pass.
        embedded = embedded.materialize()

    metadata: dict[str, Any] = {
        "format": "bird-features",
        "key": key,
        "run": run_id,
        "teacher": teacher.identity(),
        "dataset_sha256": dataset_sha,
        "preprocessing": dataset_preprocessing,
    }
    probe_state: dict[str, np.ndarray] | None = None
    if teacher.needs_probe:
        # One pass over the materialized blocks; the split filter is a numpy mask.
        arrays = _collect(embedded.select_columns(["embedding", "label", "split"]))
        is_train = arrays["split"] == "train"
        probe = train_linear_probe(
            torch.from_numpy(arrays["embedding"][is_train]),
            torch.from_numpy(arrays["label"][is_train]).long(),
            teacher.num_classes,
            epochs=probe_epochs,
            seed=seed,
        )
        probe_state = {
            "weight": probe.weight.detach().numpy().T.copy(),
            "bias": probe.bias.detach().numpy().copy(),
        }
        metadata["probe"] = {"epochs": probe_epochs, "seed": seed}

    def finalize(batch: dict[str, np.ndarray]) -> pa.Table:
        if probe_state is not None:
            batch = dict(batch)
            batch["logits"] = batch["embedding"] @ probe_state["weight"] + probe_state["bias"]
        return table_for_write(batch)

    run_prefix = join_key(prefix, f"run-{run_id}")
    filesystem, base = store.pyarrow_filesystem()
    final = embedded.map_batches(finalize, batch_format="numpy", batch_size=4096)
    final.write_parquet(f"{base}/{run_prefix}", filesystem=filesystem)

    entries: dict[str, ManifestEntry] = {}
    counts: dict[str, int] = {}
    dims: dict[str, int] = {}
    for info in store.list(run_prefix):
        if not info.key.endswith(".parquet"):
            continue
        data = store.get_bytes(info.key)
        table = pq.read_table(io.BytesIO(data), columns=["split", "embedding", "logits"])
        for split, n in zip(
            *np.unique(table.column("split").to_numpy(zero_copy_only=False), return_counts=True),
            strict=True,
        ):
            counts[str(split)] = counts.get(str(split), 0) + int(n)
        if table.num_rows:
            dims["embedding"] = table.schema.field("embedding").type.list_size
            dims["logits"] = table.schema.field("logits").type.list_size
        relative = info.key[len(prefix) + 1 :]
        entries[relative] = ManifestEntry(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    if not entries:
        raise FeatureError(f"precompute wrote no shards under {store.uri(run_prefix)}")
    metadata.update({"counts": counts, "dims": dims, "attention_size": attention_size})
    manifest = Manifest(created_at=datetime.now(timezone.utc), files=entries, metadata=metadata)
    # The manifest is the commit point: one PUT, written after every shard.
    store.put_bytes(join_key(prefix, MANIFEST_NAME), manifest.to_json())
    return FeatureSet(key, prefix, manifest)


def _collect(ds: Any) -> dict[str, np.ndarray]:
    batches = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def verify_features(store: ObjectStore, features: FeatureSet) -> None:
    """Check every shard's size and sha256 against the manifest (names the URI if not)."""
    for name, entry in features.manifest.files.items():
        key = join_key(features.prefix, name)
        info = [i for i in store.list(key.rsplit("/", 1)[0]) if i.key == key]
        if not info:
            raise FeatureError(f"feature shard {store.uri(key)} is listed but missing")
        if info[0].size != entry.size:
            raise ChecksumMismatchError(
                f"feature shard {store.uri(key)} has {info[0].size} bytes, manifest says "
                f"{entry.size}",
                store.uri(key),
            )
        fetch_verified(store, key, entry)


# -- the training side -----------------------------------------------------------------------


def read_feature_split(store: ObjectStore, features: FeatureSet, split: str | Sequence[str]):  # noqa: ANN201
    """A Ray Data dataset of the rows of one split, or of several (student input + teacher
    outputs + label + group + split)."""
    from ray.data.expressions import col

    filesystem, base = store.pyarrow_filesystem()
    dataset = read_parquet_files([f"{base}/{shard}" for shard in features.shards], filesystem)
    splits = [split] if isinstance(split, str) else list(split)
    return dataset.filter(expr=col("split").is_in(splits))


def load_feature_table(store: ObjectStore, features: FeatureSet) -> pa.Table:
    """All shards as one Arrow table, each verified against the manifest (no Ray needed)."""
    tables = [
        pq.read_table(io.BytesIO(fetch_verified(store, shard, features.manifest.files[name])))
        for shard, name in zip(features.shards, sorted(features.manifest.files), strict=True)
    ]
    return pa.concat_tables(tables)


def rows_as_tensors(
    rows: dict[str, np.ndarray], image_shape: Sequence[int] | None = None
) -> dict[str, torch.Tensor | None]:
    """Feature rows as tensors: raw ``x``, ``label``, ``group`` and the teacher's outputs
    (``teacher_embedding``, ``teacher_logits``, ``teacher_attention``; None when absent).

    Images not decoded yet are decoded for the dataset's declared ``image_shape`` (without
    it, the first image sets the shape: see :func:`bird_datasets.codec.decode_images`).
    """
    if "pixels" in rows:  # decoded once, ahead of training (see decode_images_once)
        x = torch.from_numpy(np.ascontiguousarray(rows["pixels"]))
    elif "image" in rows:
        x = torch.from_numpy(decode_images(rows["image"], image_shape))
    else:
        x = torch.from_numpy(dense(rows["x"]))
    label = rows["label"]
    label_t = (
        torch.from_numpy(np.stack(label).astype(np.float32))
        if label.dtype == object
        else torch.from_numpy(label.astype(np.int64))
    )

    def tensor(name: str) -> torch.Tensor | None:
        if name not in rows:
            return None
        return torch.from_numpy(dense(rows[name]))

    attention = tensor("attention")
    if attention is not None:
        side = round(attention.shape[1] ** 0.5)
        attention = attention.view(-1, side, side)
    return {
        "x": x,
        "label": label_t,
        "group": torch.from_numpy(rows["group"].astype(np.int64)),
        "teacher_embedding": tensor("embedding"),
        "teacher_logits": tensor("logits"),
        "teacher_attention": attention,
    }


def batch_from_rows(
    rows: dict[str, np.ndarray],
    preprocess: Preprocessor,
    device: str | torch.device = "cpu",
    image_shape: Sequence[int] | None = None,
) -> Batch:
    """Turn a batch of feature rows into a bird_core :class:`Batch` (the teacher never runs)."""
    batch = Batch(**rows_as_tensors(rows, image_shape)).to(device)  # type: ignore[arg-type]
    batch.x = preprocess(batch.x)
    return batch


def iter_batches(
    dataset: Any,
    batch_size: int,
    preprocess: Preprocessor,
    image_shape: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Batches from a Ray Data dataset or DataIterator of feature rows."""
    for rows in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield batch_from_rows(rows, preprocess, image_shape=image_shape)
