"""Layers that read the same input, run together (q/k/v on one hidden state, gate/up on another).

A transformer block calls ``q_proj(h)``, ``k_proj(h)`` and ``v_proj(h)`` one after the other on
the same tensor.  When every one of them carries a single live adapter of one ``fuse_group``,
their adapter products can share one pass over ``h`` (see ``Adapter.forward_fused_shared``).
Nothing at adapt time says which layers share an input, so it is learnt from the call order:
a *run* is the layers called in a row on one tensor (same object, unchanged version); when a
layer that began a run is next called on a fresh tensor, its whole run is computed at once and
the other members' outputs wait for their own calls.  A run that breaks (a member called on
another tensor, or not at all) only wastes that computation: the plan is re-learnt from what
was actually called, and every output is still the layer's own.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter
    from .layers import AdaptedLayer


class _Runs(threading.local):
    def __init__(self) -> None:
        self.x: weakref.ref | None = None  # the input of the current run
        self.version = -1
        self.run: list[weakref.ref] = []  # layers called on it, in order
        self.pending: dict[int, torch.Tensor] = {}  # id(layer) -> output computed ahead of its call
        #: layer -> the run it began last time (weak both ways: models are never kept alive here)
        self.plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def close(self) -> None:
        """End the current run and remember it as the plan of the layer that began it."""
        layers = [r() for r in self.run]
        if layers and layers[0] is not None:
            ok = len(layers) > 1 and None not in layers and len(set(map(id, layers))) == len(layers)
            if ok:
                self.plans[layers[0]] = tuple(self.run)
            else:
                self.plans.pop(layers[0], None)
        self.x, self.version, self.run, self.pending = None, -1, [], {}


_RUNS = _Runs()


def call(layer: "AdaptedLayer", x: torch.Tensor, adapter: "Adapter",
         fusable: Callable[["AdaptedLayer", torch.Tensor], "Adapter | None"]) -> torch.Tensor:
    """``layer(x)`` through its adapter's fused kernel, sharing the pass over ``x`` with the
    other layers of the run it begins (``fusable(layer, x)`` is the layer's single fusable
    adapter for this input, or None)."""
    state = _RUNS
    if x.is_inference() or torch.compiler.is_compiling() or _saved_tensors_hooked():
        # no version counter / traced code / activation checkpointing (its recomputation must
        # save exactly what the forward saved, so every layer is computed alone, both times)
        return adapter.forward_fused(x, x, layer.base)
    if (state.x is not None and state.x() is x and x._version == state.version
            and not any(r() is layer for r in state.run)):  # a layer called again begins a new run
        state.run.append(weakref.ref(layer))
        out = state.pending.pop(id(layer), None)
        return out if out is not None else adapter.forward_fused(x, x, layer.base)
    state.close()
    state.x, state.version, state.run = weakref.ref(x), x._version, [weakref.ref(layer)]
    plan = state.plans.get(layer)
    if plan is not None:
        members = [r() for r in plan]
        adapters = [fusable(m, x) if m is not None else None for m in members]
        group = type(adapter).fuse_group
        if members[0] is layer and all(a is not None and type(a).fuse_group == group for a in adapters):
            outs = type(adapter).forward_fused_shared(x, [(a, m.base) for a, m in zip(adapters, members)])
            state.pending = {id(m): o for m, o in zip(members[1:], outs[1:])}
            return outs[0]
    return adapter.forward_fused(x, x, layer.base)


def _saved_tensors_hooked() -> bool:
    """Saved-tensor hooks are active (non-reentrant activation checkpointing, offloading)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


@torch.no_grad()
def learn(model: torch.nn.Module, *args, **kwargs) -> None:
    """Run ``model(*args, **kwargs)`` once (eval mode, no gradients) only to learn which layers
    read the same input, so that they run together from the first training step on.

    Outputs never depend on it; gradients differ in float rounding between a layer computed
    alone and in a run, so a trainer that primes every run the same way (fresh or resumed)
    keeps resumed loss sequences bit-identical.
    """
    from .layers import AdaptedLayer

    if not any(isinstance(m, AdaptedLayer) and any(a.fuse_group is not None for a in m.adapters.values())
               for m in model.modules()):
        return  # nothing that could run together: skip the extra forward
    was = model.training
    model.eval()
    try:
        model(*args, **kwargs)
    finally:
        model.train(was)
        _RUNS.close()
