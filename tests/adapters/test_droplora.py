"""DropLoRA: a random rank mask between A and B in training; plain LoRA at eval."""

from __future__ import annotations

import itertools

import pytest
import torch

import lowrank
from _structures import adapter_of, layer, perturb, x_in


def _pair():
    drop, lora = layer(), layer()
    lowrank.adapt(drop, "droplora", rank=4, rank_dropout=0.5, mask="step")
    lowrank.adapt(lora, "lora", rank=4)
    perturb(lora)
    a, b = adapter_of(drop), adapter_of(lora)
    with torch.no_grad():
        a.lora_A.weight.copy_(b.lora_A.weight)
        a.lora_B.weight.copy_(b.lora_B.weight)
    return drop, lora


def test_eval_equals_lora_without_mask():
    drop, lora = _pair()
    x = x_in()
    # to float rounding: LoRA's fused kernel adds W x onto the low-rank term, the plain path the reverse
    torch.testing.assert_close(drop(x), lora(x), atol=1e-6, rtol=0)


def test_training_masks_whole_rank_components():
    drop, lora = _pair()
    a = adapter_of(drop)
    x = x_in()
    base = drop[0].base_layer(x)
    h = x @ a.lora_A.weight.T  # (n, r)
    candidates = [
        base + a.scaling * (h * torch.tensor(m, dtype=h.dtype) / 0.5) @ a.lora_B.weight.T
        for m in itertools.product([0.0, 1.0], repeat=4)
    ]
    drop.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        y = drop(x)
        hits = [k for k, c in enumerate(candidates) if torch.allclose(y, c, atol=1e-5)]
        assert len(hits) >= 1, "training output must be LoRA with a rank mask and 1/(1-p) scaling"
        seen.add(hits[0])
    assert len(seen) > 2, "the mask must be resampled every step"


def test_token_mask_is_unbiased():
    drop, lora = _pair()
    a = adapter_of(drop)
    a.mask = "token"
    x = x_in(n=2)
    drop.train()
    torch.manual_seed(0)
    mean = torch.stack([drop(x) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, lora(x), atol=0.08, rtol=0)


def test_not_written_as_peft_lora_and_bad_options():
    assert lowrank.get_method("droplora").peft_config(4, 4, {}) is None
    assert lowrank.get_method("droplora").from_peft_config({"peft_type": "LORA", "r": 4}) is None
    with pytest.raises(lowrank.ConfigError, match="rank_dropout"):
        lowrank.adapt(layer(), "droplora", rank=4, rank_dropout=1.0)
