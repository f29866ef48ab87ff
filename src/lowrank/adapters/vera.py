"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort, Asano, ICLR 2024).

    h = W x + Λ_b B Λ_d A x,     Λ_b = diag(b) (out), Λ_d = diag(d) (r)

A (r, in_max) and B (out_max, r) are ONE pair of frozen random matrices for the whole model,
drawn Kaiming-uniform from ``seed`` at the size of the largest target layer; each layer uses
the slice A[:, :in], B[:out, :] (as in the paper's and PEFT's implementation), so every layer
of a given shape uses literally the same tensors.  Only b (zeros) and d (``d_initial``)
train: out + r per layer, independent of the hidden size's square.

The pair lives in a :class:`FrozenStore` shared by all layers, never saved: it is regenerated
from ``seed`` on load.  Files use PEFT's layout (``vera_lambda_b``/``vera_lambda_d``,
``save_projection: false``) so they load in PEFT and PEFT's VeRA adapters load here; a PEFT
file that carries its projections (``base_model.vera_A``/``vera_B``) is checked against the
regenerated pair and refused on mismatch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import AdapterLoadError
from ..registry import register_method
from ._shared import FrozenStore, kaiming_uniform, max_shape

PEFT_KEYS = ("base_model.vera_A", "base_model.vera_B")


def vera_projections(rank: int, out_max: int, in_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared (A (r, in_max), B (out_max, r)), same draws as PEFT's VeRA for this seed."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    A = kaiming_uniform((rank, in_max), g)
    B = kaiming_uniform((out_max, rank), g)
    return A, B


@register_method
class VeRA(Adapter):
    name = "vera"
    paper = "VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., ICLR 2024), arXiv:2310.11454"
    formula = "h = W x + diag(b) B diag(d) A x   (A, B frozen random, shared by all layers)"
    params_formula = "out + r"
    test_rank = 4

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        seed: int = 0,
        d_initial: float = 0.1,
        shared: FrozenStore | None = None,
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        self.seed = int(seed)
        if shared is None:  # built alone (not through adapt): a private pair of this layer's size
            A, B = vera_projections(rank, self.out_features, self.in_features, self.seed)
            shared = FrozenStore(vera_A=A.to(base.device), vera_B=B.to(base.device))
        self.vera_shared = shared  # one module object for all layers: the pair is stored once
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))  # b (out,)
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_initial)))  # d (r,)

    @classmethod
    def shared_state(cls, layers: dict[str, BaseLayer], rank: int, **options: Any) -> dict[str, Any]:
        out_max, in_max = max_shape(layers)
        device = next(iter(layers.values())).device
        if device.type == "meta":
            A, B = torch.empty(rank, in_max, device="meta"), torch.empty(out_max, rank, device="meta")
        else:
            A, B = vera_projections(rank, out_max, in_max, options.get("seed", 0))
        store = FrozenStore(vera_A=A.to(device), vera_B=B.to(device))
        return {path: store for path in layers}

    @property
    def A(self) -> torch.Tensor:  # (r, in): a view of the shared pair
        return self.vera_shared.vera_A[: self.rank, : self.in_features]

    @property
    def B(self) -> torch.Tensor:  # (out, r)
        return self.vera_shared.vera_B[: self.out_features, : self.rank]

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        h = F.linear(x, self.A.to(x.dtype)) * self.vera_lambda_d  # (..., r)   d ⊙ A x
        h = F.linear(h, self.B.to(x.dtype)) * self.vera_lambda_b  # (..., out) b ⊙ B (d ⊙ A x)
        return base_out + h.to(base_out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.vera_lambda_b[:, None] * self.B) @ (self.vera_lambda_d[:, None] * self.A)  # (out, in)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, **options: Any) -> int:
        return out_features + rank

    @classmethod
    def validate(cls, base: BaseLayer, rank: int, path: str, **options: Any) -> None:
        cls.check_count_option(options, "seed", 0, path)

    # ---- files: PEFT layout, projections regenerated from the seed ----------------------------
    # (the shared bases are non-persistent buffers: the default state dict saves only the vectors)
    @classmethod
    def load_shared_state(cls, adapters: list[Adapter], tensors: dict[str, torch.Tensor], where: str) -> None:
        """A PEFT file saved with ``save_projection=True`` carries the pair: it must equal ours."""
        present = [k for k in PEFT_KEYS if k in tensors]
        if not present or not adapters:
            return
        store = adapters[0].vera_shared  # type: ignore[attr-defined]
        for key, ours in zip(PEFT_KEYS, (store.vera_A, store.vera_B)):
            if key not in tensors:
                raise AdapterLoadError(f"{where}: {present[0]!r} is saved but {key!r} is missing")
            saved = tensors[key]
            if tuple(saved.shape) != tuple(ours.shape) or not torch.allclose(saved.float().cpu(), ours.float().cpu()):
                raise AdapterLoadError(
                    f"{where}: saved projection {key!r} {tuple(saved.shape)} differs from the one regenerated from "
                    f"seed {adapters[0].seed} {tuple(ours.shape)}: seed/basis mismatch (other seed or targets)"  # type: ignore[attr-defined]
                )
            tensors.pop(key)

    @classmethod
    def peft_config(cls, rank: int, alpha: float, options: dict[str, Any]) -> dict[str, Any] | None:
        return {
            "peft_type": "VERA",
            "r": rank,
            "projection_prng_key": int(options.get("seed", 0)),
            "save_projection": False,
            "d_initial": float(options.get("d_initial", 0.1)),
            "vera_dropout": 0.0,
            "init_weights": True,
        }

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if config.get("peft_type") != "VERA":
            return None
        if config.get("bias", "none") != "none":
            raise AdapterLoadError(f"VeRA adapter with bias={config.get('bias')!r}: only bias='none' is supported")
        return {"seed": int(config.get("projection_prng_key", 0)), "d_initial": float(config.get("d_initial", 0.1))}
