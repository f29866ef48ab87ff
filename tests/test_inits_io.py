"""Saving adapters made by every init: save -> load into a fresh base gives the same outputs, and inits
that moved part of W convert to a plain adapter against the ORIGINAL weights (PEFT-loadable)."""

from __future__ import annotations

import json

import pytest
import torch

import lowrank
from conftest import model_input, run_model, tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CAL = [{"input_ids": torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))}]
STRUCTURE = {"lora-sb": "lora-xs", "nlora": "slora"}


def _perturb(model, seed=3, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lowrank.trainable_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _adapted(method, init, **kw):
    model = tiny_llama()
    cal = CAL if lowrank.get_init(init).needs_calibration else None
    lowrank.adapt(model, method, rank=4, targets=TARGETS, init=init, calibration=cal, **kw)
    _perturb(model)  # as a few training steps would
    return model


def _out(model):
    with torch.no_grad():
        return run_model(model, "llama", model_input("llama"))


@pytest.mark.parametrize("init", sorted(set(lowrank.inits()) - {"kaiming", "gaussian"}))
def test_save_load_into_a_fresh_base_gives_identical_outputs(init, tmp_path):
    method = STRUCTURE.get(init, "lora")
    model = _adapted(method, init)
    before = _out(model)
    lowrank.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "a")  # no calibration: nothing is re-run
    torch.testing.assert_close(_out(fresh), before, atol=1e-5, rtol=0)
    if lowrank.get_init(init).modifies_base:  # the residual base was rebuilt from the saved part
        w = {n: p for n, p in model.named_parameters() if "base_layer" in n}
        for n, p in fresh.named_parameters():
            if n in w:
                torch.testing.assert_close(p, w[n], atol=1e-6, rtol=0)


def test_randomized_pissa_is_not_rerun_on_load(tmp_path):
    model = _adapted("dora", "pissa", init_options={"niter": 1, "oversample": 0, "seed": 7})
    before = _out(model)
    lowrank.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["lowrank"]["init"] == "pissa" and "peft_type" not in cfg  # not a plain LoRA file
    cfg["lowrank"]["init_options"]["seed"] = 8  # a re-run would now give other factors
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(_out(fresh), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,init", [("lora", "pissa"), ("lora", "lora-ga"), ("rslora", "olora"),
                                         ("lora", "milora"), ("lora", "fisher"), ("lora", "nlora"), ("dora", "pissa")])
def test_convert_to_lora_loads_in_peft_on_the_unmodified_base(method, init, tmp_path):
    from peft import PeftModel

    model = _adapted(method, init)
    before = _out(model)
    lowrank.save_adapter(model, tmp_path / "c", convert_to_lora=True)
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lowrank"]["init"] is None  # rank 2r, plain
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "c"))  # original weights
    torch.testing.assert_close(_out(peft_model), before, atol=1e-5, rtol=0)
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "c")
    torch.testing.assert_close(_out(fresh), before, atol=1e-5, rtol=0)
    base_w = tiny_llama().model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(fresh.model.layers[0].self_attn.q_proj.base_layer.weight, base_w)


def test_convert_without_a_moved_part_is_the_plain_adapter(tmp_path):
    model = _adapted("lora", "eva")
    lowrank.save_adapter(model, tmp_path / "c", convert_to_lora=True)
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert cfg["r"] == 4


def test_convert_refuses_a_method_without_two_factors(tmp_path):
    model = _adapted("slora", "nlora")
    with pytest.raises(lowrank.ConfigError, match="no A/B factors"):
        lowrank.save_adapter(model, tmp_path / "c", convert_to_lora=True)
    assert not (tmp_path / "c").exists()


def test_a_base_delta_of_the_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _adapted("lora", "pissa")
    lowrank.save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("lowrank_base_delta_left"))
    state[key] = state[key][:, :2].contiguous()
    save_file(state, str(f))
    fresh = tiny_llama()
    with pytest.raises(lowrank.AdapterLoadError, match="base delta"):
        lowrank.load_adapter(fresh, tmp_path / "a")
    assert not any(isinstance(m, lowrank.AdaptedLayer) for m in fresh.modules())


def _strip_delta(path):
    from safetensors.torch import load_file, save_file

    f = path / "adapter_model.safetensors"
    state = {k: v for k, v in load_file(str(f)).items() if "lowrank_base_delta" not in k}
    save_file(state, str(f))


def test_files_without_the_saved_part_rerun_a_deterministic_init_and_refuse_a_calibrated_one(tmp_path):
    model = _adapted("lora", "pissa")  # exact SVD: re-running on the fresh base gives the same residual
    before = _out(model)
    lowrank.save_adapter(model, tmp_path / "p")
    _strip_delta(tmp_path / "p")
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "p")
    torch.testing.assert_close(_out(fresh), before, atol=1e-5, rtol=0)
    model = _adapted("lora", "lora-ga")
    lowrank.save_adapter(model, tmp_path / "g")
    _strip_delta(tmp_path / "g")
    fresh = tiny_llama()
    with pytest.raises(lowrank.AdapterLoadError, match="lora-ga"):
        lowrank.load_adapter(fresh, tmp_path / "g")
    assert not any(isinstance(m, lowrank.AdaptedLayer) for m in fresh.modules())


@pytest.mark.parametrize("init", ["gaussian", "eva"])
def test_inits_that_leave_w_alone_save_in_peft_layout(init, tmp_path):
    model = _adapted("lora", init)
    lowrank.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4


def test_an_init_that_rewrites_w_refuses_a_layer_with_adapters(tmp_path):
    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=2, targets=TARGETS, name="first")
    _perturb(model)
    before = _out(model)
    with pytest.raises(lowrank.ConfigError, match="rewrites the base weight.*first"):
        lowrank.adapt(model, "lora", rank=4, targets=TARGETS, init="pissa", name="second")
    torch.testing.assert_close(_out(model), before, atol=0, rtol=0)
    lowrank.save_adapter(_adapted("lora", "pissa"), tmp_path / "p")
    with pytest.raises(lowrank.AdapterLoadError, match="already carries adapters"):
        lowrank.load_adapter(model, tmp_path / "p", name="second")
    torch.testing.assert_close(_out(model), before, atol=0, rtol=0)
