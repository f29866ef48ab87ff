"""Q-GaLore's INT8 weights (``q_galore(..., weight_bits=8)``): the weights really are 8-bit between
uses, the model computes with exactly the dequantised weights, and updates are applied with
stochastic rounding, which is unbiased where round-to-nearest drops small updates."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import lowrank
import lowrank.optim as lo
from lowrank.optim.q_galore import Int8Weight, dequantize8, int8_update_, int8_weight_like, quantize8_

from optim_helpers import batch, tiny_llama

OPTS = dict(lr=1e-2, rank=4, update_gap=2, group_size=32, queue_size=1, weight_group_size=64)


def make(model=None, **kw):
    m = model if model is not None else tiny_llama()
    return m, lo.q_galore(m, weight_bits=8, **{**OPTS, **kw})


def projected(opt):
    return [p for g in opt.param_groups if g["method"] == "q_galore" for p in g["params"]]


def float_twin(m, opt):
    """A float tiny Llama (the same seeded init as m) whose projected weights are m's dequantised INT8 codes."""
    ref = tiny_llama()
    with torch.no_grad():
        for p, pr in zip(m.parameters(), ref.parameters()):
            if any(p is q for q in projected(opt)):
                pr.copy_(dequantize8(opt.weight_of(p), p.shape, p.dtype))
    return ref


def codes_bytes(opt):
    return sum(w.codes.numel() * w.codes.element_size() + w.scale.numel() * 4 + w.zero.numel()
               for w in (opt.weight_of(p) for p in projected(opt)))


def test_weights_are_int8_between_steps_and_counted_in_state_bytes():
    m, opt = make()
    ps = projected(opt)
    assert len(ps) == 14                                       # 7 matrices x 2 blocks
    for p in ps:
        assert p.untyped_storage().nbytes() <= p.element_size()  # a 0-stride placeholder: no float weight held
        assert torch.isnan(p).all()                            # reading it outside the module is loudly wrong
        w = opt.weight_of(p)
        assert w.codes.dtype == torch.uint8 and w.codes.element_size() == 1
        assert p.numel() <= w.codes.numel() < p.numel() + 64
    n = sum(p.numel() for p in ps)
    assert codes_bytes(opt) == pytest.approx(n * (1 + 5 / 64), rel=0.01)   # 1 byte + scale/zero per group
    # state_bytes = GaLore's state + the INT8 weights, allocated and by formula
    m2 = tiny_llama()
    plain = lo.q_galore(m2, **OPTS)
    for o, mm in ((opt, m), (plain, m2)):
        o.zero_grad()
        mm.train()
        mm(**batch(1)).loss.backward()
        o.step()
    assert lo.state_bytes(opt) == lo.state_bytes(opt, allocated=False)
    assert lo.state_bytes(opt) - lo.state_bytes(plain) == codes_bytes(opt)
    # still int8 after training steps
    assert all(p.untyped_storage().nbytes() <= p.element_size() for p in ps)


def test_autograd_keeps_int8_not_a_float_copy_of_the_weight():
    m, opt = make()
    lin = m.model.layers[0].mlp.up_proj
    seen = {}
    lin.register_forward_pre_hook(lambda mod, a: seen.update(s=weakref.ref(mod.weight.untyped_storage())))
    m.train()
    loss = m(**batch(1)).loss                                   # graph alive, backward not yet run
    gc.collect()
    assert seen["s"]() is None                                  # the dequantised weight was freed after forward
    loss.backward()                                             # ... and rebuilt from the codes in backward
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_forward_and_gradients_equal_a_float_model_with_the_dequantised_weights():
    m, opt = make()
    ref = float_twin(m, opt)
    m.train(), ref.train()
    la, lb = m(**batch(3)).loss, ref(**batch(3)).loss
    torch.testing.assert_close(la, lb, atol=1e-6, rtol=1e-6)
    la.backward(), lb.backward()
    for (n, p), (_, pr) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, pr.grad, atol=1e-6, rtol=1e-5, msg=n)


def _on_grid(group=64, groups=4, seed=0):
    """A weight exactly representable in INT8, and a small update that leaves each group's min/max alone."""
    g = torch.Generator().manual_seed(seed)
    st = int8_weight_like(torch.empty(groups * group), group)
    quantize8_(torch.randn(groups * group, generator=g), st, group)
    W = dequantize8(st, (groups * group,), torch.float32)
    step = st.scale.repeat_interleave(group)                    # quantisation step of each entry
    u = (torch.rand(groups * group, generator=g) - 0.5) * 0.6 * step   # |u| < 0.3 step: RTN drops it
    x = W.view(groups, group)
    keep = (x == x.amin(1, keepdim=True)) | (x == x.amax(1, keepdim=True))
    u[keep.view(-1)] = 0
    return st, W, u, step


def test_stochastic_rounding_is_unbiased_and_round_to_nearest_drops_small_updates():
    st0, W, u, step = _on_grid()
    # round to nearest: every sub-half-step update is lost
    st = copy.deepcopy(st0)
    int8_update_(st, u)
    assert torch.equal(st.codes, st0.codes)                     # the same codes (scales equal up to fp32 ulps)
    torch.testing.assert_close(dequantize8(st, W.shape, torch.float32), W, atol=1e-6, rtol=0)
    # stochastic rounding: E[W'] = W + u (N draws; per-entry std <= step / 2 / sqrt(N))
    gen = torch.Generator().manual_seed(1)
    N = 2000
    acc = torch.zeros_like(W)
    for _ in range(N):
        st = copy.deepcopy(st0)
        int8_update_(st, u, generator=gen)
        w = dequantize8(st, W.shape, torch.float32)
        assert torch.all((w - W).abs() <= step * 1.0001)         # one grid point up or down, never more
        acc += w
    mean = acc / N
    err = (mean - (W + u)) / step                               # in units of the step
    assert err.abs().max() < 5 * 0.5 / N**0.5                    # 5 sigma per entry
    assert err.mean().abs() < 5 * 0.5 / (N * W.numel()) ** 0.5   # and no aggregate bias
    assert ((mean - W) / step).abs().mean() > 0.1                # the updates did survive (|u| ~ 0.15 step)


def test_small_updates_move_the_model_only_with_stochastic_rounding():
    # lr so small that every update (|lr D| <= lr * scale = 2.5e-6 with Adam) is far below half a
    # quantisation step (~2e-4 here): round to nearest keeps every code, stochastic rounding moves
    # about sum |lr D| / step of them, one grid point each
    flips = {}
    for sr in (False, True):
        m, opt = make(lr=1e-5, stochastic_round=sr)
        before = {id(p): opt.weight_of(p).codes.clone() for p in projected(opt)}
        half = min(float(opt.weight_of(p).scale.min()) for p in projected(opt)) / 2
        m.train()
        for t in range(3):
            opt.zero_grad()
            m(**batch(1 + t)).loss.backward()
            opt.step()
        assert 1e-5 * 0.25 < half / 10
        flips[sr] = sum(int((opt.weight_of(p).codes != before[id(p)]).sum()) for p in projected(opt))
    print("code flips", flips)
    assert flips[False] == 0, flips
    assert flips[True] > 20, flips


def test_training_lowers_the_loss_and_tracks_float_q_galore():
    losses = {}
    for bits in (None, 8):
        m = tiny_llama()
        opt = lo.q_galore(m, weight_bits=bits, **{**OPTS, "lr": 3e-3, "rank": 8, "update_gap": 10})
        m.train()
        for t in range(25):
            opt.zero_grad()
            m(**batch(1 + t % 4)).loss.backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            losses[bits] = float(sum(m(**batch(1 + k)).loss for k in range(4)) / 4)
    print("eval loss", losses)
    assert losses[8] < 4.0                                      # from ln(64) = 4.16 at init
    assert abs(losses[8] - losses[None]) < 0.1, losses


def test_state_dict_round_trip_resumes_bit_identically():
    m, opt = make()
    m.train()

    def run(model, o, t0, n):
        for t in range(t0, t0 + n):
            o.zero_grad()
            model(**batch(1 + t)).loss.backward()
            o.step()

    run(m, opt, 0, 3)
    msd, osd = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    run(m, opt, 3, 3)
    m2, opt2 = make()
    m2.train()
    m2.load_state_dict(msd)
    opt2.load_state_dict(osd)                   # after the model's: the optimizer's codes are exact
    run(m2, opt2, 3, 3)
    for a, b in zip(projected(opt), projected(opt2)):
        wa, wb = opt.weight_of(a), opt2.weight_of(b)
        assert torch.equal(wa.codes, wb.codes) and torch.equal(wa.scale, wb.scale)
    for (n, pa), (_, pb) in zip(m.named_parameters(), m2.named_parameters()):
        if not any(pa is q for q in projected(opt)):
            assert torch.equal(pa, pb), n


def test_model_state_dict_is_float_and_loading_requantizes():
    m, opt = make()
    sd = m.state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    p = m.model.layers[0].self_attn.q_proj.weight
    assert sd[key].dtype == torch.float32 and sd[key].is_contiguous() and torch.isfinite(sd[key]).all()
    torch.testing.assert_close(sd[key], dequantize8(opt.weight_of(p), p.shape, p.dtype))
    new = {k: v.clone() for k, v in sd.items()}
    new[key] = torch.full_like(sd[key], 0.5)
    new[key][0, 0] = -0.5
    m.load_state_dict(new)
    w = dequantize8(opt.weight_of(p), p.shape, p.dtype)
    half = 0.5 / 255 + 1e-6                                      # half a step of the range [-0.5, 0.5]
    assert abs(float(w[0, 0]) + 0.5) <= half and abs(float(w[1, 1]) - 0.5) <= half
    assert p.untyped_storage().nbytes() <= p.element_size()     # back to int8 after loading


def test_unquantize_restores_float_parameters():
    m, opt = make()
    p = m.model.layers[1].mlp.down_proj.weight
    w = dequantize8(opt.weight_of(p), p.shape, p.dtype)
    opt.unquantize()
    assert p.untyped_storage().nbytes() == p.numel() * 4 and torch.equal(p.detach(), w)
    m.train()
    m(**batch(1)).loss.backward()              # an ordinary float model again
    with pytest.raises(lowrank.ConfigError, match="unquantize"):
        opt.step()


def test_bad_input_names_the_option_and_leaves_the_model_alone():
    m = tiny_llama()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with pytest.raises(lowrank.ConfigError, match="weight_bits"):
        lo.q_galore(m, weight_bits=4, **OPTS)
    with pytest.raises(lowrank.ConfigError, match="nn.Module"):
        lo.q_galore(list(m.named_parameters()), weight_bits=8, **OPTS)
    with pytest.raises(lowrank.ConfigError, match="weight_group_size"):
        lo.q_galore(m, weight_bits=8, **{**OPTS, "weight_group_size": 1})
    with pytest.raises(lowrank.ShapeError):
        lo.q_galore(m, weight_bits=8, **{**OPTS, "rank": 99})
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n


def test_works_on_a_plain_mlp_and_layerwise():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 32))
    opt = lo.q_galore(m, lr=1e-2, rank=4, targets=["0", "2"], weight_bits=8, weight_group_size=32,
                      group_size=32, layerwise=True)
    x = torch.randn(16, 32)
    y = torch.randn(16, 32)
    first = None
    for _ in range(20):
        loss = (m(x) - y).square().mean()
        first = first if first is not None else float(loss.detach())
        loss.backward()                        # the update runs inside backward (layer-wise)
        opt.step()
    assert float((m(x) - y).square().mean()) < 0.9 * first
    assert all(p.grad is None for p in (m[0].weight, m[2].weight))
    assert isinstance(opt.weight_of(m[0].weight), Int8Weight)


def test_hugging_face_trainer_trains_and_checkpoints_int8_weights(tmp_path):
    from safetensors.torch import load_file
    from transformers import Trainer, TrainingArguments

    from test_optim_hf_trainer import Rows

    m, opt = make(tiny_llama(0))
    p = m.model.layers[0].mlp.up_proj.weight
    before = dequantize8(opt.weight_of(p), p.shape, p.dtype)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, save_steps=3,
                             report_to=[], use_cpu=True, logging_steps=1, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    Trainer(model=m, args=args, train_dataset=Rows(), optimizers=(opt, sched)).train()
    after = dequantize8(opt.weight_of(p), p.shape, p.dtype)
    assert not torch.equal(before, after)
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    torch.testing.assert_close(saved, after)                    # the checkpoint holds the float weights
    m2, fresh = make(tiny_llama(0))
    fresh.load_state_dict(torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True))
    assert torch.equal(fresh.weight_of(m2.model.layers[0].mlp.up_proj.weight).codes, opt.weight_of(p).codes)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    # checkpointing brings its own saved-tensor hooks and re-runs forward inside backward
    m, opt = make()
    ref = float_twin(m, opt)
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    m.train(), ref.train()
    m(**batch(2)).loss.backward()
    ref(**batch(2)).loss.backward()
    for (n, p), (_, pr) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, pr.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_int4_groups_hold_one_basis_vector_as_the_reference_stores_it(shape):
    """Q-GaLore quantises Vh_r (r, n) row by row for a tall weight and U_r (m, r) for a wide one:
    with group_size = d, a tall weight's groups are exactly its basis vectors."""
    from lowrank.optim.projectors import make_projector

    torch.manual_seed(0)
    g = torch.randn(*shape)
    transposed = shape[0] < shape[1]
    gp = g.mT if transposed else g                                   # (m', d), d the smaller side
    d, r = gp.shape[-1], 4
    pr = make_projector("int4", r, group_size=d)
    st = pr.init(d, gp, 0, transposed)
    pr.refresh([gp], [st], 1)
    q = pr.basis(st, gp)                                             # (d, r)
    _, _, vh = torch.linalg.svd(gp, full_matrices=False)
    torch.testing.assert_close((q.T @ vh[:r].T).abs(), torch.eye(r), atol=0.1, rtol=0)  # ~ the top-r basis
    if not transposed:
        exact = vh[:r]                                               # (r, d): one group per basis vector
        spans = (exact.amax(1) - exact.amin(1)) / 15
        torch.testing.assert_close(st.scale, spans, atol=1e-6, rtol=1e-5)
