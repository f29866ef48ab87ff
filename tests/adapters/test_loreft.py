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


def _phi(h, rotate, source):
    R, W, b = rotate.weight.detach(), source.weight.detach(), source.bias.detach()
    return h + (h @ W.T + b - h @ R.T) @ R


@pytest.mark.parametrize("t", [12, 4])  # 4 < first_n + last_n: the two position sets overlap
def test_untied_prefix_and_suffix_interventions(t):
    """share_weights=False learns (R', W', b') for the last positions; where both apply, the suffix
    one edits the prefix-edited state (pyvene's order); both train and both R stay orthonormal."""
    m = _adapted(first_n=2, last_n=3, share_weights=False)
    (_, wrapped), = list(lowrank.adapted_layers(m))
    a = wrapped.adapters["default"]
    assert sum(p.numel() for _, p in lowrank.trainable_parameters(m)) == 2 * (2 * 4 * 32 + 4)
    assert lowrank.count_parameters(m)[0] == 2 * (2 * 4 * 32 + 4)
    seen, edited = {}, {}
    wrapped.base_layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("h", out))
    wrapped.register_forward_hook(lambda mod, inp, out: edited.__setitem__("h", out))
    with torch.no_grad():
        m(input_ids=IDS[:, :t])
    h = seen["h"]
    pre = _phi(h, a.rotate_layer, a.learned_source)
    expect = h.clone()
    expect[:, :2] = pre[:, :2]
    expect[:, t - 3 :] = _phi(expect, a.rotate_layer_suffix, a.learned_source_suffix)[:, t - 3 :]
    torch.testing.assert_close(edited["h"], expect, atol=1e-5, rtol=0)
    # the two interventions differ (separately initialised), so a tied model computes something else
    assert not torch.allclose(a.rotate_layer.weight, a.rotate_layer_suffix.weight)
    m.train()
    opt = torch.optim.Adam([p for _, p in lowrank.trainable_parameters(m)], lr=0.1)
    R0 = a.rotate_layer_suffix.weight.detach().clone()
    opt.zero_grad()
    m(input_ids=IDS).logits.pow(2).mean().backward()
    opt.step()
    R = a.rotate_layer_suffix.weight.detach()
    assert not torch.allclose(R, R0, atol=1e-4)
    torch.testing.assert_close(R @ R.T, torch.eye(4), atol=1e-5, rtol=0)


def test_share_weights_is_checked_and_save_load_round_trips(tmp_path):
    with pytest.raises(lowrank.ConfigError, match="share_weights"):
        _adapted(first_n=1, last_n=1, share_weights="no")
    m = _adapted(first_n=2, last_n=3, share_weights=False)
    lowrank.save_adapter(m, tmp_path / "a")
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, m(input_ids=IDS).logits, atol=1e-6, rtol=0)


def test_R_survives_weight_decay_and_starts_as_torchs_orthogonal():
    """AdamW's default weight decay shrinks the Householder map's raw diagonal (its reflector signs);
    torch's orthogonal() reads it with int(), so R became all zeros after one step.  Here R stays
    orthonormal, and at init equals what torch's orthogonal() (pyreft's R) gives."""
    from torch.nn.utils.parametrizations import orthogonal

    from lowrank.adapters.loreft import _orthonormal_rows

    m = _adapted()
    m.train()
    a = next(iter(lowrank.adapted_layers(m)))[1].adapters["default"]
    opt = torch.optim.AdamW([p for _, p in lowrank.trainable_parameters(m)], lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        m(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    R = a.R.detach()
    torch.testing.assert_close(R @ R.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.manual_seed(1)
    ref = orthogonal(torch.nn.Linear(32, 4, bias=False))
    torch.manual_seed(1)
    ours = _orthonormal_rows(torch.nn.Linear(32, 4, bias=False))
    assert torch.equal(ref.weight, ours.weight) and ref.state_dict().keys() == ours.state_dict().keys()
