"""The job spec: one typed tree, validated at the API, stored as JSON, parsed again by workers.

This module is part of the service layer and never imports torch: the method names and their
options are listed here as a catalogue, and a test checks the catalogue against
``bird_core.methods`` so the two cannot drift apart (the students' catalogue is
:mod:`service.students`, checked the same way).

What depends on the dataset (the student for a tabular or an image dataset, its input channels
or features, adversarial debiasing's group count) is left open here and filled in when the job
is submitted, from the dataset's manifest (:func:`service.compat.check_spec_against`): the
stored spec is the resolved one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from service.students import (
    STUDENT_DEFAULTS,
    check_student_name,
    check_student_options,
    student_family,
)

OptionValue = float | int | str | bool | None

# name → option → accepted kind ("float", "int", "bool", a tuple of literal choices, or
# "int|None"). Mirrors bird_core.methods.method_options (checked by tests/unit/test_spec.py).
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "bkd": {"lambda_kd": "float", "temperature": "float"},
    "fitnet": {
        "hint_fraction": "float",
        "lambda_hint": "float",
        "lambda_kd": "float",
        "temperature": "float",
    },
    "at": {"lambda_at": "float"},
    "ad": {
        "lambda_adv": "float",
        "adversary_lr": "float",
        "adversary_hidden": "int",
        "num_groups": "int",
    },
    "mfd": {"lambda_f": "float", "sigma": "float", "lambda_kd": "float", "temperature": "float"},
    "bird": {
        "inner_lr": "float",
        "inner_steps": "int",
        "phi_lr": "float",
        "phi_optimizer": ("sgd", "adam"),
        "freeze_gate": "bool",
        "gate_init": "float",
        "gate_logits": "bool",
        "gate_reference": ("zero", "mean"),
        "feature_loss_norm": ("mean", "standardised"),
        "lambda_kd": "float",
        "lambda_logit": "float",
        "temperature": "float",
        "gamma": "float",
        "lambda_fair": "float",
        "meta_fraction": "float",
        "meta_interval": "int",
        "meta_batch_size": "int|None",
        "meta_sampling": ("balanced", "random"),
        "virtual_params": ("head", "all"),
    },
}

MAX_URI = 1024
# A student option's value: a scalar, or a list of integers (the MLP's hidden widths).
StudentOptionValue = float | int | str | bool | None | list[int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_option(method: str, key: str, value: Any, kind: Any) -> None:
    if isinstance(kind, tuple):
        if value not in kind:
            raise ValueError(f"option {key} of {method!r} must be one of {list(kind)}")
        return
    if kind == "int|None" and value is None:
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"option {key} of {method!r} must be true or false")
        return
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"option {key} of {method!r} must be an integer")
        if not -(10**9) <= value <= 10**9:
            raise ValueError(f"option {key} of {method!r} is out of range")
        return
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"option {key} of {method!r} must be a number")
        if value != value or abs(value) > 1e9:  # NaN or absurd magnitudes
            raise ValueError(f"option {key} of {method!r} must be a finite number below 1e9")


class DatasetSpec(_Strict):
    """Where the Parquet dataset lives (``s3://bucket/prefix`` or a store-relative prefix)."""

    uri: str = Field(min_length=1, max_length=MAX_URI)


class TeacherSpec(_Strict):
    """The teacher: a frozen pretrained backbone + probe, an architecture with weights, or CLIP."""

    kind: Literal["efficientnet_lite0_probe", "model", "open_clip"] = "efficientnet_lite0_probe"
    arch: str | None = Field(
        default=None,
        max_length=128,
        description="kind model: taken from a teacher published by `bird teachers train` when "
        "left out; open_clip: required.",
    )
    weights_uri: str | None = Field(default=None, max_length=MAX_URI)
    image_size: int = Field(default=48, ge=16, le=1024)
    probe_epochs: int = Field(default=30, ge=1, le=1000)

    @model_validator(mode="after")
    def _needs_weights(self) -> TeacherSpec:
        if self.kind in ("model", "open_clip") and self.weights_uri is None:
            raise ValueError(f"teacher kind {self.kind!r} needs a weights_uri")
        if self.kind == "open_clip" and self.arch is None:
            raise ValueError("teacher kind 'open_clip' needs an arch (ViT-B-32, RN50, ...)")
        if self.kind == "efficientnet_lite0_probe" and self.weights_uri is not None:
            raise ValueError(
                "teacher kind 'efficientnet_lite0_probe' takes no weights_uri: its weights ship "
                "with bird"
            )
        return self


class StudentSpec(_Strict):
    """The student architecture and its constructor options (see :mod:`service.students`).

    ``model`` left out is chosen for the dataset when the job is submitted (``mlp`` for a
    tabular dataset, ``small_cnn`` for images). ``options`` are merged over the model's
    defaults (:data:`~service.students.STUDENT_DEFAULTS`), so the stored spec lists every one.
    """

    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="small_cnn, resnet18, mlp, tv:<torchvision arch> or timm:<timm arch>; "
        "default: mlp for tabular datasets, small_cnn for images.",
    )
    options: dict[str, StudentOptionValue] | None = Field(
        default=None, max_length=16, validate_default=True
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str | None) -> str | None:
        if model is not None:
            check_student_name(model)
        return model

    @field_validator("options", mode="before")
    @classmethod
    def _with_defaults(cls, options: Any, info: ValidationInfo) -> Any:
        # The model's defaults under what the spec gives, so the stored spec lists every option.
        model = info.data.get("model")
        if model is None or not (options is None or isinstance(options, dict)):
            return options
        return {**STUDENT_DEFAULTS[student_family(model)], **(options or {})}

    @field_validator("options")
    @classmethod
    def _valid_options(
        cls, options: dict[str, Any] | None, info: ValidationInfo
    ) -> dict[str, Any] | None:
        model = info.data.get("model")
        if model is not None:  # else chosen for the dataset at submit, and checked then
            check_student_options(model, options or {})
        return options


class MethodSpec(_Strict):
    """The distillation method and its options (names checked against the registry)."""

    name: str = "bird"
    options: dict[str, OptionValue] = Field(default_factory=dict, max_length=32)

    @model_validator(mode="after")
    def _known(self) -> MethodSpec:
        if self.name not in METHOD_OPTIONS:
            raise ValueError(
                f"unknown method {self.name!r}; valid methods: {', '.join(METHOD_OPTIONS)}"
            )
        valid = METHOD_OPTIONS[self.name]
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            listed = ", ".join(valid) or "none"
            raise ValueError(
                f"method {self.name!r} got unknown option(s) {unknown}; valid options: {listed}"
            )
        for key, value in self.options.items():
            _check_option(self.name, key, value, valid[key])
        return self


class TrainingSpec(_Strict):
    """Hyper-parameters of the student's training."""

    epochs: int = Field(default=3, ge=1, le=500)
    batch_size: int = Field(default=128, ge=2, le=8192)
    lr: float = Field(default=2e-3, gt=0, le=10)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    max_steps_per_epoch: int | None = Field(default=None, ge=1, le=10**7)
    objective: Literal["auroc", "fair_score"] = Field(
        default="fair_score",
        description="How 'best' is chosen: val AUROC, or AUROC − fairness_weight·Δ_mean-DEO.",
    )
    fairness_weight: float = Field(default=1.0, ge=0, le=100)
    bf16: bool | None = Field(default=None, description="bf16 autocast; default: on with GPUs.")
    channels_last: bool | None = None


class Distribution(_Strict):
    """One dimension of a search space."""

    kind: Literal["loguniform", "uniform", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[float | int | str] | None = Field(default=None, max_length=64)

    @model_validator(mode="after")
    def _consistent(self) -> Distribution:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a choice distribution needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(f"a {self.kind} distribution needs low < high")
            if self.kind == "loguniform" and self.low <= 0:
                raise ValueError("a loguniform distribution needs low > 0")
        return self


class ObjectiveSpec(_Strict):
    """Fairness-aware objective of a search."""

    kind: Literal["constrained", "weighted"] = "constrained"
    max_delta_mean_deo: float = Field(
        default=10.0, ge=0, le=100, description="constrained: best AUROC with Δ_mean-DEO ≤ this"
    )
    fairness_weight: float = Field(
        default=1.0, ge=0, le=100, description="weighted: AUROC − weight·Δ_mean-DEO"
    )


class SearchSpec(_Strict):
    """A Ray Tune search over method options (φ learning rate, loss weights)."""

    space: dict[str, Distribution] = Field(
        default_factory=lambda: {
            "phi_lr": Distribution(kind="loguniform", low=0.005, high=0.5),  # Adam steps on φ
            "lambda_kd": Distribution(kind="uniform", low=0.1, high=3.0),
            # The weight of KD to the gated logits trades the gate's reach (high) against the
            # student's AUROC (low): docs/results.md, "Closing the AUROC gap to AD".
            "lambda_logit": Distribution(kind="loguniform", low=0.5, high=5.0),
            # The KD temperature: 1 (sharp targets) brought BIRD's AUROC to AD's with both
            # teachers at half of AD's Δ_mean-DEO; 3 is the default (same section).
            "temperature": Distribution(kind="choice", values=[1.0, 3.0]),
            "gamma": Distribution(kind="uniform", low=0.5, high=10.0),
            "lambda_fair": Distribution(kind="uniform", low=0.5, high=10.0),
        },
        max_length=16,
    )
    num_samples: int = Field(default=4, ge=1, le=256)
    max_concurrent_trials: int = Field(default=1, ge=1, le=64)
    grace_period: int = Field(default=1, ge=1, le=100)
    reduction_factor: int = Field(default=2, ge=2, le=10)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)


class ResourcesSpec(_Strict):
    """How much of the Ray cluster one training run takes."""

    workers: int = Field(default=1, ge=1, le=64)
    gpus_per_worker: float = Field(default=0, ge=0, le=8)
    cpus_per_worker: float = Field(default=1, gt=0, le=128)
    placement: Literal["pack", "spread"] = Field(
        default="pack",
        description="pack: the ranks on as few nodes as possible (fastest DDP); spread: on "
        "as many nodes as possible (ranks share no node, where the cluster has the nodes).",
    )


class JobSpec(_Strict):
    """A distillation job. A minimal spec names only the dataset."""

    dataset: DatasetSpec
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    student: StudentSpec = Field(default_factory=StudentSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    search: SearchSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    priority: Annotated[
        int,
        Field(
            ge=-100,
            le=100,
            description="Orders the tenant's own queued jobs (highest first); never one "
            "tenant's jobs against another's: across tenants the claim is fair.",
        ),
    ] = 0
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3

    @model_validator(mode="after")
    def _search_space_names(self) -> JobSpec:
        if self.search is not None:
            valid = METHOD_OPTIONS[self.method.name]
            unknown = sorted(set(self.search.space) - set(valid))
            if unknown:
                raise ValueError(
                    f"search space names {unknown} are not options of method "
                    f"{self.method.name!r}; valid: {', '.join(valid) or 'none'}"
                )
        return self
