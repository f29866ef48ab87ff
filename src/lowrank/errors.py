"""Exception hierarchy of :mod:`lowrank`.

Every error the package raises on bad input derives from :class:`LowRankError`, and
its message names the module path, key, file or option at fault.  The operations
that raise them validate before they mutate, so a model, a file or a checkpoint is
left exactly as it was when one of these is raised.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class LowRankError(Exception):
    """Base class of every error raised by lowrank on bad input."""


class UnknownNameError(LowRankError, KeyError):
    """A method, init, projector, model or dataset name that is not registered."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        same_letters = [k for k in known if k.lower() == str(name).lower()]  # "LoRA" -> "lora"
        close = same_letters or difflib.get_close_matches(str(name).lower(), known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        msg = f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known)}."
        super().__init__(msg)
        self.kind, self.name, self.suggestions = kind, name, close

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return self.args[0]


class TargetError(LowRankError, ValueError):
    """Target selection matched nothing, or matched a module it cannot adapt."""


class UnsupportedLayerError(TargetError):
    """A method was asked to adapt a layer type it does not support."""


class ShapeError(LowRankError, ValueError):
    """A rank or option that does not fit a layer's dimensions."""


class AlreadyAdaptedError(LowRankError, ValueError):
    """The module already carries an adapter of that name."""


class AdapterNotFoundError(LowRankError, KeyError):
    """No adapter of that name on the model."""

    def __str__(self) -> str:
        return self.args[0]


class MergeError(LowRankError, RuntimeError):
    """Merging is not defined for the adapter (e.g. input-routed mixtures)."""


class AdapterLoadError(LowRankError, ValueError):
    """An adapter file or directory that is missing, corrupt, or does not match the model."""


class UnsafePathError(AdapterLoadError):
    """A path that resolves outside the adapter directory."""


class CalibrationError(LowRankError, ValueError):
    """An init that needs calibration batches did not get usable ones."""


class ConfigError(LowRankError, ValueError):
    """An option out of range or of the wrong type."""


class DataError(LowRankError, ValueError):
    """A dataset path that is missing, empty or unusable (e.g. a label column with one class)."""


class TrainingError(LowRankError, RuntimeError):
    """Training cannot go on (a NaN/Inf loss); the message names the step and the last good checkpoint."""


class CheckpointError(LowRankError, ValueError):
    """A training checkpoint that is missing, corrupt, or does not match the run being resumed."""


__all__ = [
    "LowRankError",
    "UnknownNameError",
    "TargetError",
    "UnsupportedLayerError",
    "ShapeError",
    "AlreadyAdaptedError",
    "AdapterNotFoundError",
    "MergeError",
    "AdapterLoadError",
    "UnsafePathError",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "TrainingError",
    "CheckpointError",
]
