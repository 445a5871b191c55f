"""The students a job may name: architectures, their options, their size — without torch.

A student is ``small_cnn``, ``resnet18`` or ``mlp`` (bird's own networks) or any architecture of
torchvision (``tv:<arch>``) or timm (``timm:<arch>``), randomly initialised, with bird's head
(an embedding layer and a classifier) on its pooled features. The API checks a job's student
when the job is submitted, and the service never imports torch, so everything that check needs
is here:

* :data:`STUDENT_OPTIONS`: the options each architecture takes, with their types and bounds
  (mirrors the constructors in ``bird_core.models``; ``tests/unit/test_students.py`` checks
  that the two agree), and :data:`STUDENT_DEFAULTS`, the options a spec that names none gets;
* the parameter count of a student as exact arithmetic: written out for bird's own networks,
  from the catalogue ``student_catalogue.json`` (generated from torchvision and timm by
  ``scripts/student_catalogue.py``, checked by the same test) for the others.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_STUDENTS",
    "CATALOGUE_PATH",
    "STUDENT_DEFAULTS",
    "STUDENT_OPTIONS",
    "ArchitectureFacts",
    "OptionRule",
    "architecture_facts",
    "catalogue_names",
    "check_student_name",
    "check_student_options",
    "student_family",
    "student_input",
    "student_parameters",
    "student_spatial",
]

BUILTIN_STUDENTS = ("small_cnn", "resnet18", "mlp")
REGISTRIES = ("tv", "timm")
CATALOGUE_PATH = Path(__file__).with_name("student_catalogue.json")
# Input channels an image dataset may declare (bird_datasets.codec.CHANNEL_MODES).
IMAGE_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class OptionRule:
    """What one student option accepts.

    ``kind``: ``"int"`` (``low``..``high``), ``"choice"`` (one of ``choices``) or
    ``"int_list"`` (1..``max_items`` integers, each ``low``..``high``); ``nullable``: ``null``
    is accepted too. ``from_dataset``: bird fills the option in from the dataset (input
    channels or features); a value given must agree with it.
    """

    kind: str
    low: int = 1
    high: int = 10**6
    choices: tuple[str, ...] = ()
    nullable: bool = False
    max_items: int = 16
    from_dataset: bool = False
    help: str = ""

    def check(self, name: str, value: Any) -> None:
        """Raise ``ValueError`` saying what ``value`` breaks."""
        if value is None:
            if not self.nullable:
                raise ValueError(f"option {name} must not be null")
            return
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"option {name} must be one of {list(self.choices)}")
            return
        if self.kind == "int_list":
            if not isinstance(value, list) or not 1 <= len(value) <= self.max_items:
                raise ValueError(f"option {name} must be a list of 1 to {self.max_items} integers")
            for item in value:
                self._check_int(name, item)
            return
        self._check_int(name, value)

    def _check_int(self, name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"option {name} must be an integer, got {value!r}")
        if not self.low <= value <= self.high:
            raise ValueError(f"option {name} must lie in {self.low}..{self.high}, got {value}")


_EMBED = OptionRule(
    "int",
    1,
    65_536,
    nullable=True,
    help="width of the embedding layer before the classifier (null: none; BIRD's default "
    "virtual step needs one)",
)
_CHANNELS = OptionRule(
    "int", 1, 4, from_dataset=True, help="input channels (filled in from the dataset)"
)

# Architecture family → option → rule. Mirrors the constructors of bird_core.models (the
# built-in networks, TorchvisionNet and TimmNet; checked by tests/unit/test_students.py).
STUDENT_OPTIONS: dict[str, dict[str, OptionRule]] = {
    "small_cnn": {
        "width": OptionRule("int", 1, 4096, help="channels of the first block (then 2x, 4x)"),
        "embed_dim": _EMBED,
        "in_channels": _CHANNELS,
    },
    "resnet18": {
        "width": OptionRule("int", 1, 4096, help="channels of the first stage (then 2x, 4x, 8x)"),
        "stem": OptionRule(
            "choice",
            choices=("cifar", "imagenet"),
            help="cifar: 3x3 stride 1 (small images); imagenet: 7x7 stride 2 and max-pool",
        ),
        "embed_dim": _EMBED,
        "in_channels": _CHANNELS,
    },
    "mlp": {
        "hidden": OptionRule("int_list", 1, 65_536, help="widths of the hidden layers"),
        "embed_dim": _EMBED,
        "in_features": OptionRule(
            "int", 1, 10**7, from_dataset=True, help="input features (filled in from the dataset)"
        ),
    },
    "tv": {"embed_dim": _EMBED, "in_channels": _CHANNELS},
    "timm": {"embed_dim": _EMBED, "in_channels": _CHANNELS},
}

# The options a student gets for what its spec leaves out (given options override these).
STUDENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "small_cnn": {"width": 16, "embed_dim": 64},
    "resnet18": {"width": 16, "stem": "cifar", "embed_dim": 64},
    "mlp": {"hidden": [64], "embed_dim": 32},
    "tv": {"embed_dim": 128},
    "timm": {"embed_dim": 128},
}


def student_family(model: str) -> str:
    """``small_cnn``, ``resnet18``, ``mlp``, ``tv`` or ``timm`` (the key of the tables above)."""
    registry, sep, _ = model.partition(":")
    return registry if sep else model


def student_input(model: str) -> str:
    """The input the architecture takes: ``"tabular"`` (``mlp``) or ``"image"``."""
    return "tabular" if model == "mlp" else "image"


# -- the catalogue of tv: and timm: architectures -----------------------------------------------


@dataclass(frozen=True)
class ArchitectureFacts:
    """One catalogue entry (see ``bird_core.catalogue.ArchitectureFacts``)."""

    backbone_params: int
    features: int
    stem_per_channel: int
    spatial: bool | None
    min_size: int | None
    fixed_size: int | None


@functools.cache
def _catalogue() -> dict[str, Any]:
    return json.loads(CATALOGUE_PATH.read_text(encoding="utf-8"))


def catalogue_names(registry: str) -> tuple[str, ...]:
    """The architectures of ``registry`` (``tv`` or ``timm``) a student may be, sorted."""
    return tuple(sorted(_catalogue()[registry]))


def architecture_facts(model: str) -> ArchitectureFacts | None:
    """The catalogue entry of ``tv:<arch>`` / ``timm:<arch>`` (None for other names)."""
    registry, sep, arch = model.partition(":")
    if not sep or registry not in REGISTRIES:
        return None
    row = _catalogue()[registry].get(arch)
    if row is None:
        return None
    fields = _catalogue()["fields"]
    return ArchitectureFacts(**dict(zip(fields, row, strict=True)))


def check_student_name(model: str) -> None:
    """Raise ``ValueError`` unless ``model`` names a student bird can build."""
    if model in BUILTIN_STUDENTS:
        return
    registry, sep, arch = model.partition(":")
    if sep and registry in REGISTRIES:
        if architecture_facts(model) is not None:
            return
        unbuildable = _catalogue()["unbuildable"][registry].get(arch)
        if unbuildable is not None:
            raise ValueError(f"{model} cannot be built as a student: {unbuildable}")
        close = difflib.get_close_matches(arch, catalogue_names(registry), n=4, cutoff=0.6)
        hint = f"; close matches: {', '.join(f'{registry}:{c}' for c in close)}" if close else ""
        what = "torchvision" if registry == "tv" else "timm"
        raise ValueError(f"unknown {what} architecture {arch!r}{hint}")
    raise ValueError(
        f"unknown student model {model!r}; valid: {', '.join(BUILTIN_STUDENTS)}, "
        "tv:<torchvision architecture> (e.g. tv:mobilenet_v3_large, tv:efficientnet_b0, "
        "tv:resnet50) or timm:<timm architecture> (e.g. timm:mobilenetv3_large_100)"
    )


def check_student_options(model: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for an option ``model`` does not take or a value out of bounds."""
    rules = STUDENT_OPTIONS[student_family(model)]
    unknown = sorted(set(options) - set(rules))
    if unknown:
        shown = [name.encode("unicode_escape").decode() for name in unknown]
        raise ValueError(
            f"student {model!r} got unknown option(s) {shown}; valid options: {', '.join(rules)}"
        )
    for name, value in options.items():
        rules[name].check(name, value)


def student_spatial(model: str) -> bool | None:
    """Whether the student's body gives a spatial feature map (None: unknown)."""
    if model in ("small_cnn", "resnet18"):
        return True
    if model == "mlp" or model.startswith("tv:"):
        return False  # bird's torchvision wrapper pools inside the backbone
    facts = architecture_facts(model)
    return facts.spatial if facts is not None else None


# -- parameter counts --------------------------------------------------------------------------


def _head(width: int, embed_dim: int | None, num_classes: int) -> int:
    """ClassifierHead: optional Linear(width, embed_dim) + ReLU, then Linear(., num_classes)."""
    if embed_dim is None:
        return width * num_classes + num_classes
    return width * embed_dim + embed_dim + embed_dim * num_classes + num_classes


def _conv_bn(cin: int, cout: int, kernel: int = 3) -> int:
    """Conv2d without bias plus BatchNorm2d's weight and bias."""
    return cin * cout * kernel * kernel + 2 * cout


def _small_cnn(options: Mapping[str, Any], channels: int, num_classes: int) -> int:
    width = options.get("width", 32)
    body = _conv_bn(channels, width) + _conv_bn(width, 2 * width) + _conv_bn(2 * width, 4 * width)
    return body + _head(4 * width, options.get("embed_dim", 64), num_classes)


def _resnet18(options: Mapping[str, Any], channels: int, num_classes: int) -> int:
    width = options.get("width", 64)
    kernel = 7 if options.get("stem", "cifar") == "imagenet" else 3
    total = _conv_bn(channels, width, kernel)
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        first = _conv_bn(cin, cout) + _conv_bn(cout, cout)
        if stage > 0 or cin != cout:
            first += _conv_bn(cin, cout, 1)  # the shortcut's projection
        total += first + 2 * _conv_bn(cout, cout)
        cin = cout
    return total + _head(cin, options.get("embed_dim"), num_classes)


def _mlp(options: Mapping[str, Any], features: int, num_classes: int) -> int:
    total, width = 0, features
    for hidden in options.get("hidden", [64]):
        total += width * hidden + hidden
        width = hidden
    return total + _head(width, options.get("embed_dim", 32), num_classes)


def student_parameters(
    model: str, options: Mapping[str, Any], num_classes: int, inputs: int
) -> int:
    """The number of parameters of the student ``model`` with ``options`` for ``num_classes``
    classes and ``inputs`` input channels (images) or features (``mlp``): exactly what
    ``sum(p.numel() for p in create_model(...).parameters())`` gives, without building it.

    Options left out take the constructor defaults of ``bird_core.models`` (not
    :data:`STUDENT_DEFAULTS`, which the spec fills in before this is called).
    """
    if model == "small_cnn":
        return _small_cnn(options, inputs, num_classes)
    if model == "resnet18":
        return _resnet18(options, inputs, num_classes)
    if model == "mlp":
        return _mlp(options, inputs, num_classes)
    facts = architecture_facts(model)
    if facts is None:
        raise ValueError(f"unknown student model {model!r}")
    backbone = facts.backbone_params + (inputs - 3) * facts.stem_per_channel
    return backbone + _head(facts.features, options.get("embed_dim"), num_classes)
