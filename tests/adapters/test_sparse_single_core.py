"""LoRI, SingLoRA, PMSS, LaMDA, DenseLoRA: each method's defining property."""

from __future__ import annotations

import pytest
import torch

import lowrank
from conftest import tiny_llama, tiny_mlp

X = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _ads(model):
    return {p: layer.adapters["default"] for p, layer in lowrank.adapted_layers(model)}


def _train(model, steps=3, lr=1e-2, wd=0.1):
    model.train()
    opt = torch.optim.AdamW([p for _, p in lowrank.trainable_parameters(model)], lr=lr, weight_decay=wd)
    for _ in range(steps):
        loss = model(X, labels=X).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return opt


# ---- LoRI ------------------------------------------------------------------------------------
def test_lori_B_keeps_exactly_its_mask_sparsity_after_steps():
    from lowrank.adapters.lori import calibrate_masks

    m = tiny_llama()
    lowrank.adapt(m, "lori", targets=["q_proj", "v_proj", "down_proj"], rank=4, sparsity=0.75)
    A0 = {p: a.lora_A.clone() for p, a in _ads(m).items()}
    _train(m, steps=2)  # LoRI-D: dense B
    with pytest.raises(lowrank.ConfigError, match="scope"):
        calibrate_masks(m, scope="global")
    got = calibrate_masks(m, scope="layer")
    for p, a in _ads(m).items():
        assert got[p] == pytest.approx(0.75, abs=1 / a.lori_mask.numel())
    masks = {p: a.lori_mask.clone() for p, a in _ads(m).items()}
    _train(m, steps=4)  # LoRI-S: AdamW with weight decay under the mask
    for p, a in _ads(m).items():
        B = a.lora_B.detach()
        assert torch.equal(B[masks[p] == 0], torch.zeros_like(B[masks[p] == 0])), p
        assert (B[masks[p] == 1] != 0).float().mean() > 0.9, "unmasked entries must train"
        assert torch.equal(a.lori_mask, masks[p]) and torch.equal(a.lora_A, A0[p])


def test_lori_global_mask_over_all_layers_and_saved(tmp_path):
    from lowrank.adapters.lori import calibrate_masks

    m = tiny_llama()
    lowrank.adapt(m, "lori", targets=["q_proj", "up_proj"], rank=4)  # default sparsity 0.9
    with pytest.raises(lowrank.ConfigError, match="trained dense B"):
        calibrate_masks(m)
    _train(m, steps=2)
    calibrate_masks(m)
    total = sum(a.lori_mask.numel() for a in _ads(m).values())
    kept = sum(a.lori_mask.sum().item() for a in _ads(m).values())
    assert kept == int((1 - 0.9) * total)  # rounded down, as the reference (0.0999.. * total)
    _train(m, steps=1)
    lowrank.save_adapter(m, tmp_path / "a")
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "a")
    for (p, a), b in zip(_ads(m).items(), _ads(fresh).values()):
        assert torch.equal(a.lori_mask, b.lori_mask) and torch.equal(a.delta_weight(), b.delta_weight())


@pytest.mark.parametrize("s", [1.0, -0.1, 1.5])
def test_lori_sparsity_out_of_range(s):
    with pytest.raises(lowrank.ConfigError, match="sparsity"):
        lowrank.adapt(tiny_llama(), "lori", targets=["q_proj"], rank=4, sparsity=s)


# ---- SingLoRA ------------------------------------------------------------------------------------
def test_singlora_symmetric_update_for_square_and_ramp_from_base():
    m = tiny_llama()
    base_out = m(X).logits.detach()
    lowrank.adapt(m, "singlora", targets=["q_proj", "o_proj", "up_proj"], rank=4, ramp_up_steps=4)
    with torch.no_grad():
        torch.testing.assert_close(m(X).logits, base_out, atol=1e-6, rtol=0)  # u(0) = 0
    _train(m, steps=2)
    for p, a in _ads(m).items():
        assert int(a.singlora_step) == 2 and a.ramp() == 0.5
        dw = a.delta_weight()
        if a.in_features == a.out_features:
            torch.testing.assert_close(dw, dw.T, atol=1e-6, rtol=0)
            assert dw.abs().max() > 0
        else:  # non-square: A* = the first rows of the single A
            A = a.singlora_A.detach()
            expect = a.scaling * 0.5 * A[: a.out_features] @ A[: a.in_features].T
            torch.testing.assert_close(dw, expect)
            assert a.singlora_A.shape == (max(a.in_features, a.out_features), 4)
    assert lowrank.count_parameters(m)[0] == 2 * 4 * (32 + 32 + 64)
    _train(m, steps=3)
    assert all(a.ramp() == 1.0 for a in _ads(m).values())


def test_singlora_first_training_step_already_trains_a():
    """t counts the current training step: u = 1/T at step 1, so A moves from the first step."""
    m = tiny_llama()
    lowrank.adapt(m, "singlora", targets=["q_proj"], rank=4, ramp_up_steps=4)
    m.train()
    m(X, labels=X).loss.backward()
    for a in _ads(m).values():
        assert int(a.singlora_step) == 1 and a.ramp() == 0.25
        assert a.singlora_A.grad is not None and a.singlora_A.grad.abs().max() > 0


def test_singlora_bad_options():
    with pytest.raises(lowrank.ConfigError, match="ramp_up_steps"):
        lowrank.adapt(tiny_llama(), "singlora", targets=["q_proj"], rank=4, ramp_up_steps=-1)
    with pytest.raises(lowrank.ShapeError, match="'4'"):
        lowrank.adapt(tiny_mlp(), "singlora", targets=["4"], rank=20)


# ---- PMSS ------------------------------------------------------------------------------------
def test_pmss_skeletons_are_columns_and_rows_of_W_and_only_core_trains():
    m = tiny_llama()
    lowrank.adapt(m, "pmss", targets=["q_proj", "up_proj"], rank=8)
    assert lowrank.count_parameters(m)[0] == 4 * 64
    _train(m, steps=2)
    for p, layer in lowrank.adapted_layers(m):
        a = layer.adapters["default"]
        W = layer.base.weight.detach()
        torch.testing.assert_close(a.pmss_C, W[:, a.pmss_cols])
        torch.testing.assert_close(a.pmss_R, W[a.pmss_rows, :])
        assert len(set(a.pmss_cols.tolist())) == 8 and len(set(a.pmss_rows.tolist())) == 8
        # the skeletons are well conditioned (pivoting picks independent columns)
        assert torch.linalg.matrix_rank(a.pmss_C.double()) == 8
        dw = a.delta_weight()
        assert dw.abs().max() > 0
        core = torch.linalg.pinv(a.pmss_C.double()) @ dw.double() @ torch.linalg.pinv(a.pmss_R.double())
        torch.testing.assert_close(core.float(), a.scaling * a.pmss_M.detach(), atol=1e-4, rtol=1e-3)


def test_pmss_rank_too_large():
    with pytest.raises(lowrank.ShapeError, match="skeleton"):
        lowrank.adapt(tiny_mlp(), "pmss", targets=["4"], rank=17)


# ---- LaMDA ------------------------------------------------------------------------------------
def test_lamda_A_frozen_core_trains_and_B_freezes_on_schedule():
    m = tiny_llama()
    lowrank.adapt(m, "lamda", targets=["q_proj", "down_proj"], rank=4, freeze_b_steps=2, freeze_b="all")
    A0 = {p: a.lamda_A.clone() for p, a in _ads(m).items()}
    assert lowrank.count_parameters(m)[0] == 4 * (4 * 32 + 4 * 4)
    opt = _train(m, steps=2)
    B_at_freeze = {p: a.lamda_B.detach().clone() for p, a in _ads(m).items()}
    S_before = {p: a.lamda_S.detach().clone() for p, a in _ads(m).items()}
    assert all(a.lamda_B.abs().max() > 0 for a in _ads(m).values()), "B trains before the freeze"
    m.train()
    for _ in range(2):  # same optimizer: B must not move any more (no grad, skipped by AdamW)
        loss = m(X, labels=X).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p, a in _ads(m).items():
        assert not a.lamda_B.requires_grad and a.lamda_B.grad is None
        assert torch.equal(a.lamda_B.detach(), B_at_freeze[p])
        assert not torch.equal(a.lamda_S.detach(), S_before[p])
        assert torch.equal(a.lamda_A, A0[p])
    assert lowrank.count_parameters(m)[0] == 4 * 16


def test_lamda_freezes_b_one_column_at_a_time_by_default():
    """The reference's schedule: from step t on, the first t // T columns of B get no gradient;
    at t = r T all of B is frozen.  Plain SGD, so a column without gradient does not move."""
    m = tiny_llama()
    lowrank.adapt(m, "lamda", targets=["q_proj"], rank=4, freeze_b_steps=2)
    m.train()
    ads = _ads(m)
    opt = torch.optim.SGD([p for _, p in lowrank.trainable_parameters(m)], lr=0.5)
    last_moved = {p: [0] * 4 for p in ads}
    for step in range(1, 11):
        before = {p: a.lamda_B.detach().clone() for p, a in ads.items()}
        opt.zero_grad()
        m(X, labels=X).loss.backward()
        opt.step()
        for p, a in ads.items():
            for j in range(4):
                if not torch.equal(a.lamda_B[:, j], before[p][:, j]):
                    last_moved[p][j] = step
    for p, a in ads.items():
        assert last_moved[p] == [2, 4, 6, 8], p      # column j trains for the first 2 (j + 1) steps
        assert not a.lamda_B.requires_grad
    with pytest.raises(lowrank.ConfigError, match="freeze_b"):
        lowrank.adapt(tiny_llama(), "lamda", targets=["q_proj"], rank=4, freeze_b="rows")


def test_lamda_svd_init_starts_at_base():
    m = tiny_llama()
    ref = m(X).logits.detach()
    lowrank.adapt(m, "lamda", targets=["q_proj"], rank=4, projection_init="svd")
    torch.testing.assert_close(m(X).logits, ref, atol=1e-6, rtol=0)
    with pytest.raises(lowrank.ConfigError, match="init"):
        lowrank.adapt(tiny_llama(), "lamda", targets=["q_proj"], rank=4, projection_init="pissa")


# ---- DenseLoRA ------------------------------------------------------------------------------------
def test_denselora_encoder_decoder_shared_per_kind_and_dense_core_per_layer(tmp_path):
    m = tiny_llama()
    lowrank.adapt(m, "denselora", targets=["q_proj", "k_proj", "up_proj"], rank=4)
    ads = _ads(m)
    kinds: dict = {}
    for p, a in ads.items():
        kinds.setdefault(p.rsplit(".", 1)[1], set()).add(id(a.lora_codec))
    assert all(len(v) == 1 for v in kinds.values()) and len({next(iter(v)) for v in kinds.values()}) == 3
    r = 4
    expect = 6 * r * r + r * (32 + 32) + r * (32 + 16) + r * (32 + 64)
    assert lowrank.count_parameters(m)[0] == expect
    _train(m, steps=2)
    codec = next(a for p, a in ads.items() if p.endswith("q_proj")).lora_codec
    assert codec.decoder.abs().max() > 0
    with pytest.raises(lowrank.MergeError):
        lowrank.merge(m)
    with torch.no_grad():
        ref = m(X).logits
    lowrank.save_adapter(m, tmp_path / "a")
    from safetensors.torch import load_file

    keys = list(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert sum(k.endswith("lora_encoder") for k in keys) == 3  # one pair per kind, not per layer
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "a")
    fa = _ads(fresh)
    assert len({id(a.lora_codec) for p, a in fa.items() if p.endswith("q_proj")}) == 1
    with torch.no_grad():
        torch.testing.assert_close(fresh(X).logits, ref, atol=1e-6, rtol=0)


def test_denselora_dropout_is_on_the_input_and_after_each_gelu():
    """Reference forward: dropout(σ(D M dropout(σ(E dropout(x))))) (three dropouts, same p)."""
    import torch.nn.functional as F

    m = torch.nn.Sequential(torch.nn.Linear(32, 48))
    lowrank.adapt(m, "denselora", rank=4, dropout=0.3)
    a = m[0].adapters["default"]
    with torch.no_grad():
        a.lora_codec.decoder.normal_()
    m.train()
    x = torch.randn(5, 32)
    torch.manual_seed(1)
    out = m(x)
    torch.manual_seed(1)
    d = lambda t: F.dropout(t, 0.3, training=True)  # noqa: E731
    h = d(F.gelu(d(x) @ a.lora_codec.encoder.T))
    expect = m[0].base_layer(x) + a.scaling * d(F.gelu((h @ a.lora_M.T) @ a.lora_codec.decoder.T))
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)
