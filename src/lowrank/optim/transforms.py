"""Gradient transformations: ``init`` + ``update`` with typed state, and ``chain``.

The shape of optax's ``GradientTransformation``, adapted to PyTorch: a transform owns no
tensors itself; ``init(p, index)`` returns a typed :class:`State` (a dataclass of tensors and
ints) for one parameter, and ``update(grads, states, params, step)`` takes *lists* (one entry
per parameter, all at the same 1-based ``step``) so the hot path can use ``torch._foreach_*``
kernels, mutates the states in place and returns the *descent directions* ``d`` (the caller
applies ``p <- p - lr * d``).  The learning rate and decoupled weight decay live at the edge,
in :class:`lowrank.optim.optimizer.LowRankOptimizer`, so LR schedulers work unchanged.

Inner optimizers defined here (``inner=`` of every low-rank wrapper): ``adamw``, ``adafactor``,
``sgd`` (momentum), ``lion``.  Each also knows how to *rotate* its moments when the subspace
they live in changes (``rotate(state, R, axis)`` with ``R = Q_new^T Q_old``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from .._checks import is_finite_real
from ..errors import ConfigError, UnknownNameError


def check_positive(owner: str, key: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (>= 0 with ``allow_zero``); ConfigError naming ``key`` otherwise."""
    if not is_finite_real(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{owner}: {key} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def check_coefficient(owner: str, key: str, value: Any) -> float:
    """A decay coefficient in [0, 1) (momentum, beta1) as a float; ConfigError naming ``key`` otherwise."""
    if not is_finite_real(value) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{owner}: {key} must lie in [0, 1), got {value!r}")
    return float(value)


def check_betas(owner: str, betas: Any) -> tuple[float, float]:
    """Two coefficients in [0, 1); ConfigError naming ``betas`` otherwise."""
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: betas must be two numbers in [0, 1), got {betas!r}") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ConfigError(f"{owner}: betas must be two numbers in [0, 1), got {tuple(betas)}")
    return b1, b2


# --------------------------------------------------------------------------------------
# typed state: flatten to / load from the flat dicts torch.optim's state_dict carries


@dataclass
class State:
    """Base of every typed optimizer state.  Fields are tensors, ints, floats or nested States."""


def flatten_state(state: Any, prefix: str = "") -> dict[str, Any]:
    """``{"inner.m": tensor, "next_refresh": 201, ...}`` from a (nested) typed state."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(state):
        for f in fields(state):
            out.update(flatten_state(getattr(state, f.name), f"{prefix}{f.name}."))
    elif isinstance(state, (tuple, list)):
        for i, s in enumerate(state):
            out.update(flatten_state(s, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = state
    return out


def load_state(fresh: Any, flat: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Fill a freshly ``init``-ed state with saved values, checking every key, shape and dtype.

    Returns a new state object; ``fresh`` is not mutated, so a failure leaves nothing half-loaded.
    """
    if dataclasses.is_dataclass(fresh):
        vals = {f.name: load_state(getattr(fresh, f.name), flat, where, f"{prefix}{f.name}.") for f in fields(fresh)}
        return dataclasses.replace(fresh, **vals)
    if isinstance(fresh, (tuple, list)):
        return type(fresh)(load_state(s, flat, where, f"{prefix}{i}.") for i, s in enumerate(fresh))
    key = prefix[:-1]
    if key not in flat:
        raise ConfigError(f"{where}: saved optimizer state has no key {key!r} (saved with other options?)")
    v = flat[key]
    if isinstance(fresh, Tensor):
        if not isinstance(v, Tensor) or v.shape != fresh.shape or v.dtype != fresh.dtype:
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, Tensor) else type(v).__name__
            raise ConfigError(
                f"{where}: saved state {key!r} is {got}, this optimizer expects "
                f"{tuple(fresh.shape)} {fresh.dtype} (saved with another rank or projector?)"
            )
        return v.detach().clone().to(fresh.device)
    if isinstance(v, Tensor) or not isinstance(v, (int, float)):
        raise ConfigError(f"{where}: saved state {key!r} should be a number, got {type(v).__name__}")
    return type(fresh)(v)


def state_tensors(state: Any) -> list[Tensor]:
    return [v for v in flatten_state(state).values() if isinstance(v, Tensor)]


def nbytes(state: Any) -> int:
    """Bytes held by the tensors of a typed state (works on ``meta`` tensors: nothing is read)."""
    return sum(t.numel() * t.element_size() for t in state_tensors(state))


# --------------------------------------------------------------------------------------
# the protocol


@dataclass
class Factored:
    """A direction D = left @ right kept as its two factors (left (m, r), right (r, n)).

    Only the optimizer edge sees it (:meth:`Transform.directions`): W <- W - lr D is then one
    accumulating GEMM into W, with no (m, n) temporary and no separate pass to add it.
    """

    left: Tensor
    right: Tensor

    @property
    def mT(self) -> "Factored":
        return Factored(self.right.mT, self.left.mT)

    def dense(self) -> Tensor:
        return self.left @ self.right


class Transform:
    """``init(p, index) -> State``; ``update(grads, states, params, step) -> directions``."""

    def init(self, p: Tensor, index: int = 0) -> State:
        raise NotImplementedError

    def update(self, grads: list[Tensor], states: list[State], params: list[Tensor], step: int) -> list[Tensor]:
        raise NotImplementedError

    def directions(self, grads: list[Tensor], states: list[State], params: list[Tensor],
                   step: int) -> list[Tensor | Factored]:
        """What the optimizer edge applies: ``update``'s directions, some possibly as
        :class:`Factored` (same values).  Default: ``update``."""
        return self.update(grads, states, params, step)

    def hyper(self) -> dict[str, Any]:
        """Hyperparameters that may change between steps, under torch's param-group names
        (``betas``, ``eps``, ``momentum``, ...).  The optimizer edge shows them in the param group
        and passes the group's values to :meth:`set_hyper` before each update, so schedulers that
        cycle ``betas``/``momentum`` (``OneCycleLR``, ``CyclicLR``) work.  Default: none."""
        return {}

    def set_hyper(self, values: dict[str, Any]) -> None:
        """Apply ``values`` (keys of :meth:`hyper`).  Every value is checked before any is applied:
        a bad one raises ConfigError naming its key and changes nothing."""


@dataclass
class ChainState(State):
    parts: tuple = ()


class Chain(Transform):
    """Apply transforms one after the other: each one's output is the next one's input."""

    def __init__(self, *transforms: Transform):
        self.transforms = transforms

    def init(self, p: Tensor, index: int = 0) -> ChainState:
        return ChainState(tuple(t.init(p, index) for t in self.transforms))

    def update(self, grads, states, params, step):
        for i, t in enumerate(self.transforms):
            grads = t.update(grads, [s.parts[i] for s in states], params, step)
        return grads

    def hyper(self):
        # a key two parts both have would be ambiguous in one param group: it is left out (fixed)
        keys = [k for t in self.transforms for k in t.hyper()]
        return {k: v for t in self.transforms for k, v in t.hyper().items() if keys.count(k) == 1}

    def set_hyper(self, values):
        old = [t.hyper() for t in self.transforms]
        try:
            own = self.hyper()
            for t in self.transforms:
                t.set_hyper({k: values[k] for k in t.hyper() if k in values and k in own})
        except ConfigError:
            for t, h in zip(self.transforms, old):   # all or nothing
                t.set_hyper(h)
            raise


def chain(*transforms: Transform) -> Chain:
    return Chain(*transforms)


@dataclass
class EmptyState(State):
    pass


class ClipByRMS(Transform):
    """``d <- d / max(1, rms(d) / threshold)`` per tensor (Adafactor's update clipping)."""

    def __init__(self, threshold: float = 1.0):
        self.threshold = threshold

    def init(self, p, index=0):
        return EmptyState()

    def update(self, grads, states, params, step):
        return [g / (g.norm() / (g.numel() ** 0.5 * self.threshold)).clamp(min=1.0) for g in grads]


# --------------------------------------------------------------------------------------
# moving moments into a new basis (used when a low-rank wrapper refreshes its subspace)


def rotate_linear(x: Tensor, R: Tensor, axis: int) -> Tensor:
    """Change of basis of a first-moment-like tensor along ``axis``: x_new = R x_old.  R (r_new, r_old)."""
    return x @ R.mT if axis == x.dim() - 1 else R @ x


def rotate_square(x: Tensor, R: Tensor, axis: int) -> Tensor:
    """Second-moment-like (elementwise squares): v_new = (R*R) v_old.

    Exact when the bases differ by a permutation / sign flips; in general it keeps v >= 0 and
    carries each old coordinate's variance into the new coordinates in proportion to R_ij^2.
    """
    return rotate_linear(x, R * R, axis)


# --------------------------------------------------------------------------------------
# inner optimizers


class Inner(Transform):
    """An elementwise / per-tensor optimizer usable inside a low-rank wrapper."""

    name: ClassVar[str] = ""

    def rotate(self, state: State, R: Tensor, axis: int) -> None:
        raise NotImplementedError


@dataclass
class AdamState(State):
    m: Tensor  # first moment
    v: Tensor  # second moment


class AdamW(Inner):
    """Adam direction ``m_hat / (sqrt(v_hat) + eps)`` (weight decay is decoupled, at the edge).

    ``eps_convention="torch"`` adds eps to the bias-corrected sqrt(v) (torch.optim.AdamW);
    ``"hf"`` adds it to the raw sqrt(v) and folds the corrections into the step size
    (Kingma & Ba's "efficient" form, used by transformers' AdamW, galore-torch, fira, apollo),
    with the same floating-point operations as those packages (mul+add rather than lerp).
    """

    name = "adamw"

    def __init__(self, betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 bias_correction: bool = True, eps_convention: str = "torch"):
        if eps_convention not in ("torch", "hf"):
            raise ConfigError(f"adamw: eps_convention must be 'torch' or 'hf', got {eps_convention!r}")
        self.b1, self.b2 = check_betas("adamw", betas)
        self.eps = check_positive("adamw", "eps", eps, allow_zero=True)
        self.bias_correction, self.eps_convention = bias_correction, eps_convention

    def hyper(self):
        return {"betas": (self.b1, self.b2), "eps": self.eps}

    def set_hyper(self, values):
        b1, b2 = check_betas("adamw", values.get("betas", (self.b1, self.b2)))
        eps = check_positive("adamw", "eps", values.get("eps", self.eps), allow_zero=True)
        self.b1, self.b2, self.eps = b1, b2, eps

    def init(self, p, index=0):
        return AdamState(torch.zeros_like(p), torch.zeros_like(p))

    def update(self, grads, states, params, step):
        ms, vs = [s.m for s in states], [s.v for s in states]
        if self.eps_convention == "torch":                                    # m = b1 m + (1-b1) g
            torch._foreach_lerp_(ms, grads, 1.0 - self.b1)                    # (torch's arithmetic)
        else:                                                                 # (transformers' arithmetic)
            torch._foreach_mul_(ms, self.b1)
            torch._foreach_add_(ms, grads, alpha=1.0 - self.b1)
        torch._foreach_mul_(vs, self.b2)
        torch._foreach_addcmul_(vs, grads, grads, 1.0 - self.b2)              # v = b2 v + (1-b2) g^2
        bc1 = 1.0 - self.b1 ** step if self.bias_correction else 1.0
        bc2 = 1.0 - self.b2 ** step if self.bias_correction else 1.0
        denom = torch._foreach_sqrt(vs)
        if self.eps_convention == "torch":                                    # m_hat / (sqrt(v_hat) + eps)
            torch._foreach_div_(denom, math.sqrt(bc2))
            torch._foreach_add_(denom, self.eps)
            out = torch._foreach_div(ms, denom)
            torch._foreach_mul_(out, 1.0 / bc1)
        else:                                                                 # m / (sqrt(v) + eps) * sqrt(bc2)/bc1
            torch._foreach_add_(denom, self.eps)
            out = torch._foreach_div(ms, denom)
            torch._foreach_mul_(out, math.sqrt(bc2) / bc1)
        return list(out)

    def rotate(self, state, R, axis):
        state.m = rotate_linear(state.m, R, axis)
        state.v = rotate_square(state.v, R, axis)


@dataclass
class AdafactorState(State):
    row: Tensor  # (m,)  mean over columns of the squared gradient (factored) -- or full v for 1-D
    col: Tensor  # (n,)  mean over rows; empty for 1-D tensors
    m: Tensor    # first moment (empty when beta1 is None)


class Adafactor(Inner):
    """Adafactor (Shazeer & Stern 2018) with an external learning rate.

    v is factored into row and column means for matrices (``v_ij ~ r_i c_j / mean(r)``),
    ``beta2_t = 1 - t^decay_rate``, update ``g / sqrt(v_hat)`` clipped to RMS ``clip_threshold``,
    optional first moment ``beta1`` applied to the clipped update.
    """

    name = "adafactor"

    def __init__(self, decay_rate: float = -0.8, eps: float = 1e-30, clip_threshold: float = 1.0,
                 beta1: float | None = None):
        if decay_rate >= 0:
            raise ConfigError(f"adafactor: decay_rate must be < 0, got {decay_rate}")
        self.clip = check_positive("adafactor", "clip_threshold", clip_threshold)
        self.decay_rate, self.eps, self.beta1 = decay_rate, eps, beta1
        self.has_m = bool(beta1)
        self.set_hyper(self.hyper())   # checks beta1

    def hyper(self):
        # beta1 only when there is a first moment (built with one): None <-> number would change the state
        return {"clip_threshold": self.clip, **({"beta1": self.beta1} if self.has_m else {})}

    def set_hyper(self, values):
        clip = check_positive("adafactor", "clip_threshold", values.get("clip_threshold", self.clip))
        if self.has_m and "beta1" in values:
            self.beta1 = check_coefficient("adafactor", "beta1", values["beta1"])
        self.clip = clip

    def init(self, p, index=0):
        m = torch.zeros_like(p) if self.has_m else p.new_zeros(0)
        if p.dim() == 2:
            return AdafactorState(p.new_zeros(p.shape[0]), p.new_zeros(p.shape[1]), m)
        return AdafactorState(torch.zeros_like(p), p.new_zeros(0), m)

    def update(self, grads, states, params, step):
        b2 = 1.0 - step ** self.decay_rate
        out = []
        for g, s in zip(grads, states):
            g2 = g * g + self.eps
            if g.dim() == 2:
                s.row.mul_(b2).add_(g2.mean(dim=1), alpha=1 - b2)
                s.col.mul_(b2).add_(g2.mean(dim=0), alpha=1 - b2)
                r = (s.row / s.row.mean()).rsqrt_().unsqueeze(1)              # (m, 1)
                u = g * r * s.col.rsqrt().unsqueeze(0)                        # g / sqrt(r c / mean r)
            else:
                s.row.mul_(b2).add_(g2, alpha=1 - b2)
                u = g * s.row.rsqrt()
            u = u / (u.norm() / (u.numel() ** 0.5 * self.clip)).clamp(min=1.0)
            if s.m.numel():
                s.m.lerp_(u, 1 - self.beta1)
                u = s.m.clone()
            out.append(u)
        return out

    def rotate(self, state, R, axis):
        if state.col.numel() == 0:
            raise ConfigError("adafactor: only factored (2-D) moments can be rotated")
        if axis == 1:                          # columns are the subspace coordinates
            state.col = (R * R) @ state.col
        else:
            state.row = (R * R) @ state.row
        if state.m.numel():
            state.m = rotate_linear(state.m, R, axis)


@dataclass
class MomentumState(State):
    buf: Tensor


class SGDMomentum(Inner):
    """Heavy-ball momentum as torch.optim.SGD: ``buf = mu buf + g``; direction ``buf`` (or Nesterov)."""

    name = "sgd"

    def __init__(self, momentum: float = 0.9, nesterov: bool = False):
        self.mu, self.nesterov = check_coefficient("sgd", "momentum", momentum), nesterov

    def hyper(self):
        return {"momentum": self.mu}

    def set_hyper(self, values):
        self.mu = check_coefficient("sgd", "momentum", values.get("momentum", self.mu))

    def init(self, p, index=0):
        return MomentumState(torch.zeros_like(p))

    def update(self, grads, states, params, step):
        bufs = [s.buf for s in states]
        if step == 1:
            torch._foreach_copy_(bufs, grads)
        else:
            torch._foreach_mul_(bufs, self.mu)
            torch._foreach_add_(bufs, grads)
        if self.nesterov:
            return list(torch._foreach_add(grads, bufs, alpha=self.mu))
        return [b.clone() for b in bufs]

    def rotate(self, state, R, axis):
        state.buf = rotate_linear(state.buf, R, axis)


class Lion(Inner):
    """Lion (Chen et al. 2023): direction ``sign(b1 m + (1-b1) g)``, then ``m = b2 m + (1-b2) g``."""

    name = "lion"

    def __init__(self, betas: Sequence[float] = (0.9, 0.99)):
        self.b1, self.b2 = check_betas("lion", betas)

    def hyper(self):
        return {"betas": (self.b1, self.b2)}

    def set_hyper(self, values):
        self.b1, self.b2 = check_betas("lion", values.get("betas", (self.b1, self.b2)))

    def init(self, p, index=0):
        return MomentumState(torch.zeros_like(p))

    def update(self, grads, states, params, step):
        bufs = [s.buf for s in states]
        c = torch._foreach_lerp(bufs, grads, 1.0 - self.b1)
        torch._foreach_lerp_(bufs, grads, 1.0 - self.b2)
        return [x.sign_() for x in c]

    def rotate(self, state, R, axis):
        state.buf = rotate_linear(state.buf, R, axis)


_INNER: dict[str, type[Inner]] = {c.name: c for c in (AdamW, Adafactor, SGDMomentum, Lion)}


def inner_names() -> list[str]:
    return sorted(_INNER)


def make_inner(name: str, **options) -> Inner:
    """Build an inner optimizer by name; unknown options raise ConfigError naming them."""
    if name not in _INNER:
        raise UnknownNameError("inner optimizer", name, _INNER)
    try:
        return _INNER[name](**options)
    except TypeError as e:
        raise ConfigError(f"inner optimizer {name!r}: {e}") from None


__all__ = [
    "State", "Transform", "Chain", "chain", "ClipByRMS", "Inner", "AdamW", "Adafactor", "SGDMomentum",
    "Lion", "AdamState", "AdafactorState", "MomentumState", "make_inner", "inner_names",
    "flatten_state", "load_state", "nbytes", "rotate_linear", "rotate_square",
]
