"""Data-driven inits: LoRA-GA, LoRA-SB, EVA-style, Fisher (LoKU) — defining properties and calibration errors."""

from __future__ import annotations

import pytest
import torch

import lowrank
from conftest import model_input, run_model, tiny_llama, tiny_mlp

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def _batches(n=1, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(n)]


def _loss(model, batch):
    return model(**batch, labels=batch["input_ids"]).loss


def _true_grads(model, batch) -> dict[str, torch.Tensor]:
    """dL/dW of every target Linear by plain autograd on the unadapted model, as (out, in)."""
    weights = {n[: -len(".weight")]: p for n, p in model.named_parameters() if n.split(".")[-2] in TARGETS}
    grads = torch.autograd.grad(_loss(model, batch), list(weights.values()))
    return dict(zip(weights, grads))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _truncate(g: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def _first_step_update(model, batch, path_of) -> dict[str, torch.Tensor]:
    """First-order full-weight update direction of one SGD step on the factors: -(s (gB A + B gA))."""
    for _, p in lowrank.trainable_parameters(model):
        p.grad = None
    _loss(model, batch).backward()
    out = {}
    for path, layer in lowrank.adapted_layers(model):
        a = layer.adapters["default"]
        ga = a.A.grad if a.A.grad is not None else torch.zeros_like(a.A)
        gb = a.B.grad if a.B.grad is not None else torch.zeros_like(a.B)
        out[path_of(path)] = -a.scaling * (gb @ a.A + a.B @ ga)
    return out


def test_lora_ga_first_step_matches_the_best_rank_2r_direction_and_beats_lora():
    batch = _batches()[0]
    g_true = _true_grads(tiny_llama(), batch)
    r = 4
    cos = {}
    for init in ("lora-ga", None):
        model = tiny_llama()
        lowrank.adapt(model, "lora", rank=r, targets=TARGETS, init=init, calibration=[batch] if init else None)
        cos[init] = {p: _cos(-d, g_true[p]) for p, d in _first_step_update(model, batch, lambda p: p).items()}
    best = {p: _cos(_truncate(g, 2 * r), g) for p, g in g_true.items()}  # the best any rank-2r update reaches
    for p in g_true:
        assert cos["lora-ga"][p] >= 0.99 * best[p], (p, cos["lora-ga"][p], best[p])
    mean = {k: sum(v.values()) / len(v) for k, v in cos.items()}
    assert mean["lora-ga"] > mean[None] + 0.2, mean


def test_lora_ga_factors_are_the_gradient_singular_vectors_with_stable_scale():
    batch = _batches()[0]
    g = _true_grads(tiny_llama(), batch)["model.layers.0.mlp.up_proj"]  # (64, 32)
    model = tiny_llama()
    w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    lowrank.adapt(model, "lora", rank=4, alpha=8, targets=TARGETS, init="lora-ga", calibration=[batch],
                  init_options={"niter": None})
    layer = model.model.layers[0].mlp.up_proj
    a = layer.adapters["default"]
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    c = 64**0.25 / 16**0.5  # d_out^(1/4) / sqrt(gamma), gamma = 16
    # A spans the top-r right singular vectors, B the next r left ones ("ArB2r"), both scaled by c
    torch.testing.assert_close((a.A / c) @ (a.A / c).T, torch.eye(4), atol=1e-4, rtol=0)
    assert torch.linalg.svdvals(vh[:4] @ (a.A / c).T).min() > 0.999
    assert torch.linalg.svdvals(u[:, 4:8].T @ (a.B / c)).min() > 0.999
    torch.testing.assert_close(layer.base.weight + a.scaling * a.B @ a.A, w0, atol=1e-6, rtol=0)


def test_lora_sb_init_is_the_best_rank_r_first_update_and_its_first_step_too():
    batch = _batches()[0]
    g_true = _true_grads(tiny_llama(), batch)
    lr, r = 1e-4, 4
    model = tiny_llama()
    w0 = {p: model.get_submodule(p).weight.detach().clone() for p in g_true}
    lowrank.adapt(model, "lora-xs", rank=r, targets=TARGETS, init="lora-sb", calibration=[batch],
                  init_options={"lr": lr, "update": "sgd"})
    for p, g in g_true.items():
        layer = model.get_submodule(p)
        a = layer.adapters["default"]
        torch.testing.assert_close(layer.base.weight, w0[p])  # W untouched
        torch.testing.assert_close(a.A @ a.A.T, torch.eye(r), atol=1e-5, rtol=0)  # orthonormal frozen bases
        torch.testing.assert_close(a.B.T @ a.B, torch.eye(r), atol=1e-5, rtol=0)
        # the init is the optimal rank-r approximation of the first full update -lr G
        torch.testing.assert_close(a.delta_weight(), -lr * _truncate(g, r), atol=1e-7, rtol=1e-4)
    # first SGD step on R alone: its full-weight update s B dR A is the rank-r truncation of the gradient
    for p in g_true:
        model.get_submodule(p).adapters["default"].core.grad = None
    _loss(model, batch).backward()
    for p, g in g_true.items():
        a = model.get_submodule(p).adapters["default"]
        step = -a.scaling * a.B @ (a.scaling * a.core.grad) @ a.A  # = -s^2 B B^T G' A^T A
        best = -a.scaling**2 * _truncate(g, r)
        assert (step - best).norm() / best.norm() < 0.02, p
        assert _cos(-step, g) >= 0.99 * _cos(_truncate(g, r), g)


def test_lora_sb_default_sign_update_and_two_factor_variant():
    batch = _batches()[0]
    g = _true_grads(tiny_llama(), batch)["model.layers.1.self_attn.q_proj"]
    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=4, targets=TARGETS, init="lora-sb", calibration=[batch])  # lr 1e-4, sign
    a = model.model.layers[1].self_attn.q_proj.adapters["default"]
    torch.testing.assert_close(a.delta_weight(), _truncate(-1e-4 * g.sign(), 4), atol=1e-8, rtol=1e-4)


def test_eva_reads_the_principal_directions_of_the_layer_inputs():
    """A = the top right singular vectors of the *centred* inputs (a PCA, as the paper's incremental
    PCA); the uncentred top vectors are a different subspace here, so the test tells them apart."""
    batches = _batches(2)
    model = tiny_llama()
    seen = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    x = torch.cat(seen).double()  # (tokens, in)
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    _, _, raw = torch.linalg.svd(x, full_matrices=False)
    lowrank.adapt(model, "dora", rank=4, targets=TARGETS, init="eva", calibration=batches)
    a = model.model.layers[0].mlp.down_proj.adapters["default"]
    assert torch.count_nonzero(a.B) == 0
    assert torch.linalg.svdvals(vh[:4].float() @ a.A.T).min() > 0.999  # same 4-dim subspace
    assert torch.linalg.svdvals(raw[:4].float() @ a.A.T).min() < 0.99   # not the uncentred one
    torch.testing.assert_close(a.A @ a.A.T, torch.eye(4), atol=1e-5, rtol=0)


def test_fisher_init_is_the_row_weighted_best_approximation():
    g = torch.Generator().manual_seed(0)
    pairs = [{"forget": {"input": torch.randn(8, 32, generator=g)}, "retain": {"input": torch.randn(8, 32, generator=g)}}]

    def loss_fn(model, batch):
        return model(batch["input"]).pow(2).mean()

    ref = tiny_mlp()
    w = ref[0].weight
    f_forget = torch.autograd.grad(loss_fn(ref, pairs[0]["forget"]), [w])[0] ** 2
    f_retain = torch.autograd.grad(loss_fn(ref, pairs[0]["retain"]), [w])[0] ** 2
    d = (f_forget / (f_retain + 1e-5)).sum(1).sqrt()  # row weights of the relative Fisher
    w0 = w.detach().clone()
    model = tiny_mlp()
    lowrank.adapt(model, "lora", rank=4, targets=["0"], init="fisher", calibration=pairs,
                  init_options={"loss_fn": loss_fn})
    layer = model[0]
    a = layer.adapters["default"]
    part = a.scaling * a.B @ a.A
    s = torch.linalg.svdvals(d[:, None] * w0)
    weighted_err = (d[:, None] * (w0 - part)).norm()
    assert abs(weighted_err - s[4:].norm()) < 1e-3 * s[4:].norm()  # weighted Eckart-Young optimum
    pissa_part = _truncate(w0, 4)
    assert weighted_err < (d[:, None] * (w0 - pissa_part)).norm()  # better than the unweighted best
    torch.testing.assert_close(layer.base.weight + part, w0, atol=1e-5, rtol=0)


# ---- calibration errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["lora-ga", "lora-sb", "eva", "fisher"])
def test_missing_or_bad_calibration_names_the_init_and_changes_nothing(init):
    model = tiny_llama()
    x = model_input("llama")
    with torch.no_grad():
        before = run_model(model, "llama", x)
    bad = [
        (None, "reads calibration"),
        ([], "empty"),
        ({"input_ids": torch.zeros(2, 12, dtype=torch.long)}, "iterable of batches"),
        ([torch.zeros(2, 12, dtype=torch.long)], "expected a dict"),
        ([{"input_ids": torch.zeros(2, 12, 3)}], "rejected calibration batch 0"),  # wrong shape and dtype
    ]
    for calibration, msg in bad:
        with pytest.raises(lowrank.CalibrationError, match=rf"init '{init}'.*{msg}"):
            lowrank.adapt(model, "lora", rank=4, targets=TARGETS, init=init, calibration=calibration)
    assert not any(isinstance(m, lowrank.AdaptedLayer) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(run_model(model, "llama", x), before, atol=0, rtol=0)


@pytest.mark.parametrize("init", ["lora-ga", "lora-sb", "fisher"])
def test_a_target_the_loss_never_reaches_is_refused(init):
    model = tiny_llama()
    # a loss on the hidden state after the first block: the second block's q_proj gets no gradient
    cal = [{"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))}]
    lf = lambda m, b: m(**b, output_hidden_states=True).hidden_states[1].pow(2).mean()
    with pytest.raises(lowrank.CalibrationError, match=rf"init '{init}'.*does not reach 'model.layers.1.self_attn.q_proj'"):
        lowrank.adapt(model, "lora", rank=2, targets=["q_proj"], init=init, calibration=cal,
                      init_options={"loss_fn": lf})
    assert not any(isinstance(m, lowrank.AdaptedLayer) for m in model.modules())


def test_a_failing_loss_fn_is_a_calibration_error():
    with pytest.raises(lowrank.CalibrationError, match="loss_fn failed on calibration batch 0: AttributeError"):
        lowrank.adapt(tiny_llama(), "lora", rank=2, targets=["q_proj"], init="lora-ga", calibration=_batches(),
                      init_options={"loss_fn": lambda m, b: m(**b).nope})


def test_a_model_without_loss_needs_loss_fn():
    with pytest.raises(lowrank.CalibrationError, match="loss_fn"):
        lowrank.adapt(tiny_mlp(), "lora", rank=4, init="lora-ga", calibration=[{"input": torch.randn(4, 32)}])


def test_lora_ga_needs_2r_singular_directions():
    with pytest.raises(lowrank.ShapeError, match="2 \\* rank"):
        lowrank.adapt(tiny_llama(), "lora", rank=20, targets=["q_proj"], init="lora-ga", calibration=_batches())
