"""The student catalogue of the service (no torch) against bird_core's networks and the
installed torchvision and timm registries, so the two cannot drift apart."""

from __future__ import annotations

import inspect
import json
import random

import pytest
import torch

from bird_core.catalogue import ArchitectureFacts, describe_architecture, registry_names
from bird_core.models import _BUILDERS, TimmNet, TorchvisionNet, create_model
from service.students import (
    BUILTIN_STUDENTS,
    CATALOGUE_PATH,
    STUDENT_DEFAULTS,
    STUDENT_OPTIONS,
    architecture_facts,
    catalogue_names,
    check_student_name,
    check_student_options,
    student_parameters,
)

# The deployable architectures users distil into most, in both registries.
DEPLOYABLE = (
    "tv:mobilenet_v3_large",
    "tv:efficientnet_b0",
    "tv:resnet50",
    "timm:mobilenetv3_large_100",
    "timm:efficientnet_b0",
    "timm:resnet50",
)


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _constructor_options(builder: type) -> set[str]:
    return {p for p in inspect.signature(builder).parameters if p not in ("num_classes", "arch")}


def test_option_tables_name_exactly_the_constructor_options():
    for model in BUILTIN_STUDENTS:
        assert set(STUDENT_OPTIONS[model]) == _constructor_options(_BUILDERS[model]), model
    assert set(STUDENT_OPTIONS["tv"]) == _constructor_options(TorchvisionNet)
    assert set(STUDENT_OPTIONS["timm"]) == _constructor_options(TimmNet)


@pytest.mark.parametrize("model", [*BUILTIN_STUDENTS, "tv:resnet18", "timm:resnet18"])
def test_defaults_are_valid_options_that_build(model):
    family = model.partition(":")[0] if ":" in model else model
    defaults = STUDENT_DEFAULTS[family]
    check_student_options(model, defaults)
    inputs = {"in_features": 5} if model == "mlp" else {"in_channels": 1}
    net = create_model(model, 3, **defaults, **inputs)
    assert net.embed_dim == defaults["embed_dim"]


@pytest.mark.parametrize(
    ("model", "options", "inputs"),
    [
        ("small_cnn", {}, 3),
        ("small_cnn", {"width": 4, "embed_dim": 8}, 1),
        ("small_cnn", {"width": 5, "embed_dim": None}, 4),
        ("resnet18", {}, 3),
        ("resnet18", {"width": 4, "stem": "imagenet", "embed_dim": 12}, 1),
        ("resnet18", {"width": 8, "stem": "cifar", "embed_dim": None}, 4),
        ("mlp", {}, 11),
        ("mlp", {"hidden": [7, 5, 3], "embed_dim": None}, 4),
        ("mlp", {"hidden": [16], "embed_dim": 9}, 100),
    ],
)
def test_builtin_parameter_counts_are_exact(model, options, inputs):
    key = "in_features" if model == "mlp" else "in_channels"
    net = create_model(model, 7, **options, **{key: inputs})
    assert student_parameters(model, options, 7, inputs) == _count(net)


def test_the_catalogue_lists_every_architecture_of_the_installed_registries():
    import timm
    import torchvision

    catalogue = json.loads(CATALOGUE_PATH.read_text())
    installed = {
        "torchvision": torchvision.__version__.split("+")[0],
        "timm": timm.__version__,
    }
    for package, version in installed.items():
        assert catalogue["versions"][package] == version, (
            f"the catalogue was generated with {package} {catalogue['versions'][package]}, "
            f"{version} is installed: run scripts/student_catalogue.py"
        )
    assert catalogue["fields"] == list(ArchitectureFacts.__dataclass_fields__)
    for registry, names in registry_names().items():
        listed = set(catalogue[registry]) | set(catalogue["unbuildable"][registry])
        assert listed == set(names), registry
        assert set(catalogue_names(registry)) == set(catalogue[registry])
    # Nearly every architecture can be a student; the few that cannot say why.
    assert len(catalogue["timm"]) > 0.95 * len(registry_names()["timm"])
    for deployable in DEPLOYABLE:
        check_student_name(deployable)


def _sample() -> list[str]:
    names = [f"timm:{n}" for n in catalogue_names("timm")]
    names += [f"tv:{n}" for n in catalogue_names("tv")]
    # A fixed sample (the catalogue is too large to rebuild in a unit test), plus the
    # architectures that matter most and one with a fixed input size.
    picked = random.Random(12).sample(names, 6)
    return [*DEPLOYABLE, "timm:vit_tiny_patch16_224", "tv:vit_b_16", *picked]


@pytest.mark.parametrize("model", _sample())
def test_catalogue_facts_and_parameter_counts_match_the_networks(model):
    facts = architecture_facts(model)
    assert facts is not None
    assert list(facts.__dict__.values()) == describe_architecture(model).as_list()
    # The count the API computes is the count of the network the worker builds, for other
    # channel counts and heads too (built on the meta device: shapes only).
    for channels, embed_dim in ((1, 128), (4, None), (3, 32)):
        with torch.device("meta"):
            net = create_model(model, 7, in_channels=channels, embed_dim=embed_dim)
        options = {"embed_dim": embed_dim}
        assert student_parameters(model, options, 7, channels) == _count(net), channels


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nope", "unknown student model 'nope'"),
        ("timm:mobilenetv3_larg_100", "close matches: timm:mobilenetv3_large_100"),
        ("tv:resnet5O", "unknown torchvision architecture 'resnet5O'"),
        ("keras:resnet50", "unknown student model"),
    ],
)
def test_unknown_architectures_are_named_with_close_matches(model, message):
    with pytest.raises(ValueError, match=message):
        check_student_name(model)


@pytest.mark.parametrize(
    ("model", "options", "message"),
    [
        ("small_cnn", {"width": 1e9}, "width must be an integer"),
        ("small_cnn", {"width": 0}, r"width must lie in 1\.\.4096"),
        ("small_cnn", {"depth": 3}, r"unknown option\(s\) \['depth'\]"),
        ("small_cnn", {"\x00": 1}, r"unknown option\(s\) \['\\\\x00'\]"),
        ("resnet18", {"stem": "big"}, "stem must be one of"),
        ("mlp", {"hidden": []}, "hidden must be a list of 1 to 16 integers"),
        ("mlp", {"hidden": [8, True]}, "hidden must be an integer"),
        ("tv:resnet50", {"width": 8}, r"unknown option\(s\) \['width'\]"),
        ("timm:resnet50", {"embed_dim": -1}, "embed_dim must lie in"),
    ],
)
def test_bad_student_options_say_what_is_wrong(model, options, message):
    with pytest.raises(ValueError, match=message):
        check_student_options(model, options)
