"""In-memory dataset splits shared by every loader in ``bird_core.data``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Task = Literal["multiclass", "multilabel"]


@dataclass(frozen=True)
class Split:
    """One split held as tensors.

    ``x`` is ``uint8 [N, C, H, W]`` for images or ``float32 [N, D]`` for tabular data, before
    normalisation (the :class:`~bird_core.preprocess.Preprocessor` normalises). ``label`` is
    ``int64 [N]`` (multi-class) or ``float32 [N, A]`` of 0/1 (multi-label); ``group`` is
    ``int64 [N]``, the sensitive attribute.
    """

    x: torch.Tensor
    label: torch.Tensor
    group: torch.Tensor

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.label.shape[0] != n or self.group.shape[0] != n:
            raise ValueError(
                f"split tensors disagree on the number of rows: x={n}, "
                f"label={self.label.shape[0]}, group={self.group.shape[0]}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: torch.Tensor) -> Split:
        """Rows ``index`` of this split, as a new split."""
        return Split(self.x[index], self.label[index], self.group[index])


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset ready for training: train/val/test splits plus what a model needs to know."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    num_groups: int
    task: Task = "multiclass"
    # How raw ``x`` becomes model input; see ``bird_core.preprocess.Preprocessor.from_config``.
    preprocessing: dict[str, Any] = field(default_factory=dict)
    group_names: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one raw input row (``(C, H, W)`` or ``(D,)``)."""
        return tuple(self.train.x.shape[1:])
