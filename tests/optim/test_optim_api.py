"""The torch.optim edge: targets, state_dict resume, schedulers, clipping, layer-wise mode, bad input, memory."""

from __future__ import annotations

import io

import pytest
import torch

import lowrank.optim as lo
from lowrank.errors import ConfigError, ShapeError, TargetError, UnknownNameError
from lowrank.optim import NonFiniteGradientError, state_bytes

from optim_helpers import batch, tiny_llama, train_steps

BUILDERS = {
    "galore": lambda m: lo.galore(m, lr=1e-2, rank=4, update_gap=3, rotate_moments=True),
    "galore-svd-lion": lambda m: lo.galore(m, lr=1e-3, rank=4, update_gap=3, projector="svd", inner="lion"),
    "galore-dct-adafactor": lambda m: lo.galore(m, lr=1e-2, rank=4, update_gap=3, projector="dct", inner="adafactor"),
    "galore-sgd": lambda m: lo.galore(m, lr=1e-2, rank=4, update_gap=3, inner="sgd", momentum=0.9),
    "fira": lambda m: lo.fira(m, lr=1e-2, rank=4, update_gap=3),
    "apollo": lambda m: lo.apollo(m, lr=1e-2, rank=4, update_gap=3),
    "apollo-mini": lambda m: lo.apollo_mini(m, lr=1e-2, update_gap=3),
    "flora": lambda m: lo.flora(m, lr=1e-2, rank=4, kappa=3),
    "q_galore": lambda m: lo.q_galore(m, lr=1e-2, rank=4, update_gap=2, group_size=32, queue_size=1),
    "osd": lambda m: lo.osd(m, lr=1e-2, rank=4),
}


def test_default_targets_are_block_matrices():
    m = tiny_llama(0)
    plain, proj = lo.split_targets(m, None)
    names = [n for n, _ in proj]
    assert len(names) == 14 and all(".layers." in n and n.endswith("_proj.weight") for n in names)
    assert {n for n, _ in plain} >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    _, proj = lo.split_targets(m, ["q_proj", "model.layers.1.mlp.down_proj.weight"])
    assert [n for n, _ in proj] == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                                    "model.layers.1.mlp.down_proj.weight"]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_state_dict_round_trip_resumes_bit_identically(name):
    build = BUILDERS[name]
    ma = tiny_llama(0)
    oa = build(ma)
    sched_a = torch.optim.lr_scheduler.LambdaLR(oa, lambda s: 1.0 / (1 + s))
    for t in range(4):                                     # crosses a refresh (gap 3)
        oa.zero_grad()
        ma(**batch(t)).loss.backward()
        torch.nn.utils.clip_grad_norm_(ma.parameters(), 1.0)
        oa.step()
        sched_a.step()
    buf = io.BytesIO()
    torch.save({"opt": oa.state_dict(), "sched": sched_a.state_dict(), "model": ma.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)                # plain tensors and numbers only
    mb = tiny_llama(1)
    mb.load_state_dict(ck["model"])
    ob = build(mb)
    sched_b = torch.optim.lr_scheduler.LambdaLR(ob, lambda s: 1.0 / (1 + s))
    ob.load_state_dict(ck["opt"])
    sched_b.load_state_dict(ck["sched"])
    assert state_bytes(ob) == state_bytes(oa) > 0
    for m, o, s in ((ma, oa, sched_a), (mb, ob, sched_b)):
        for t in range(4, 8):                              # crosses the next refresh
            o.zero_grad()
            m(**batch(t)).loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            o.step()
            s.step()
    for (n, a), (_, b) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_state_bytes_exact_and_formula(name):
    m = tiny_llama(0)
    opt = BUILDERS[name](m)
    train_steps(m, opt, 2)
    held = state_bytes(opt)
    with torch.device("meta"):
        meta_model = tiny_llama(0)
    assert next(meta_model.parameters()).is_meta
    assert held == state_bytes(opt, allocated=False) == state_bytes(BUILDERS[name](meta_model), allocated=False)


def test_state_bytes_matches_the_paper_formula():
    m = tiny_llama(0)
    opt = lo.galore(m, lr=1e-3, rank=4, projector="svd")
    train_steps(m, opt, 1)
    plain, proj = lo.split_targets(m, None)
    expect = sum(2 * p.numel() * 4 for _, p in plain)
    expect += sum((2 * max(p.shape) * 4 + min(p.shape) * 4) * 4 for _, p in proj)   # m, v (m' x r) + Q (d x r)
    assert state_bytes(opt) == expect
    adam = torch.optim.AdamW(m.parameters())
    train_steps(m, adam, 1)
    assert state_bytes(opt) < 0.5 * state_bytes(adam)
    ap = lo.apollo_mini(m, lr=1e-3)
    train_steps(m, ap, 1)
    # rank 1: per matrix 2 * m' floats of moments + a 4-byte limiter norm, no projection matrix
    assert state_bytes(ap) == sum(2 * p.numel() * 4 for _, p in plain) + sum((2 * max(p.shape) + 1) * 4 for _, p in proj)


def test_layerwise_matches_the_global_step_and_frees_gradients():
    ma, mb = tiny_llama(0), tiny_llama(0)
    oa = lo.galore(ma, lr=1e-2, rank=4, update_gap=2, projector="svd")
    ob = lo.galore(mb, lr=1e-2, rank=4, update_gap=2, projector="svd", layerwise=True)
    train_steps(ma, oa, 3)
    for t in range(3):
        ob.zero_grad()
        mb(**batch(1 + t)).loss.backward()
        assert all(p.grad is None for p in mb.parameters())   # consumed inside backward
        ob.step()
    for a, b in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_layerwise_refuses_gradient_accumulation():
    m = tiny_llama(0)
    with pytest.raises(ConfigError, match="accumulat"):
        lo.galore(m, rank=4, layerwise=True, accumulation_steps=4)
    opt = lo.galore(m, rank=4, layerwise=True)
    m(**batch(1)).loss.backward()
    with pytest.raises(ConfigError, match="accumulation"):
        m(**batch(2)).loss.backward()                        # a second micro-batch without step()
    opt.remove_hooks()


def test_bad_input_is_refused_before_anything_changes():
    m = tiny_llama(0)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(ShapeError, match=r"k_proj.*rank 17"):
        lo.galore(m, rank=17)                                # k_proj is 16 x 32
    with pytest.raises(UnknownNameError, match="projector"):
        lo.galore(m, rank=4, projector="svdd")
    with pytest.raises(UnknownNameError, match="inner"):
        lo.galore(m, rank=4, inner="adamx")
    with pytest.raises(ShapeError, match="model.norm.weight"):
        lo.galore(m, rank=4, targets=["model.norm.weight"])
    with pytest.raises(TargetError, match="nothing_here"):
        lo.galore(m, rank=4, targets=["nothing_here"])
    with pytest.raises(ConfigError, match="betaz"):
        lo.galore(m, rank=4, betaz=(0.9, 0.9))
    with pytest.raises(ConfigError, match="update_gap"):
        lo.galore(m, rank=4, update_gap=0)
    assert "svd" in lo.projectors() and "randomized" in lo.projectors() and len(lo.projectors()) == 6
    assert all(torch.equal(p, w0[n]) for n, p in m.named_parameters())
    with pytest.raises(ShapeError):
        lo.galore(m, rank=17, layerwise=True)
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in m.parameters())   # no hook left behind


@pytest.mark.parametrize("build, exc, match", [
    (lambda m: lo.galore([{"params": list(m.parameters())}], rank=4), ConfigError, "param-group dicts"),
    (lambda m: lo.galore(list(m.parameters()), rank=4), TargetError, "no parameter is projected"),
    (lambda m: lo.galore(m, lr=float("nan"), rank=4), ConfigError, "lr must be a finite number"),
    (lambda m: lo.galore(m, lr="0.1", rank=4), ConfigError, "lr must be a finite number"),
    (lambda m: lo.galore(m, rank=4, scale=float("inf")), ConfigError, "scale"),
    (lambda m: lo.fira(m, rank=4, weight_decay=-1.0), ConfigError, "weight_decay"),
    (lambda m: lo.galore(m, rank=4, inner="lion", betas=(1.5, 2.0)), ConfigError, "lion: betas"),
    (lambda m: lo.galore(m, rank=4, betas=(0.9,)), ConfigError, "adamw: betas"),
    (lambda m: lo.fira(m, rank=4, gamma=0.0), ConfigError, "fira: gamma"),
    (lambda m: lo.apollo(m, rank=4, gamma=-1.0), ConfigError, "apollo: gamma"),
    (lambda m: lo.flora(m, rank=4, clip_threshold=-1.0), ConfigError, "clip_threshold"),
    (lambda m: lo.galore(m, rank=4, seed="a"), ConfigError, "seed"),
    (lambda m: lo.osd(m, rank=4, update_gap=5), ConfigError, "osd fixes update_gap"),
    (lambda m: lo.q_galore(m, rank=4, projector="svd"), ConfigError, "q_galore fixes projector"),
])
def test_bad_hyperparameters_are_refused_at_construction(build, exc, match):
    m = tiny_llama(0)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(exc, match=match):
        build(m)
    assert all(torch.equal(p, w0[n]) for n, p in m.named_parameters())


def test_groups_are_fixed_after_construction():
    m = tiny_llama(0)
    opt = lo.galore(m, lr=1e-3, rank=4)
    with pytest.raises(ConfigError, match="fixed at construction"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))]})
    assert len(opt.param_groups) == 2
    train_steps(m, opt, 1)                                   # still steps


@pytest.mark.parametrize("change", [{"rank": 8}, {"projector": "svd"}])
def test_loading_state_saved_with_other_rank_or_projector_is_refused(change):
    m = tiny_llama(0)
    a = lo.galore(m, lr=1e-3, rank=4)
    train_steps(m, a, 1)
    b = lo.galore(m, lr=1e-3, **{"rank": 4, **change})
    train_steps(m, b, 1)
    before = b.state_dict()
    with pytest.raises(ConfigError, match=next(iter(change))):
        b.load_state_dict(a.state_dict())
    after = b.state_dict()
    assert all(torch.equal(x, y) for k in before["state"] for x, y in
               zip(before["state"][k].values(), after["state"][k].values()) if isinstance(x, torch.Tensor))


def test_loading_state_with_wrong_shapes_names_the_parameter():
    m = tiny_llama(0)
    a = lo.galore(m, lr=1e-3, rank=4)
    train_steps(m, a, 1)
    sd = a.state_dict()
    sd["param_groups"][1]["rank"] = 8                        # lie about the rank: shapes cannot match
    b = lo.galore(m, lr=1e-3, rank=8)
    with pytest.raises(ConfigError, match=r"layers\.0\.self_attn\.q_proj\.weight.*proj\.Q.*\(32, 4\)"):
        b.load_state_dict(sd)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradients_skip_or_raise(bad):
    m = tiny_llama(0)
    opt = lo.fira(m, lr=1e-2, rank=4)
    train_steps(m, opt, 1)
    w0 = [p.detach().clone() for p in m.parameters()]
    s0 = opt.state_dict()
    opt.zero_grad()
    m(**batch(5)).loss.backward()
    m.model.layers[0].mlp.up_proj.weight.grad[3, 4] = bad
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(w0, m.parameters()))
    s1 = opt.state_dict()
    for k in s0["state"]:
        for key, v in s0["state"][k].items():
            assert (torch.equal(v, s1["state"][k][key]) if isinstance(v, torch.Tensor) else v == s1["state"][k][key])
    strict = lo.galore(m, lr=1e-2, rank=4, nonfinite="raise")
    with pytest.raises(NonFiniteGradientError, match="up_proj"):
        strict.step()
    assert all(torch.equal(a, b) for a, b in zip(w0, m.parameters()))
    # a finite step afterwards works and keeps everything finite
    opt.zero_grad()
    m(**batch(6)).loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_works_with_named_parameters_and_param_lists():
    m = tiny_llama(0)
    opt = lo.galore(list(m.named_parameters()), lr=1e-3, rank=4)
    assert [g["method"] for g in opt.param_groups] == ["plain", "galore"]
    opt2 = lo.galore([p for p in m.parameters() if p.dim() == 2], lr=1e-3, rank=4, targets=["param1"])
    assert len(opt2.param_groups[1]["params"]) == 1


# ---------------------------------------------------------------- hyperparameters in param groups

def _weights(m):
    return [p.detach().clone() for p in m.parameters()]


@pytest.mark.parametrize("make, edits", [
    (lambda m, **kw: lo.galore(m, lr=1e-2, rank=4, update_gap=2, **kw), {"betas": (0.5, 0.9), "eps": 1e-3, "scale": 0.6}),
    (lambda m, **kw: lo.galore(m, lr=1e-2, rank=4, inner="sgd", **kw), {"momentum": 0.3}),
    (lambda m, **kw: lo.galore(m, lr=1e-3, rank=4, inner="lion", **kw), {"betas": (0.7, 0.95)}),
    (lambda m, **kw: lo.fira(m, lr=1e-2, rank=4, **kw), {"gamma": 1.5, "scale": 0.5}),
    (lambda m, **kw: lo.flora(m, lr=1e-2, rank=4, **kw), {"beta1": 0.5, "clip_threshold": 0.5}),
])
def test_hyperparameters_edited_in_param_groups_are_the_ones_used(make, edits):
    """Editing a param group (as a scheduler does) gives exactly the optimizer built with those values."""
    built = make(tiny_llama(0), **edits)
    ma, mb = tiny_llama(0), tiny_llama(0)
    oa = make(ma)
    for g in oa.param_groups:
        for k, v in edits.items():
            if k in g:
                g[k] = v
    ob = make(mb, **edits)
    assert all(g[k] == built.param_groups[i][k] for i, g in enumerate(oa.param_groups) for k in edits if k in g)
    train_steps(ma, oa, 3)
    train_steps(mb, ob, 3)
    assert all(torch.equal(a, b) for a, b in zip(_weights(ma), _weights(mb)))
    plain = tiny_llama(0)
    train_steps(plain, make(plain), 3)          # and the edit made a difference
    assert not all(torch.equal(a, b) for a, b in zip(_weights(ma), _weights(plain)))


@pytest.mark.parametrize("make, key", [
    (lambda m: lo.galore(m, lr=1e-2, rank=4), "betas"),
    (lambda m: lo.galore(m, lr=1e-2, rank=4, inner="sgd"), "momentum"),
])
def test_one_cycle_cycles_the_inner_momentum(make, key):
    """torch's OneCycleLR (cycle_momentum=True by default) finds betas / momentum and the step uses them."""
    m = tiny_llama(0)
    opt = make(m)
    assert key in opt.defaults
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    seen = []
    for t in range(4):
        seen.append(opt.param_groups[-1][key])
        train_steps(m, opt, 1, seed0=t)
        inner = opt._transforms[-1].inner
        used = (inner.b1, inner.b2) if key == "betas" else inner.mu
        assert used == pytest.approx(seen[-1])
        sched.step()
    assert len(set(map(str, seen))) == 4                 # it did cycle


def test_bad_hyperparameter_in_a_group_is_refused_before_anything_changes():
    m = tiny_llama(0)
    opt = lo.galore(m, lr=1e-2, rank=4)
    train_steps(m, opt, 1)
    before, state = _weights(m), {k: v.clone() for k, v in opt.state_dict()["state"][0].items() if torch.is_tensor(v)}
    opt.param_groups[1]["betas"] = (1.5, 0.999)
    m(**batch(5)).loss.backward()
    with pytest.raises(ConfigError, match=r"param group 1 \(galore\).*betas"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(m)))
    after = opt.state_dict()["state"][0]
    assert all(torch.equal(v, after[k]) for k, v in state.items())
    opt.param_groups[1]["betas"] = (0.9, 0.999)         # fixed: steps again
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(m)))


def test_update_gap_is_restored_from_a_state_dict_and_honoured_from_the_next_refresh():
    m = tiny_llama(0)
    a = lo.galore(m, lr=1e-3, rank=4, update_gap=7)
    train_steps(m, a, 1)
    b = lo.galore(tiny_llama(0), lr=1e-3, rank=4, update_gap=3)
    b.load_state_dict(a.state_dict())
    assert b.param_groups[1]["update_gap"] == 7
    p = b.param_groups[1]["params"][0]
    assert b.state[p]["s"].next_refresh == 8            # scheduled by a's gap at its refresh
    b.param_groups[1]["update_gap"] = 2                  # takes effect at the next refresh
    mb = tiny_llama(0)
    mb.load_state_dict(m.state_dict())
    c = lo.galore(mb, lr=1e-3, rank=4, update_gap=3)
    c.load_state_dict(a.state_dict())
    c.param_groups[1]["update_gap"] = 2
    train_steps(mb, c, 7)                               # steps 2..8: refresh at 8, next at 10
    q = c.param_groups[1]["params"][0]
    assert c.state[q]["s"].next_refresh == 10


def test_each_group_keeps_its_own_hyperparameters_and_a_chain_leaves_shared_keys_fixed():
    from lowrank.optim import LowRankOptimizer
    from lowrank.optim.transforms import AdamW, SGDMomentum, chain

    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    tb = AdamW(betas=(0.5, 0.6), eps=1e-3)
    opt = LowRankOptimizer([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.1}], [AdamW(), tb])
    assert opt.param_groups[1]["betas"] == (0.5, 0.6) and opt.param_groups[1]["eps"] == 1e-3
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert (tb.b1, tb.b2, tb.eps) == (0.5, 0.6, 1e-3)
    c = chain(SGDMomentum(0.5), SGDMomentum(0.0))        # "momentum" would be ambiguous: not in the group
    p = torch.nn.Parameter(torch.zeros(4))
    o = LowRankOptimizer([{"params": [p], "lr": 1.0}], [c])
    assert "momentum" not in o.param_groups[0]
    for _ in range(2):
        p.grad = torch.ones(4)
        o.step()
    assert [t.mu for t in c.transforms] == [0.5, 0.0]
    assert p.detach().tolist() == [-2.5] * 4             # 1, then (0.5 * 1 + 1)


def test_layerwise_bad_hyperparameter_is_refused_before_any_update():
    m = tiny_llama(0)
    opt = lo.galore(m, lr=1e-2, rank=4, layerwise=True)
    opt.param_groups[1]["betas"] = (1.5, 0.999)
    before = _weights(m)
    with pytest.raises(ConfigError, match=r"param group 1 \(galore\).*betas"):
        m(**batch(0)).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(m)))
    opt.param_groups[1]["betas"] = (0.9, 0.999)
    m.zero_grad(set_to_none=True)
    m(**batch(0)).loss.backward()                        # fixed: the next backward updates normally
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, _weights(m)))


def test_state_dict_with_bad_hyperparameters_is_refused_at_load():
    m = tiny_llama(0)
    a = lo.galore(m, lr=1e-3, rank=4)
    train_steps(m, a, 1)
    sd = a.state_dict()
    sd["param_groups"][1]["betas"] = (0.9, 1.5)
    b = lo.galore(m, lr=1e-3, rank=4)
    train_steps(m, b, 1)
    before = b.state_dict()
    with pytest.raises(ConfigError, match=r"optimizer state_dict: param group 1.*betas"):
        b.load_state_dict(sd)
    assert b.param_groups[1]["betas"] == (0.9, 0.999)
    after = b.state_dict()
    assert all(torch.equal(x, after["state"][k][n]) for k in before["state"]
               for n, x in before["state"][k].items() if torch.is_tensor(x))
