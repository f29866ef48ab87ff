"""Shared plumbing of the adapter-side optimizers.

* :func:`factor_pairs` finds the trainable (A, B) factor pairs of an adapted model through the
  adapter protocol (``lowrank.adapted_layers`` -> ``FactorAdapter.A/B/scaling``), never by
  parameter names.
* :class:`AdapterOptimizer` is a ``torch.optim.Optimizer`` whose ``step`` refuses non-finite
  gradients before anything is written (skip and count, or raise), runs AdamW on the parameters
  that are not factors (heads, norms, ...), and leaves the factor pairs to the subclass.
  Every tensor it keeps lives in ``self.state`` so ``state_bytes`` counts all of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ...core.adapter import FactorAdapter
from ...core.inject import adapted_layers
from ..._checks import is_finite_real
from ...errors import ConfigError


@dataclass(frozen=True)
class FactorPair:
    """One adapter's trainable factors: ΔW = scaling · B @ A, A (r, in), B (out, r)."""

    path: str  # module path of the adapted layer
    name: str  # adapter name
    adapter: FactorAdapter

    @property
    def A(self) -> torch.Tensor:
        return self.adapter.A

    @property
    def B(self) -> torch.Tensor:
        return self.adapter.B

    @property
    def scaling(self) -> float:
        return float(self.adapter.scaling)


def factor_pairs(model: nn.Module, who: str) -> list[FactorPair]:
    """The trainable factor pairs of ``model``'s active adapters; ConfigError naming ``who`` if none."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{who} needs the adapted model (an nn.Module carrying lowrank adapters), got {type(model).__name__}"
        )
    pairs: list[FactorPair] = []
    for path, layer in adapted_layers(model):
        for name in layer.active:
            adapter = layer.adapters[name]
            if not isinstance(adapter, FactorAdapter):
                continue
            try:
                A, B = adapter.A, adapter.B
            except NotImplementedError:
                continue
            if not (isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter)):
                continue
            if A.requires_grad and B.requires_grad:
                pairs.append(FactorPair(path, name, adapter))
    if not pairs:
        raise ConfigError(
            f"{who} needs a model adapted with a factor adapter (A, B trainable, e.g. "
            f"lowrank.adapt(model, 'lora', rank=8)); {type(model).__name__} has none"
        )
    return pairs


def other_trainables(model: nn.Module, pairs: Iterable[FactorPair]) -> list[nn.Parameter]:
    """Trainable parameters that are not factors of ``pairs`` (heads, magnitude vectors, ...)."""
    taken = {id(t) for p in pairs for t in (p.A, p.B)}
    seen: set[int] = set()
    out = []
    for prm in model.parameters():
        if prm.requires_grad and id(prm) not in taken and id(prm) not in seen:
            seen.add(id(prm))
            out.append(prm)
    return out


def check_hparams(who: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if not (is_finite_real(lr) and lr >= 0):
        raise ConfigError(f"{who}: lr must be a finite number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{who}: betas must be two numbers in [0, 1), got {betas!r}")
    if not eps >= 0:
        raise ConfigError(f"{who}: eps must be >= 0, got {eps!r}")
    if not weight_decay >= 0:
        raise ConfigError(f"{who}: weight_decay must be >= 0, got {weight_decay!r}")


@torch.no_grad()
def adamw_(p: torch.Tensor, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
    """One decoupled-weight-decay Adam step on ``p`` (torch.optim.AdamW's math, state in ``state``)."""
    beta1, beta2 = group["betas"]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["step"] += 1
    t = float(state["step"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if group["weight_decay"]:
        p.mul_(1 - group["lr"] * group["weight_decay"])
    denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
    p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1**t))


class AdapterOptimizer(torch.optim.Optimizer):
    """Base of the adapter-side optimizers.

    ``nonfinite="skip"`` (default) skips a step whose gradients hold NaN/Inf, leaving weights and
    moments untouched, and counts it in ``skipped_steps``; ``"raise"`` raises ``FloatingPointError``.
    """

    who = "optimizer"

    def __init__(self, params, defaults: dict[str, Any], *, nonfinite: str = "skip"):
        if nonfinite not in ("skip", "raise"):
            raise ConfigError(f"{self.who}: nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        super().__init__(params, defaults)

    # -- bookkeeping ---------------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of every tensor held in ``self.state`` (moments, projected statistics, steps)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        return total

    def _grads_finite(self) -> bool:
        flags = [p.grad.isfinite().all() for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not flags:
            return True
        return bool(torch.stack(flags).all())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{self.who}: non-finite gradient; step refused, nothing was changed")
            self.skipped_steps += 1
            return loss
        self._step()
        return loss

    def _step(self) -> None:  # pragma: no cover - subclasses
        raise NotImplementedError

    def _adamw_group(self, group: dict[str, Any]) -> None:
        """:func:`adamw_` on every parameter of ``group`` with a gradient, batched with foreach ops."""
        params = [p for p in group["params"] if p.grad is not None]
        self._adamw_foreach(params, [p.grad for p in params], group)

    def _adamw_foreach(self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]) -> None:
        """:func:`adamw_` on ``params`` with the given gradients (state in ``self.state``), foreach-batched."""
        if not params:
            return
        beta1, beta2 = group["betas"]
        ms, vs, bc1, bc2 = [], [], [], []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            t = float(st["step"])
            ms.append(st["exp_avg"])
            vs.append(st["exp_avg_sq"])
            bc1.append(-group["lr"] / (1 - beta1**t))
            bc2.append(math.sqrt(1 - beta2**t))
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, ms, denom, bc1)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)


def adamw_state_bytes(params: Iterable[torch.Tensor]) -> int:
    """Bytes :func:`adamw_` keeps for ``params``: two moments of each plus a float32 step."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)


def gram_inv(M: torch.Tensor, damping: float) -> torch.Tensor:
    """(M + damping · I)^-1 for small symmetric (..., r, r) Gram matrices, solved in float64."""
    r = M.shape[-1]
    M64 = M.double() + damping * torch.eye(r, dtype=torch.float64, device=M.device)
    return torch.linalg.inv(M64).to(M.dtype)
