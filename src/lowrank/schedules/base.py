"""What every training schedule shares: the callback hook, lazy attachment, and resumable state.

A schedule is a plain object driven by the training loop (``lowrank train`` or your own):

    sched = ReLoRA(every=500)
    sched.attach(model, optimizer)          # before the first optimizer step (and after load_state_dict);
                                            # schedules with sets_up_next_step refuse to step without it
    for batch in data:
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        sched.step(model, optimizer, step)  # after every optimizer step

It counts the optimizer steps it has seen itself (``self.t``, saved in ``state_dict``), so it
does not depend on whether the loop numbers its steps from 0 or 1.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from .._checks import is_finite_real
from ..errors import CheckpointError, ConfigError


def check_int(owner: str, key: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    """ConfigError naming ``key`` unless ``value`` is an int >= ``minimum`` (or None when optional)."""
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{owner} option {key!r} must be an integer >= {minimum}, got {value!r}")


def check_real(owner: str, key: str, value: Any, low: float, high: float = math.inf, *, open_low: bool = False) -> float:
    """``value`` as a float in [low, high] ((low, high] with ``open_low``); ConfigError naming ``key``."""
    if not is_finite_real(value) or value > high or value < low or (open_low and value == low):
        span = f"{'(' if open_low else '['}{low}, {high}]" if math.isfinite(high) else f"{'>' if open_low else '>='} {low}"
        raise ConfigError(f"{owner} option {key!r} must be a finite number {'in ' if math.isfinite(high) else ''}{span}, got {value!r}")
    return float(value)


class Schedule:
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: attach prepares the coming optimizer step (so it must run before it; step() then refuses a
    #: schedule that was never attached instead of attaching it one step late)
    sets_up_next_step: ClassVar[bool] = False

    def __init__(self) -> None:
        self.t = 0  # optimizer steps seen
        self._attached = False

    # -- the hook -------------------------------------------------------------------------------
    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Validate the model/optimizer and apply the state for step ``self.t`` (idempotent)."""
        self._attached = True

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int | None = None) -> None:
        if not self._attached:
            if self.sets_up_next_step:
                # its attach prepares the optimizer step about to run (a warm-up LR, first draws or
                # samples): attached only now, after that step, the schedule would run one step late
                from ..errors import ConfigError

                raise ConfigError(f"schedule {self.name!r}: call attach(model, optimizer) before the first "
                                  "optimizer step (and again after load_state_dict)")
            self.attach(model, optimizer)
        self.t += 1
        self.on_step(model, optimizer)

    def on_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        raise NotImplementedError

    # -- resuming -------------------------------------------------------------------------------
    #: keys ``state_dict`` always holds (checked on load)
    state_keys: ClassVar[tuple[str, ...]] = ("t",)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "t": self.t, **self.extra_state()}

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            raise CheckpointError(f"schedule {self.name!r}: the checkpoint holds no state for it (cannot resume)")
        if state.get("name", self.name) != self.name:
            raise CheckpointError(f"schedule {self.name!r}: the checkpoint's state is for schedule {state.get('name')!r}")
        missing = [k for k in self.state_keys if k not in state]
        if missing:
            raise CheckpointError(f"schedule {self.name!r}: checkpoint state lacks {', '.join(missing)}")
        before = dict(self.__dict__)  # a state that fails part-way leaves the schedule as it was
        try:
            self.t = int(state["t"])
            self.load_extra_state(state)
        except CheckpointError:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise CheckpointError(f"schedule {self.name!r}: the checkpoint's state is corrupt: {type(e).__name__}: {e}") from None
        self._attached = False  # re-apply at the next attach

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def schedules_state_dict(callbacks: Iterable[Any]) -> dict[str, Any]:
    """``{name: state}`` for every callback that has state (for a training checkpoint)."""
    out: dict[str, Any] = {}
    for cb in callbacks:
        if hasattr(cb, "state_dict"):
            key = getattr(cb, "name", type(cb).__name__)
            out[key] = cb.state_dict()
    return out


def load_schedules_state_dict(callbacks: Iterable[Any], state: dict[str, Any] | None) -> None:
    """Restore every callback from a checkpoint; a callback whose state is missing is an error."""
    cbs = [cb for cb in callbacks if hasattr(cb, "load_state_dict")]
    state = state or {}
    missing = [getattr(cb, "name", type(cb).__name__) for cb in cbs if getattr(cb, "name", type(cb).__name__) not in state]
    if missing:
        raise CheckpointError(
            f"the checkpoint has no state for schedule(s) {', '.join(map(repr, missing))}; "
            f"it has {sorted(state) or 'none'} (was it written by a run with the same method?)"
        )
    for cb in cbs:
        cb.load_state_dict(state[getattr(cb, "name", type(cb).__name__)])


def generator_state(g: torch.Generator) -> torch.Tensor:
    return g.get_state().clone()


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the longest ``nn.ModuleList`` of same-type modules."""
    best: tuple[str, nn.ModuleList] | None = None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (path, mod)
    if best is None:
        from ..errors import TargetError

        raise TargetError("found no stack of layers (an nn.ModuleList of identical blocks) in this model")
    return best


def optimizer_params(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in optimizer.param_groups for p in g["params"]}
