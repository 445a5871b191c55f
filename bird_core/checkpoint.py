"""Student checkpoints: safetensors plus JSON, a manifest written last, never a pickle.

A checkpoint is a directory::

    student.safetensors    the student's state_dict
    method.safetensors     the method's state (BIRD: φ and the projector), if it has any
    optimizer.safetensors  tensors of the optimizer state (for resume), if saved
    optimizer.json         the optimizer state's structure, tensors replaced by references
    meta.json              model name/options, preprocessing, method, spec, epoch, metrics
    manifest.json          size and sha256 of every file above — written last

Readers trust only the manifest: a directory without one is not a checkpoint, and a file whose
checksum differs from its manifest entry is rejected.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bird_core.losses import probabilities
from bird_core.models import Net, create_model
from bird_core.preprocess import Preprocessor

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _flatten_state(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """Replace every tensor in a nested state by ``{"__tensor__": key}``; collect the tensors."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        # JSON keys are strings: remember which were ints (optimizer param ids).
        return {
            "__dict__": [
                [k, isinstance(k, int), _flatten_state(v, tensors, prefix)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, list | tuple):
        return {"__list__": [_flatten_state(v, tensors, prefix) for v in obj]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint without pickling")


def _unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {
                (int(k) if is_int else k): _unflatten_state(v, tensors)
                for k, is_int, v in obj["__dict__"]
            }
        if "__list__" in obj:
            return [_unflatten_state(v, tensors) for v in obj["__list__"]]
    return obj


def _state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(
    directory: str | os.PathLike[str],
    student: Net,
    preprocess: Preprocessor,
    *,
    method: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    spec: dict[str, Any] | None = None,
    epoch: int | None = None,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint into ``directory`` (created if needed), the manifest last.

    ``student`` must have been built by :func:`bird_core.models.create_model` (it records the
    model's name and options, which :func:`load_student` needs to rebuild it).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / MANIFEST
    # An existing manifest would vouch for files we are about to replace: remove it first.
    manifest_path.unlink(missing_ok=True)
    model_name = getattr(student, "model_name", None)
    if model_name is None:
        raise ValueError("the student was not built by create_model: its architecture is unknown")
    files: list[str] = []
    save_file(_state_tensors(student), str(directory / "student.safetensors"))
    files.append("student.safetensors")
    if method is not None and len(method.state_dict()) > 0:
        save_file(_state_tensors(method), str(directory / "method.safetensors"))
        files.append("method.safetensors")
    if optimizer is not None:
        tensors: dict[str, torch.Tensor] = {}
        structure = _flatten_state(optimizer.state_dict(), tensors, "")
        save_file(tensors, str(directory / "optimizer.safetensors"))
        (directory / "optimizer.json").write_text(json.dumps(structure))
        files += ["optimizer.safetensors", "optimizer.json"]
    meta = {
        "format_version": FORMAT_VERSION,
        "model": {
            "name": model_name,
            "num_classes": student.num_classes,
            "options": getattr(student, "model_options", {}),
        },
        "preprocessing": preprocess.config(),
        "method": getattr(method, "name", None),
        # Facts the method reports about its own state (BIRD: the learned gate's summary).
        "method_summary": (
            method.extra_state_for_checkpoint()
            if hasattr(method, "extra_state_for_checkpoint")
            else {}
        ),
        "spec": spec or {},
        "epoch": epoch,
        "step": step,
        "metrics": metrics or {},
        "extra": extra or {},
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2, default=float))
    files.append("meta.json")
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {
            name: {
                "size": (directory / name).stat().st_size,
                "sha256": sha256_file(directory / name),
            }
            for name in files
        },
    }
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, manifest_path)  # atomic: the manifest appears complete or not at all
    return directory


def read_manifest(directory: str | os.PathLike[str], verify: bool = True) -> dict[str, Any]:
    """The checkpoint's manifest, after checking every listed file's size and sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {path} is missing")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path} is not a valid manifest: {err}") from err
    if verify:
        for name, entry in files.items():
            file = directory / name
            if not file.is_file():
                raise CheckpointError(f"{file} is listed in the manifest but missing")
            if file.stat().st_size != entry["size"]:
                raise CheckpointError(
                    f"{file} has {file.stat().st_size} bytes, the manifest says {entry['size']}"
                )
            if sha256_file(file) != entry["sha256"]:
                raise CheckpointError(f"{file} does not match its sha256 in the manifest")
    return manifest


def _require_listed(directory: Path, manifest: dict[str, Any], *names: str) -> None:
    """Only files the manifest vouches for are read."""
    for name in names:
        if name not in manifest["files"]:
            raise CheckpointError(f"{directory / MANIFEST} does not list {name}")


@dataclass
class LoadedStudent:
    """A student ready to use: ``model`` (eval mode), its ``preprocess``, and ``meta.json``."""

    model: Net
    preprocess: Preprocessor
    meta: dict[str, Any]

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class probabilities for raw rows (uint8 images ``[N, C, H, W]`` or tabular rows).

        ``x`` is a tensor or a NumPy array: new table rows come as the ``float32`` array that
        ``TableEncoding.encode`` returns, images often as arrays too.
        """
        task = self.meta.get("spec", {}).get("task", "multiclass")
        x = torch.as_tensor(x, device=self.preprocess.mean.device)
        return probabilities(self.model(self.preprocess(x)), task)


def load_student(path: str | os.PathLike[str], map_location: str = "cpu") -> LoadedStudent:
    """Load a checkpoint directory: the student in eval mode with its preprocessing.

    Example::

        student = load_student("checkpoints/best")
        probs = student.predict_proba(images)          # or:
        logits = student.model(student.preprocess(images))
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    _require_listed(directory, manifest, "student.safetensors", "meta.json")
    meta = json.loads((directory / "meta.json").read_text())
    model_info = meta["model"]
    model = create_model(model_info["name"], model_info["num_classes"], **model_info["options"])
    state = load_file(str(directory / "student.safetensors"), device=map_location)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{directory / 'student.safetensors'} does not fit: {err}") from err
    preprocess = Preprocessor.from_config(meta["preprocessing"])
    return LoadedStudent(model.to(map_location).eval(), preprocess.to(map_location), meta)


def load_training_state(path: str | os.PathLike[str], map_location: str = "cpu") -> dict[str, Any]:
    """Everything needed to resume: student/method tensors, optimizer state, epoch, step."""
    directory = Path(path)
    manifest = read_manifest(directory)
    _require_listed(directory, manifest, "student.safetensors", "meta.json")
    meta = json.loads((directory / "meta.json").read_text())
    out: dict[str, Any] = {
        "student": load_file(str(directory / "student.safetensors"), device=map_location),
        "method": None,
        "optimizer": None,
        "meta": meta,
    }
    if "method.safetensors" in manifest["files"]:
        out["method"] = load_file(str(directory / "method.safetensors"), device=map_location)
    if "optimizer.safetensors" in manifest["files"]:
        _require_listed(directory, manifest, "optimizer.json")
        tensors = load_file(str(directory / "optimizer.safetensors"), device=map_location)
        structure = json.loads((directory / "optimizer.json").read_text())
        out["optimizer"] = _unflatten_state(structure, tensors)
    return out
