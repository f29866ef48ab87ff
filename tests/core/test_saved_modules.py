"""Modules saved in full (``modules_to_save``): one live copy in the model, the original kept aside
and shown whenever the owning adapter is not applied (as PEFT runs its frozen original)."""

from __future__ import annotations

import pytest
import torch

import lowrank
from conftest import tiny_llama

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
HEAD = "lm_head"


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def train_a_little(m):
    """Change the adapter and its saved head the way training would (in place, same tensors)."""
    with torch.no_grad():
        for _, p in lowrank.trainable_parameters(m):
            p.add_(0.05 * torch.randn_like(p))


def test_disabled_runs_the_original_saved_module_and_gives_the_trained_one_back():
    base = logits(tiny_llama())
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, targets=["q_proj"], modules_to_save=[HEAD])
    head = m.get_submodule(HEAD).weight
    train_a_little(m)
    trained_head, adapted = head.detach().clone(), logits(m)
    assert not torch.allclose(adapted, base)
    with lowrank.disabled(m):
        torch.testing.assert_close(logits(m), base, rtol=0, atol=0)
        with lowrank.disabled(m):  # nested: still the base
            torch.testing.assert_close(logits(m), base, rtol=0, atol=0)
        torch.testing.assert_close(logits(m), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(m), adapted, rtol=0, atol=0)
    # the same tensor holds the trained values again (an optimizer's references stay valid)
    assert m.get_submodule(HEAD).weight is head and torch.equal(head, trained_head) and head.requires_grad


def test_a_save_inside_disabled_writes_the_trained_head(tmp_path):
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, targets=["q_proj"], modules_to_save=[HEAD])
    train_a_little(m)
    adapted = logits(m)
    with lowrank.disabled(m):
        lowrank.save_adapter(m, tmp_path / "a")
    fresh = lowrank.load_adapter(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(logits(fresh), adapted, rtol=0, atol=0)


def test_a_loaded_adapter_keeps_the_original_head_for_disabled(tmp_path):
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, targets=["q_proj"], modules_to_save=[HEAD])
    train_a_little(m)
    lowrank.save_adapter(m, tmp_path / "a")
    fresh = lowrank.load_adapter(tiny_llama(), tmp_path / "a")
    with lowrank.disabled(fresh):
        torch.testing.assert_close(logits(fresh), logits(tiny_llama()), rtol=0, atol=0)


def test_an_inactive_adapter_leaves_the_original_head_and_still_saves_its_own(tmp_path):
    base_head = tiny_llama().get_submodule(HEAD).weight.detach().clone()
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=[HEAD])
    train_a_little(m)
    a_head, a_logits = m.get_submodule(HEAD).weight.detach().clone(), logits(m)
    lowrank.adapt(m, "lora", rank=2, name="b", targets=["v_proj"])
    lowrank.set_active(m, "b")
    assert torch.equal(m.get_submodule(HEAD).weight, base_head)
    assert not m.get_submodule(HEAD).weight.requires_grad
    lowrank.save_adapter(m, tmp_path / "a", name="a")  # a's own head, though it is not shown now
    torch.testing.assert_close(logits(lowrank.load_adapter(tiny_llama(), tmp_path / "a")), a_logits, rtol=0, atol=0)
    lowrank.set_active(m, ["a", "b"])
    assert torch.equal(m.get_submodule(HEAD).weight, a_head) and m.get_submodule(HEAD).weight.requires_grad
    lowrank.set_active(m, "a")
    torch.testing.assert_close(logits(m), a_logits, rtol=0, atol=0)


def test_unload_keeps_the_head_the_model_shows():
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, targets=["q_proj"], modules_to_save=[HEAD])
    train_a_little(m)
    adapted = logits(m)
    plain = lowrank.unload(m)
    torch.testing.assert_close(logits(plain), adapted, rtol=1e-5, atol=1e-6)
    assert not [k for k in vars(plain) if k.startswith("_lowrank")]


def test_a_tied_head_is_restored_with_its_embedding():
    """GPT-2's lm_head shares its weight with the token embedding: one live tensor, so both show
    the original inside disabled and the trained values after."""
    from conftest import tiny_gpt2

    base = logits(tiny_gpt2())
    m = lowrank.adapt(tiny_gpt2(), "lora", rank=2, targets=["c_attn"], modules_to_save=[HEAD])
    assert m.lm_head.weight is m.transformer.wte.weight
    train_a_little(m)
    adapted = logits(m)
    with lowrank.disabled(m):
        torch.testing.assert_close(logits(m), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(m), adapted, rtol=0, atol=0)
    assert m.lm_head.weight is m.transformer.wte.weight


def test_two_adapters_each_train_their_own_copy_of_a_module_one_shown_at_a_time(tmp_path):
    """As PEFT's per-adapter copies: b starts from the original head, not from a's; switching the
    active adapter switches the head; both active at once is refused; each saves its own head."""
    base = logits(tiny_llama())
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=[HEAD])
    train_a_little(m)
    a_logits = logits(m)
    with pytest.raises(lowrank.ConfigError, match="set_active without 'a' first"):
        lowrank.adapt(m, "lora", rank=2, name="b", targets=["v_proj"], modules_to_save=[HEAD])
    lowrank.set_active(m, [])
    torch.testing.assert_close(logits(m), base, rtol=0, atol=0)
    lowrank.adapt(m, "lora", rank=2, name="b", targets=["v_proj"], modules_to_save=[HEAD])
    torch.testing.assert_close(logits(m), base, rtol=0, atol=0)  # b's head starts as the original
    train_a_little(m)
    b_logits = logits(m)
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(lowrank.ConfigError, match="each train their own copy of 'lm_head'"):
        lowrank.set_active(m, ["a", "b"])
    assert all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())
    lowrank.set_active(m, "a")
    torch.testing.assert_close(logits(m), a_logits, rtol=0, atol=0)
    with lowrank.disabled(m):
        torch.testing.assert_close(logits(m), base, rtol=0, atol=0)
    lowrank.save_adapter(m, tmp_path / "b", name="b")  # b is not shown: its kept copy is written
    lowrank.set_active(m, "b")
    torch.testing.assert_close(logits(m), b_logits, rtol=0, atol=0)
    lowrank.save_adapter(m, tmp_path / "a", name="a")
    for d, want in (("a", a_logits), ("b", b_logits)):
        torch.testing.assert_close(logits(lowrank.load_adapter(tiny_llama(), tmp_path / d, name=d)), want,
                                   rtol=0, atol=0)
    # and both files load side by side into one model, switched the same way
    both = lowrank.load_adapter(tiny_llama(), tmp_path / "a", name="a")
    with pytest.raises(lowrank.AdapterLoadError, match="set_active without 'a' first"):
        lowrank.load_adapter(both, tmp_path / "b", name="b")
    lowrank.set_active(both, [])
    lowrank.load_adapter(both, tmp_path / "b", name="b")
    torch.testing.assert_close(logits(both), b_logits, rtol=0, atol=0)
    lowrank.set_active(both, "a")
    torch.testing.assert_close(logits(both), a_logits, rtol=0, atol=0)


def test_a_module_and_a_part_of_it_are_not_saved_by_two_adapters():
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=["model.layers.1.mlp"])
    lowrank.set_active(m, [])
    with pytest.raises(lowrank.ConfigError, match="a module and a part of it"):
        lowrank.adapt(m, "lora", rank=2, name="b", targets=["v_proj"], modules_to_save=["model.layers.1.mlp.up_proj"])


def test_set_active_inside_disabled_takes_effect_when_it_ends():
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=[HEAD])
    train_a_little(m)
    a_head = m.get_submodule(HEAD).weight.detach().clone()
    lowrank.set_active(m, [])
    lowrank.adapt(m, "lora", rank=2, name="b", targets=["v_proj"], modules_to_save=[HEAD])
    train_a_little(m)
    b_head = m.get_submodule(HEAD).weight.detach().clone()
    original = tiny_llama().get_submodule(HEAD).weight
    with lowrank.disabled(m):
        lowrank.set_active(m, "a")
        assert torch.equal(m.get_submodule(HEAD).weight, original)  # still the base inside
    assert torch.equal(m.get_submodule(HEAD).weight, a_head)
    with lowrank.disabled(m):
        lowrank.set_active(m, [])
    assert torch.equal(m.get_submodule(HEAD).weight, original)
    lowrank.set_active(m, "b")
    assert torch.equal(m.get_submodule(HEAD).weight, b_head)


@pytest.mark.parametrize("entries", [["lm_head", "lm_head"], ["model.layers.1.mlp", "model.layers.1.mlp.up_proj"]])
def test_repeated_or_nested_entries_are_saved_once_and_come_back_after_disabled(tmp_path, entries):
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, targets=["q_proj"], modules_to_save=entries)
    assert lowrank.adapter_record(m)["modules_to_save"] == entries[:1]
    train_a_little(m)
    adapted = logits(m)
    with lowrank.disabled(m):
        pass
    torch.testing.assert_close(logits(m), adapted, rtol=0, atol=0)
    lowrank.save_adapter(m, tmp_path / "a")
    torch.testing.assert_close(logits(lowrank.load_adapter(tiny_llama(), tmp_path / "a")), adapted, rtol=0, atol=0)


def test_one_tied_tensor_saved_under_two_paths():
    """One adapter saving GPT-2's lm_head and wte (one tied weight) gets its training back after
    disabled(); two adapters each owning one of the two paths is refused."""
    from conftest import tiny_gpt2

    m = lowrank.adapt(tiny_gpt2(), "lora", rank=2, targets=["c_attn"], modules_to_save=["lm_head", "wte"])
    train_a_little(m)
    adapted = logits(m)
    with lowrank.disabled(m):
        torch.testing.assert_close(logits(m), logits(tiny_gpt2()), rtol=0, atol=0)
    torch.testing.assert_close(logits(m), adapted, rtol=0, atol=0)
    two = lowrank.adapt(tiny_gpt2(), "lora", rank=2, name="a", targets=["c_attn"], modules_to_save=["lm_head"])
    lowrank.set_active(two, [])
    with pytest.raises(lowrank.ConfigError, match="shares tensors with 'lm_head'"):
        lowrank.adapt(two, "lora", rank=2, name="b", targets=["c_proj"], modules_to_save=["wte"])


def test_unload_inside_disabled_gives_the_adapted_model():
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, targets=["q_proj"], modules_to_save=[HEAD])
    train_a_little(m)
    adapted = logits(m)
    with lowrank.disabled(m):
        plain = lowrank.unload(m)
    torch.testing.assert_close(logits(plain), adapted, rtol=1e-5, atol=1e-6)
    assert not [k for k in vars(plain) if k.startswith("_lowrank")]


def test_an_inactive_owner_saves_its_head_in_the_model_dtype(tmp_path):
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=[HEAD])
    lowrank.set_active(m, [])
    m.double()
    lowrank.save_adapter(m, tmp_path / "a", name="a")
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "a" / "adapter_model.safetensors").values()} == {torch.float64}


def test_an_adapter_name_is_used_once():
    """Adapting again under an existing name (other layers, even another method) is refused: one
    name, one record and one file (it used to replace the record, and the file then did not load)."""
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, targets=["q_proj"])
    with pytest.raises(lowrank.AlreadyAdaptedError, match="already has an adapter named 'default'"):
        lowrank.adapt(m, "dora", rank=4, targets=["v_proj"])
    assert lowrank.adapter_record(m)["method"] == "lora"
    assert not any("default" in layer.adapters for p, layer in lowrank.adapted_layers(m) if "v_proj" in p)
