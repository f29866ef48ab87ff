"""SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information (Zhou et al., 2024),
arXiv:2406.06564.

Each factor adapter (h = W x + s B A x) gets two pools of candidate vectors: rows for A
(length in) and columns for B (length out).  After an optimizer step, a few LoRA vectors are
swapped with candidates; W absorbs the difference so the layer's function does not change at
the moment of the switch:

    switch row i of A to candidate c:      W ← W + s B[:, i] (A[i] − c)ᵀ,   A[i] ← c
    switch column j of B to candidate c:   W ← W + s (B[:, j] − c) A[j],   B[:, j] ← c

and the vector that left goes back to the pool.  Optimizer handling as in the reference code:
the *counterpart* of a switched vector (column i of B when row i of A switched, and vice
versa) has its Adam moments zeroed and is frozen (its gradient masked to zero) for
``freeze_steps`` steps, while Adam re-estimates them.

At attach, fresh factors (B still zero, LoRA's init) are re-drawn like the candidates and W
absorbs s B A, so switching A rows matters from the first step and the function is unchanged.
Factors and candidates are uniform with the reference's bounds (``get_init_lora_bound``: Xavier /
Kaiming-like, so that A ΔB and B ΔA are the same size), √3 σ with, for W (out = m, in = n),

    σ_A = (√m r / n^{3/2})^{1/4} √gain,   σ_B = (r / √(m n))^{1/4} √gain,   gain = 1/√3,

which the reference pairs with s = 1/r (``lora_alpha = 1``; the recipe adapts so): then
std(s B A x) = gain for unit inputs.  For another scaling s both bounds are multiplied by
(s r)^{-1/2}, keeping that scale.

Schedule: the expected number of switches per matrix per step is rank / interval(t), with
interval(t) = interval₀ / 0.3^((t+1)/T_d) (the exponential descent of the reference code:
the switching frequency falls to 0.3x of its start at T_d = descent_rate · total_steps);
fractional counts are rounded stochastically.  Which vectors switch, and to which candidate,
is drawn at random among those not in use whose vector and counterpart are both not frozen
(the reference walks through the vectors in order with the same exclusion).

Adam's step count: the reference's recipe (``--zero_switch_state --zero_switch_step_state``)
also restarts the counterpart's bias correction, with an AdamW that keeps one step count per
element.  Here that is :class:`lowrank.optim.ElementwiseAdamW` (the ``switchlora`` recipe's
optimizer for the factors, with one count per row of A and per column of B, the granularity at
which vectors switch): the counts are zeroed with the moments.  Under torch's AdamW (one count per tensor) only the moments restart, so the first
update after a freeze is about (1 − β₁)/√(1 − β₂) ≈ 3.2x larger than the reference's.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..core.adapter import FactorAdapter
from ..errors import ConfigError
from .base import Schedule, check_int, check_real, generator_state
from .relora import factor_adapters


def uniform(rows: int, cols: int, bound: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(rows, cols, generator=g) * 2 - 1).mul_(bound)


def init_bounds(n_in: int, n_out: int, rank: int, scaling: float) -> tuple[float, float]:
    """Uniform bounds (A, B) of factors and candidates: the reference's, for s = 1/r (see above)."""
    m, n, r, gain = n_out, n_in, rank, 1.0 / math.sqrt(3.0)
    std_a = ((m**0.5 * r) / n**1.5) ** 0.25 * gain**0.5
    std_b = (r / (m * n) ** 0.5) ** 0.25 * gain**0.5
    adjust = (scaling * r) ** -0.5  # 1 at the reference's s = 1/r
    return math.sqrt(3.0) * std_a * adjust, math.sqrt(3.0) * std_b * adjust


class _LayerState:
    """Candidate pools and freeze counters of one adapter."""

    def __init__(self, a: FactorAdapter, n_candidates: int, g: torch.Generator):
        r, n_in = a.A.shape
        n_out = a.B.shape[0]
        dt, dev = a.A.dtype, a.A.device
        bound_a, bound_b = init_bounds(n_in, n_out, r, a.scaling)
        # the pool never holds a vector in use: a switch swaps a LoRA vector and a candidate slot
        self.cand_A = uniform(n_candidates, n_in, bound_a, g).to(dev, dt)  # (C, in)
        self.cand_B = uniform(n_candidates, n_out, bound_b, g).to(dev, dt)  # (C, out)
        self.frozen_A = torch.zeros(r, dtype=torch.int64)  # steps left frozen, per row of A
        self.frozen_B = torch.zeros(r, dtype=torch.int64)  # per column of B

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if torch.is_tensor(v)}

    def load(self, st: dict[str, torch.Tensor]) -> None:
        for k, v in st.items():
            cur = getattr(self, k)
            setattr(self, k, v.to(cur.device, cur.dtype).clone())


class SwitchLoRA(Schedule):
    name = "switchlora"
    sets_up_next_step = True
    paper = "SwitchLoRA: Switched Low-Rank Adaptation Can Learn Full-Rank Information (Zhou et al., 2024), arXiv:2406.06564"

    def __init__(
        self,
        *,
        total_steps: int,
        interval: float = 40.0,
        descent_rate: float = 0.1,
        freeze_steps: int = 5,
        n_candidates: int | None = None,
        adapter: str = "default",
        seed: int = 0,
    ):
        super().__init__()
        check_int("switchlora", "total_steps", total_steps, 1)
        check_int("switchlora", "freeze_steps", freeze_steps, 0)
        check_int("switchlora", "n_candidates", n_candidates, 1, optional=True)
        check_int("switchlora", "seed", seed, 0)
        check_real("switchlora", "interval", interval, 0.0, open_low=True)
        check_real("switchlora", "descent_rate", descent_rate, 0.0, 1.0, open_low=True)
        if interval < 2 * max(freeze_steps, 1):
            raise ConfigError(f"switchlora option 'interval'={interval} must be at least 2 x freeze_steps ({freeze_steps})")
        if not 0.0 < descent_rate <= 1.0 or total_steps < 1:
            raise ConfigError(f"switchlora needs total_steps >= 1 and descent_rate in (0, 1], got {total_steps}, {descent_rate}")
        self.total_steps, self.interval0, self.descent_rate = total_steps, float(interval), float(descent_rate)
        self.freeze_steps, self.n_candidates, self.adapter = freeze_steps, n_candidates, adapter
        self.g = torch.Generator().manual_seed(seed)
        self.layers: dict[str, _LayerState] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._hooks: list[Any] = []
        self.switches = 0

    # -- schedule of the switching frequency ------------------------------------------------------
    def current_interval(self, t: int) -> float:
        td = max(1.0, self.descent_rate * self.total_steps)
        rate = max(0.3 ** ((t + 1) / td), 1e-8)
        return self.interval0 / rate

    def _count(self, rank: int) -> int:
        expected = rank / self.current_interval(self.t)
        n = int(expected)
        if float(torch.rand((), generator=self.g)) < expected - n:
            n += 1
        return n

    # -- attach -----------------------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        found = factor_adapters(model, self.adapter)
        if not found:
            raise ConfigError(
                f"switchlora needs factor adapters (e.g. lowrank.adapt(model, 'lora', ...)) named {self.adapter!r}; "
                "this model has none"
            )
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for path, layer, a in found:
            if path not in self.layers:
                c = self.n_candidates or min(a.in_features, a.out_features)
                # resuming: the pools come from the checkpoint, so do not consume the restored RNG
                g = torch.Generator() if path in self._pending else self.g
                self.layers[path] = _LayerState(a, c, g)
                if self.t == 0 and not a.B.any():
                    self._init_factors(layer, a)
            if path in self._pending:
                self.layers[path].load(self._pending.pop(path))
            st = self.layers[path]
            # frozen vectors get no gradient (Adam then leaves them, their moments being zero)
            self._hooks.append(a.A.register_hook(lambda g, st=st: g * (st.frozen_A == 0).to(g.device, g.dtype)[:, None]))
            self._hooks.append(a.B.register_hook(lambda g, st=st: g * (st.frozen_B == 0).to(g.device, g.dtype)[None, :]))
        super().attach(model, optimizer)

    @torch.no_grad()
    def _init_factors(self, layer, a: FactorAdapter) -> None:
        """SwitchLoRA starts with B != 0 (so that switching A rows matters); W absorbs s B A."""
        r, n_in = a.A.shape
        bound_a, bound_b = init_bounds(n_in, a.B.shape[0], r, a.scaling)
        a.A.copy_(uniform(r, n_in, bound_a, self.g))
        a.B.copy_(uniform(r, a.B.shape[0], bound_b, self.g).t())
        base = layer.base
        base.set_weight(base.weight.to(a.B.dtype) - a.scaling * (a.B @ a.A))

    # -- one switch -------------------------------------------------------------------------------
    @torch.no_grad()
    def switch(self, layer, a: FactorAdapter, st: _LayerState, optimizer: torch.optim.Optimizer, which: str, n: int) -> int:
        """Switch ``n`` rows of A (which='A') or columns of B (which='B'); returns how many switched."""
        frozen_self = st.frozen_A if which == "A" else st.frozen_B
        frozen_pair = st.frozen_B if which == "A" else st.frozen_A
        # neither the vector nor its counterpart frozen (the reference's available_num cap): a switch
        # would otherwise re-zero a counterpart still re-estimating its moments and extend its freeze
        idle = ((frozen_self == 0) & (frozen_pair == 0)).nonzero().flatten()
        pool = st.cand_A if which == "A" else st.cand_B
        n = min(n, idle.numel(), pool.shape[0])
        if n == 0:
            return 0
        vec = idle[torch.randperm(idle.numel(), generator=self.g)[:n]]  # LoRA vectors to switch
        slot = torch.randperm(pool.shape[0], generator=self.g)[:n]  # candidates coming in
        A, B, s, base = a.A, a.B, a.scaling, layer.base
        new = pool[slot].clone()  # (n, in) or (n, out)
        if which == "A":
            old = A[vec].clone()  # (n, in)
            delta = s * B[:, vec] @ (old - new)  # (out, in)  s B_i (A_i − c)ᵀ
            A[vec] = new
        else:
            old = B[:, vec].t().clone()  # (n, out)
            delta = s * (old - new).t() @ A[vec]  # (out, in)  s (B_j − c) A_j
            B[:, vec] = new.t()
        base.set_weight(base.weight.to(delta.dtype) + delta)
        pool[slot] = old  # the vector that left returns to the pool, in the slot it frees
        # counterpart: zero its moments (and, under ElementwiseAdamW, its step counts) and freeze it
        counterpart = B if which == "A" else A
        frozen_other = st.frozen_B if which == "A" else st.frozen_A
        frozen_other[vec] = self.freeze_steps
        state = optimizer.state.get(counterpart, {})
        axis = 1 if which == "A" else 0  # the counterpart's columns (B) or rows (A)
        for key, v in state.items():
            # its moments, and ElementwiseAdamW's step counts (full-size, or one per column/row)
            if torch.is_tensor(v) and v.dim() == counterpart.dim() and v.shape[axis] == counterpart.shape[axis]:
                v.index_fill_(axis, vec.to(v.device), 0)
        return n

    def on_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from ..core.inject import adapted_layers

        layers = dict(adapted_layers(model))
        for path, st in self.layers.items():
            st.frozen_A.sub_(1).clamp_(min=0)
            st.frozen_B.sub_(1).clamp_(min=0)
            layer = layers[path]
            a = layer.adapters[self.adapter]
            r = a.A.shape[0]
            self.switches += self.switch(layer, a, st, optimizer, "A", self._count(r))
            self.switches += self.switch(layer, a, st, optimizer, "B", self._count(r))

    # -- resuming ---------------------------------------------------------------------------------
    state_keys = ("t", "rng", "layers", "switches")

    def extra_state(self) -> dict[str, Any]:
        return {
            "rng": generator_state(self.g),
            "layers": {p: st.state() for p, st in self.layers.items()},
            "switches": self.switches,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.g.set_state(state["rng"])
        self.switches = int(state["switches"])
        self._pending = dict(state["layers"])
        for p in list(self._pending):
            if p in self.layers:
                self.layers[p].load(self._pending.pop(p))
