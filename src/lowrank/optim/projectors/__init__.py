"""Projectors: one interface, one small module each (auto-imported, each registers itself).

Frame: the wrapper hands a projector the gradient *oriented* so that the projected dimension is
the last one, ``G' (m', d)`` with ``d = min(m, n)`` (``G' = G`` when m >= n, ``G^T`` otherwise:
galore-torch's "std" side choice).  A projector keeps a basis ``Q (d, r)`` (or what it needs
to rebuild it: indices, a seed, quantized codes) and the wrapper computes

    R = G' Q          (m', r)   project
    D = N Q^T         (m', d)   project back

``refresh`` recomputes the basis of many same-step matrices at once (a projector may batch
same-shaped ones); ``track`` is called every step for projectors that move continuously
(online PCA); ``gap_factor`` lets a projector stretch the refresh gap (Q-GaLore).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, ClassVar

from torch import Tensor

from ...errors import ConfigError, UnknownNameError
from ..transforms import State

_PROJECTORS: dict[str, type["Projector"]] = {}
_loaded = False


def register_projector(cls):
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set `name`")
    if cls.name in _PROJECTORS and _PROJECTORS[cls.name] is not cls:
        raise TypeError(f"projector {cls.name!r} already registered")
    _PROJECTORS[cls.name] = cls
    return cls


class Projector:
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    continuous: ClassVar[bool] = False   # basis moves every step (no periodic refresh)
    orthonormal: ClassVar[bool] = True   # Q^T Q = I (random Gaussian projections are not)

    def __init__(self, rank: int, seed: int = 0):
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"projector {self.name!r}: rank must be a positive int, got {rank!r}")
        self.rank, self.seed = rank, seed

    def init(self, d: int, like: Tensor, index: int, transposed: bool) -> State:
        raise NotImplementedError

    def refresh(self, grads: list[Tensor], states: list[State], step: int) -> None:
        raise NotImplementedError

    def basis(self, state: State, like: Tensor) -> Tensor:
        """(d, r) basis; ``like`` is the oriented gradient G' (m', d) (gives d, dtype, device)."""
        raise NotImplementedError

    def track(self, grads: list[Tensor], states: list[State], projected: list[Tensor], step: int) -> None:
        """Called every step after projecting (``projected[i] = G'_i Q_i``); online projectors move here."""

    def gap_factor(self, state: State) -> int:
        return 1


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def projectors() -> list[str]:
    """Names of the registered projectors."""
    _load()
    return sorted(_PROJECTORS)


def get_projector(name: str) -> type[Projector]:
    _load()
    if name not in _PROJECTORS:
        raise UnknownNameError("projector", name, _PROJECTORS)
    return _PROJECTORS[name]


def make_projector(name: str, rank: int, seed: int = 0, **options: Any) -> Projector:
    cls = get_projector(name)
    try:
        return cls(rank, seed=seed, **options)
    except TypeError as e:
        raise ConfigError(f"projector {name!r}: {e}") from None


def mix_seed(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 steps), for per-matrix generators."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def group_by_shape(grads: list[Tensor]) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        out.setdefault((tuple(g.shape), g.dtype, g.device), []).append(i)
    return out


def capture(G: Tensor, Q: Tensor) -> float:
    """Fraction of ||G'||^2 captured by the span of the orthonormal columns of Q: ||G' Q||^2 / ||G'||^2."""
    return float((G @ Q).square().sum() / G.square().sum().clamp_min(1e-30))


__all__ = ["Projector", "register_projector", "projectors", "get_projector", "make_projector", "capture"]
