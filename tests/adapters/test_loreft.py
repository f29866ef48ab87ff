"""LoReFT: h + Rᵀ(W h + b − R h) on a block's output; R keeps orthonormal rows through training."""

from __future__ import annotations

import pytest
import torch

import lowrank
from conftest import tiny_llama

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _adapted(**kw):
    m = tiny_llama()
    lowrank.adapt(m, "loreft", targets=r"model\.layers\.1", rank=4, **kw)
    return m


def test_intervention_formula_on_the_block_output():
    m = _adapted()
    (path, wrapped), = list(lowrank.adapted_layers(m))
    a = wrapped.adapters["default"]
    seen = {}
    wrapped.base_layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("h", out))
    edited = {}
    wrapped.register_forward_hook(lambda mod, inp, out: edited.__setitem__("h", out))
    with torch.no_grad():
        m(input_ids=IDS)
    h, R = seen["h"], a.R.detach()
    W, b = a.learned_source.weight.detach(), a.learned_source.bias.detach()
    torch.testing.assert_close(edited["h"], h + (h @ W.T + b - h @ R.T) @ R, atol=1e-5, rtol=0)
    assert sum(p.numel() for _, p in lowrank.trainable_parameters(m)) == 2 * 4 * 32 + 4


def test_dropout_is_on_the_whole_intervened_state_as_pyreft():
    m = _adapted(dropout=0.3)
    (_, wrapped), = list(lowrank.adapted_layers(m))
    a = wrapped.adapters["default"].train()
    h = torch.randn(2, 5, 32)
    torch.manual_seed(4)
    out = a.intervene(h)
    torch.manual_seed(4)
    R, W, b = a.R.detach(), a.learned_source.weight.detach(), a.learned_source.bias.detach()
    expect = torch.nn.functional.dropout(h + (h @ W.T + b - h @ R.T) @ R, 0.3, training=True)
    torch.testing.assert_close(out.detach(), expect, atol=1e-6, rtol=0)
    assert (out == 0).float().mean() > 0.2          # whole entries dropped, not only the edit


def test_R_keeps_orthonormal_rows_after_optimizer_steps():
    m = _adapted()
    m.train()
    opt = torch.optim.Adam([p for _, p in lowrank.trainable_parameters(m)], lr=0.1)
    a = next(iter(lowrank.adapted_layers(m)))[1].adapters["default"]
    R0 = a.R.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        m(input_ids=IDS).logits.pow(2).mean().backward()
        opt.step()
    R = a.R.detach()
    assert not torch.allclose(R, R0, atol=1e-3), "R must train"
    torch.testing.assert_close(R @ R.T, torch.eye(4), atol=1e-5, rtol=0)


def test_positions_and_no_merge():
    m = _adapted(first_n=2, last_n=3)
    (path, wrapped), = list(lowrank.adapted_layers(m))
    seen, edited = {}, {}
    wrapped.base_layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("h", out))
    wrapped.register_forward_hook(lambda mod, inp, out: edited.__setitem__("h", out))
    with torch.no_grad():
        m(input_ids=IDS)
    changed = (edited["h"] - seen["h"]).abs().amax(dim=(0, 2)) > 0  # per position
    assert changed.tolist() == [True, True] + [False] * 7 + [True, True, True]
    with pytest.raises(lowrank.MergeError, match="hidden states"):
        lowrank.merge(m)
    with pytest.raises(lowrank.ConfigError, match="first_n"):
        _adapted(first_n=-1)
