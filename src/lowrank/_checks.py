"""The number predicates that argument checks across the package share (adapters, optimizers,
schedules): one definition of "a real number", so every ``ConfigError`` agrees on what it accepts."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def is_real(value: Any) -> bool:
    """A real number: Python, numpy or a one-element real torch tensor; not a bool or a string."""
    if isinstance(value, (bool, str, bytes)):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real)


def is_finite_real(value: Any) -> bool:
    return is_real(value) and math.isfinite(float(value))
