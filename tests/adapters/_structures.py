"""Small helpers for the structures-II adapter tests (not collected: leading underscore)."""

from __future__ import annotations

import torch
from torch import nn

import lowrank


def layer(i: int = 32, o: int = 48, bias: bool = True, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(i, o, bias=bias)).eval()


def adapter_of(model: nn.Module, name: str = "default"):
    (_, wrapped), *_ = list(lowrank.adapted_layers(model))
    return wrapped.adapters[name]


def perturb(model: nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lowrank.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def x_in(i: int = 32, n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, i, generator=torch.Generator().manual_seed(seed))


def check_runs_under_autocast(method: str, grad_of: str, **options) -> None:
    """bf16 autocast around a method with a custom autograd Function: close to fp32, and the named
    parameter gets a gradient (the Function must keep one dtype inside, forward and backward)."""
    import lowrank

    m = layer(32, 48)
    lowrank.adapt(m, method, **options)
    perturb(m)
    x = x_in()
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y.float().square().sum().backward()
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    assert getattr(adapter_of(m), grad_of).grad.abs().sum() > 0
