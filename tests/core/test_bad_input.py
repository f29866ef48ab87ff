"""Bad input gets a lowrank error naming the culprit, and leaves model and files as they were."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lowrank
from conftest import tiny_bert, tiny_llama


def snapshot(model):
    return (
        repr(model),
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    r, state, grads = snap
    assert repr(model) == r
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


@pytest.fixture
def model():
    return tiny_llama()


def test_targets_matching_nothing_lists_closest(model):
    snap = snapshot(model)
    with pytest.raises(lowrank.TargetError) as e:
        lowrank.adapt(model, "lora", targets=["q_prj"])
    assert "q_proj" in str(e.value)
    assert_unchanged(model, snap)


def test_unknown_method_and_init_suggest(model):
    snap = snapshot(model)
    with pytest.raises(lowrank.UnknownNameError, match="(?i)did you mean 'dora'"):
        lowrank.adapt(model, "dorra")
    with pytest.raises(lowrank.UnknownNameError, match="(?i)did you mean 'gaussian'"):
        lowrank.adapt(model, "lora", init="gausian")
    with pytest.raises(lowrank.ConfigError, match="rslora"):
        lowrank.adapt(model, "dora", rsloar=True)
    assert_unchanged(model, snap)


def test_rank_too_large_names_module(model):
    snap = snapshot(model)
    with pytest.raises(lowrank.ShapeError, match="k_proj"):
        lowrank.adapt(model, "lora", targets=["q_proj", "k_proj"], rank=20)  # k_proj is 16 x 32
    assert_unchanged(model, snap)
    with pytest.raises(lowrank.ConfigError):
        lowrank.adapt(model, "lora", rank=0)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("method", ["denselora", "flylora", "lori"])
def test_rank_too_large_for_other_factor_methods(model, method):
    snap = snapshot(model)
    with pytest.raises(lowrank.ShapeError, match="q_proj"):
        lowrank.adapt(model, method, targets=["q_proj"], rank=1000)
    assert_unchanged(model, snap)


def test_unsupported_layer_type(model):
    snap = snapshot(model)
    with pytest.raises(lowrank.UnsupportedLayerError, match="input_layernorm"):
        lowrank.adapt(model, "lora", targets=["input_layernorm"])
    assert_unchanged(model, snap)


def test_same_adapter_twice(model):
    lowrank.adapt(model, "lora", targets=["q_proj"], rank=2)
    snap = snapshot(model)
    with pytest.raises(lowrank.AlreadyAdaptedError, match="q_proj"):
        lowrank.adapt(model, "lora", targets=["q_proj", "v_proj"], rank=2)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kw", [{"name": "a.b"}, {"name": ""}, {"name": 123}, {"name": "x/y"}, {"alpha": "x"}])
def test_bad_adapter_name_or_alpha(model, kw):
    snap = snapshot(model)
    with pytest.raises(lowrank.ConfigError, match="name" if "name" in kw else "alpha"):
        lowrank.adapt(model, "lora", targets=["q_proj"], rank=2, **kw)
    assert_unchanged(model, snap)
    assert not getattr(model, "_lowrank_adapters", {}), "no adapter record may be left behind"


@pytest.mark.parametrize("kw, n", [
    ({"targets": {"q_proj", "v_proj"}}, 4), ({"targets": ("q_proj",)}, 2), ({"exclude": []}, 14),
    ({"alpha": np.int64(8)}, 14), ({"alpha": torch.tensor(8.0)}, 14),
])
def test_collections_and_numpy_scalars_are_accepted(model, kw, n):
    lowrank.adapt(model, "lora", rank=2, **kw)
    assert len(list(lowrank.adapted_layers(model))) == n


@pytest.mark.parametrize("kw, exc, match", [
    ({"exclude": r"(["}, lowrank.TargetError, "exclude regex"),
    ({"targets": [1, 2]}, lowrank.TargetError, "targets must be"),
    ({"targets": None}, lowrank.TargetError, "targets must be"),
    ({"method": "vera", "d_initial": "bad"}, lowrank.ConfigError, "'d_initial' must be a number"),
    ({"method": "asymmetric", "seed": 1.5}, lowrank.ConfigError, "'seed' must be an integer"),
    ({"method": "dora", "rslora": "yes"}, lowrank.ConfigError, "'rslora' must be a bool"),
])
def test_bad_targets_and_option_types(model, kw, exc, match):
    snap = snapshot(model)
    method = kw.pop("method", "lora")
    with pytest.raises(exc, match=match):
        lowrank.adapt(model, method, rank=2, **kw)
    assert_unchanged(model, snap)


def test_weight_reading_init_on_meta_model():
    with torch.device("meta"):
        model = tiny_llama()
    snap = repr(model)
    with pytest.raises(lowrank.ConfigError, match="meta device"):
        lowrank.adapt(model, "lora", rank=2, init="pissa")
    assert repr(model) == snap and not getattr(model, "_lowrank_adapters", {})
    lowrank.adapt(model, "lora", rank=2, init="gaussian")  # an init that only draws random factors is fine


@pytest.fixture
def saved(tmp_path):
    m = lowrank.adapt(tiny_llama(), "lora", targets=["q_proj", "v_proj"], rank=2)
    d = tmp_path / "adapter"
    lowrank.save_adapter(m, d)
    return d


def _fails_cleanly(d, exc=lowrank.AdapterLoadError, match=None, model=None):
    model = model or tiny_llama()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        lowrank.load_adapter(model, d)
    assert_unchanged(model, snap)


def test_load_missing_dir_and_files(saved, tmp_path):
    _fails_cleanly(tmp_path / "nope", match="does not exist")
    (saved / "adapter_model.safetensors").unlink()
    torch.save({}, saved / "adapter_model.bin")
    _fails_cleanly(saved, match="pickled files are never loaded")


def test_load_truncated_file(saved):
    f = saved / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _fails_cleanly(saved, match="truncated or corrupt")


def test_load_non_safetensors_file(saved):
    (saved / "adapter_model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    _fails_cleanly(saved, match="safetensors")


def test_load_wrong_keys(saved):
    f = saved / "adapter_model.safetensors"
    from safetensors.torch import load_file

    t = load_file(f)
    k = next(iter(t))
    t[k.replace("lora_A", "lora_X")] = t.pop(k)
    save_file(t, f)
    _fails_cleanly(saved, match="missing")


def test_load_extra_keys(saved):
    f = saved / "adapter_model.safetensors"
    from safetensors.torch import load_file

    t = load_file(f)
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(2, 32)
    save_file(t, f)
    _fails_cleanly(saved, match="unexpected keys")


def test_load_wrong_shapes(saved):
    f = saved / "adapter_model.safetensors"
    from safetensors.torch import load_file

    t = load_file(f)
    k = next(k for k in t if "lora_B" in k)
    t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
    save_file(t, f)
    _fails_cleanly(saved, match="shape")


def test_load_into_other_base_model(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    )
    _fails_cleanly(saved, match="different base model", model=other)
    _fails_cleanly(saved, match="does not exist in this model", model=tiny_bert())


def test_load_bad_config(saved):
    (saved / "adapter_config.json").write_text("{not json")
    _fails_cleanly(saved, match="not valid JSON")
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 2}))
    _fails_cleanly(saved, match="no registered method")


def test_load_integer_tensor_for_float_parameter(saved):
    from safetensors.torch import load_file

    tensors = load_file(str(saved / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key].round().to(torch.int64)
    save_file(tensors, str(saved / "adapter_model.safetensors"))
    _fails_cleanly(saved, match="torch.int64")


@pytest.mark.parametrize("key, value, match", [
    ("rank", "four", "lowrank.rank"), ("rank", True, "lowrank.rank"), ("alpha", "x", "lowrank.alpha"),
    ("targets", 5, "lowrank.targets"), ("options", [], "lowrank.options"),
    ("shapes", {"model.layers.0.self_attn.q_proj": [32]}, "lowrank.shapes"),
    ("shapes", {"model.nothere": [4, 4]}, "model.nothere"),
])
def test_load_malformed_lowrank_section(saved, key, value, match):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["lowrank"][key] = value
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    _fails_cleanly(saved, match=match)


def test_load_path_escaping_directory(saved, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(saved / "adapter_model.safetensors", outside)
    os.symlink(outside, saved / "adapter_model.safetensors")
    _fails_cleanly(saved, exc=lowrank.UnsafePathError, match="outside the adapter directory")


def test_load_twice_under_same_name(saved):
    m = lowrank.load_adapter(tiny_llama(), saved)
    snap = snapshot(m)
    with pytest.raises(lowrank.AlreadyAdaptedError):
        lowrank.load_adapter(m, saved)
    assert_unchanged(m, snap)
    lowrank.load_adapter(m, saved, name="second")  # another name is fine


def test_save_leaves_previous_files_on_failure(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    m = lowrank.adapt(tiny_llama(), "lora", targets=["q_proj"], rank=2)
    import lowrank.core.io as io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError):
        lowrank.save_adapter(m, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_errors_share_one_hierarchy():
    for cls in (lowrank.TargetError, lowrank.UnknownNameError, lowrank.ShapeError, lowrank.AdapterLoadError,
                lowrank.UnsafePathError, lowrank.MergeError, lowrank.AlreadyAdaptedError, lowrank.ConfigError):
        assert issubclass(cls, lowrank.LowRankError)


@pytest.mark.parametrize("kw, match", [
    ({"dropout": "x"}, "dropout"),
    ({"dropout": None}, "dropout"),
    ({"modules_to_save": [5]}, "modules_to_save"),
    ({"targets": ["q_proj"], "modules_to_save": ["q_proj"]}, "overlaps .* adapted by default"),
])
def test_bad_adapt_arguments_are_package_errors(model, kw, match):
    snap = snapshot(model)
    with pytest.raises(lowrank.ConfigError, match=match):
        lowrank.adapt(model, "lora", rank=2, **kw)
    assert_unchanged(model, snap)


def test_a_module_saved_in_full_is_left_out_of_all_linear_and_round_trips(tmp_path):
    """As PEFT: with targets='all-linear', modules_to_save are not also adapted, so the saved
    adapter loads back (before, the module was both, and its own loader refused the file)."""
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, modules_to_save="model.layers.0.self_attn")
    paths = [p for p, _ in lowrank.adapted_layers(m)]
    assert paths and not any(p.startswith("model.layers.0.self_attn") for p in paths)
    lowrank.save_adapter(m, tmp_path / "a")
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "a")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, m(input_ids=ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("names", [None, 5, ["default", 3]])
def test_set_active_refuses_what_is_not_a_name(model, names):
    lowrank.adapt(model, "lora", rank=2)
    with pytest.raises(lowrank.ConfigError, match="set_active"):
        lowrank.set_active(model, names)


def test_numpy_option_values_are_saved_as_numbers_and_nothing_half_written(tmp_path, monkeypatch):
    m = torch.nn.Sequential(torch.nn.Linear(16, 16))
    lowrank.adapt(m, "vera", rank=4, d_initial=np.float32(0.25))
    lowrank.save_adapter(m, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["lowrank"]["options"]["d_initial"] == 0.25
    # an option value JSON cannot hold: refused before either file is written
    import lowrank.core.io as io

    real = io.adapter_config
    monkeypatch.setattr(io, "adapter_config", lambda *a, **k: {**real(*a, **k), "extra": object()})
    m2 = torch.nn.Sequential(torch.nn.Linear(16, 16))
    lowrank.adapt(m2, "vera", rank=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    with pytest.raises(lowrank.ConfigError, match="adapter_config.json"):
        lowrank.save_adapter(m2, tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


def test_saving_to_a_file_or_under_one_is_a_package_error(tmp_path):
    m = lowrank.adapt(tiny_llama(), "lora", targets=["q_proj"], rank=2)
    f = tmp_path / "afile"
    f.write_text("keep")
    for target in (f, f / "x"):
        with pytest.raises(lowrank.ConfigError, match="cannot write the adapter"):
            lowrank.save_adapter(m, target)
    assert f.read_text() == "keep"
    with pytest.raises(lowrank.AdapterLoadError, match="string or a path"):
        lowrank.load_adapter(tiny_llama(), None)


@pytest.mark.parametrize("key, value", [("r", "x"), ("r", None), ("r", 4.7), ("lora_alpha", "x"),
                                        ("lora_dropout", "x"), ("modules_to_save", [5]), ("target_modules", 3)])
def test_bad_peft_config_fields_name_the_file(saved, model, key, value):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg.pop("lowrank")
    cfg[key] = value
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    snap = snapshot(model)
    with pytest.raises(lowrank.AdapterLoadError, match=rf"adapter_config.json: '{key}' must be"):
        lowrank.load_adapter(model, saved)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("key, value, match", [("format_version", "x", "format_version"),
                                               ("method", "lorax", "unknown method 'lorax'"),
                                               ("init", "pisa", "unknown init 'pisa'")])
def test_bad_lowrank_section_names_the_file(saved, model, key, value, match):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["lowrank"][key] = value
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    snap = snapshot(model)
    with pytest.raises(lowrank.AdapterLoadError, match=rf"adapter_config.json: .*{match}"):
        lowrank.load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_a_module_saved_in_full_belongs_to_one_active_adapter(model):
    """The model shows one copy of a module saved in full: while adapter a is active a second
    adapter may not save its own copy, never adapt it, and may not save a module another adapter
    adapted; under all-linear such modules are simply left out."""
    lowrank.adapt(model, "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=["model.layers.0.self_attn.o_proj"])
    snap = snapshot(model)
    cases = [
        dict(targets=["v_proj"], modules_to_save=["model.layers.0.self_attn.o_proj"]),  # saved twice
        dict(targets=["o_proj"]),  # adapts a's saved module
        dict(targets=["v_proj"], modules_to_save=["model.layers.1.self_attn.q_proj"]),  # saves a's adapted layer
    ]
    for kw in cases:
        with pytest.raises(lowrank.ConfigError, match="overlaps"):
            lowrank.adapt(model, "lora", rank=2, name="b", **kw)
        assert_unchanged(model, snap)
    lowrank.adapt(model, "lora", rank=2, name="b")  # all-linear: a's q_proj layers get b too, o_proj of layer 0 not
    paths = {p for p, layer in lowrank.adapted_layers(model) if "b" in layer.adapters}
    assert "model.layers.0.self_attn.o_proj" not in paths and "model.layers.1.self_attn.o_proj" in paths


def test_loading_an_adapter_that_saves_a_module_another_adapter_holds_is_refused(tmp_path):
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=["lm_head"])
    lowrank.save_adapter(m, tmp_path / "a", name="a")
    other = lowrank.adapt(tiny_llama(), "lora", rank=2, name="b", targets=["v_proj"], modules_to_save=["lm_head"])
    snap = snapshot(other)
    with pytest.raises(lowrank.AdapterLoadError, match="which adapter 'b' trains and saves in full"):
        lowrank.load_adapter(other, tmp_path / "a", name="a")
    assert_unchanged(other, snap)


def test_loading_a_saved_module_that_another_adapter_adapted_names_the_conflict(tmp_path):
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=["model.layers.1.mlp"])
    lowrank.save_adapter(m, tmp_path / "a", name="a")
    other = lowrank.adapt(tiny_llama(), "lora", rank=2, name="b", targets=["down_proj"])
    snap = snapshot(other)
    with pytest.raises(lowrank.AdapterLoadError, match=r"'model.layers.1.mlp' overlaps .*down_proj', adapted by b"):
        lowrank.load_adapter(other, tmp_path / "a", name="a")
    assert_unchanged(other, snap)
