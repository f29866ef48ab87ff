"""lowrank.delete_adapter: what it removes, and what it refuses (the conformance suite checks every
method on every tiny model: the other adapter's outputs stay, the last one gives the base back)."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.adapters.factorized import parameterise

from conftest import tiny_llama

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))


def logits(m):
    with torch.no_grad():
        return m(input_ids=IDS).logits


def state(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, {n: p.requires_grad for n, p in m.named_parameters()},
            repr(m), sorted(k for k in vars(m) if k.startswith("_lowrank")))


def assert_same(m, before):
    now = state(m)
    assert now[0].keys() == before[0].keys() and all(torch.equal(now[0][k], before[0][k]) for k in now[0])
    assert now[1:] == before[1:]


def perturb(m):
    with torch.no_grad():
        for _, p in lowrank.trainable_parameters(m):
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("case", ["unknown", "merged", "pissa", "released"])
def test_refusals_leave_the_model_as_it_was(case):
    m = tiny_llama()
    if case == "released":
        parameterise(m, "lowrank", rank=4)
    else:
        lowrank.adapt(m, "lora", rank=2, targets=["q_proj"], init="pissa" if case == "pissa" else None)
    perturb(m)
    if case == "merged":
        lowrank.merge(m)
    before = state(m)
    exc, match = {"unknown": (lowrank.AdapterNotFoundError, "no adapter named 'nope'"),
                  "merged": (lowrank.MergeError, "unmerge before deleting"),
                  "pissa": (lowrank.ConfigError, "holds part of the base weight"),
                  "released": (lowrank.ConfigError, "which was released")}[case]
    with pytest.raises(exc, match=match):
        lowrank.delete_adapter(m, "nope" if case == "unknown" else "default")
    assert_same(m, before)


def test_deleting_the_owner_of_a_saved_module_gives_its_original_back_and_frees_the_name():
    base = tiny_llama()
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"], modules_to_save=["lm_head"])
    perturb(m)
    a_logits = logits(m)
    lowrank.set_active(m, [])
    lowrank.adapt(m, "lora", rank=2, name="b", targets=["v_proj"], modules_to_save=["lm_head"])
    perturb(m)
    lowrank.delete_adapter(m, "b")
    assert torch.equal(m.lm_head.weight, base.lm_head.weight) and not m.lm_head.weight.requires_grad
    lowrank.set_active(m, "a")
    torch.testing.assert_close(logits(m), a_logits, rtol=0, atol=0)
    lowrank.adapt(m, "lora", rank=2, name="b", targets=["k_proj"])  # the name is free again
    lowrank.delete_adapter(m, "b")
    lowrank.delete_adapter(m, "a")
    assert torch.equal(m.lm_head.weight, base.lm_head.weight)
    torch.testing.assert_close(logits(m), logits(base), rtol=0, atol=0)
    assert m.state_dict().keys() == base.state_dict().keys()
    assert not [k for k in vars(m) if k.startswith("_lowrank")]


def test_inside_disabled_delete_is_refused_and_a_new_adapter_waits_for_the_end():
    base = logits(tiny_llama())
    m = lowrank.adapt(tiny_llama(), "lora", rank=2, name="a", targets=["q_proj"])
    perturb(m)
    lowrank.merge(m)
    merged = logits(m)
    with lowrank.disabled(m):
        with pytest.raises(lowrank.ConfigError, match="inside lowrank.disabled"):
            lowrank.delete_adapter(m, "a")
        lowrank.adapt(m, "lora", rank=2, name="b", targets=["v_proj"])
        perturb(m)  # b's factors (the trainable ones now): b changes outputs wherever it applies
        # b is not applied inside either (a was unmerged: W back to float rounding)
        torch.testing.assert_close(logits(m), base, rtol=1e-5, atol=1e-6)
    assert lowrank.adapter_names(m) == ["a", "b"]
    with_b = logits(m)
    assert not torch.allclose(with_b, merged)  # b applies now, beside the re-merged a
    lowrank.unmerge(m)
    lowrank.set_active(m, "a")
    torch.testing.assert_close(logits(m), merged, rtol=1e-5, atol=1e-6)
