"""SwitchLoRA: a switch does not change the effective weight; counterparts are frozen and reset."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.schedules import SwitchLoRA
from conftest import tiny_llama


def _ids(seed):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _effective(model):
    return {p: (l.base.weight + l.adapters["default"].delta_weight()).detach().clone() for p, l in lowrank.adapted_layers(model)}


def test_switch_keeps_effective_weight_and_freezes_counterpart():
    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    # interval 8 with rank 4: about one switch per matrix every other step early on
    sched = SwitchLoRA(total_steps=100, interval=4.0, freeze_steps=2, seed=1)
    init = _effective(model)
    sched.attach(model, opt)  # gives B its SwitchLoRA init; W absorbs it
    for p, w in _effective(model).items():
        torch.testing.assert_close(w, init[p], atol=1e-6, rtol=0)
    switched_any = False
    for s in range(6):
        ids = _ids(s)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        before = _effective(model)
        A_before = {p: l.adapters["default"].A.detach().clone() for p, l in lowrank.adapted_layers(model)}
        n0 = sched.switches
        sched.step(model, opt, s)
        for p, w in _effective(model).items():
            torch.testing.assert_close(w, before[p], atol=1e-5, rtol=0, msg=f"switch changed {p}")
        if sched.switches > n0:
            switched_any = True
            for p, l in lowrank.adapted_layers(model):
                a, st = l.adapters["default"], sched.layers[p]
                rows = (a.A.detach() != A_before[p]).any(1).nonzero().flatten()
                for i in rows.tolist():  # row i of A switched -> column i of B frozen, moments zeroed
                    assert st.frozen_B[i] == 2
                    assert opt.state[a.B]["exp_avg"][:, i].abs().max() == 0
                    assert opt.state[a.B]["exp_avg_sq"][:, i].abs().max() == 0
    assert switched_any
    # a frozen vector gets no gradient on the next step
    p, l = next((p, l) for p, l in lowrank.adapted_layers(model) if sched.layers[p].frozen_B.any() or sched.layers[p].frozen_A.any())
    st, a = sched.layers[p], l.adapters["default"]
    ids = _ids(50)
    model(input_ids=ids, labels=ids).loss.backward()
    cols = st.frozen_B.nonzero().flatten()
    rows = st.frozen_A.nonzero().flatten()
    assert a.B.grad[:, cols].abs().sum() == 0 and a.A.grad[rows].abs().sum() == 0
    opt.zero_grad()


def test_switch_frequency_decays_and_bad_input():
    s = SwitchLoRA(total_steps=1000, interval=40, descent_rate=0.1)
    assert s.current_interval(99) == pytest.approx(40 / 0.3)
    assert s.current_interval(0) < s.current_interval(500)
    with pytest.raises(lowrank.ConfigError, match="interval"):
        SwitchLoRA(total_steps=100, interval=4, freeze_steps=5)
    model = tiny_llama()
    with pytest.raises(lowrank.ConfigError, match="factor adapters"):
        SwitchLoRA(total_steps=10, interval=20).attach(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_resume_continues_exactly():
    import copy

    def run(model, opt, sched, steps):
        for s in steps:
            ids = _ids(s)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step(model, opt, s)

    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = SwitchLoRA(total_steps=100, interval=4.0, freeze_steps=2, seed=1)
    sched.attach(model, opt)
    run(model, opt, sched, range(3))
    # a checkpoint: copies of the model, optimizer and schedule state
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched2 = SwitchLoRA(total_steps=100, interval=4.0, freeze_steps=2, seed=7)
    sched2.load_state_dict(copy.deepcopy(sched.state_dict()))
    sched2.attach(model2, opt2)
    run(model, opt, sched, range(3, 7))
    run(model2, opt2, sched2, range(3, 7))
    assert sched2.switches == sched.switches
    for (p, l), (_, l2) in zip(lowrank.adapted_layers(model), lowrank.adapted_layers(model2)):
        torch.testing.assert_close(l2.adapters["default"].A, l.adapters["default"].A, msg=p)
        torch.testing.assert_close(l2.base.weight, l.base.weight, msg=p)


def test_factors_and_candidates_use_the_reference_init_scale():
    """get_init_lora_bound with s = 1/r (lora_alpha = 1): std(s B A x) = 1/sqrt(3) for unit x."""
    import math

    from lowrank.schedules.switchlora import init_bounds

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 128, bias=False))
    lowrank.adapt(model, "lora", rank=16, alpha=1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = SwitchLoRA(total_steps=100)
    sched.attach(model, opt)
    a = model[0].adapters["default"]
    bound_a, bound_b = init_bounds(256, 128, 16, a.scaling)
    assert a.A.abs().max() <= bound_a and a.A.abs().max() > 0.9 * bound_a
    assert a.B.abs().max() <= bound_b and a.B.abs().max() > 0.9 * bound_b
    st = sched.layers["0"]
    assert st.cand_A.abs().max() <= bound_a and st.cand_B.abs().max() <= bound_b
    x = torch.randn(4096, 256)
    y = a.scaling * (x @ a.A.T) @ a.B.T
    assert abs(y.std().item() * math.sqrt(3) - 1) < 0.1


def test_a_vector_whose_counterpart_is_frozen_is_not_switched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32, bias=False))
    lowrank.adapt(model, "lora", rank=4, alpha=1.0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = SwitchLoRA(total_steps=100, freeze_steps=5)
    sched.attach(model, opt)
    layer = model[0]
    a, st = layer.adapters["default"], sched.layers["0"]
    st.frozen_B[:3] = 5                       # columns 0..2 of B re-estimating: rows 0..2 of A must stay
    A0 = a.A.detach().clone()
    assert sched.switch(layer, a, st, opt, "A", 4) == 1
    assert torch.equal(a.A[:3], A0[:3]) and not torch.equal(a.A[3], A0[3])


def test_with_elementwise_adamw_a_counterpart_restarts_its_bias_correction():
    """As the reference's recipe (--zero_switch_state --zero_switch_step_state, StepAdamW): the
    counterpart's step counts restart with its moments and advance through the freeze, so once
    unfrozen its first update is bias-corrected with the count since the restart (as the
    reference's), not with the tensor's whole history ((1 - b1)/sqrt(1 - b2) x lr)."""
    from lowrank.optim import ElementwiseAdamW

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    lowrank.adapt(model, "lora", rank=4, alpha=1.0)
    a = model[0].adapters["default"]
    lr = 1e-3
    opt = ElementwiseAdamW([a.A, a.B], lr=lr, weight_decay=0.0)
    sched = SwitchLoRA(total_steps=1000, freeze_steps=2)
    sched.attach(model, opt)
    x = torch.randn(8, 16)
    for _ in range(30):
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    st = sched.layers["0"]
    assert sched.switch(model[0], a, st, opt, "A", 1) == 1
    i = int(st.frozen_B.nonzero()[0])  # column i of B is the counterpart
    ostate = opt.state[a.B]
    assert ostate["step"][:, i].eq(0).all() and ostate["step"][:, (i + 1) % 4].eq(30).all()
    for _ in range(2):  # frozen: no gradient, so no move; the counts still advance
        before = a.B.detach()[:, i].clone()
        model(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        assert torch.equal(a.B.detach()[:, i], before)
        st.frozen_B.sub_(1).clamp_(min=0)
    before = a.B.detach()[:, i].clone()
    model(x).pow(2).sum().backward()
    g = a.B.grad[:, i].clone()
    opt.step()
    n = 3.0  # third count since the restart: m = 0.1 g, v = 0.001 g^2 after two zero-gradient steps
    m_hat, v_hat = 0.1 * g / (1 - 0.9**n), 0.001 * g * g / (1 - 0.999**n)
    torch.testing.assert_close(a.B.detach()[:, i] - before, -lr * m_hat / (v_hat.sqrt() + 1e-8), atol=1e-9, rtol=1e-4)


def test_switchlora_recipe_gives_the_factors_elementwise_counts():
    from lowrank.optim import ElementwiseAdamW
    from lowrank.recipes import TaskInfo, get_recipe

    model = tiny_llama()
    prepared = get_recipe("switchlora").build(model, TaskInfo("pretrain"), rank=4, total_steps=50)
    opt = prepared.optimizer
    assert isinstance(opt, ElementwiseAdamW)
    flags = {id(p): g["elementwise_step"] for g in opt.param_groups for p in g["params"]}
    for _, layer in lowrank.adapted_layers(model):
        a = layer.adapters["default"]
        assert flags[id(a.A)] == (0,) and flags[id(a.B)] == (1,)  # one count per row of A, per column of B
    assert flags[id(model.model.embed_tokens.weight)] is False
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    a = next(iter(lowrank.adapted_layers(model)))[1].adapters["default"]
    assert opt.state[a.A]["step"].shape == (4, 1) and opt.state[a.B]["step"].shape == (1, 4)
    # a switch restarts the counterpart's counts: row i of A switched -> column i of B restarts
    sched = prepared.callbacks[0]
    path, layer = next(iter(lowrank.adapted_layers(model)))
    assert sched.switch(layer, a, sched.layers[path], opt, "A", 1) == 1
    i = int(sched.layers[path].frozen_B.nonzero()[0])
    assert opt.state[a.B]["step"][0, i] == 0 and opt.state[a.B]["step"].sum() == 3
    assert opt.state[a.B]["exp_avg"][:, i].abs().sum() == 0
