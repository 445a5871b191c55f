"""Converters from public datasets to the bird format, in a registry by name.

Each module of this package registers one converter with :func:`register_converter`, declaring
the options it takes (name, type, default, help); ``bird datasets prepare <name>`` builds its
flags from them. Adding a dataset is one file here: the package imports every module in it.

>>> from bird_datasets.converters import get_converter
>>> get_converter("adult").run(store, "datasets/adult", seed=0, train_size=1000)

Converters write through :class:`bird_datasets.writer.DatasetWriter`: parts first, manifest
last, so an interrupted conversion leaves no dataset behind. Each returns the manifest.

The canned datasets are built by ``bird_core``'s loaders, so a converter imports ``bird_core``
(and torch) inside its function, never at module level: listing the converters and their
options (``bird datasets prepare --help``) stays fast.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.storage import Manifest, ObjectStore

__all__ = [
    "Converter",
    "ConverterOption",
    "UnknownConverterError",
    "available_converters",
    "get_converter",
    "register_converter",
]

# The option types a converter may declare; ``list`` is a list of names (comma-separated on the
# command line).
OPTION_TYPES: tuple[type, ...] = (int, float, str, Path, list)


@dataclass(frozen=True)
class ConverterOption:
    """One keyword option of a converter: ``bird datasets prepare <name> --<flag> VALUE``.

    ``name`` is the converter's keyword argument (``train_size``; the flag is ``--train-size``),
    ``type`` one of :data:`OPTION_TYPES`, ``default`` what the converter uses when the option is
    not given (``None``: the converter decides, as its help says), ``minimum`` a lower bound for
    numbers, ``required`` whether it must be given.
    """

    name: str
    type: type
    default: Any = None
    help: str = ""
    minimum: float | None = None
    required: bool = False

    def __post_init__(self) -> None:
        if self.type not in OPTION_TYPES:
            raise ValueError(
                f"option {self.name!r}: type must be one of "
                f"{', '.join(t.__name__ for t in OPTION_TYPES)}, got {self.type!r}"
            )

    @property
    def flag(self) -> str:
        """The command-line flag, ``--train-size`` for ``train_size``."""
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Converter:
    """A registered converter: its name, options and function.

    ``function(out_store=..., prefix=..., seed=..., **options)`` writes the dataset and returns
    its manifest. ``check(options)``, when given, checks the options quickly (a source folder's
    layout) before anything is read or written.
    """

    name: str
    function: Callable[..., Manifest]
    options: tuple[ConverterOption, ...]
    summary: str
    check: Callable[[Mapping[str, Any]], None] | None = None

    def option(self, name: str) -> ConverterOption | None:
        """The declared option ``name``, or None."""
        return next((o for o in self.options if o.name == name), None)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The given options (``None`` values dropped), checked against the declaration.

        Raises ``ValueError`` naming the converter and the flag for an option it does not take
        (listing those it takes) or a required option that is missing, and whatever
        :attr:`check` raises (``FileNotFoundError`` naming the missing file).
        """
        given = {k: v for k, v in options.items() if v is not None}
        unknown = [k for k in given if self.option(k) is None]
        if unknown:
            flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
            takes = ", ".join(o.flag for o in self.options) or "no options"
            raise ValueError(f"{self.name} does not take {flags}; it takes {takes}")
        for option in self.options:
            if option.required and option.name not in given:
                raise ValueError(f"{self.name} needs {option.flag}: {option.help}")
        if self.check is not None:
            self.check(given)
        return given

    def run(
        self, out_store: ObjectStore, prefix: str = "", *, seed: int = 0, **options: Any
    ) -> Manifest:
        """Write the dataset at ``prefix`` of ``out_store`` (options checked first)."""
        given = self.check_options(options)
        return self.function(out_store=out_store, prefix=prefix, seed=seed, **given)


class UnknownConverterError(ValueError):
    """No converter of that name; the message lists the registered ones."""


_CONVERTERS: dict[str, Converter] = {}


def _key(name: str) -> str:
    # Tolerate "Fashion_MNIST_S" from scripts and command lines, which commonly use underscores.
    return name.strip().lower().replace("_", "-")


def register_converter(
    name: str,
    *,
    options: Sequence[ConverterOption] = (),
    check: Callable[[Mapping[str, Any]], None] | None = None,
) -> Callable[[Callable[..., Manifest]], Callable[..., Manifest]]:
    """Register the decorated function as converter ``name`` with its declared ``options``.

    The function takes ``out_store``, ``prefix`` and ``seed`` plus one keyword argument per
    option, with the declared defaults; its docstring's first paragraph is the command's help.
    """
    key = _key(name)

    def decorator(function: Callable[..., Manifest]) -> Callable[..., Manifest]:
        if key in _CONVERTERS:
            raise ValueError(f"a converter named {key!r} is already registered")
        parameters = inspect.signature(function).parameters
        missing = [p for p in ("out_store", "prefix", "seed") if p not in parameters]
        missing += [o.name for o in options if o.name not in parameters]
        if missing:
            raise TypeError(f"converter {key!r}: {function.__name__} lacks argument(s) {missing}")
        doc = inspect.getdoc(function) or ""
        summary = " ".join(doc.split("\n\n")[0].split())
        _CONVERTERS[key] = Converter(key, function, tuple(options), summary, check)
        return function

    return decorator


def available_converters() -> tuple[str, ...]:
    """The registered converter names, sorted."""
    return tuple(sorted(_CONVERTERS))


def get_converter(name: str) -> Converter:
    """The converter registered as ``name`` (case and ``_``/``-`` do not matter).

    Raises :class:`UnknownConverterError` listing the registered names.
    """
    key = _key(name) if isinstance(name, str) else name
    if key not in _CONVERTERS:
        raise UnknownConverterError(
            f"unknown dataset {name!r}; choose one of: {', '.join(available_converters())}"
        )
    return _CONVERTERS[key]


# Every module of this package registers its converter when imported.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
