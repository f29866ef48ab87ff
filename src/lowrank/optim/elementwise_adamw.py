"""AdamW with a step counter per element, so that part of a tensor can restart its bias correction.

torch's AdamW keeps one step count t per tensor: zeroing some rows' moments (a schedule that
swaps those rows for fresh vectors, as SwitchLoRA does) leaves them bias-corrected with the
tensor's large t, so their first update afterwards is (1 − β₁)/√(1 − β₂) ≈ 3.2 times Adam's
usual first step.  Here a group with ``elementwise_step=True`` keeps ``state["step"]`` as a
float32 tensor shaped like the parameter, and the update of element k is

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,   t_k ← t_k + 1
    p ← p (1 − lr λ) − lr · (m / (1 − β₁^t_k)) / (√(v / (1 − β₂^t_k)) + ε)

which is AdamW exactly while no count is reset.  A schedule restarts elements by zeroing their
entries of ``exp_avg``, ``exp_avg_sq`` and ``step``.  As SwitchLoRA's reference optimizer
(``StepAdamW``), which keeps a count for every element.  Where whole rows or columns restart
together, ``elementwise_step`` may instead name the dimensions the counts vary along: ``(0,)`` keeps
one count per row (a (rows, 1) tensor, broadcast), ``(1,)`` one per column, so the counts cost
almost no memory.  Groups with ``elementwise_step=False`` keep torch's scalar step.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..errors import ConfigError
from .transforms import check_betas, check_positive


class ElementwiseAdamW(torch.optim.Optimizer):
    """AdamW whose groups may keep one step count per element (``elementwise_step=True``) or per
    slice along some dimensions (``elementwise_step=(0,)``: per row)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, elementwise_step: bool | tuple[int, ...] = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, elementwise_step=elementwise_step)
        super().__init__(params, defaults)
        for i, g in enumerate(self.param_groups):
            self._check(g, i)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a state dict saved by torch's AdamW has no elementwise_step
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @staticmethod
    def _check(group: dict[str, Any], i: int) -> None:
        where = f"elementwise_adamw param group {i}"
        for key in ("maximize", "amsgrad"):  # torch AdamW options this optimizer does not have
            if group.get(key):
                raise ConfigError(f"{where}: {key}=True is not supported (a state dict of torch's AdamW with {key}?)")
        check_positive(where, "lr", group["lr"], allow_zero=True)
        check_positive(where, "eps", group["eps"], allow_zero=True)
        check_positive(where, "weight_decay", group["weight_decay"], allow_zero=True)
        group["betas"] = check_betas(where, group["betas"])
        spec = group["elementwise_step"]
        if isinstance(spec, list):  # a state dict read back from JSON
            spec = group["elementwise_step"] = tuple(spec)
        ok = isinstance(spec, bool) or (isinstance(spec, tuple) and all(
            isinstance(d, int) and not isinstance(d, bool) and all(-p.dim() <= d < p.dim() for p in group["params"])
            for d in spec))
        if not ok:
            raise ConfigError(f"{where}: elementwise_step must be True, False or a tuple of dimensions of its "
                              f"parameters, got {spec!r}")

    @staticmethod
    def count_shape(p: torch.Tensor, spec: bool | tuple[int, ...]) -> tuple[int, ...]:
        """The shape of ``p``'s step counts: () (one), p's shape (one per element), or p's sizes
        along the dimensions in ``spec`` and 1 elsewhere."""
        if spec is False:
            return ()
        if spec is True:
            return tuple(p.shape)
        dims = {d % p.dim() for d in spec}
        return tuple(n if d in dims else 1 for d, n in enumerate(p.shape))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):  # everything checked before anything changes
            self._check(group, i)
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise ConfigError(f"elementwise_adamw param group {i}: sparse gradients are not supported")
                t = self.state.get(p, {}).get("step")
                want = self.count_shape(p, group["elementwise_step"])
                if t is not None and (not torch.is_tensor(t) or tuple(t.shape) not in (want, ())):
                    raise ConfigError(f"elementwise_adamw param group {i}: a parameter of shape {tuple(p.shape)} has "
                                      f"a step count of shape {tuple(getattr(t, 'shape', ()))}, not {want} (a state "
                                      "from another optimizer or model?)")
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                shape = self.count_shape(p, group["elementwise_step"])
                if not st:
                    st["step"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if st["step"].device != p.device:  # torch's load_state_dict leaves counts where they were saved
                    st["step"] = st["step"].to(p.device)
                if shape and st["step"].dim() == 0:  # a count from torch's AdamW
                    st["step"] = st["step"].float().expand(shape).clone()
                t, m, v = st["step"], st["exp_avg"], st["exp_avg_sq"]
                t.add_(1)
                if wd:
                    p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if t.dim() == 0:  # one count: torch's AdamW to the bit
                    n = float(t)
                    denom = (v.sqrt() / (1 - b2**n) ** 0.5).add_(eps)
                    p.addcdiv_(m, denom, value=-lr / (1 - b1**n))
                else:
                    n = t.to(torch.float32 if t.device.type == "mps" else torch.float64)  # broadcasts to p
                    bc1 = 1 - torch.pow(b1, n)
                    bc2 = (1 - torch.pow(b2, n)).sqrt_()
                    denom = (v.sqrt() / bc2.to(v.dtype)).add_(eps)
                    p.addcdiv_(m * (-lr / bc1).to(m.dtype), denom)
        return loss
