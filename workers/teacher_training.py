"""Train a teacher with bird itself and publish it where jobs can use it (``bird teachers train``).

A team without a pretrained teacher for its task can train one on the task's dataset: any
``bird_core.models`` architecture, cross-entropy only (method ``none``), evaluated on the test
split. The result is published as an artifact set (manifest written last)::

    <out_prefix>/model.safetensors   the teacher's state_dict
    <out_prefix>/teacher.json        kind "model", arch, options, num_classes, task,
                                     preprocessing, test/val metrics, dataset, training settings
    <out_prefix>/manifest.json       size and sha256 of both, written last

A job then names it with ``{"kind": "model", "weights_uri": "<out>/model.safetensors"}`` (or
the prefix itself): :func:`workers.teachers.teacher_source_from_spec` reads ``teacher.json``
for the architecture, options and input normalisation, and checks both files against the
manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from bird_core.data.base import DatasetSplits
from bird_core.methods import create_method
from bird_core.models import create_model
from bird_core.preprocess import Preprocessor
from bird_core.train import EpochResult, TrainConfig, TrainingState, evaluate, fit, seed_everything
from bird_datasets.fingerprint import dataset_fingerprint
from service.storage import Manifest, ObjectStore, publish
from service.teachers import TEACHER_JSON, TEACHER_WEIGHTS
from workers.datasets import load_splits

__all__ = ["TEACHER_FORMAT", "default_options", "train_teacher"]

TEACHER_FORMAT = "bird-teacher"
TEACHER_FORMAT_VERSION = 1

# Architectures whose width the default options narrow to fit a CPU budget.
_WIDTH_ARCHS = frozenset({"resnet18", "small_cnn"})


def default_options(arch: str) -> dict[str, Any]:
    """The constructor options used when none are given: width 16 for the bird CNNs."""
    return {"width": 16} if arch in _WIDTH_ARCHS else {}


def _input_options(arch: str, data: DatasetSplits, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` plus the input size the bird architectures need from the dataset.

    The filled-in values are recorded in ``teacher.json`` with the rest, so the teacher is
    rebuilt exactly as trained.
    """
    resolved = dict(options)
    shape = data.input_shape
    if arch == "mlp" and "in_features" not in resolved:
        resolved["in_features"] = int(shape[0])
    elif arch in _WIDTH_ARCHS and "in_channels" not in resolved and shape[0] != 3:
        resolved["in_channels"] = int(shape[0])
    return resolved


def train_teacher(
    store: ObjectStore,
    dataset_prefix: str,
    out_prefix: str,
    *,
    arch: str = "resnet18",
    options: Mapping[str, Any] | None = None,
    epochs: int = 3,
    lr: float = 2e-3,
    batch_size: int = 128,
    seed: int = 0,
    max_steps_per_epoch: int | None = None,
    device: str | None = None,
    out_store: ObjectStore | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Manifest:
    """Train ``arch`` with cross-entropy on the dataset at ``dataset_prefix`` and publish it.

    ``options`` go to ``create_model`` (default :func:`default_options`); the dataset's input
    size is added where the architecture needs it. The teacher is published under
    ``out_prefix`` of ``out_store`` (default: ``store``), manifest last, and the manifest is
    returned. Raises the storage/dataset errors of :func:`workers.datasets.load_splits`,
    ``TypeError``/``ValueError`` for an unknown architecture or option, and ``ValueError`` for
    bad training settings.
    """
    out_store = out_store or store
    options = default_options(arch) if options is None else dict(options)
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        max_steps_per_epoch=max_steps_per_epoch,
        device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
    )
    data = load_splits(store, dataset_prefix)
    options = _input_options(arch, data, options)
    # Seed before building so the initial weights, like the batch order, follow ``seed``.
    seed_everything(seed)
    net = create_model(arch, data.num_classes, **options)
    method = create_method("none")
    method.setup(
        student_dim=net.embed_dim, teacher_dim=None, num_classes=data.num_classes, task=data.task
    )
    preprocess = Preprocessor.from_config(data.preprocessing)

    def report(epoch: EpochResult, state: TrainingState) -> None:
        if on_progress is not None:
            loss = epoch.train.get("loss", float("nan"))
            on_progress(
                f"epoch {epoch.epoch + 1}/{epochs}: loss {loss:.4f}, "
                f"val accuracy {epoch.val['accuracy']:.1f} %"
            )

    result = fit(net, method, data, config, preprocess=preprocess, on_epoch_end=report)
    net.cpu().eval()
    try:
        test_metrics: dict[str, Any] = evaluate(net, preprocess.cpu(), data.test, data.task)
    except ValueError as err:
        # E.g. AUROC is undefined when the test split lacks a class: keep the trained teacher
        # and say why there are no metrics rather than throwing the training away.
        test_metrics = {"error": str(err)}

    dataset_uri = store.uri(dataset_prefix)
    teacher = {
        "format": TEACHER_FORMAT,
        "format_version": TEACHER_FORMAT_VERSION,
        "kind": "model",
        "arch": arch,
        "options": options,
        "num_classes": data.num_classes,
        "task": data.task,
        # The dataset's own config (float64 statistics), not the float32 buffers' round trip:
        # the teacher then sees exactly the inputs the students of this dataset see.
        "preprocessing": dict(data.preprocessing),
        "weights": TEACHER_WEIGHTS,
        "test_metrics": test_metrics,
        "val_metrics": result.epochs[-1].val if result.epochs else None,
        "dataset": {
            "uri": dataset_uri,
            "name": data.name,
            "sha256": dataset_fingerprint(store, dataset_prefix)[0],
        },
        "training": {
            "method": "none",
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "max_steps_per_epoch": max_steps_per_epoch,
        },
    }
    from safetensors.torch import save as save_safetensors

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    files = {
        TEACHER_WEIGHTS: save_safetensors(state),
        TEACHER_JSON: json.dumps(teacher, indent=2, sort_keys=True).encode(),
    }
    summary = {
        "format": TEACHER_FORMAT,
        "kind": "model",
        "arch": arch,
        "num_classes": data.num_classes,
        "dataset_uri": dataset_uri,
        "test_accuracy": test_metrics.get("accuracy"),
        "test_delta_mean_deo": test_metrics.get("delta_mean_deo"),
        "test_predicted_classes": test_metrics.get("predicted_classes"),
    }
    return publish(out_store, out_prefix, files, metadata=summary)
