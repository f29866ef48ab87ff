"""Helpers shared by the random-basis and SVD-based adapters of this package (not a method)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.layers import BaseLayer


def kaiming_uniform(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan_in = shape[1] * prod(shape[2:])) drawn from ``generator``.

    The same draw as PEFT's VeRA/RandLoRA projections, so seeded bases match PEFT exactly.
    """
    t = torch.empty(shape)
    fan_in = shape[1] * math.prod(shape[2:]) if len(shape) > 1 else shape[0]
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan_in)
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


def max_shape(layers: dict[str, BaseLayer]) -> tuple[int, int]:
    """(largest out, largest in) over the target layers."""
    return max(b.out_features for b in layers.values()), max(b.in_features for b in layers.values())


def is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta"


class FrozenStore(nn.Module):
    """Frozen tensors shared by the adapters of many layers, held as non-persistent buffers.

    One instance is registered as a child of every adapter that uses it: moving the model
    (``.to``) converts it once and the layers keep sharing it; being non-persistent, its
    tensors never reach a state dict or an adapter file (they are regenerated from a seed).
    """

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v, persistent=False)


def thin_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out, n), S (n,), Vh (n, in) of W in float32 (n = min(out, in)); empty on the meta device."""
    out, inp = weight.shape
    n = min(out, inp)
    if is_meta(weight):
        return (torch.empty(out, n, device="meta"), torch.empty(n, device="meta"), torch.empty(n, inp, device="meta"))
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    # canonical signs (largest-magnitude entry of each u_i positive) so that the bases
    # recomputed from the same W on load are the same, whatever the LAPACK build
    idx = U.abs().argmax(0)  # (n,)
    sign = torch.sign(U.gather(0, idx[None]).squeeze(0))
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign[:, None]


def check_base(saved: torch.Tensor, ours: torch.Tensor, what: str, method: str) -> None:
    """Refuse to load an adapter whose base-derived reference values differ from this base's."""
    from ..errors import AdapterLoadError

    if saved.shape != ours.shape or not torch.allclose(saved.float().cpu(), ours.float().cpu(), rtol=1e-3, atol=1e-5):
        raise AdapterLoadError(
            f"{method}: the saved {what} differ from those of this model's base weight: the adapter was made "
            "for another base model (or the base was modified)"
        )


def layer_seeds(layers: dict[str, BaseLayer], seed: int) -> dict[str, int]:
    """A distinct, reproducible seed per target path (the path's CRC32 mixed into ``seed``)."""
    import zlib

    return {p: (int(seed) ^ zlib.crc32(p.encode())) & 0x7FFFFFFF for p in layers}


def check_fingerprint(saved: torch.Tensor, ours: torch.Tensor, method: str) -> None:
    """Refuse a file whose frozen random tensor (regenerated from the seed) differs from ours."""
    from ..errors import AdapterLoadError

    if not torch.allclose(saved.float().cpu(), ours.float().cpu(), rtol=1e-4, atol=1e-4):
        raise AdapterLoadError(
            f"{method}: the frozen random projection regenerated from the seed differs from the saved one "
            f"(fingerprint {ours.tolist()} vs {saved.tolist()}): seed/basis mismatch"
        )


def backward_as_forward(backward, ctx, gy: torch.Tensor):
    """Run a custom Function's ``backward(ctx, gy)`` as its forward ran: autocast off, ``gy`` in
    the dtype of the first saved tensor (the forward computed in one dtype)."""
    with torch.autocast(gy.device.type, enabled=False):
        return backward(ctx, gy.to(ctx.saved_tensors[0].dtype))
