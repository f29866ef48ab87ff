"""SVFit, SALT, LoLDU, asymmetric LoRA: each method's defining property."""

from __future__ import annotations

import pytest
import torch

import lowrank
from conftest import tiny_llama, tiny_mlp

X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _one(model):
    return next(iter((p, layer) for p, layer in lowrank.adapted_layers(model)))


def _train_steps(model, steps=3, lr=1e-2, wd=0.1):
    model.train()
    opt = torch.optim.AdamW([p for _, p in lowrank.trainable_parameters(model)], lr=lr, weight_decay=wd)
    for _ in range(steps):
        loss = model(X, labels=X).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_svfit_changes_only_singular_values():
    m = tiny_llama()
    W0 = {p: l.base.weight.detach().clone() for p, l in []}
    lowrank.adapt(m, "svfit", targets=["q_proj", "up_proj"], rank=4)
    W0 = {p: layer.base.weight.detach().clone() for p, layer in lowrank.adapted_layers(m)}
    assert lowrank.count_parameters(m)[0] == 4 * 4
    _train_steps(m, steps=2, lr=0.05)
    lowrank.merge(m)
    for p, layer in lowrank.adapted_layers(m):
        U, S, Vh = torch.linalg.svd(W0[p].double(), full_matrices=False)
        core = U.T @ layer.base.weight.detach().double() @ Vh.T  # base's singular vectors diagonalise W'
        off = core - torch.diag(torch.diagonal(core))
        assert off.abs().max() < 1e-5, p
        new = torch.diagonal(core)
        assert (new[:4] - S[:4]).abs().max() > 1e-3, "top singular values must have moved"
        torch.testing.assert_close(new[4:], S[4:], atol=1e-5, rtol=0)  # the rest is untouched


def test_svfit_rank_above_width_is_a_shape_error():
    m = tiny_mlp()
    with pytest.raises(lowrank.ShapeError, match="'4'"):
        lowrank.adapt(m, "svfit", targets=["4"], rank=17)  # the 16x32 head has 16 singular values
    assert not any(isinstance(mod, lowrank.AdaptedLayer) for mod in m.modules())


def test_salt_top_spectrum_scaled_and_rest_update_confined_to_remaining_subspace():
    m = tiny_llama()
    lowrank.adapt(m, "salt", targets=["q_proj"], rank=4, lora_rank=2)
    _, layer = _one(m)
    a = layer.adapters["default"]
    U, S, Vh = torch.linalg.svd(layer.base.weight.detach().double(), full_matrices=False)
    with torch.no_grad():
        a.salt_scale.copy_(torch.tensor([1.5, 0.5, 1.0, 2.0]))
        a.salt_shift.copy_(torch.tensor([0.0, 0.1, -0.1, 0.0]))
    dw = a.delta_weight().double()
    W1 = layer.base.weight.detach().double() + dw
    core = U.T @ W1 @ Vh.T
    expect = torch.relu(torch.tensor([1.5, 0.5, 1.0, 2.0]).double() * S[:4] + torch.tensor([0.0, 0.1, -0.1, 0.0]).double())
    torch.testing.assert_close(torch.diagonal(core)[:4], expect, atol=1e-5, rtol=0)
    with torch.no_grad():
        a.salt_scale.fill_(1.0)
        a.salt_shift.zero_()
        a.salt_Y.normal_()
    rest = a.delta_weight().double()
    assert rest.abs().max() > 1e-3
    assert (U[:, :4].T @ rest).abs().max() < 1e-5 and (rest @ Vh[:4].T).abs().max() < 1e-5
    cls = lowrank.get_method("salt")
    assert cls.trainable_count(32, 32, 4, lora_rank=2) == 8 + 2 * 28 * 2


def test_salt_regulariser_is_the_reference_penalty_through_aux_loss():
    """reg_weight · (‖diag(aσ+b) − diag(σ)‖_F + ‖X Y‖_F); none by default; finite gradients at Y = 0."""
    m = tiny_llama()
    lowrank.adapt(m, "salt", targets=["q_proj"], rank=4, lora_rank=2, reg_weight=0.01)
    m.train()
    _, layer = _one(m)
    a = layer.adapters["default"]
    loss = lowrank.aux_loss(m)
    assert loss.item() == 0.0                          # a = 1, b = 0, Y = 0 at init
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in (a.salt_X, a.salt_Y, a.salt_scale, a.salt_shift))
    with torch.no_grad():
        a.salt_scale.mul_(1.5)
        a.salt_shift.add_(0.1)
        a.salt_Y.normal_()
    s0 = a.salt_sigma0
    expect = 0.01 * ((0.5 * s0 + 0.1).norm() + (a.salt_X @ a.salt_Y).norm())
    torch.testing.assert_close(lowrank.aux_loss(m), expect, rtol=1e-5, atol=1e-7)  # the other layer adds 0
    plain = tiny_llama()
    lowrank.adapt(plain, "salt", targets=["q_proj"], rank=4, lora_rank=2)
    assert lowrank.aux_loss(plain.train()) is None
    with pytest.raises(lowrank.ConfigError, match="reg_weight"):
        lowrank.adapt(tiny_llama(), "salt", targets=["q_proj"], rank=4, reg_weight=-1.0)


def test_salt_bad_ranks():
    with pytest.raises(lowrank.ShapeError, match="remaining subspace"):
        lowrank.adapt(tiny_mlp(), "salt", targets=["4"], rank=16)
    with pytest.raises(lowrank.ConfigError, match="lora_rank"):
        lowrank.adapt(tiny_mlp(), "salt", targets=["4"], rank=4, lora_rank=0)


def test_asymmetric_A_never_changes_and_is_orthonormal():
    m = tiny_llama()
    lowrank.adapt(m, "asymmetric", targets=["q_proj", "down_proj"], rank=4)
    As = {p: l.adapters["default"].lora_A.clone() for p, l in lowrank.adapted_layers(m)}
    Bs = {p: l.adapters["default"].lora_B.detach().clone() for p, l in lowrank.adapted_layers(m)}
    for A in As.values():
        torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)
    _train_steps(m, steps=3)
    for p, layer in lowrank.adapted_layers(m):
        a = layer.adapters["default"]
        assert torch.equal(a.lora_A, As[p]), "A must never change"
        assert not torch.equal(a.lora_B.detach(), Bs[p]), "B must train"
    names = {n.rsplit(".", 1)[1] for n, _ in lowrank.trainable_parameters(m)}
    assert names == {"lora_B"}


def test_loldu_only_the_diagonal_trains_and_ldu_reconstructs_W():
    from lowrank.adapters.loldu import ldu

    W = tiny_mlp()[0].weight.detach()  # 48 x 32
    PL, D, U = ldu(W, 32)
    torch.testing.assert_close((PL * D) @ U, W, atol=1e-5, rtol=0)
    m = tiny_llama()
    lowrank.adapt(m, "loldu", targets=["q_proj", "up_proj"], rank=4)
    assert lowrank.count_parameters(m)[0] == 4 * 4         # z only, as the reference (s = alpha / r = 1 / 4)
    names = {n.rsplit(".", 1)[1] for n, _ in lowrank.trainable_parameters(m)}
    assert names == {"loldu_z"}
    assert all(float(layer.adapters["default"].loldu_scale) == 0.25 for _, layer in lowrank.adapted_layers(m))
    both = tiny_llama()
    lowrank.adapt(both, "loldu", targets=["q_proj"], rank=4, train_scale=True)
    assert {n.rsplit(".", 1)[1] for n, _ in lowrank.trainable_parameters(both)} == {"loldu_z", "loldu_scale"}
    assert lowrank.count_parameters(both)[0] == 2 * (4 + 1)
    _train_steps(m, steps=2)
    for _, layer in lowrank.adapted_layers(m):
        a = layer.adapters["default"]
        dw = a.delta_weight()
        # the update stays in the span of L_r (columns) and U_r (rows) of W's LDU
        coef = torch.linalg.lstsq(a.loldu_L, dw).solution  # (r, in)
        torch.testing.assert_close(a.loldu_L @ coef, dw, atol=1e-5, rtol=0)
        c = torch.linalg.lstsq(a.loldu_U.T, coef.T).solution.T  # (r, r): must be diagonal
        assert (c - torch.diag(torch.diagonal(c))).abs().max() < 1e-4


def test_svd_adapter_refuses_another_base(tmp_path):
    m = tiny_llama()
    lowrank.adapt(m, "svfit", targets=["q_proj"], rank=4)
    lowrank.save_adapter(m, tmp_path / "a")
    other = tiny_llama(seed=1)
    with pytest.raises(lowrank.AdapterLoadError, match="another base model"):
        lowrank.load_adapter(other, tmp_path / "a")


@pytest.mark.parametrize("method", ["asymmetric", "lori"])
def test_random_A_regenerated_from_seed_not_saved(method, tmp_path):
    import json

    from safetensors.torch import load_file

    m = tiny_llama()
    lowrank.adapt(m, method, targets=["q_proj", "v_proj"], rank=4, seed=5)
    As = [layer.adapters["default"].lora_A for _, layer in lowrank.adapted_layers(m)]
    assert not torch.equal(As[0], As[1]), "each layer draws its own A"
    _train_steps(m, steps=1)
    lowrank.save_adapter(m, tmp_path / "a")
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert not any(k.endswith(".lora_A") for k in keys)
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "a")
    for a, b in zip(As, [layer.adapters["default"].lora_A for _, layer in lowrank.adapted_layers(fresh)]):
        assert torch.equal(a, b)
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lowrank"]["options"]["seed"] = 6
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(lowrank.AdapterLoadError, match="seed/basis mismatch"):
        lowrank.load_adapter(tiny_llama(), tmp_path / "a")
