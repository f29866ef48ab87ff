"""The adapter protocol: what one method declares about its parametrization of a weight update.

A method is one subclass of :class:`Adapter` in its own file under ``lowrank/adapters``,
registered with :func:`lowrank.register_method`.  It declares

* the parameters it creates from the base layer (``__init__``; options are keyword-only
  arguments with defaults, so the signature *is* the config),
* the activation-space forward ``forward(x, base_out, base)`` — never the full update matrix,
* ``delta_weight()`` (or ``merge_into``/``unmerge_from`` when the merged weight is not
  ``W + delta``) for merging,
* its paper, formula and trainable-parameter formula (``trainable_count``).

Shared code (injection, merging, saving, the conformance tests) only ever talks to this
protocol.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, MergeError, ShapeError
from .layers import LINEAR_TYPES, BaseLayer


class Adapter(nn.Module):
    """One named adapter on one base layer."""

    # ---- declared by each method ---------------------------------------------------------
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    params_formula: ClassVar[str] = ""
    layer_types: ClassVar[tuple[type[nn.Module], ...]] = LINEAR_TYPES
    #: merging into W is defined (False for input-routed mixtures and representation edits)
    mergeable: ClassVar[bool] = True
    #: with its default initialisation the adapted layer computes exactly the base layer
    identity_at_init: ClassVar[bool] = True
    #: the adapter computes the whole layer output (full-weight parameterisations); the
    #: wrapper then skips the base layer and passes ``base_out=None``
    replaces_base: ClassVar[bool] = False
    #: the update depends on W itself (DoRA's norm, Bone's weight guide): it cannot be stacked on a
    #: full-weight parameterisation, whose W is not the layer's weight
    reads_base_weight: ClassVar[bool] = False
    #: :meth:`forward` receives the layer input itself and applies ``self.dropout`` where its paper
    #: does (HydraLoRA's router reads the clean input; DenseLoRA drops out after each GELU too);
    #: otherwise the wrapper passes the input after the adapter's dropout
    applies_own_dropout: ClassVar[bool] = False
    #: the adapter can compute base layer + update in one fused op (:meth:`forward_fused`);
    #: the wrapper uses it when this is the only live adapter on a plain ``layer(x)`` call
    fuses_base: ClassVar[bool] = False
    #: adapters of classes with the same non-None key can compute several layers that read one
    #: input (q/k/v, gate/up) together in :meth:`forward_fused_shared`; needs ``fuses_base``
    fuse_group: ClassVar[object] = None
    #: options the conformance tests use on tiny layers (e.g. a block size dividing 16)
    test_options: ClassVar[dict[str, Any]] = {}
    #: the ranks the conformance tests use (tiny layers are 16..64 wide)
    test_rank: ClassVar[int] = 4

    def __init__(self, base: BaseLayer, *, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(self.default_alpha(self.rank))
        self.in_features, self.out_features = base.in_features, base.out_features
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # ---- the parametrization -------------------------------------------------------------
    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None, base: BaseLayer) -> torch.Tensor:
        """Layer output with this adapter applied.

        x: (..., in) after the adapter's dropout (the input itself with ``applies_own_dropout``);
        base_out: (..., out) = W x + b as computed by
        the base layer (None when ``replaces_base``); base: the frozen layer, for methods whose
        output depends on W itself (DoRA's norm, Bone's weight guide).
        """
        raise NotImplementedError

    def forward_fused(self, x: torch.Tensor, xa: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        """W x + b plus this adapter's update, computed together (only if ``fuses_base``).

        x: the layer input; xa: the same after the adapter's dropout (may be ``x`` itself).
        """
        raise NotImplementedError

    @classmethod
    def forward_fused_shared(cls, x: torch.Tensor, members: list[tuple["Adapter", BaseLayer]]) -> list[torch.Tensor]:
        """The outputs of several layers that read the same input ``x``, computed together.

        members: (adapter, base layer) of each layer, all with this ``fuse_group`` and no dropout.
        Same results as ``forward_fused`` on each; only if ``fuse_group`` is set.
        """
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The update ΔW as an (out, in) matrix, for merging and analysis (never used in forward)."""
        raise NotImplementedError

    def merge_into(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight W' for base weight W (out, in). Default W + ΔW."""
        return weight + self.delta_weight().to(weight.dtype)

    def unmerge_from(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merge_into`."""
        return merged - self.delta_weight().to(merged.dtype)

    def merge_bias_into(self, bias: torch.Tensor) -> torch.Tensor:
        """The merged bias b' for base bias b (out,).  Default b: most updates leave the bias alone;
        one that transforms the layer's output (Hydra's sequential branch reads W x + b) moves it."""
        return bias

    def unmerge_bias_from(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`merge_bias_into`."""
        return merged

    def finalize(self, weight: torch.Tensor) -> None:
        """Called once after the (possibly replaced) init with the effective base weight."""

    def aux_loss(self) -> torch.Tensor | None:
        """An auxiliary training loss from the last forward (input-routed mixtures: load balancing).

        None (the default) when the method has none; :func:`lowrank.aux_loss` sums them over a
        model so the training loop can add it to the task loss.
        """
        return None

    # ---- declared sizes ------------------------------------------------------------------
    @classmethod
    def default_alpha(cls, rank: int) -> float:
        return float(rank)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options) -> int:
        """Trainable parameters the method adds to one (out x in) layer, by its paper's formula."""
        raise NotImplementedError

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options) -> None:
        """Raise a :class:`lowrank.LowRankError` naming ``path`` if the layer cannot take this adapter.

        Runs before any module is created, so a failure leaves the model untouched.
        """

    @classmethod
    def check_rank_fits(cls, base: BaseLayer, rank: int, path: str) -> None:
        """ShapeError naming ``path`` if ``rank`` exceeds min(out, in) of the layer."""
        if rank > min(base.in_features, base.out_features):
            raise ShapeError(
                f"{cls.name} rank {rank} exceeds min(out, in) of {path!r} ({base.out_features}x{base.in_features})"
            )

    @classmethod
    def check_count_option(cls, options: dict[str, Any], key: str, default: int, path: str) -> int:
        """The option ``key`` as a non-negative int (a seed, a step count); ConfigError naming it otherwise."""
        value = options.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(
                f"{cls.name} option {key} must be a non-negative integer, got {value!r} (module {path!r})"
            )
        return value

    @classmethod
    def options(cls) -> dict[str, inspect.Parameter]:
        """The method's keyword options (its typed config), read from ``__init__``."""
        sig = inspect.signature(cls.__init__)
        return {
            k: p
            for k, p in sig.parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("rank", "alpha", "dropout", "shared")
        }

    # ---- state shared across layers ----------------------------------------------------------
    @classmethod
    def shared_state(cls, layers: dict[str, BaseLayer], rank: int, **options) -> dict[str, Any] | None:
        """Model-level state built once per ``adapt``/``load_adapter`` call, from all target layers.

        Methods whose layers share tensors (VeRA's random pair sized for the largest target,
        DenseLoRA's encoder/decoder) return ``{path: obj}``; each layer's adapter is then
        built with ``shared=obj``.  Default None: adapters are built without ``shared``.
        """
        return None

    @classmethod
    def load_shared_state(cls, adapters: list["Adapter"], tensors: dict[str, torch.Tensor], where: str) -> None:
        """Check and pop model-level keys of a saved file (outside every layer's prefix).

        Called by ``load_adapter`` before anything is attached; raise
        :class:`lowrank.AdapterLoadError` on a mismatch (e.g. saved random bases that differ
        from the ones regenerated from the seed).  Default: nothing to read.
        """

    # ---- saving ------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors saved in the adapter file, keyed relative to the layer (PEFT-style names).

        Default: all persistent parameters and buffers.  Methods whose frozen tensors are
        regenerated from a seed override this to leave them out.
        """
        return {k: v for k, v in self.state_dict().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state, strict=True)

    @classmethod
    def peft_config(cls, rank: int, alpha: float, options: dict[str, Any]) -> dict[str, Any] | None:
        """PEFT ``adapter_config.json`` fields for methods PEFT also ships, else None."""
        return None

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        """If this method is the one a PEFT config describes, its ``adapt`` options, else None."""
        return None

    # ---- helpers -------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        for b in self.buffers():
            return b.dtype
        return torch.get_default_dtype()

    def check_mergeable(self) -> None:
        if not self.mergeable:
            raise MergeError(
                f"method {self.name!r} cannot be merged into the base weight: its update depends on the input"
            )


class FactorAdapter(Adapter):
    """An adapter whose update is ``scaling * B @ A`` with A (r, in) and B (out, r) trainable factors.

    Initialisation strategies (``init=``) work on any method that exposes these two factors,
    whatever else the method adds around them.
    """

    @property
    def A(self) -> torch.Tensor:  # (r, in)
        raise NotImplementedError

    @property
    def B(self) -> torch.Tensor:  # (out, r)
        raise NotImplementedError

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
