"""Pure low-rank factorisation trained from scratch: the weak baseline of the GaLore tables.

    h = s · B (A x) + b,     A ∈ R^{r×in}, B ∈ R^{out×r},  s = alpha / r  (1 by default)

The layer's weight *is* B A: nothing of the dense base weight is used (``replaces_base``), so
this is a full-weight parameterisation for pretraining a model built from a config, not an
adapter for fine-tuning.  Trainable parameters per layer: r · (in + out).
Init (:func:`init_factors_like`): Gaussian A and B with s B A at the scale of the dense init it
replaces.  The public baselines differ (ReLoRA's ``lora_only``: A Kaiming-uniform, B = 0, so the
layer starts at zero; GaLore's repository ships no low-rank baseline code).

This file also holds what every full-weight parameterisation shares (:class:`FullWeight`) and
the pretraining helpers:

    model = LlamaForCausalLM(config)
    lowrank.adapt(model, "sltrain", rank=64, sparsity=0.03)   # adapter protocol: only factors train
    parameterise(model, "sltrain", rank=64, sparsity=0.03)    # pretraining: every other weight
                                                              # (embeddings, norms, head) trains too
                                                              # and the dead dense weights are freed
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter, FactorAdapter
from ..core.inject import adapted_layers
from ..core.layers import BaseLayer, is_released
from ..errors import ConfigError, ShapeError
from ..registry import register_method


class FullWeight(Adapter):
    """Shared behaviour of full-weight parameterisations (W is re-parameterised, not updated).

    * ``replaces_base``: the wrapper skips the dense base layer; ``forward`` computes the whole
      layer, adding the base layer's bias (frozen under ``adapt``, trained under
      :func:`parameterise`).
    * merging writes the parameterised weight into W (``merge_into`` returns it, ignoring the
      old W, which is kept aside so that ``unmerge`` restores it exactly).
    * ``delta_weight`` is the layer's whole weight: there is no base weight to add it to.
    """

    replaces_base = True
    identity_at_init = False  # a fresh random init, not the base function

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this parameterisation represents (for merging and analysis)."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        return self.dense_weight()

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        self._replaced_weight = weight.detach().clone()
        return self.dense_weight().to(weight.dtype)

    def unmerge_from(self, merged: torch.Tensor) -> torch.Tensor:
        old = getattr(self, "_replaced_weight", None)
        assert old is not None, "unmerge without a prior merge"
        self._replaced_weight = None
        return old.to(merged.dtype)

    @staticmethod
    def add_bias(y: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        bias = base.bias
        return y if bias is None else y + bias.to(y.dtype)

    @staticmethod
    def check_rank(rank: int, base: BaseLayer, path: str) -> None:
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(
                f"rank {rank} exceeds the dimensions of {path!r} ({base.out_features}x{base.in_features})"
            )


def base_init_std(base: BaseLayer) -> float:
    """Standard deviation of the base layer's fresh initialisation (what the model's config chose)."""
    w = base.weight
    if w.device.type == "meta" or w.numel() < 2:
        return 1.0 / math.sqrt(3 * base.in_features)
    std = float(w.detach().float().std())
    return std if std > 0 else 1.0 / math.sqrt(3 * base.in_features)


@torch.no_grad()
def init_factors_like(A: torch.Tensor, B: torch.Tensor, std: float, scaling: float = 1.0) -> None:
    """Gaussian A, B with Var((s B A)_ij) = std² — the same scale as the dense init they replace.

    A ~ N(0, 1/in), B ~ N(0, std² · in / (r s²)):  Var(s Σ_k B_ik A_kj) = s² r · (std² in / r s²) / in.
    """
    r, n_in = A.shape
    A.normal_(0.0, 1.0 / math.sqrt(n_in))
    B.normal_(0.0, std * math.sqrt(n_in / r) / scaling)


class FactorizedWeight(FullWeight, FactorAdapter):
    """A full-weight parameterisation with a low-rank part s B A: the factors, and their product on x.

    Subclasses initialise ``lora_A`` (r, in) and ``lora_B`` (out, r) and add their own terms.
    """

    def __init__(self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank))  # (out, r)

    @property
    def A(self) -> torch.Tensor:
        return self.lora_A

    @property
    def B(self) -> torch.Tensor:
        return self.lora_B

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s B A x: (..., in) -> (..., out)."""
        y = F.linear(F.linear(x, self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return y * self.scaling if self.scaling != 1.0 else y


@register_method
class LowRank(FactorizedWeight):
    name = "lowrank"
    paper = (
        "Low-rank factorised pretraining baseline, as in GaLore (Zhao et al., 2024), arXiv:2403.03507, Tab. 2; "
        "benchmarked in Glentis et al., 2025, arXiv:2505.22922"
    )
    formula = "h = s B A x + b   (W := B A, trained from scratch)"
    params_formula = "r * (in + out)"

    def __init__(self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        init_factors_like(self.lora_A, self.lora_B, base_init_std(base), self.scaling)

    def forward(self, x: torch.Tensor, base_out: None, base: BaseLayer) -> torch.Tensor:
        return self.add_bias(self.low_rank(x), base)

    def dense_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return rank * (in_features + out_features)

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        cls.check_rank(rank, base, path)


# ---- pretraining helpers ----------------------------------------------------------------------
def release_base_weights(model: nn.Module, name: str = "default") -> int:
    """Free the dense weights that full-weight parameterisations no longer read; returns bytes freed.

    Each such base weight becomes a non-persistent buffer holding a zero-stride view of one
    scalar (same shape, no storage): shapes and module introspection still work, and it leaves
    the state dict, so checkpoints neither save nor expect it.  After this, ``merge``/``unmerge``/
    ``disabled`` are no longer meaningful for those layers: save with :func:`plain_state_dict`.
    ``model.to(dtype or device)`` keeps them released (only their scalar is converted).
    """
    freed = 0
    for _, layer in adapted_layers(model):
        adapter = layer.adapters[name] if name in layer.adapters else None
        if adapter is None or not adapter.replaces_base or name not in layer.active:
            continue
        mod = layer.base_layer
        w = mod.weight
        if is_released(w):
            continue
        freed += w.numel() * w.element_size()
        empty = torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)
        if "weight" in mod._parameters:
            del mod._parameters["weight"]
        mod.register_buffer("weight", empty, persistent=False)
    return freed


def parameterise(
    model: nn.Module,
    method: str = "lowrank",
    *,
    rank: int,
    targets: str | Sequence[str] = "all-linear",
    exclude: str | Sequence[str] | None = None,
    release_base: bool = True,
    name: str = "default",
    **options: Any,
) -> nn.Module:
    """Re-parameterise a freshly built model for pretraining (the `build` helper).

    Calls :func:`lowrank.adapt` with a full-weight method (``lowrank``, ``sltrain``, ``lost``,
    ``cola``), then makes every parameter outside the re-parameterised layers trainable
    (embeddings, norms, output head, biases) and, with ``release_base``, frees the dense weights
    the new layers replace.
    """
    from ..core.api import adapt
    from ..registry import get_method

    cls = get_method(method)
    if not cls.replaces_base:
        raise ConfigError(
            f"parameterise() needs a full-weight parameterisation (replaces_base); method {method!r} adds an "
            "update to a frozen base weight: use lowrank.adapt for it"
        )
    adapt(model, method, targets=targets, exclude=exclude, rank=rank, name=name, **options)
    dead: set[int] = set()
    for _, layer in adapted_layers(model):
        if name in layer.adapters:
            dead.add(id(layer.base_layer.weight))
    for p in model.parameters():
        if id(p) not in dead:
            p.requires_grad_(True)
    if release_base:
        release_base_weights(model, name)
    return model


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain (un-adapted) architecture, with every active parameterisation
    written in as a dense weight; the model itself is not modified."""
    layers = dict(adapted_layers(model))
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner = next((p for p in layers if key.startswith(p + ".")), None)
        if owner is None:
            state[key] = value.detach().clone().contiguous()
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("base_layer.") and rest != "base_layer.weight":
            state[f"{owner}.{rest[len('base_layer.'):]}"] = value.detach().clone().contiguous()
    for owner, layer in layers.items():  # the weights, dense: W folded with the live adapters
        live = [layer.adapters[n] for n in layer.active if n not in layer.merged]
        full = [a for a in live if isinstance(a, FullWeight)]
        w0 = layer.base.weight.detach().float()
        # a full-weight parameterisation *is* the weight; every other update is taken against W0 and
        # added, as the forward computes them
        w = full[0].dense_weight().float() if full else w0.clone()
        for a in live:
            if not isinstance(a, FullWeight):
                w += a.merge_into(w0.to(a.compute_dtype)).float() - w0
        w = w.to(layer.base.dtype)
        state[f"{owner}.weight"] = (w.T if layer.base.transposed else w).contiguous()
        if layer.base.bias is not None:  # an update that moves the bias (Hydra) moves it here too
            b0 = layer.base.bias.detach().float()
            b = b0.clone()
            for a in live:
                if not isinstance(a, FullWeight):
                    b += a.merge_bias_into(b0.to(a.compute_dtype)).float() - b0
            state[f"{owner}.bias"] = b.to(layer.base.bias.dtype).contiguous()
    return state
