"""The converter registry: names, declared options, and the commands built from them."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bird_datasets.converters import (
    ConverterOption,
    UnknownConverterError,
    available_converters,
    get_converter,
    register_converter,
)
from cli.app import app


def test_the_canned_converters_are_registered():
    assert available_converters() == ("adult", "celeba", "cifar10-s", "fashion-mnist-s")
    assert get_converter("Fashion_MNIST_S").name == "fashion-mnist-s"


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(UnknownConverterError, match="unknown dataset 'mnist'") as raised:
        get_converter("mnist")
    assert all(name in str(raised.value) for name in available_converters())


@pytest.mark.parametrize("name", available_converters())
def test_declared_options_are_the_functions_keyword_arguments(name: str):
    converter = get_converter(name)
    parameters = inspect.signature(converter.function).parameters
    for option in converter.options:
        parameter = parameters[option.name]
        # The declared default is the function's own: the CLI's --help shows what runs.
        if not option.required:
            assert parameter.default == option.default, option.name
    assert converter.summary and not converter.summary.endswith(":")


def test_options_are_checked_before_anything_runs(tmp_path: Path):
    adult = get_converter("adult")
    assert adult.option("test_size") is not None  # adult honours --test-size
    with pytest.raises(ValueError, match=r"adult does not take --val-size; it takes --root"):
        adult.check_options({"val_size": 10, "train_size": None})
    assert adult.check_options({"train_size": 5, "test_size": None}) == {"train_size": 5}
    with pytest.raises(ValueError, match="cifar10-s needs --root"):
        get_converter("cifar10-s").check_options({})
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        get_converter("cifar10-s").check_options({"root": tmp_path})


def test_registration_refuses_what_the_cli_could_not_call():
    with pytest.raises(ValueError, match="type must be one of"):
        ConverterOption("size", dict)
    with pytest.raises(ValueError, match="already registered"):
        register_converter("adult")(lambda out_store, prefix, seed: None)
    with pytest.raises(TypeError, match=r"lacks argument\(s\) \['train_size'\]"):
        register_converter("new-dataset", options=(ConverterOption("train_size", int),))(
            lambda out_store, prefix="", *, seed=0: None
        )
    assert "new-dataset" not in available_converters()


def test_prepare_commands_come_from_the_registry():
    runner = CliRunner()
    listing = runner.invoke(app, ["datasets", "prepare", "--help"], terminal_width=200)
    assert listing.exit_code == 0, listing.output
    for name in available_converters():
        assert name in listing.output
    celeba = runner.invoke(app, ["datasets", "prepare", "celeba", "--help"], terminal_width=200)
    assert celeba.exit_code == 0, celeba.output
    for option in get_converter("celeba").options:
        assert option.flag in celeba.output
    refused = runner.invoke(app, ["datasets", "prepare", "adult", "--out", "x", "--val-size", "3"])
    assert refused.exit_code == 2
    assert "adult does not take --val-size; it takes --out, --seed, --root" in refused.output
