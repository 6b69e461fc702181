"""Device selection shared by the stages that may run on a GPU (extract, train)."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str, setting: str) -> torch.device:
    """``auto`` = CUDA if available, else CPU; an explicit CUDA device must exist.

    ``setting`` names the config key (e.g. ``train.device``) in the error message.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} is {name!r} but no CUDA device is available")
    return device
