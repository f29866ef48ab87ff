"""The conformance suite: every registered method x init is checked here just by registering.

A method declares what it is (``identity_at_init``, ``mergeable``, ``test_options``,
``trainable_count``); the properties below hold for all of them on a tiny Llama, BERT, GPT-2
(transposed Conv1D weights) and a plain MLP.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lowrank
from lowrank.core.adapter import FactorAdapter

from conftest import MODELS, model_input, run_model

METHODS = lowrank.methods()
ATOL = 1e-5


def _adapt(model, method, **kw):
    cls = lowrank.get_method(method)
    opts = dict(cls.test_options)
    opts.update(kw)
    return lowrank.adapt(model, method, rank=cls.test_rank, **opts)


def _perturb(model, seed=3, scale=0.05):
    """Move every trainable tensor away from its init, as a few training steps would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lowrank.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _setup(method, kind, perturb=True):
    model = MODELS[kind]()
    x = model_input(kind)
    with torch.no_grad():
        base_out = run_model(model, kind, x)
    try:
        _adapt(model, method)
    except lowrank.UnsupportedLayerError:
        pytest.skip(f"{method} does not adapt the layers of {kind}")
    if perturb:
        _perturb(model)
    return model, x, base_out


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init(method, model_kind):
    model, x, base_out = _setup(method, model_kind, perturb=False)
    if not lowrank.get_method(method).identity_at_init:
        pytest.skip(f"{method} does not start from the base function")
    with torch.no_grad():
        out = run_model(model, model_kind, x)
    torch.testing.assert_close(out, base_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_disabled_gives_base(method, model_kind):
    model, x, base_out = _setup(method, model_kind)
    with torch.no_grad():
        adapted = run_model(model, model_kind, x)
        with lowrank.disabled(model):
            off = run_model(model, model_kind, x)
        again = run_model(model, model_kind, x)
    torch.testing.assert_close(off, base_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(again, adapted, atol=0, rtol=0)
    assert not torch.allclose(adapted, base_out, atol=1e-4), "perturbed adapter should change the output"


@pytest.mark.parametrize("method", METHODS)
def test_merge_keeps_outputs_and_unmerge_restores(method, model_kind):
    model, x, _ = _setup(method, model_kind)
    if not lowrank.get_method(method).mergeable:
        with pytest.raises(lowrank.MergeError):
            lowrank.merge(model)
        return
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        before = run_model(model, model_kind, x)
        lowrank.merge(model)
        merged = run_model(model, model_kind, x)
        lowrank.unmerge(model)
        after = run_model(model, model_kind, x)
    torch.testing.assert_close(merged, before, atol=ATOL, rtol=0)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0, msg=f"{n} not restored")


@pytest.mark.parametrize("method", METHODS)
def test_unload_gives_plain_model(method, model_kind):
    model, x, _ = _setup(method, model_kind)
    if not lowrank.get_method(method).mergeable:
        pytest.skip("unload merges")
    with torch.no_grad():
        before = run_model(model, model_kind, x)
        plain = lowrank.unload(model)
        after = run_model(plain, model_kind, x)
    assert not any(isinstance(m, lowrank.AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("copied", [False, True], ids=["model", "deepcopy"])
@pytest.mark.parametrize("method", METHODS)
def test_save_load_roundtrip(method, model_kind, tmp_path, copied):
    """Save, then load into a fresh base: the same outputs; also from a deep copy of the adapted
    model (state kept by object identity would not survive the copy)."""
    model, x, _ = _setup(method, model_kind)
    if copied:
        model = copy.deepcopy(model)
    with torch.no_grad():
        before = run_model(model, model_kind, x)
    lowrank.save_adapter(model, tmp_path / "a")
    fresh = MODELS[model_kind]()
    lowrank.load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        after = run_model(fresh, model_kind, x)
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
    assert lowrank.count_parameters(fresh) == lowrank.count_parameters(model)


@pytest.mark.parametrize("method", METHODS)
def test_only_adapter_parameters_trainable(method, model_kind):
    model, _, _ = _setup(method, model_kind, perturb=False)
    cls = lowrank.get_method(method)
    adapter_params = set()
    expected = 0
    for _, layer in lowrank.adapted_layers(model):
        a = layer.adapters["default"]
        adapter_params |= {id(p) for p in a.parameters()}
        b = layer.base
        opts = dict(cls.test_options)
        expected += cls.trainable_count(b.in_features, b.out_features, cls.test_rank, **opts)
    trainable = lowrank.trainable_parameters(model)
    assert trainable, "no trainable parameters"
    assert {id(p) for _, p in trainable} == adapter_params
    shared = getattr(cls, "shared_trainable", False)  # methods with cross-layer shared trainables
    if not shared:
        assert sum(p.numel() for _, p in trainable) == expected, "trainable count differs from the method's formula"


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_adapter_parameter(method, model_kind):
    model, x, _ = _setup(method, model_kind)
    model.train()
    out = run_model(model, model_kind, x)
    out.float().pow(2).mean().backward()
    for n, p in lowrank.trainable_parameters(model):
        assert p.grad is not None, f"{n} got no gradient"
        assert p.grad.abs().sum() > 0, f"{n} got an all-zero gradient"


@pytest.mark.parametrize("method", [m for m in METHODS if issubclass(lowrank.get_method(m), FactorAdapter)])
@pytest.mark.parametrize("init", lowrank.inits())
def test_every_init_on_every_factor_method(method, init):
    """Structure x init: every init works on every factor method (tiny Llama)."""
    model = MODELS["llama"]()
    x = model_input("llama")
    with torch.no_grad():
        base_out = run_model(model, "llama", x)
    init_cls = lowrank.get_init(init)
    calibration = None
    if init_cls.needs_calibration:
        g = torch.Generator().manual_seed(5)
        calibration = [{"input_ids": torch.randint(0, 64, (2, 12), generator=g)} for _ in range(2)]
    _adapt(model, method, init=init, calibration=calibration)
    with torch.no_grad():
        out = run_model(model, "llama", x)
    if init_cls.identity_at_init and lowrank.get_method(method).identity_at_init:
        torch.testing.assert_close(out, base_out, atol=1e-4, rtol=0)
    _perturb(model)
    if lowrank.get_method(method).mergeable:
        with torch.no_grad():
            before = run_model(model, "llama", x)
            lowrank.merge(model)
            torch.testing.assert_close(run_model(model, "llama", x), before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_stacked_with_lora_updates_sum_in_any_order(method, model_kind):
    """Two live adapters on one layer (the method and a LoRA): each update is taken against the base layer and they add
    up, so the active order does not matter, and merging both keeps the outputs."""
    model, x, base_out = _setup(method, model_kind)
    targets = lowrank.adapter_record(model, "default")["targets"]
    try:
        lowrank.adapt(model, "lora", rank=2, name="second", targets=targets)
    except lowrank.UnsupportedLayerError:  # a method for other layer types: stack two of its own
        _adapt(model, method, name="second", targets=targets)
    _perturb(model, seed=5)
    layer = next(m for m in model.modules()
                 if isinstance(m, lowrank.AdaptedLayer) and {"default", "second"} <= set(m.adapters))
    seen = []  # the layer's call on the model's forward
    layer.register_forward_pre_hook(lambda mod, args, kw: seen.append((args, kw)) if not seen else None,
                                    with_kwargs=True)

    def call():  # the layer alone, on that call (a block's output may be a tuple)
        out = layer(*seen[0][0], **seen[0][1])
        return out[0] if isinstance(out, tuple) else out
    with torch.no_grad():
        outs = {}
        for order in (["default", "second"], ["second", "default"], ["default"], ["second"]):
            lowrank.set_active(model, order)
            outs[tuple(order)] = run_model(model, model_kind, x)
        with lowrank.disabled(model):
            y0 = call()
        lowrank.set_active(model, ["default", "second"])
        y_both = call()
        lowrank.set_active(model, ["default"])
        y_a = call()
        lowrank.set_active(model, ["second"])
        y_b = call()
    torch.testing.assert_close(outs[("second", "default")], outs[("default", "second")], atol=ATOL, rtol=0)
    torch.testing.assert_close(y_both - y0, (y_a - y0) + (y_b - y0), atol=ATOL, rtol=0)
    assert not torch.allclose(y_b, y0, atol=1e-5), "the second adapter should change the layer"
    if not lowrank.get_method(method).mergeable:
        return
    lowrank.set_active(model, ["default", "second"])
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        lowrank.merge(model)
        merged = run_model(model, model_kind, x)
        lowrank.unmerge(model)
        after = run_model(model, model_kind, x)
    torch.testing.assert_close(merged, outs[("default", "second")], atol=ATOL, rtol=0)
    torch.testing.assert_close(after, outs[("default", "second")], atol=ATOL, rtol=0)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0, msg=f"{n} not restored")


@pytest.mark.parametrize("method", METHODS)
def test_delete_adapter_leaves_the_others_then_the_base(method, model_kind):
    """Deleting one of two stacked adapters leaves the other's outputs; deleting the last gives the
    base model back (its outputs and its own state-dict keys).  Refused, with the model unchanged,
    when the init moved part of the base weight into the adapter (or the base weight was released)."""
    model, x, base_out = _setup(method, model_kind)
    targets = lowrank.adapter_record(model, "default")["targets"]
    try:
        lowrank.adapt(model, "lora", rank=2, name="second", targets=targets)
    except lowrank.UnsupportedLayerError:
        _adapt(model, method, name="second", targets=targets)
    _perturb(model, seed=5)
    with torch.no_grad():
        lowrank.set_active(model, "second")
        only_second = run_model(model, model_kind, x)
        lowrank.set_active(model, ["default", "second"])
        both = run_model(model, model_kind, x)
    for name in ("default", "second"):
        try:
            lowrank.delete_adapter(model, name)
        except lowrank.ConfigError as e:
            assert "holds part of the base weight" in str(e) or "which was released" in str(e)
            with torch.no_grad():  # refused: nothing changed
                torch.testing.assert_close(run_model(model, model_kind, x), both if name == "default" else only_second,
                                           atol=ATOL, rtol=0)
            return
        assert name not in lowrank.adapter_names(model)
        with torch.no_grad():
            out = run_model(model, model_kind, x)
        if name == "default":
            torch.testing.assert_close(out, only_second, atol=ATOL, rtol=0)
    assert not any(isinstance(m, lowrank.AdaptedLayer) for m in model.modules())
    assert set(model.state_dict()) == set(MODELS[model_kind]().state_dict())
    torch.testing.assert_close(out, base_out, atol=ATOL, rtol=0)
    lowrank.adapt(model, "lora", rank=2, targets=targets if method == "lora" else "all-linear")  # the name is free again
