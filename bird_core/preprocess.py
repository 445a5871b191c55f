"""Preprocessing from raw dataset rows to model input, stored with every checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Preprocessor(nn.Module):
    """Turns raw rows into normalised float input.

    Images: ``uint8 [N, C, H, W]`` → ``float`` in [0, 1] → optional resize → per-channel
    ``(x - mean) / std``. Tabular: ``float [N, D]`` → per-feature ``(x - mean) / std``.
    The whole behaviour is described by :meth:`config`, a JSON-able dict, so a checkpoint can
    rebuild it without pickling.
    """

    def __init__(self, kind: str, mean: list[float], std: list[float], size: int | None = None):
        super().__init__()
        if kind not in ("image", "tabular"):
            raise ValueError(f"preprocessing kind must be 'image' or 'tabular', got {kind!r}")
        if len(mean) != len(std):
            raise ValueError(f"preprocessing mean has {len(mean)} values but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError("preprocessing std values must be positive")
        self.kind = kind
        self.size = size
        shape = (1, -1, 1, 1) if kind == "image" else (1, -1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocessor:
        """Build from the dict written by :meth:`config` (or by a dataset loader)."""
        unknown = set(config) - {"kind", "mean", "std", "size"}
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}")
        return cls(config["kind"], list(config["mean"]), list(config["std"]), config.get("size"))

    def config(self) -> dict[str, Any]:
        """JSON-able description that :meth:`from_config` turns back into this module."""
        return {
            "kind": self.kind,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "size": self.size,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch of raw rows."""
        if self.kind == "image":
            if x.dim() != 4:
                raise ValueError(f"image input must be [N, C, H, W], got shape {tuple(x.shape)}")
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            if self.size is not None and x.shape[-1] != self.size:
                x = nn.functional.interpolate(
                    x, size=(self.size, self.size), mode="bilinear", align_corners=False
                )
        elif x.dim() != 2:
            raise ValueError(f"tabular input must be [N, D], got shape {tuple(x.shape)}")
        if x.shape[1] != self.mean.shape[1]:
            raise ValueError(
                f"input has {x.shape[1]} channels/features but preprocessing expects "
                f"{self.mean.shape[1]}"
            )
        return (x.float() - self.mean) / self.std
