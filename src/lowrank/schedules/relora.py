"""ReLoRA: High-Rank Training Through Low-Rank Updates (Lialin et al., 2023), arXiv:2307.05695.

Every ``every`` optimizer steps (after steps every + 1, 2·every + 1, ... as the reference code,
which merges when ``update_step % relora == 1``), for each factor adapter (LoRA and friends):

    W ← W + s B A            merge the update into the frozen weight
    A ← Kaiming, B ← 0       restart the factors (the layer's function is unchanged)
    optimizer state of A, B: reset to zero, or magnitude-pruned (keep the largest (1 - ratio)
                             of each moment tensor; "prune-joint": one mask per parameter, from
                             its second moment), or kept ("none")

so the sum of many rank-r updates reaches high rank.  The learning rate follows a *jagged*
cosine: one cosine decay over the run (``total_steps``; constant when None), with a linear
warm-up at the start and a short re-warm-up (from 0 to the cosine value) after every restart
(:func:`relora_lr_lambda`).  With ``manage_lr`` (default) the schedule writes each group's LR
itself (base: the group's ``initial_lr``); the re-warm-up matters: the surviving optimizer
moments (pruned independently, as the reference code does) meet freshly restarted factors.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from ..core.adapter import FactorAdapter
from ..core.inject import adapted_layers
from ..errors import ConfigError
from .base import Schedule, check_int, check_real


def relora_lr_lambda(
    step: int,
    *,
    total_steps: int | None,
    warmup_steps: int,
    restart_every: int,
    restart_warmup_steps: int,
    min_lr_ratio: float = 0.1,
) -> float:
    """Multiplier of the base LR at ``step`` (0-based): jagged cosine with restart warm-ups.

    Usable directly with ``torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(relora_lr_lambda, ...))``.
    ``total_steps=None``: no cosine decay (constant LR), only the warm-ups.
    """

    def cosine(s: int) -> float:
        if total_steps is None:
            return 1.0
        progress = min(1.0, max(0.0, (s - warmup_steps) / max(1, total_steps - warmup_steps)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    if step < warmup_steps:
        return step / max(1, warmup_steps)
    since_restart = step % restart_every
    if step >= restart_every and since_restart < restart_warmup_steps:
        # ramp from 0 to where the cosine will be at the end of the re-warm-up
        return (since_restart / restart_warmup_steps) * cosine(step - since_restart + restart_warmup_steps)
    return cosine(step)


def factor_adapters(model: nn.Module, name: str) -> list[tuple[str, Any, FactorAdapter]]:
    found = []
    for path, layer in adapted_layers(model):
        a = layer.adapters[name] if name in layer.adapters else None
        if isinstance(a, FactorAdapter) and not a.replaces_base and a.mergeable:
            found.append((path, layer, a))
    return found


def _smallest(v: torch.Tensor, ratio: float) -> torch.Tensor | None:
    """Mask of the ⌈ratio · n⌉ entries of v smallest in magnitude (None: nothing to drop)."""
    k = math.ceil(ratio * v.numel() - 1e-9)
    if k <= 0:
        return None
    if k >= v.numel():
        return torch.ones_like(v, dtype=torch.bool)
    a = v.abs()
    return a <= a.flatten().kthvalue(k).values


@torch.no_grad()
def prune_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], mode: str, ratio: float) -> None:
    """Reset (zero) or magnitude-prune every tensor in the optimizer state of ``params``.

    "prune": each moment tensor keeps its own largest (1 - ratio) entries (the reference code).
    "prune-joint": one mask per parameter, from its second moment (``exp_avg_sq``; else its first
    state tensor), applied to every moment, so no first moment survives over a zeroed second
    moment (an Adam step of m / eps right after the restart).
    """
    for p in params:
        st = optimizer.state.get(p)
        if not st:
            continue
        # the moments: not the step counter, a scalar under torch's optimizers but shaped like the
        # parameter under ElementwiseAdamW (ReLoRA, as its reference, keeps the counts)
        moments = {key: v for key, v in st.items()
                   if key != "step" and torch.is_tensor(v) and v.shape == p.shape and v.is_floating_point()}
        joint = None
        if mode == "prune-joint" and moments:
            joint = _smallest(moments.get("exp_avg_sq", next(iter(moments.values()))), ratio)
        for v in moments.values():
            if mode == "reset":
                v.zero_()
                continue
            drop = joint if mode == "prune-joint" else _smallest(v, ratio)
            if drop is not None:
                v.masked_fill_(drop, 0.0)


class ReLoRA(Schedule):
    name = "relora"
    sets_up_next_step = True
    paper = "ReLoRA: High-Rank Training Through Low-Rank Updates (Lialin et al., 2023), arXiv:2307.05695"

    def __init__(
        self,
        every: int = 500,
        *,
        adapter: str = "default",
        optimizer_reset: Literal["prune", "prune-joint", "reset", "none"] = "prune",
        prune_ratio: float = 0.99,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        restart_warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        manage_lr: bool = True,
    ):
        super().__init__()
        check_int("relora", "every", every, 1)
        check_int("relora", "total_steps", total_steps, 1, optional=True)
        check_int("relora", "warmup_steps", warmup_steps, 0)
        check_int("relora", "restart_warmup_steps", restart_warmup_steps, 0)
        check_real("relora", "min_lr_ratio", min_lr_ratio, 0.0, 1.0)
        check_real("relora", "prune_ratio", prune_ratio, 0.0, 1.0)
        if optimizer_reset not in ("prune", "prune-joint", "reset", "none"):
            raise ConfigError(
                "relora option 'optimizer_reset' must be 'prune', 'prune-joint', 'reset' or 'none', "
                f"got {optimizer_reset!r}"
            )
        if not 0.0 <= prune_ratio <= 1.0:
            raise ConfigError(f"relora option 'prune_ratio' must be in [0, 1], got {prune_ratio!r}")
        if restart_warmup_steps >= every:
            raise ConfigError(
                f"relora option 'restart_warmup_steps'={restart_warmup_steps} must be shorter than 'every'={every}"
            )
        self.every, self.adapter = every, adapter
        self.optimizer_reset, self.prune_ratio = optimizer_reset, float(prune_ratio)
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.restart_warmup_steps, self.min_lr_ratio = restart_warmup_steps, min_lr_ratio
        self.manage_lr = manage_lr
        self.restarts = 0

    def lr_lambda(self, step: int) -> float:
        return relora_lr_lambda(
            step,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            restart_every=self.every,
            restart_warmup_steps=self.restart_warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
        )

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not factor_adapters(model, self.adapter):
            raise ConfigError(
                f"relora needs mergeable factor adapters (e.g. lowrank.adapt(model, 'lora', ...)) named "
                f"{self.adapter!r}; this model has none"
            )
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self._set_lr(optimizer)
        super().attach(model, optimizer)

    def _set_lr(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.manage_lr:
            return  # the loop owns the LR (use relora_lr_lambda with LambdaLR)
        f = self.lr_lambda(self.t)
        for g in optimizer.param_groups:
            g["lr"] = g["initial_lr"] * f

    @torch.no_grad()
    def restart(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Merge every factor adapter into W, restart its factors, reset/prune their optimizer state."""
        params: list[torch.Tensor] = []
        for _, layer, a in factor_adapters(model, self.adapter):
            base = layer.base
            base.set_weight(a.merge_into(base.weight.to(a.compute_dtype)))
            if hasattr(a, "reset_parameters"):
                a.reset_parameters()
            else:
                torch.nn.init.kaiming_uniform_(a.A, a=math.sqrt(5))
                torch.nn.init.zeros_(a.B)
            params += [a.A, a.B]
        if self.optimizer_reset != "none":
            prune_state(optimizer, params, self.optimizer_reset, self.prune_ratio)
        self.restarts += 1

    def on_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        # as the reference (merge when update_step % relora == 1): the restart follows the step at
        # index k·every, the one the jagged schedule runs at LR 0, so the first step on fresh
        # factors already has the re-warm-up's first LR
        if self.t > self.every and (self.t - 1) % self.every == 0:
            self.restart(model, optimizer)
        self._set_lr(optimizer)

    state_keys = ("t", "restarts")

    def extra_state(self) -> dict[str, Any]:
        return {"restarts": self.restarts}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.restarts = int(state["restarts"])
