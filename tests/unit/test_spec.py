"""The job spec: defaults, limits, and the method catalogue against bird_core's registry."""

import typing

import pytest
from pydantic import ValidationError

from bird_core.methods import METHODS, available_methods, method_options
from service.spec import METHOD_OPTIONS, JobSpec


def test_catalogue_matches_registry_names_and_options():
    assert list(METHOD_OPTIONS) == available_methods()
    for name in available_methods():
        assert set(METHOD_OPTIONS[name]) == set(method_options(name)), name


@pytest.mark.parametrize("name", available_methods())
def test_catalogue_kinds_match_option_types(name):
    hints = typing.get_type_hints(METHODS[name].options_class)
    for option, kind in METHOD_OPTIONS[name].items():
        hint = hints[option]
        if isinstance(kind, tuple):
            assert set(typing.get_args(hint)) == set(kind), (name, option)
        elif kind == "int|None":
            assert set(typing.get_args(hint)) == {int, type(None)}, (name, option)
        else:
            assert hint is {"float": float, "int": int, "bool": bool}[kind], (name, option)


def test_minimal_spec_is_short_and_defaults_are_valid_options():
    spec = JobSpec.model_validate({"dataset": {"uri": "s3://bucket/datasets/fmnist"}})
    assert spec.method.name == "bird"
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"method": {"name": "nope"}}, "unknown method 'nope'"),
        ({"method": {"name": "bkd", "options": {"phi_lr": 1.0}}}, "unknown option"),
        ({"method": {"name": "bird", "options": {"meta_interval": 1.5}}}, "meta_interval"),
        ({"method": {"name": "bird", "options": {"virtual_params": "x"}}}, "virtual_params"),
        ({"method": {"name": "bird", "options": {"freeze_gate": 1}}}, "freeze_gate"),
        ({"method": {"name": "bird", "options": {"phi_optimizer": "lbfgs"}}}, "phi_optimizer"),
        ({"method": {"name": "bird", "options": {"inner_steps": 2.5}}}, "inner_steps"),
        ({"training": {"epochs": 0}}, "epochs"),
        ({"training": {"lr": -1}}, "lr"),
        ({"resources": {"workers": 1000}}, "workers"),
        ({"resources": {"placement": "scatter"}}, "resources.placement"),
        ({"surprise": 1}, "surprise"),
        (
            {"search": {"space": {"temperature_x": {"kind": "uniform", "low": 0, "high": 1}}}},
            "temperature_x",
        ),
        ({"search": {"space": {"phi_lr": {"kind": "loguniform", "low": 0, "high": 1}}}}, "low > 0"),
    ],
)
def test_bad_specs_name_the_field(payload, field):
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate({"dataset": {"uri": "d"}, **payload})
    assert field in str(info.value)


def test_default_search_space_samples_only_valid_bird_options():
    """Every bound of every default distribution is a value BIRD accepts for that option."""
    from bird_core.methods.bird import BIRDOptions

    spec = JobSpec.model_validate({"dataset": {"uri": "datasets/fm"}, "search": {}})
    assert spec.search is not None
    space = spec.search.space
    assert {"phi_lr", "lambda_logit", "temperature", "lambda_fair", "gamma"} <= set(space)
    for name, distribution in space.items():
        assert name in METHOD_OPTIONS["bird"], name
        bounds = distribution.values or (distribution.low, distribution.high)
        for value in bounds:
            BIRDOptions(**{name: value})  # raises on a value out of range
