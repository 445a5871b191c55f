"""Facts about the ``tv:`` and ``timm:`` architectures, for a catalogue read without torch.

The service checks a job's student when it is submitted, and never imports torch: it reads a
catalogue of every torchvision and timm architecture (``service/student_catalogue.json``) that
this module computes, one :class:`ArchitectureFacts` per name, by building each network on
PyTorch's ``meta`` device (shapes only: no memory, no arithmetic). With these facts a student's
parameter count is exact arithmetic::

    backbone_params + (in_channels - 3) * stem_per_channel + head(features, embed_dim, classes)

``scripts/student_catalogue.py`` writes the catalogue; ``tests/unit/test_student_catalogue.py``
checks it against the installed registries and against networks built for real.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from bird_core.models import create_model

__all__ = [
    "PROBE_SIZES",
    "ArchitectureFacts",
    "describe_architecture",
    "registry_names",
]

# Square input sides a forward pass is tried at, to find the smallest one an architecture takes
# (many stop working once their downsampling leaves nothing) and whether it takes only one.
PROBE_SIZES = (8, 16, 32, 64, 96, 128, 160, 224, 256, 299, 384, 448, 512)


@dataclass(frozen=True)
class ArchitectureFacts:
    """What the service needs to know about one ``tv:<arch>`` / ``timm:<arch>`` student.

    ``backbone_params``: parameters without bird's head, for 3 input channels.
    ``features``: width of the pooled features the head (embedding layer, classifier) takes.
    ``stem_per_channel``: parameters each input channel adds (the stem's weights per channel).
    ``spatial``: whether the body gives a spatial feature map (attention transfer needs one);
    None when the forward pass could not be run on the meta device.
    ``min_size``: the smallest of :data:`PROBE_SIZES` a forward pass takes (None: unknown).
    ``fixed_size``: the one input side the architecture takes, when it takes only one.
    """

    backbone_params: int
    features: int
    stem_per_channel: int
    spatial: bool | None
    min_size: int | None
    fixed_size: int | None

    def as_list(self) -> list[Any]:
        """The compact JSON form of the catalogue (field order of this class)."""
        return list(asdict(self).values())


def registry_names() -> dict[str, list[str]]:
    """Every architecture the registries of the installed torchvision and timm offer."""
    import timm
    import torchvision

    return {
        "tv": sorted(torchvision.models.list_models(module=torchvision.models)),
        "timm": sorted(timm.list_models()),
    }


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _forward_ok(net: torch.nn.Module, channels: int, size: int) -> bool | None:
    """Whether a forward pass takes ``size``×``size`` inputs; the spatial-map answer as a
    side channel: returns None when it fails, else whether the body gave a spatial map."""
    x = torch.empty(2, channels, size, size, device="meta")
    try:
        out = net(x, features=True)
    except Exception:  # any failure means: not at this size (or not on the meta device)
        return None
    return out.feature_map is not None


def _stem_per_channel(net: torch.nn.Module, name: str) -> int | None:
    """Weights of the stem convolution per input channel, read off the 3-channel network
    (None when the stem cannot be told: then a 4-channel build measures it)."""
    from bird_core.models import first_conv

    backbone = net.backbone  # type: ignore[attr-defined]
    if name.startswith("tv:"):
        conv = first_conv(backbone)[2]  # the convolution TorchvisionNet rebuilds
    else:
        stem = getattr(backbone, "pretrained_cfg", {}).get("first_conv")
        if not isinstance(stem, str):
            return None
        try:
            conv = backbone.get_submodule(stem)
        except AttributeError:
            return None
    weight = getattr(conv, "weight", None)
    if weight is None or weight.dim() < 2 or weight.shape[1] != 3:
        return None
    return weight.numel() // 3


def _timm_fixed_size(net: torch.nn.Module) -> int | None:
    """The input side a timm architecture is fixed to (position embeddings), or None."""
    config = getattr(net.backbone, "pretrained_cfg", {})  # type: ignore[attr-defined]
    size = config.get("input_size")
    if config.get("fixed_input_size") and isinstance(size, list | tuple) and size[-1] == size[-2]:
        return int(size[-1])
    return None


def describe_architecture(name: str) -> ArchitectureFacts:
    """The :class:`ArchitectureFacts` of ``name`` (``tv:<arch>`` or ``timm:<arch>``).

    Builds the network on the meta device and runs forward passes there (as few as it can:
    each costs about as much as the build); raises what
    :func:`~bird_core.models.create_model` raises for an architecture that cannot be built.
    """
    if not name.startswith(("tv:", "timm:")):
        raise ValueError(f"describe_architecture takes tv:<arch> or timm:<arch>, got {name!r}")
    with torch.device("meta"):
        net = create_model(name, 1)
    features = net.head.fc.in_features
    backbone = _count(net) - (features + 1)
    per_channel = _stem_per_channel(net, name)
    if per_channel is None:
        with torch.device("meta"):
            per_channel = _count(create_model(name, 1, in_channels=4)) - _count(net)
    net.eval()
    spatial: bool | None = None
    min_size: int | None = None
    fixed = _timm_fixed_size(net) if name.startswith("timm:") else None
    sizes = (fixed,) if fixed is not None else PROBE_SIZES
    for size in sizes:
        result = _forward_ok(net, 3, size)
        if result is not None:
            spatial, min_size = result, size
            break
    if name.startswith("tv:") and min_size is not None and min_size != PROBE_SIZES[-1]:
        # A side that works, and the next probed ones that do not: a fixed input size (a ViT
        # with fixed position embeddings). timm says so itself; torchvision does not.
        larger = [s for s in PROBE_SIZES if s > min_size]
        if all(_forward_ok(net, 3, s) is None for s in larger[:2]):
            fixed = min_size
    return ArchitectureFacts(backbone, features, per_channel, spatial, min_size, fixed)
