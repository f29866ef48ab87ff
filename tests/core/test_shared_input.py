"""Layers that read one input run together (core.shared_input): same results, learnt plans."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lowrank
from lowrank.core import shared_input
from lowrank.core.layers import AdaptedLayer
from conftest import tiny_llama


def _perturb(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lowrank.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in lowrank.trainable_parameters(model)}


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), _grads(model)


@pytest.fixture
def llama_pair(monkeypatch):
    """A LoRA Llama, and an unfused reference copy (every layer through the plain protocol path)."""
    model = tiny_llama().train()
    lowrank.adapt(model, "lora", rank=4)
    _perturb(model)
    ref = copy.deepcopy(model)
    return model, ref


def _unfused(monkeypatch):
    monkeypatch.setattr(AdaptedLayer, "fused_adapter", lambda self, x: None)


def _plans(model: nn.Module) -> list[tuple[str, ...]]:
    names = {m: n for n, m in model.named_modules()}
    return sorted(
        tuple(names[r()].rsplit(".", 1)[-1] for r in plan)
        for layer, plan in shared_input._RUNS.plans.items() if layer in names
    )


def test_runs_are_learnt_and_change_no_output(llama_pair, monkeypatch):
    model, ref = llama_pair
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with monkeypatch.context() as m:
        _unfused(m)
        want_logits, want_grads = _loss_and_grads(ref, ids)
    first_logits, _ = _loss_and_grads(model, ids)  # learns the runs
    # q/k/v read the attention input, gate/up the MLP input, in each of the two blocks
    assert _plans(model) == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    logits, grads = _loss_and_grads(model, ids)  # now computed together
    # the forward computes each layer exactly as alone: bit for bit the same outputs
    assert torch.equal(logits, first_logits)
    torch.testing.assert_close(logits, want_logits, atol=1e-6, rtol=0)
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-6, rtol=1e-5, msg=n)


def test_broken_run_is_relearnt_and_stays_correct():
    """Layers that shared an input once and then no longer do still give their own outputs."""
    torch.manual_seed(0)
    net = nn.ModuleDict({"a": nn.Linear(8, 6), "b": nn.Linear(8, 5), "c": nn.Linear(8, 4)})
    lowrank.adapt(net, "lora", rank=2, targets=["a", "b", "c"])
    _perturb(net)
    x, y = torch.randn(3, 8), torch.randn(3, 8)

    def plain(name, inp):  # W' x + b with the merged weight W' = W + ΔW
        layer = net[name]
        merged = layer.base_layer.weight + layer.adapters["default"].delta_weight()
        return inp @ merged.t() + layer.base_layer.bias

    with torch.no_grad():
        for _ in range(2):  # learn a run a, b, c on x
            outs = [net[k](x) for k in "abc"]
        assert _plans(net) == [("a", "b", "c")]
        # the run breaks: b gets another tensor, c is never called
        oa, ob = net["a"](x), net["b"](y)
        torch.testing.assert_close(oa, plain("a", x), atol=1e-6, rtol=0)
        torch.testing.assert_close(ob, plain("b", y), atol=1e-6, rtol=0)
        net["c"](x)  # a fresh tensor for this layer: closes the broken run
        assert _plans(net) == []  # the runs were only (a), (b): no plan left
        for k, o in zip("abc", outs):
            torch.testing.assert_close(o, plain(k, x), atol=1e-6, rtol=0)


def test_input_modified_in_place_is_not_shared():
    torch.manual_seed(0)
    net = nn.ModuleDict({"a": nn.Linear(8, 6), "b": nn.Linear(8, 5)})
    lowrank.adapt(net, "lora", rank=2, targets=["a", "b"])
    _perturb(net)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(3, 8)
            net["a"](x), net["b"](x)
        x = torch.randn(3, 8)
        net["a"](x)  # computes b's output ahead, for this x
        x.mul_(2.0)  # ... which is then changed before b reads it
        got = net["b"](x)
        layer = net["b"]
        want = x @ (layer.base_layer.weight + layer.adapters["default"].delta_weight()).t() + layer.base_layer.bias
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_layers_not_fusable_are_left_alone(monkeypatch):
    """A member with dropout (or any non-fusable state) is computed on its own, correctly."""
    model = tiny_llama().eval()
    lowrank.adapt(model, "lora", rank=4, targets=["q_proj", "v_proj"])
    lowrank.adapt(model, "lora", rank=4, targets=["k_proj"], name="other", dropout=0.1)
    lowrank.set_active(model, ["default", "other"])
    _perturb(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids)
        got = model(input_ids=ids).logits
        with monkeypatch.context() as m:
            _unfused(m)
            want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_model_still_copies_and_pickles_after_learning(llama_pair):
    model, _ = llama_pair
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids), model(input_ids=ids)
        want = model(input_ids=ids).logits
        clone = copy.deepcopy(model)  # plans live outside the model: the copy relearns its own
        torch.testing.assert_close(clone(input_ids=ids).logits, want, atol=0, rtol=0)
        torch.testing.assert_close(clone(input_ids=ids).logits, want, atol=0, rtol=0)
    buf = io.BytesIO()
    torch.save(model, buf)  # nothing unpicklable was attached to the modules
    assert buf.tell() > 0


def test_learn_primes_plans_without_touching_outputs(llama_pair):
    model, _ = llama_pair
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    shared_input.learn(model, input_ids=ids)
    assert model.training  # the mode is restored
    assert len(_plans(model)) == 4


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(llama_pair, reentrant):
    """Recomputation must save what the forward saved: under checkpointing layers run alone."""
    model, ref = llama_pair
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second step is the one a learnt run could change
        _, got = _loss_and_grads(model, ids)
        _, want = _loss_and_grads(ref, ids)
        for n, g in want.items():
            torch.testing.assert_close(got[n], g, atol=1e-6, rtol=1e-5, msg=n)
