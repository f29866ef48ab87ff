"""Interop with Hugging Face PEFT (the real package): adapters move both ways, same logits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import lowrank
from conftest import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

CASES = {
    "lora": dict(use_rslora=False, use_dora=False),
    "rslora": dict(use_rslora=True, use_dora=False),
    "dora": dict(use_rslora=False, use_dora=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _train_a_little(model, steps=3, seed=0):
    """A few real optimizer steps so that B != 0 and the magnitudes move."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 10), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method", sorted(CASES))
def test_ours_loads_in_peft(method, tmp_path):
    model = tiny_llama()
    lowrank.adapt(model, method, targets=TARGETS, rank=4, alpha=8)
    _train_a_little(model)
    with torch.no_grad():
        ours = model(input_ids=_ids()).logits
    lowrank.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["use_rslora"] == CASES[method]["use_rslora"] and cfg["use_dora"] == CASES[method]["use_dora"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=_ids()).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", sorted(CASES))
def test_peft_loads_here(method, tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **CASES[method])
    pm = peft.get_peft_model(base, cfg)
    _train_a_little(pm)
    with torch.no_grad():
        theirs = pm(input_ids=_ids()).logits
    pm.save_pretrained(str(tmp_path))
    model = lowrank.load_adapter(tiny_llama(), tmp_path)
    assert lowrank.adapter_record(model)["method"] == method
    with torch.no_grad():
        ours = model(input_ids=_ids()).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_peft_gpt2_conv1d_roundtrip(tmp_path):
    """Transposed Conv1D weights (GPT-2): fan_in_fan_out handled both ways."""
    model = tiny_gpt2()
    lowrank.adapt(model, "lora", targets=["c_attn", "c_proj", "c_fc"], rank=4)
    _train_a_little(model)
    with torch.no_grad():
        ours = model(input_ids=_ids()).logits
    lowrank.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=_ids()).logits, ours, atol=1e-5, rtol=0)


def test_dora_forward_matches_peft_on_same_weights():
    """Same factors, same magnitude: our activation-space DoRA equals PEFT's (which builds W + sBA)."""
    base = tiny_llama()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    _train_a_little(pm)
    sd = peft.get_peft_model_state_dict(pm)
    ours = lowrank.adapt(tiny_llama(), "dora", targets=TARGETS, rank=4, alpha=8)
    state = {k.replace("base_model.model.", "", 1): v for k, v in sd.items()}
    for path, layer in lowrank.adapted_layers(ours):
        a = layer.adapters["default"]
        a.lora_A.weight.data.copy_(state[f"{path}.lora_A.weight"])
        a.lora_B.weight.data.copy_(state[f"{path}.lora_B.weight"])
        a.lora_magnitude_vector.data.copy_(state[f"{path}.lora_magnitude_vector"])
    x = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-5, rtol=0)


def _tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3)).eval()


def test_a_saved_classifier_head_goes_both_ways_and_disables_as_in_peft(tmp_path):
    """modules_to_save: PEFT's files load here and ours in PEFT with the same logits, and inside
    disabled() / disable_adapter() both run the original head."""
    import peft

    ids = _ids()
    pm = peft.get_peft_model(_tiny_classifier(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        want = pm(input_ids=ids).logits
        with pm.disable_adapter():
            want_off = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "peft")
    ours = lowrank.load_adapter(_tiny_classifier(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        with lowrank.disabled(ours):
            torch.testing.assert_close(ours(input_ids=ids).logits, want_off, atol=1e-5, rtol=0)
    lowrank.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_tiny_classifier(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, want, atol=1e-5, rtol=0)
