"""A job spec against its dataset: the defaults that depend on the data, and what cannot work.

:func:`check_spec_against` is the one place where a spec meets the dataset's manifest (kind,
channels, image size, classes, groups) and what the teacher says about itself
(:class:`~service.teachers.TeacherFacts`). It returns the resolved spec — the student chosen
for the dataset (``mlp`` for tabular data, ``small_cnn`` for images), its input channels or
features, adversarial debiasing's group count, a published teacher's architecture — and every
problem, each with the spec field it is about and how to fix it. The API answers problems with a
422 before anything is queued; nothing here reads a store or imports torch (the API's
``check_submission`` does the reading).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from bird_datasets.format import DatasetMeta
from service.spec import JobSpec, MethodSpec, StudentSpec, TeacherSpec
from service.students import (
    architecture_facts,
    student_input,
    student_parameters,
    student_spatial,
)
from service.teachers import TeacherFacts

__all__ = ["CheckedSpec", "SpecProblem", "check_spec_against", "resolve_spec"]

# Methods that compare the student's spatial attention with the teacher's.
_SPATIAL_METHODS = frozenset({"at"})


@dataclass(frozen=True)
class SpecProblem:
    """One reason a spec cannot run on its dataset: the field (``("student", "model")``) and
    a message that says what to change."""

    loc: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class CheckedSpec:
    """The resolved spec and what is wrong with it (nothing, when ``problems`` is empty)."""

    spec: JobSpec
    problems: list[SpecProblem] = field(default_factory=list)


def _shape(meta: DatasetMeta) -> str:
    if meta.input == "image" and meta.image_shape is not None:
        c, h, w = meta.image_shape
        return f"{c}x{h}x{w} images"
    return f"tabular rows of {meta.num_features} features"


def _problems_of(error: ValidationError, prefix: tuple[str, ...]) -> list[SpecProblem]:
    out = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        out.append(SpecProblem((*prefix, *(str(p) for p in item["loc"])), message))
    return out


def resolve_spec(
    spec: JobSpec, meta: DatasetMeta, teacher: TeacherFacts | None = None
) -> tuple[JobSpec, list[SpecProblem]]:
    """``spec`` with its dataset-dependent defaults filled in, and the problems found doing so.

    Idempotent: a resolved spec resolves to itself (the worker calls this again on the stored
    spec, which the API resolved already).
    """
    problems: list[SpecProblem] = []
    updates: dict[str, Any] = {}

    student = spec.student
    model = student.model or ("mlp" if meta.input == "tabular" else "small_cnn")
    options = dict(student.options or {})
    if student_input(model) == meta.input:
        if meta.input == "tabular":
            options.setdefault("in_features", meta.num_features)
        elif meta.image_shape is not None:
            options.setdefault("in_channels", meta.image_shape[0])
    if model != student.model or options != (student.options or {}):
        try:
            updates["student"] = StudentSpec.model_validate({"model": model, "options": options})
        except ValidationError as error:
            problems += _problems_of(error, ("student",))

    if spec.method.name == "ad" and "num_groups" not in spec.method.options:
        groups = max(meta.num_groups, 2)
        updates["method"] = MethodSpec(
            name="ad", options={**spec.method.options, "num_groups": groups}
        )

    if (
        teacher is not None
        and spec.teacher.kind == "model"
        and spec.teacher.arch is None
        and teacher.arch is not None
    ):
        updates["teacher"] = TeacherSpec.model_validate(
            {**spec.teacher.model_dump(), "arch": teacher.arch}
        )
    return (spec.model_copy(update=updates) if updates else spec), problems


def _train_teacher_hint(meta: DatasetMeta, arch: str) -> str:
    name = f"{meta.name}-{arch}".replace("_", "-")
    # What a tenant can do: train on its local copy, upload into its own space, name it.
    return (
        f"train one on this dataset with `bird teachers train --dataset <its local copy> --arch "
        f"{arch} --out {name}`, upload it with `bird teachers push {name} --name {name}` and "
        f'give "teacher": {{"kind": "model", "weights_uri": "teachers/{name}"}}'
    )


def _teacher_problems(
    spec: JobSpec, meta: DatasetMeta, teacher: TeacherFacts, given: bool
) -> list[SpecProblem]:
    """``given``: the spec names a teacher (else it is the default one, and a problem points at
    the ``teacher`` section rather than at a field the user never wrote)."""
    problems: list[SpecProblem] = []
    kind = spec.teacher.kind
    where = teacher.uri or kind
    if teacher.input is not None and teacher.input != meta.input:
        if kind == "model":
            loc = ("teacher", "weights_uri")
            message = (
                f"teacher {where} takes {teacher.input} input but dataset {meta.name!r} holds "
                f"{_shape(meta)}; "
            )
        else:
            loc = ("teacher", "kind") if given else ("teacher",)
            default = "" if given else "the default "
            message = (
                f"dataset {meta.name!r} holds {_shape(meta)}: {default}teacher {kind!r} takes "
                "images only; "
            )
        arch = "mlp" if meta.input == "tabular" else "resnet18"
        problems.append(SpecProblem(loc, message + _train_teacher_hint(meta, arch)))
        return problems
    if kind == "model" and spec.teacher.arch is None:
        problems.append(
            SpecProblem(
                ("teacher", "arch"),
                f"teacher weights {where} are a plain weights file: give the architecture they "
                "fit (resnet18, small_cnn, mlp, tv:<arch>, timm:<arch>), or name a teacher "
                "published by `bird teachers train`",
            )
        )
    loc = ("teacher", "weights_uri")
    if teacher.num_classes is not None and teacher.num_classes != meta.num_classes:
        problems.append(
            SpecProblem(
                loc,
                f"teacher {where} predicts {teacher.num_classes} classes but dataset "
                f"{meta.name!r} has {meta.num_classes}; "
                + _train_teacher_hint(meta, spec.teacher.arch or teacher.arch or "resnet18"),
            )
        )
    if teacher.task is not None and teacher.task != meta.task:
        problems.append(
            SpecProblem(
                loc,
                f"teacher {where} was trained for a {teacher.task} task, dataset "
                f"{meta.name!r} is {meta.task}",
            )
        )
    if teacher.inputs is not None:
        if meta.input == "tabular" and teacher.inputs != meta.num_features:
            problems.append(
                SpecProblem(
                    loc,
                    f"teacher {where} takes {teacher.inputs} features but dataset "
                    f"{meta.name!r} has {meta.num_features}",
                )
            )
        if meta.input == "image" and meta.image_shape is not None:
            channels = meta.image_shape[0]
            # An RGB teacher gets grayscale images on three channels and RGBA without alpha.
            if teacher.inputs != channels and teacher.inputs != 3:
                problems.append(
                    SpecProblem(
                        loc,
                        f"teacher {where} takes {teacher.inputs}-channel images but dataset "
                        f"{meta.name!r} has {channels}-channel images",
                    )
                )
    return problems


def _student_problems(
    spec: JobSpec, meta: DatasetMeta, max_student_params: int
) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    model = spec.student.model
    if model is None:
        return problems  # resolving it failed, and said why
    options: Mapping[str, Any] = spec.student.options or {}
    if student_input(model) != meta.input:
        if meta.input == "tabular":
            fix = "use the mlp student (the default for tabular data: leave student.model out)"
        else:
            fix = "use small_cnn (the default for images), resnet18, tv:<arch> or timm:<arch>"
        problems.append(
            SpecProblem(
                ("student", "model"),
                f"student {model!r} takes {student_input(model)} input but dataset "
                f"{meta.name!r} holds {_shape(meta)}: {fix}",
            )
        )
        return problems
    if meta.input == "tabular":
        inputs = int(meta.num_features or 0)
        if options.get("in_features", inputs) != inputs:
            problems.append(
                SpecProblem(
                    ("student", "options"),
                    f"option in_features is {options['in_features']} but dataset "
                    f"{meta.name!r} has {inputs} features: leave it out (bird fills it in)",
                )
            )
            return problems
    else:
        assert meta.image_shape is not None
        inputs = meta.image_shape[0]
        if options.get("in_channels", inputs) != inputs:
            problems.append(
                SpecProblem(
                    ("student", "options"),
                    f"option in_channels is {options['in_channels']} but dataset "
                    f"{meta.name!r} has {inputs}-channel images: leave it out (bird fills it in)",
                )
            )
            return problems
        facts = architecture_facts(model)
        if facts is not None:
            side = min(meta.image_shape[1:])
            if facts.fixed_size is not None and meta.image_shape[1:] != (
                facts.fixed_size,
                facts.fixed_size,
            ):
                problems.append(
                    SpecProblem(
                        ("student", "model"),
                        f"{model} takes only {facts.fixed_size}x{facts.fixed_size} images, "
                        f"dataset {meta.name!r} holds {_shape(meta)}: choose a convolutional "
                        "architecture (tv:mobilenet_v3_large, tv:efficientnet_b0, tv:resnet50)",
                    )
                )
            elif facts.min_size is not None and side < facts.min_size:
                problems.append(
                    SpecProblem(
                        ("student", "model"),
                        f"{model} needs images of at least {facts.min_size}x{facts.min_size}, "
                        f"dataset {meta.name!r} holds {_shape(meta)}",
                    )
                )
    params = student_parameters(model, options, meta.num_classes, inputs)
    if params > max_student_params:
        loc = ("student", "model") if ":" in model else ("student", "options")
        problems.append(
            SpecProblem(
                loc,
                f"student {model} with options {dict(options)} has {params:,} parameters; "
                f"this deployment allows at most {max_student_params:,} "
                "(BIRD_MAX_STUDENT_PARAMS): choose a smaller width or architecture",
            )
        )
    return problems


def _method_problems(spec: JobSpec, meta: DatasetMeta, teacher: TeacherFacts) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    name = spec.method.name
    options = spec.method.options
    model = spec.student.model
    if name in _SPATIAL_METHODS:
        reasons = []
        if meta.input != "image":
            reasons.append(f"dataset {meta.name!r} is tabular")
        if teacher.spatial is False:
            reasons.append(f"teacher {teacher.arch or spec.teacher.kind} gives none")
        if model is not None and student_spatial(model) is False:
            reasons.append(f"student {model} gives none")
        if reasons:
            problems.append(
                SpecProblem(
                    ("method", "name"),
                    f"method {name!r} compares spatial feature maps of teacher and student, "
                    f"but {' and '.join(reasons)}: use another method (bkd, fitnet, mfd, bird)",
                )
            )
    if name == "ad":
        groups = options.get("num_groups")
        if isinstance(groups, int) and groups < meta.num_groups:
            problems.append(
                SpecProblem(
                    ("method", "options"),
                    f"option num_groups is {groups} but dataset {meta.name!r} has "
                    f"{meta.num_groups} groups: leave it out (bird fills it in)",
                )
            )
    if name == "bird" and model is not None:
        virtual = options.get("virtual_params", "head")
        if virtual == "head" and (spec.student.options or {}).get("embed_dim") is None:
            problems.append(
                SpecProblem(
                    ("student", "options"),
                    "bird with virtual_params 'head' needs a student with an embedding layer: "
                    "give student.options.embed_dim (e.g. 64), or set "
                    "method.options.virtual_params to 'all'",
                )
            )
    return problems


def check_spec_against(
    spec: JobSpec,
    meta: DatasetMeta,
    teacher: TeacherFacts,
    *,
    max_student_params: int,
) -> CheckedSpec:
    """Resolve ``spec`` for the dataset ``meta`` and the ``teacher``, and list what cannot work.

    Problems: a student or teacher for the other kind of input (an image teacher on a tabular
    dataset names ``teacher`` and the command that trains one), input channels, features, image
    size, classes or task that do not match the dataset, a student over ``max_student_params``
    parameters, a method the data or networks cannot serve (attention transfer without spatial
    maps, fewer adversary groups than the dataset has, BIRD's head-only virtual step without an
    embedding layer).
    """
    resolved, problems = resolve_spec(spec, meta, teacher)
    problems += _teacher_problems(resolved, meta, teacher, "teacher" in spec.model_fields_set)
    problems += _student_problems(resolved, meta, max_student_params)
    problems += _method_problems(resolved, meta, teacher)
    return CheckedSpec(resolved, problems)
