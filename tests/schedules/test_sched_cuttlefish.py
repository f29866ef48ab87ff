"""Cuttlefish: the switch to factorised layers preserves the function up to the truncation error it reports."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank.schedules import Cuttlefish, stable_rank
from conftest import tiny_llama


def test_stable_rank():
    assert stable_rank(torch.eye(5)) == pytest.approx(5.0)
    assert stable_rank(torch.outer(torch.randn(6), torch.randn(4))) == pytest.approx(1.0)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))


def test_switch_preserves_function_up_to_reported_truncation():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = Cuttlefish(check_every=1, tol=0.05, max_full_steps=1)
    sched.attach(model, opt)  # srank(W_0) measured on the random init
    with torch.no_grad():  # "training" made the first layer nearly low-rank: rank 3 plus small noise
        model[0].weight.copy_(torch.randn(64, 3) @ torch.randn(3, 64) / 8 + 1e-3 * torch.randn(64, 64))
    W = {p: m.weight.detach().clone() for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(16, 64)
    with torch.no_grad():
        dense_out = {p: x @ W[p].t() for p in W}
    sched.step(model, opt, 0)  # max_full_steps reached: switch
    assert sched.switched
    rep = sched.report
    assert "0" in rep and rep["0"]["rank"] < 16 and rep["0"]["rel_frobenius_error"] < 0.05  # near-rank-3: small rank
    for p, r in rep.items():
        layer = model.get_submodule(p)
        assert isinstance(layer, lowrank.AdaptedLayer)
        a = layer.adapters["cuttlefish"]
        with torch.no_grad():
            y = layer(x) - (layer.base_layer.bias if layer.base_layer.bias is not None else 0)
        # ||W x - B A x|| <= sigma_{r+1} ||x|| per input, and the reported Frobenius error is exact
        err = (y - dense_out[p]).norm(dim=1)
        assert (err <= r["sigma_next"] * x.norm(dim=1) + 1e-5).all()
        s = torch.linalg.svdvals(W[p])
        assert r["sigma_next"] == pytest.approx(float(s[r["rank"]]), rel=1e-4)
        assert r["rel_frobenius_error"] == pytest.approx(float((s[r["rank"]:] ** 2).sum().sqrt() / s.norm()), rel=1e-3)
        # the optimizer now trains A and B instead of the dense weight
        group_params = {id(q) for g in opt.param_groups for q in g["params"]}
        assert id(a.lora_A) in group_params and id(a.lora_B) in group_params
        assert id(layer.base_layer.weight) not in group_params
    # training continues
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()


def test_waits_for_stable_ranks():
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # nothing moves: ranks are stable at once
    sched = Cuttlefish(check_every=2, tol=1e-3, switch_test="relative")
    sched.attach(model, opt)
    sched.step(model, opt, 0)
    sched.step(model, opt, 1)
    assert not sched.switched  # one measurement only
    sched.step(model, opt, 2)
    sched.step(model, opt, 3)
    assert sched.switched  # two equal measurements
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(lowrank.ConfigError, match="check_every"):
        Cuttlefish(check_every=0)


def test_resume_after_the_switch_rebuilds_the_factorised_layers():
    """The loop's resume order: schedule state, attach, then model tensors and optimizer state."""

    def fresh():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
        return m, torch.optim.AdamW(m.parameters(), lr=1e-2)

    x = torch.randn(8, 64)
    model, opt = fresh()
    sched = Cuttlefish(check_every=1, max_full_steps=2)
    sched.attach(model, opt)
    with torch.no_grad():  # training made layer 0 nearly low-rank
        model[0].weight.copy_(torch.randn(64, 3) @ torch.randn(3, 64) / 8 + 1e-3 * torch.randn(64, 64))
    for s in range(4):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step(model, opt, s)
    assert sched.switched and sched.ranks
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()  # as a checkpoint would
    assert not any(k.endswith("base_layer.weight") for k in saved_model)  # freed dense weights are not saved

    model2, opt2 = fresh()
    sched2 = Cuttlefish(check_every=1, max_full_steps=2)
    sched2.load_state_dict(saved_sched)
    sched2.attach(model2, opt2)
    res = model2.load_state_dict(saved_model, strict=False)
    assert not res.unexpected_keys and not res.missing_keys
    opt2.load_state_dict(saved_opt)
    with torch.no_grad():
        torch.testing.assert_close(model2(x), model(x))
    for m in (model, model2):  # and training continues identically
        m(x).pow(2).mean().backward()
    opt.step()
    opt2.step()
    with torch.no_grad():
        torch.testing.assert_close(model2(x), model(x))


def test_the_reference_slope_test_waits_for_its_window_then_switches_on_flat_ranks():
    """The reference's detector: no layer is stable before check 15 (0-based), flat floored
    stable ranks are stable from then on; ranks ⌈⌊srank_t⌋ · full / ⌊srank_0⌋⌉."""
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # nothing moves
    sched = Cuttlefish(check_every=1)
    sched.attach(model, opt)
    for s in range(15):
        sched.step(model, opt, s)
    assert not sched.switched and len(sched.floors) == 15
    raw = dict(sched.initial)
    sched.initial = {p: 4 * v for p, v in raw.items()}  # as if the ranks had fallen to a quarter
    sched.step(model, opt, 15)
    assert sched.switched and sched.ranks
    full = {p: min(l.base.in_features, l.base.out_features) for p, l in lowrank.adapted_layers(model)}
    for p, r in sched.ranks.items():
        assert r == -(-int(raw[p]) * full[p] // int(4 * raw[p]))     # ⌈⌊s_t⌋ full / ⌊s_0⌋⌉


def test_slope_test_on_a_moving_rank_record():
    """A layer whose floored stable rank still falls by one per check is not stable; flat is."""
    sched = Cuttlefish(check_every=1)
    falling = list(range(60, 30, -1))
    flat = [20] * 30
    for t in range(30):
        sched.floors.append({"a": falling[t], "b": flat[t]})
        sched._update_stable()
    assert sched.stable == {"a": False, "b": True}
    sched.floors.append({"a": falling[-1], "b": 5})      # once stable, stays stable
    sched._update_stable()
    assert sched.stable["b"] is True
