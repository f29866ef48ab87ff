"""The wrapper that carries adapters on a base layer, and a uniform view of base layers.

`AdaptedLayer` replaces a target module in the model.  It owns the frozen base layer and a
`ModuleDict` of named adapters, and holds the shared plumbing every method uses: dropout,
dtype casting, which adapters are active, merged or disabled.  It knows nothing about any
particular method: it calls the `Adapter` protocol only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import shared_input

if TYPE_CHECKING:  # pragma: no cover
    from .adapter import Adapter

try:  # GPT-2 style layers store their weight as (in, out)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency, but keep core importable
    class Conv1D(nn.Module):  # type: ignore[no-redef]
        pass

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


class BaseLayer:
    """A read/write view of a frozen base layer's weight in (out_features, in_features) layout.

    Hides the storage difference between `nn.Linear` (out, in) and transformers' `Conv1D`
    (in, out) so that every method reasons about W as in the papers: y = W x + b.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.transposed = isinstance(module, Conv1D)
        w = getattr(module, "weight", None)
        #: False for a module without a weight of its own (a transformer block): methods that edit
        #: its output hidden states (LoReFT) adapt it; its width is that of its last linear sublayer
        self.has_weight = isinstance(w, torch.Tensor)
        if not self.has_weight:
            self.in_features = self.out_features = _output_width(module)
            return
        if self.transposed:
            self.in_features, self.out_features = w.shape
        else:
            self.out_features, self.in_features = w.shape[0], w.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """W as (out, in); a view of the stored parameter (no copy).  None for a weightless block."""
        if not self.has_weight:
            return None  # type: ignore[return-value]
        w = self.module.weight
        return w.T if self.transposed else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def device(self) -> torch.device:
        return self.module.weight.device if self.has_weight else next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype if self.has_weight else next(self.module.parameters()).dtype

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Overwrite W (given as (out, in)) in place, keeping the stored dtype and layout."""
        self.weight.copy_(w.to(self.dtype))

    @torch.no_grad()
    def set_bias(self, b: torch.Tensor) -> None:
        """Overwrite the bias in place, keeping its dtype."""
        self.bias.copy_(b.to(self.bias.dtype))

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """W x without the bias."""
        return nn.functional.linear(x, self.weight)


def is_released(t: torch.Tensor) -> bool:
    """A weight freed by ``release_base_weights``: a zero-stride view of one scalar, no storage of its own."""
    return t.dim() > 0 and all(st == 0 for st in t.stride())


def _shareable(adapter: "Adapter") -> bool:
    return adapter.fuse_group is not None and isinstance(adapter.dropout, nn.Identity)


def _output_width(module: nn.Module) -> int:
    """Hidden width of a weightless block: the output width of its last Linear/Conv1D sublayer."""
    width = None

    def walk(m: nn.Module) -> None:
        nonlocal width
        if isinstance(m, AdaptedLayer):  # an adapted sublayer: its base layer, not the adapters' own Linears
            m = m.base_layer
        if isinstance(m, LINEAR_TYPES):
            width = BaseLayer(m).out_features
        for child in m.children():
            walk(child)

    walk(module)
    if width is None:
        from ..errors import UnsupportedLayerError

        raise UnsupportedLayerError(
            f"a {type(module).__name__} has neither a weight nor a linear sublayer to read its width from"
        )
    return width


class AdaptedLayer(nn.Module):
    """A base layer plus named adapters: y = base(x), then each active adapter transforms y."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.base = BaseLayer(base_layer)  # a plain view object, not a submodule
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        # Let code that inspects the wrapped layer (`.weight`, `.in_features`, ...) keep working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if "base_layer" not in modules:
                raise
            return getattr(modules["base_layer"], name)

    def _apply(self, fn, recurse=True):
        # nn.Module's hook for .to()/.float()/.cuda()...: a released base weight (a zero-stride view
        # of one scalar) would come out as a full dense tensor; convert only its scalar instead
        bufs = self.base_layer._buffers
        w = bufs.get("weight")
        if not recurse or w is None or not is_released(w):
            return super()._apply(fn, recurse)
        del bufs["weight"]
        try:
            out = super()._apply(fn, recurse)
            new = fn(w.as_strided((), ())).expand(w.shape)
        except BaseException:
            bufs["weight"] = w
            raise
        bufs["weight"] = new
        return out

    # -- forward ---------------------------------------------------------------------------
    def fused_adapter(self, x: torch.Tensor) -> "Adapter | None":
        """The single live adapter, if it can compute this whole layer on ``x`` in one fused op."""
        live = [] if self.disabled else [n for n in self.active if n not in self.merged]
        if len(live) != 1:
            return None
        adapter = self.adapters[live[0]]
        if not adapter.fuses_base or type(self.base_layer) not in LINEAR_TYPES:
            return None  # a subclassed base layer may compute something else than W x + b
        # the fused path calls forward_fused directly, so an adapter or base layer with forward
        # hooks (e.g. ALLoRA's gradient rescaling) must go through its ordinary __call__
        for m in (adapter, self.base_layer):
            if m._forward_hooks or m._forward_pre_hooks:
                return None
        if not x.dtype == adapter.compute_dtype == self.base.dtype:
            return None
        return adapter

    @staticmethod
    def shareable_adapter(layer: "AdaptedLayer", x: torch.Tensor) -> "Adapter | None":
        """The layer's fused adapter if it can also run together with others on the input ``x``."""
        adapter = layer.fused_adapter(x)
        return adapter if adapter is not None and _shareable(adapter) else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not args and not kwargs:
            adapter = self.fused_adapter(x)
            if adapter is not None:
                if _shareable(adapter):
                    return shared_input.call(self, x, adapter, AdaptedLayer.shareable_adapter)
                return adapter.forward_fused(x, adapter.dropout(x), self.base)
        live = [] if self.disabled else [n for n in self.active if n not in self.merged]
        replacing = [n for n in live if self.adapters[n].replaces_base]
        if len(replacing) > 1:
            from ..errors import ConfigError

            raise ConfigError(f"adapters {replacing} each replace the base layer; activate one of them")
        if replacing:  # a full-weight parameterisation computes the whole layer: it is the base here
            base_out = self._run_adapter(replacing[0], x, None)
            live.remove(replacing[0])
        else:
            base_out = self.base_layer(x, *args, **kwargs)
        out = base_out
        for name in live:
            if out is base_out or not isinstance(base_out, torch.Tensor):
                # the first update (or representation edits of a block's non-tensor output, in order)
                out = self._run_adapter(name, x, out)
            else:  # every update is taken against the base output and the updates add up
                out = out + (self._run_adapter(name, x, base_out) - base_out)
        return out

    def _run_adapter(self, name: str, x: torch.Tensor, base_out):
        adapter: Adapter = self.adapters[name]
        xa = x if adapter.applies_own_dropout else adapter.dropout(x)
        if xa.dtype != adapter.compute_dtype:
            xa = xa.to(adapter.compute_dtype)
        return adapter(xa, base_out, self.base)

    # -- merging ---------------------------------------------------------------------------
    def check_mergeable(self, names: list[str]) -> None:
        """MergeError if ``names`` cannot be folded into this layer's weight."""
        w = self.base.weight
        if names and w is not None and is_released(w):
            from ..errors import MergeError

            raise MergeError("this layer's base weight was released (release_base_weights: no storage of its "
                             "own), so there is nothing to merge into; save with plain_state_dict instead")
        for name in names:
            self.adapters[name].check_mergeable()

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        todo = [n for n in (names if names is not None else self.active) if n not in self.merged]
        if not todo:
            return
        self.check_mergeable(todo)
        base = self.base
        if not self.merged and len(todo) == 1:
            adapter = self.adapters[todo[0]]
            w = adapter.merge_into(base.weight.to(adapter.compute_dtype))
            b = None if base.bias is None else adapter.merge_bias_into(base.bias.to(adapter.compute_dtype))
            base.set_weight(w)
            if b is not None:
                base.set_bias(b)
            self.merged.append(todo[0])
            return
        # Several adapters: each update is taken against the same base weight W0 (as in forward)
        # and they add up.  W0 is kept to restore exactly: an update may depend on W0 itself.
        names = self.merged + todo
        self.unmerge()
        w0 = base.weight.detach().clone()  # (out, in)
        b0 = None if base.bias is None else base.bias.detach().clone()  # (out,)
        merged = w0.to(torch.promote_types(w0.dtype, torch.float32), copy=True)  # summed in at least fp32
        merged_b = None if b0 is None else b0.to(merged.dtype, copy=True)
        for name in names:
            adapter = self.adapters[name]
            w = w0.to(adapter.compute_dtype)
            w_i = adapter.merge_into(w)
            adapter.unmerge_from(w_i)  # releases what merge_into kept for its own unmerge
            merged += (w_i - w).to(merged.dtype)
            if b0 is not None:
                b = b0.to(adapter.compute_dtype)
                merged_b += (adapter.merge_bias_into(b) - b).to(merged.dtype)
        base.set_weight(merged)
        if b0 is not None:
            base.set_bias(merged_b)
        self._premerge_weight = (w0, b0)
        self.merged = names

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.base
        saved = self.__dict__.pop("_premerge_weight", None)
        if saved is not None:
            w0, b0 = saved
            base.set_weight(w0)
            if b0 is not None:
                base.set_bias(b0)
            self.merged = []
        while self.merged:
            adapter = self.adapters[self.merged[-1]]
            w = adapter.unmerge_from(base.weight.to(adapter.compute_dtype))
            b = None if base.bias is None else adapter.unmerge_bias_from(base.bias.to(adapter.compute_dtype))
            base.set_weight(w)
            if b is not None:
                base.set_bias(b)
            self.merged.pop()

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}, disabled={self.disabled}"
