"""Cuttlefish: Low-Rank Model Training without All the Tuning (Wang et al., MLSys 2023), arXiv:2305.02538.

Train full-rank first, watching each layer's *stable rank*

    srank(W) = ‖W‖_F² / σ_max(W)²,      scaled:  ξ(W_t) = srank(W_t) · min(out, in) / srank(W_0)

(scaled so that a layer starts at full rank).  When the stable ranks stop moving, or after
``max_full_steps``, each layer is switched to the factorised form W ≈ B A at rank r = ⌈ξ(W_t)⌉
via a truncated SVD,

    W = U Σ Vᵀ,   B = U_r Σ_r^½,   A = Σ_r^½ V_rᵀ,

and training continues on A and B (the ``lowrank`` parameterisation).  Layers for which the
factorised form would not save parameters (r ≥ out·in / (out+in)), and those matched by
``exclude`` (Cuttlefish keeps the first layers full-rank), stay dense.

"Stop moving" (``switch_test``):

* ``"slope"`` (default, the reference code's ``layer_rank_stable_detector``): at every check
  (every ``check_every`` steps; the reference checks once per epoch) each layer's floored stable
  rank is recorded; from check ``window`` (15) on, a layer is stable when the mean absolute slope
  (``np.gradient``) of the 15-point exponential moving average of its record, over the last 11
  checks, is <= ``slope_tol`` (0.1, doubled while a single layer lags: the reference's
  threshold with its scaler for non-CNN models); a stable layer stays stable; all stable: switch.  The ranks
  are then the reference's ⌈⌊srank(W_t)⌋ · min(out, in) / ⌊srank(W_0)⌋⌉.
* ``"relative"``: every layer's relative change of ξ between two checks below ``tol``.  Simpler,
  but on noisy stable ranks it switches erratically.

At the switch the function changes only by the truncation: for any input x,
‖W x − B A x‖ ≤ σ_{r+1}(W) ‖x‖.  ``self.report`` holds, per switched layer, the rank, σ_{r+1},
and the relative Frobenius error ‖W − B A‖_F / ‖W‖_F.  The optimizer swaps W for A and B in
W's parameter group (W's state is dropped; A and B start with fresh state).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..core.inject import adapted_layers, commit_adapters, plan_adapters, resolve_targets
from ..core.layers import AdaptedLayer, BaseLayer
from ..errors import ConfigError
from ..registry import get_method
from .base import Schedule, check_int, check_real

ADAPTER = "cuttlefish"


def stable_rank(w: torch.Tensor) -> float:
    w = w.detach().float()
    top = torch.linalg.matrix_norm(w, ord=2)
    return float(w.pow(2).sum() / top.pow(2).clamp_min(1e-30))


class Cuttlefish(Schedule):
    name = "cuttlefish"
    paper = "Cuttlefish: Low-Rank Model Training without All the Tuning (Wang et al., MLSys 2023), arXiv:2305.02538"

    def __init__(
        self,
        *,
        check_every: int = 50,
        switch_test: str = "slope",
        window: int = 15,
        slope_tol: float = 0.1,
        tol: float = 0.02,
        max_full_steps: int | None = None,
        min_full_steps: int = 0,
        targets: str | Sequence[str] = "all-linear",
        exclude: str | Sequence[str] | None = None,
        release_base: bool = True,
    ):
        super().__init__()
        check_int("cuttlefish", "check_every", check_every, 1)
        check_int("cuttlefish", "max_full_steps", max_full_steps, 0, optional=True)
        check_int("cuttlefish", "min_full_steps", min_full_steps, 0)
        check_real("cuttlefish", "tol", tol, 0.0, open_low=True)
        check_real("cuttlefish", "slope_tol", slope_tol, 0.0, open_low=True)
        check_int("cuttlefish", "window", window, 2)
        if switch_test not in ("slope", "relative"):
            raise ConfigError(f"cuttlefish: switch_test must be 'slope' or 'relative', got {switch_test!r}")
        self.check_every, self.tol = check_every, float(tol)
        self.switch_test, self.window, self.slope_tol = switch_test, window, float(slope_tol)
        self.max_full_steps, self.min_full_steps = max_full_steps, min_full_steps
        self.targets, self.exclude, self.release_base = targets, exclude, release_base
        self.initial: dict[str, float] = {}  # srank(W_0) per layer
        self.history: list[dict[str, float]] = []  # scaled stable ranks at each check
        self.floors: list[dict[str, int]] = []  # floored stable ranks at each check (the "slope" test)
        self.stable: dict[str, bool] = {}  # per layer, once stable under the "slope" test
        self.switched = False
        self.ranks: dict[str, int] = {}
        self.report: dict[str, dict[str, float]] = {}

    # -- tracking -----------------------------------------------------------------------------------
    def _layers(self, model: nn.Module) -> list[tuple[str, BaseLayer]]:
        out = []
        for path, mod in resolve_targets(model, self.targets, self.exclude, method=self.name):
            if isinstance(mod, AdaptedLayer):
                continue  # already parameterised
            out.append((path, BaseLayer(mod)))
        return out

    def stable_ranks(self, model: nn.Module) -> dict[str, float]:
        """srank(W_t) of every tracked layer."""
        return {path: stable_rank(base.weight) for path, base in self._layers(model)}

    def _scaled(self, model: nn.Module, raw: dict[str, float]) -> dict[str, float]:
        full = {p: min(b.in_features, b.out_features) for p, b in self._layers(model)}
        return {p: raw[p] * full[p] / self.initial[p] for p in raw}

    def scaled_ranks(self, model: nn.Module) -> dict[str, float]:
        return self._scaled(model, self.stable_ranks(model))

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.switched and self.ranks and not any(n == ADAPTER for _, l in adapted_layers(model) for n in l.adapters):
            self._factorise(model, optimizer, self.ranks, weights_from_model=False)  # resume after the switch
        if not self.initial:
            layers = self._layers(model)
            if not layers:
                raise ConfigError("cuttlefish found no dense linear layer to track (targets/exclude leave none)")
            self.initial = {p: stable_rank(b.weight) for p, b in layers}
        super().attach(model, optimizer)

    def should_switch(self) -> bool:
        if self.max_full_steps is not None and self.t >= self.max_full_steps:
            return True
        if self.t < self.min_full_steps or len(self.history) < 2:
            return False
        if self.switch_test == "slope":
            return bool(self.stable) and all(self.stable.values())
        prev, cur = self.history[-2], self.history[-1]
        return all(abs(cur[p] - prev[p]) / max(prev[p], 1e-12) < self.tol for p in cur)

    def _update_stable(self) -> None:
        """The reference's per-layer test on the floored stable ranks recorded so far."""
        epoch = len(self.floors) - 1
        remain = sum(not self.stable.get(p, False) for p in self.floors[-1])
        thr = self.slope_tol * {2: 1.0, 1: 2.0}.get(remain, 1.0)  # the reference's scaler (1.0) for non-CNN models
        for p in self.floors[-1]:
            if self.stable.get(p, False) or epoch < self.window:
                self.stable.setdefault(p, False)
                continue
            rec = [f[p] for f in self.floors]
            w = 2.0 / (self.window + 1)  # ``points``-point exponential moving average
            ema = [float(rec[0])]
            for v in rec[1:]:
                ema.append(v * w + ema[-1] * (1 - w))
            slope = np.abs(np.gradient(np.asarray(ema)))
            self.stable[p] = bool(np.mean(slope[-11:]) <= thr)

    def on_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.switched:
            return
        if self.t % self.check_every == 0:
            raw = self.stable_ranks(model)
            self.history.append(self._scaled(model, raw))
            self.floors.append({p: int(v) for p, v in raw.items()})
            self._update_stable()
        if self.should_switch():
            self.switch(model, optimizer)

    # -- the switch ---------------------------------------------------------------------------------
    def switch(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
        """Factorise every tracked layer at its measured rank; returns the truncation report."""
        raw = self.stable_ranks(model)  # the ranks now, at the switch
        current = self._scaled(model, raw)
        ranks = {}
        for path, base in self._layers(model):
            full = min(base.in_features, base.out_features)
            if self.switch_test == "slope":  # the reference's ⌈⌊srank_t⌋ · full / ⌊srank_0⌋⌉
                r = min(full, math.ceil(int(raw[path]) * full / max(1, int(self.initial[path]))))
            else:
                r = math.ceil(current[path])
            r = max(1, r)
            n_in, n_out = base.in_features, base.out_features
            if r * (n_in + n_out) < n_in * n_out:  # only where factorising saves parameters
                ranks[path] = r
        self._factorise(model, optimizer, ranks, weights_from_model=True)
        self.switched = True
        return self.report

    @torch.no_grad()
    def _factorise(self, model: nn.Module, optimizer: torch.optim.Optimizer, ranks: dict[str, int], weights_from_model: bool) -> None:
        method = get_method("lowrank")
        for path, r in ranks.items():
            planned = plan_adapters(
                model, method, name=ADAPTER, targets=re.escape(path), exclude=None, rank=r, alpha=None,
                dropout=0.0, init=None, calibration=None, options={},
            )
            p = planned[0]
            W = p.base.weight  # the dense parameter as stored (maybe transposed)
            dense_param = p.base.module.weight
            if weights_from_model:
                w = W.detach().float()
                U, S, Vh = torch.linalg.svd(w, full_matrices=False)
                root = S[:r].sqrt()
                p.adapter.lora_B.copy_(U[:, :r] * root)  # (out, r)
                p.adapter.lora_A.copy_(root[:, None] * Vh[:r])  # (r, in)
                err = (w - p.adapter.lora_B @ p.adapter.lora_A).norm() / w.norm().clamp_min(1e-30)
                self.report[path] = {
                    "rank": r,
                    "sigma_next": float(S[r]) if r < S.numel() else 0.0,
                    "rel_frobenius_error": float(err),
                }
            commit_adapters(model, planned, ADAPTER, freeze=False)
            dense_param.requires_grad_(False)
            dense_param.grad = None
            self._swap_in_optimizer(optimizer, dense_param, [p.adapter.lora_A, p.adapter.lora_B])
        self.ranks.update(ranks)
        if self.release_base:
            from ..adapters.factorized import release_base_weights

            release_base_weights(model, ADAPTER)

    @staticmethod
    def _swap_in_optimizer(optimizer: torch.optim.Optimizer, old: torch.Tensor, new: list[torch.Tensor]) -> None:
        optimizer.state.pop(old, None)
        for g in optimizer.param_groups:
            if any(q is old for q in g["params"]):
                g["params"] = [q for q in g["params"] if q is not old] + new
                return
        optimizer.param_groups[0]["params"].extend(new)

    # -- resuming -----------------------------------------------------------------------------------
    state_keys = ("t", "initial", "history", "switched", "ranks", "floors", "stable")

    def extra_state(self) -> dict[str, Any]:
        return {
            "initial": dict(self.initial),
            "history": [dict(h) for h in self.history],
            "floors": [dict(f) for f in self.floors],
            "stable": dict(self.stable),
            "switched": self.switched,
            "ranks": dict(self.ranks),
            "report": {k: dict(v) for k, v in self.report.items()},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.initial = dict(state["initial"])
        self.history = [dict(h) for h in state["history"]]
        self.floors = [{k: int(v) for k, v in f.items()} for f in state["floors"]]
        self.stable = {k: bool(v) for k, v in state["stable"].items()}
        self.switched = bool(state["switched"])
        self.ranks = {k: int(v) for k, v in state["ranks"].items()}
        self.report = dict(state.get("report", {}))
