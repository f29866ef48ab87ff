"""Adapter-side optimizers (issue 4): LoRA+, LoRA-Pro, LoFT, ALLoRA — each paper's defining property."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowrank
from lowrank.optim import allora, loft, lora_pro, loraplus
from lowrank.optim.adapter_side.allora import allora_coefficients
from lowrank.optim.adapter_side.loft import quad_rows
from lowrank.optim.adapter_side.lora_pro import equivalent_gradient, lora_pro_adjust

from conftest import model_input, run_model, tiny_llama, tiny_mlp

FACTORIES = {"loraplus": loraplus, "lora_pro": lora_pro, "loft": loft, "allora": allora}
torch.set_default_dtype(torch.float32)


def _adapted_mlp(rank=4, seed=0, perturb=0.3, head=False):
    model = tiny_mlp(seed)
    kw = {"targets": ["0", "2"], "modules_to_save": ["4"]} if head else {}
    lowrank.adapt(model, "lora", rank=rank, alpha=2 * rank, **kw)
    if perturb:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for _, layer in lowrank.adapted_layers(model):
                B = layer.adapters["default"].B
                B.copy_(perturb * torch.randn(B.shape, generator=g))
    return model


def _loss(model, seed=1):
    x = model_input("mlp", seed)["input"]
    return run_model(model, "mlp", {"input": x}).pow(2).mean() + run_model(model, "mlp", {"input": x}).sum() * 0.1


def _full_gradients(model, seed=1):
    """Full weight gradients G = ∂L/∂W_eff per adapted layer (from a merged copy), and the factor
    gradients of the adapted model itself."""
    paths = [path for path, _ in lowrank.adapted_layers(model)]
    merged = lowrank.unload(copy.deepcopy(model))  # W_eff = W + s B A, plain modules
    for p in merged.parameters():
        p.requires_grad_(True)
    _loss(merged, seed).backward()
    model.zero_grad(set_to_none=True)
    _loss(model, seed).backward()
    out = []
    for path, (_, layer) in zip(paths, lowrank.adapted_layers(model)):
        ad = layer.adapters["default"]
        G = merged.get_submodule(path).weight.grad.clone()
        out.append((ad, G, ad.A.grad.clone(), ad.B.grad.clone()))
    return out


def _train(model, opt, steps, sched=None):
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        _loss(model, seed=1 + i % 3).backward()
        opt.step()
        if sched is not None:
            sched.step()


# ---------------------------------------------------------------------------------------- common
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_no_factor_adapters_is_a_config_error(name):
    with pytest.raises(lowrank.ConfigError, match=name):
        FACTORIES[name](nn.Sequential(nn.Linear(4, 4)), 1e-3)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_state_dict_round_trip_resumes_bit_identically(name):
    model = _adapted_mlp(head=True)
    opt = FACTORIES[name](model, 1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    _train(model, opt, 3, sched)
    twin = copy.deepcopy(model)  # (ALLoRA: the factory replaces the hooks the copy carries)
    opt2 = FACTORIES[name](twin, 1e-2)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.9)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    sched2.load_state_dict(sched.state_dict())
    for m, o, s in ((model, opt, sched), (twin, opt2, sched2)):
        o.zero_grad()
        _loss(m, seed=5).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        o.step()
        s.step()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n
    assert opt.state_bytes() == opt2.state_bytes() > 0


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_nonfinite_gradients_never_reach_weights_or_moments(name):
    model = _adapted_mlp(head=True)
    opt = FACTORIES[name](model, 1e-2)
    _train(model, opt, 2)
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    _loss(model).backward()
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                assert torch.equal(v, state_before[k][key]), (k, key)
    raising = FACTORIES[name](model, 1e-2, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        raising.step()


# ---------------------------------------------------------------------------------------- LoRA+
def test_loraplus_is_adamw_with_b_at_ratio_times_lr():
    model = _adapted_mlp(head=True)
    ref = copy.deepcopy(model)
    opt = loraplus(model, 1e-3, ratio=16)
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"A": 1e-3, "B": 16e-3, "other": 1e-3, "other_no_decay": 1e-3}
    groups = {"A": [], "B": [], "other": [], "other_no_decay": []}
    adapters = [layer.adapters["default"] for _, layer in lowrank.adapted_layers(ref)]
    ids_A = {id(a.A) for a in adapters}
    ids_B = {id(a.B) for a in adapters}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            other = "other_no_decay" if "bias" in n else "other"
            groups["A" if id(p) in ids_A else "B" if id(p) in ids_B else other].append(p)
    ref_opt = torch.optim.AdamW([{"params": v, "lr": lrs[k]} for k, v in groups.items()], weight_decay=0.0)
    _train(model, opt, 4)
    _train(ref, ref_opt, 4)
    for (n, a), (_, b) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_loraplus_leaves_biases_and_layernorms_without_weight_decay():
    """As the reference (the transformers Trainer's rule): no decay on biases and LayerNorm weights."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8))
    lowrank.adapt(model, "lora", targets=["0"], rank=4)
    for n, p in model.named_parameters():
        if n.startswith(("1.", "2.")):
            p.requires_grad_(True)
    opt = loraplus(model, 1e-2, weight_decay=0.1)
    decay = {g["role"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"A": 0.1, "B": 0.1, "other": 0.1, "other_no_decay": 0.0}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = next(g for g in opt.param_groups if g["role"] == "other_no_decay")["params"]
    assert sorted(names[id(p)] for p in no_decay) == ["1.bias", "1.weight", "2.bias"]


# ---------------------------------------------------------------------------------------- LoRA-Pro
def _achievable_projection(A, B, G, s):
    """Least-squares best s(B M + N A) ≈ G over all M (r, in), N (out, r): the reference answer."""
    out, r = B.shape
    inn = A.shape[1]
    cols = []
    for k in range(r * inn):  # columns of the linear map vec(M) -> vec(s B M)
        M = torch.zeros(r * inn, dtype=torch.float64)
        M[k] = 1
        cols.append((s * B.double() @ M.view(r, inn)).reshape(-1))
    for k in range(out * r):
        N = torch.zeros(out * r, dtype=torch.float64)
        N[k] = 1
        cols.append((s * N.view(out, r) @ A.double()).reshape(-1))
    J = torch.stack(cols, 1)
    sol = torch.linalg.lstsq(J, G.double().reshape(-1, 1), driver="gelsd").solution
    return (J @ sol).view(out, inn)


def test_lora_pro_equivalent_gradient_is_the_best_achievable_approximation():
    model = _adapted_mlp(rank=3)
    for ad, G, gA, gB in _full_gradients(model)[:2]:
        A, B, s = ad.A.detach(), ad.B.detach(), ad.scaling
        torch.testing.assert_close(gA, s * B.T @ G, rtol=1e-4, atol=1e-6)  # chain rule holds
        best = _achievable_projection(A, B, G, s)
        adjA, adjB = lora_pro_adjust(A, B, gA, gB, s)
        g_pro = equivalent_gradient(A, B, adjA, adjB, s)
        g_lora = equivalent_gradient(A, B, gA, gB, s)
        torch.testing.assert_close(g_pro.double(), best, rtol=1e-3, atol=1e-6)
        err_pro = (g_pro - G).norm()
        assert err_pro <= (best.float() - G).norm() * (1 + 1e-4)
        assert err_pro < 0.9 * (g_lora - G).norm(), "plain LoRA's equivalent gradient should be clearly worse"
        # X does not change the equivalent gradient ...
        for mode in ("zero", "symmetry"):
            a2, b2 = lora_pro_adjust(A, B, gA, gB, s, x_mode=mode)
            torch.testing.assert_close(equivalent_gradient(A, B, a2, b2, s), g_pro, rtol=1e-4, atol=1e-6)
        # ... and the Sylvester X gives the pair closest to the plain gradients among all X
        a0, b0 = lora_pro_adjust(A, B, gA, gB, s, x_mode="zero")
        r = A.shape[0]
        # minimise ||a0 + X A - gA||² + ||b0 - B X - gB||² over X by least squares
        J = torch.cat([torch.kron(torch.eye(r), A.T.contiguous()), -torch.kron(B, torch.eye(r))]).double()
        rhs = torch.cat([(gA - a0).reshape(-1), (gB - b0).reshape(-1)]).double()
        X = torch.linalg.lstsq(J, rhs[:, None]).solution.view(r, r).float()
        torch.testing.assert_close(adjA, a0 + X @ A, rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(adjB, b0 - B @ X, rtol=1e-3, atol=1e-5)


def test_lora_pro_full_mode_keeps_adam_moments_of_the_projected_full_gradient():
    model = _adapted_mlp(rank=3)
    info = _full_gradients(model)
    opt = lora_pro(model, 1e-3)
    model.zero_grad()
    _loss(model).backward()
    before = [(ad.A.detach().clone(), ad.B.detach().clone()) for ad, *_ in info]
    opt.step()
    for (ad, G, _, _), (A0, B0) in zip(info, before):
        st = opt.state[ad.A]
        best = _achievable_projection(A0, B0, G, ad.scaling).float()
        torch.testing.assert_close(st["exp_avg"], 0.1 * best, rtol=1e-3, atol=1e-7)
        assert st["exp_avg"].shape == G.shape
        # the applied ΔW (to first order) lies in the achievable set {B M + N A}
        dW = ad.scaling * (ad.B.detach() @ A0 + B0 @ ad.A.detach() - 2 * B0 @ A0)
        torch.testing.assert_close(_achievable_projection(A0, B0, dW, 1.0).float(), dW, rtol=1e-3, atol=1e-7)
    pairs = [(ad.A.shape, ad.B.shape) for ad, *_ in info]
    assert opt.state_bytes() == sum(2 * b[0] * a[1] * 4 + 4 for a, b in pairs)


def test_lora_pro_batches_same_shaped_layers_exactly_like_one_at_a_time():
    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=2)
    with torch.no_grad():
        for _, layer in lowrank.adapted_layers(model):
            layer.adapters["default"].B.normal_(0, 0.1)
    ids = model_input("llama")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    ads = [layer.adapters["default"] for _, layer in lowrank.adapted_layers(model)]
    one = [lora_pro_adjust(a.A.detach(), a.B.detach(), a.A.grad, a.B.grad, a.scaling) for a in ads]
    expected = [0.1 * equivalent_gradient(a.A.detach(), a.B.detach(), *lora_pro_adjust(
        a.A.detach(), a.B.detach(), a.A.grad, a.B.grad, a.scaling, "zero"), a.scaling) for a in ads]
    same = [a for a in ads if a.A.shape == ads[0].A.shape and a.B.shape == ads[0].B.shape]
    assert len(same) > 1
    bA, bB = lora_pro_adjust(torch.stack([a.A.detach() for a in same]), torch.stack([a.B.detach() for a in same]),
                             torch.stack([a.A.grad for a in same]), torch.stack([a.B.grad for a in same]),
                             same[0].scaling)
    for i, a in enumerate(same):
        k = ads.index(a)
        torch.testing.assert_close(bA[i], one[k][0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(bB[i], one[k][1], rtol=1e-4, atol=1e-7)
    opt = lora_pro(model, 1e-3)
    opt.step()
    for a, e in zip(ads, expected):
        torch.testing.assert_close(opt.state[a.A]["exp_avg"], e, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------------------------------- LoFT
def test_loft_at_full_rank_is_exactly_adamw_on_the_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    x, y = torch.randn(16, 6), torch.randn(16, 6)
    full = copy.deepcopy(model)
    lowrank.adapt(model, "lora", rank=6, alpha=12)
    with torch.no_grad():
        for _, layer in lowrank.adapted_layers(model):
            layer.adapters["default"].B.copy_(torch.randn(6, 6) * 0.2 + torch.eye(6))
            layer.base_layer.weight.sub_(layer.adapters["default"].delta_weight())  # same W_eff as `full`
    for n, p in full.named_parameters():
        p.requires_grad_(n.endswith("weight"))
    opt = loft(model, 1e-2, eps=1e-4, damping_a=1e-12, damping_b=1e-12)
    ref = torch.optim.AdamW([p for p in full.parameters() if p.requires_grad], lr=1e-2, eps=1e-4, weight_decay=0)
    for _ in range(8):
        for m, o in ((model, opt), (full, ref)):
            o.zero_grad()
            (m(x) - y).pow(2).mean().backward()
            o.step()
    for (_, layer), w in zip(lowrank.adapted_layers(model), (full[0].weight, full[2].weight)):
        w_eff = layer.base_layer.weight + layer.adapters["default"].delta_weight()
        torch.testing.assert_close(w_eff, w, rtol=1e-4, atol=1e-5)


def test_loft_step_is_the_projected_full_update_and_moments_follow_the_subspace():
    model = _adapted_mlp(rank=3)
    info = _full_gradients(model)
    lr, eps, b1, b2 = 1e-2, 1e-4, 0.9, 0.999
    opt = loft(model, lr, damping_a=1e-12, damping_b=1e-12)
    model.zero_grad()
    _loss(model).backward()
    before = [(ad.A.detach().clone(), ad.B.detach().clone()) for ad, *_ in info]
    opt.step()  # step 1 moves B only
    for (ad, G, gA, _), (A0, B0) in zip(info, before):
        s = ad.scaling
        assert torch.equal(ad.A.detach(), A0)
        At, Bt0, Bt1 = s * A0, s * B0, s * ad.B.detach()
        P_A = At.T @ torch.linalg.solve(At @ At.T, At)  # projector onto Ã's row space
        GP = G @ P_A
        U = GP / (GP.abs() + eps)  # first Adam step on the projected gradient
        torch.testing.assert_close((Bt1 - Bt0) @ A0, -lr * U @ P_A, rtol=1e-3, atol=1e-6)
        # A's statistics were carried into the new B subspace: B̃' m_A = P_B̃' (B̃ m_A_old)
        old_full = Bt0 @ torch.linalg.solve(Bt0.T @ Bt0, gA)  # B̃ c_A = P_B̃ G
        P_B1 = Bt1 @ torch.linalg.solve(Bt1.T @ Bt1, Bt1.T)
        st = opt.state[ad.A]
        torch.testing.assert_close(Bt1 @ st["exp_avg"], (1 - b1) * P_B1 @ old_full, rtol=1e-3, atol=1e-7)
        v = quad_rows(Bt1, st["row_products"])
        torch.testing.assert_close(v, (1 - b2) * (P_B1 @ old_full) ** 2, rtol=1e-3, atol=1e-9)
    r_, sizes = 3, [(ad.A.shape[1], ad.B.shape[0]) for ad, *_ in info]
    assert opt.state_bytes() == sum((r_ * (i + o) + r_ * r_ * (i + o)) * 4 + 8 for i, o in sizes)


# ---------------------------------------------------------------------------------------- ALLoRA
def test_allora_rescales_factor_gradients_per_row_and_leaves_input_gradients_alone():
    model = _adapted_mlp(rank=3, perturb=0.3)
    plain = copy.deepcopy(model)
    info = _full_gradients(plain)
    eta = 1.5
    allora(model, 1e-3, eta=eta)
    x = model_input("mlp", 1)["input"].requires_grad_(True)
    x_plain = x.detach().clone().requires_grad_(True)
    for m, xi in ((model, x), (plain, x_plain)):
        m.zero_grad()
        out = run_model(m, "mlp", {"input": xi})
        (out.pow(2).mean() + out.sum() * 0.1).backward()
    torch.testing.assert_close(x.grad, x_plain.grad)  # the gradient to earlier layers is untouched
    for (_, layer), (ad, G, _, _) in zip(lowrank.adapted_layers(model), info):
        mine = layer.adapters["default"]
        A, B, s = mine.A.detach(), mine.B.detach(), mine.scaling
        c = 1.0 / torch.sqrt((s * B @ A).norm(dim=1) + 1.0 / eta**2)
        torch.testing.assert_close(allora_coefficients(A, B, s, eta), c)
        torch.testing.assert_close(mine.A.grad, s * B.T @ (c[:, None] * G), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(mine.B.grad, s * (c[:, None] * G) @ A.T, rtol=1e-4, atol=1e-7)
        assert c.std() > 1e-3, "rows of different norm must get different coefficients"
    with torch.no_grad():  # inference is plain LoRA
        torch.testing.assert_close(run_model(model, "mlp", {"input": x}), run_model(plain, "mlp", {"input": x}))


def test_allora_at_zero_update_scales_gradients_by_eta():
    model = _adapted_mlp(rank=3, perturb=0)  # B = 0: ‖ΔW_i‖ = 0 so c_i = η
    plain = copy.deepcopy(model)
    allora(model, 1e-3, eta=3.0)
    for m in (model, plain):
        m.zero_grad()
        _loss(m).backward()
    for (_, a), (_, b) in zip(lowrank.adapted_layers(model), lowrank.adapted_layers(plain)):
        torch.testing.assert_close(a.adapters["default"].B.grad, 3.0 * b.adapters["default"].B.grad)


def test_allora_hooks_are_installed_once_and_removable():
    model = _adapted_mlp(rank=3)
    plain = copy.deepcopy(model)
    opt = allora(model, 1e-3)
    allora(model, 1e-3)  # a second install replaces, never stacks
    assert all(len(layer.adapters["default"]._forward_hooks) == 1 for _, layer in lowrank.adapted_layers(model))
    opt.remove_hooks()
    for m in (model, plain):
        m.zero_grad()
        _loss(m).backward()
    for (_, a), (_, b) in zip(lowrank.adapted_layers(model), lowrank.adapted_layers(plain)):
        assert not a.adapters["default"]._forward_hooks
        torch.testing.assert_close(a.adapters["default"].A.grad, b.adapters["default"].A.grad)


def test_allora_refuses_adapters_not_of_the_plain_form():
    model = tiny_mlp()
    lowrank.adapt(model, "dora", rank=2)
    with pytest.raises(lowrank.ConfigError, match="allora"):
        allora(model, 1e-3)
    assert all(not layer.adapters["default"]._forward_hooks for _, layer in lowrank.adapted_layers(model))


# ---------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", ["loraplus", "lora-pro", "loft", "allora"])
def test_recipes_adapt_with_lora_and_train_the_head(recipe, tmp_path):
    from lowrank.recipes import TaskInfo, get_recipe

    model = tiny_llama()
    prep = get_recipe(recipe).build(model, TaskInfo("finetune", ["lm_head"]), lr=1e-3, rank=2)
    assert isinstance(prep.optimizer, torch.optim.Optimizer)
    assert lowrank.adapter_record(model)["method"] == "lora"
    head = model.lm_head.weight
    assert head.requires_grad
    ids = model_input("llama")["input_ids"]
    before = head.detach().clone()
    for _ in range(2):
        prep.optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        prep.optimizer.step()
    assert not torch.equal(before, head.detach())
    prep.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    "cls_name, kw",
    [("LoRAPlus", {}), ("LoRAPro", {}), ("LoRAPro", {"mode": "efficient"}), ("LoFT", {}), ("ALLoRA", {})],
)
def test_state_bytes_formula_on_a_meta_model_matches_what_is_held(cls_name, kw):
    import lowrank.optim.adapter_side as side

    cls = getattr(side, cls_name)
    with torch.device("meta"):
        meta = tiny_llama()
    lowrank.adapt(meta, "lora", rank=2, modules_to_save=["lm_head"])
    assert next(p for p in meta.parameters() if p.requires_grad).is_meta
    expected = cls.expected_state_bytes(meta, **kw)
    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=2, modules_to_save=["lm_head"])
    opt = cls(model, 1e-3, **kw)
    ids = model_input("llama")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert opt.state_bytes() == expected
