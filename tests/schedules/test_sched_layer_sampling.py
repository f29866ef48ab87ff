"""LISA / OwLore: unsampled blocks get no update and hold no optimizer state; OwLore's weights."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.errors import CheckpointError
from lowrank.schedules import LISA, OwLore, outlier_ratio


def _ids(seed):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _llama4():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("cls", [LISA, OwLore])
def test_unsampled_blocks_do_not_move_and_hold_no_state(cls):
    model = _llama4()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = cls(n_layers=1, interval=2, seed=3)
    sched.attach(model, opt)
    blocks = model.model.layers
    seen = set()
    for s in range(8):
        active = list(sched.active)
        seen.update(active)
        snap = {n: p.detach().clone() for n, p in model.named_parameters()}
        ids = _ids(s)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        for i, block in enumerate(blocks):
            for n, p in block.named_parameters():
                full = f"model.layers.{i}.{n}"
                if i in active:
                    continue
                assert torch.equal(p, snap[full]), f"unsampled block {i} moved ({n})"
                assert p not in opt.state or not opt.state[p], f"unsampled block {i} holds optimizer state"
        assert not torch.equal(model.model.embed_tokens.weight, snap["model.embed_tokens.weight"])
        sched.step(model, opt, s)
        # after a resample, blocks that left the sample have dropped their state
        for i, block in enumerate(blocks):
            if i not in sched.active:
                assert all(p not in opt.state for p in block.parameters())
    assert len(seen) > 1, "the sample never changed"


def test_owlore_samples_blocks_by_outlier_ratio():
    model = _llama4()
    with torch.no_grad():  # make block 2 heavy with outliers
        for m in model.model.layers[2].modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                w.view(-1)[::7] *= 40
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = OwLore(n_layers=1, interval=1, seed=0)
    sched.attach(model, opt)
    ratios = sched.ratios
    assert ratios[2] == max(ratios) and ratios[2] > 5 * max(ratios[i] for i in (0, 1, 3))
    counts = torch.zeros(4)
    for s in range(60):
        sched.step(model, opt, s)
        counts[sched.active] += 1
    assert counts[2] > 0.6 * 60, counts
    # the ratio itself: fraction of |W_ij| above M x mean
    w = torch.ones(10, 10)
    w[0, 0] = 1000
    assert outlier_ratio(w, 5.0) == pytest.approx(0.01)
    # a block's ratio pools the scores of all its layers against ONE mean (OWL): a layer scaled
    # x10 has no outliers of its own, but against the block's mean most of its entries are
    big, small = torch.ones(10, 10) * 10, torch.ones(10, 10)
    assert outlier_ratio(big, 5.0) == 0.0 and outlier_ratio(small, 5.0) == 0.0
    assert outlier_ratio([big, small, small, small], 3.0) == pytest.approx(0.25)


def test_layer_sampling_bad_input_and_resume():
    model = _llama4()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(lowrank.ConfigError, match="n_layers"):
        LISA(n_layers=5).attach(model, opt)
    with pytest.raises(lowrank.ConfigError, match="interval"):
        LISA(interval=0)
    s = LISA(n_layers=2, interval=3, seed=1)
    with pytest.raises(lowrank.ConfigError, match="call attach"):  # the first sample must precede step 1
        s.step(model, opt, 0)
    s.attach(model, opt)
    for t in range(7):
        s.step(model, opt, t)
    state = s.state_dict()
    r = LISA(n_layers=2, interval=3, seed=99)
    r.load_state_dict(state)
    r.attach(model, opt)
    for t in range(7, 13):
        s.step(model, opt, t)
        r.step(model, opt, t)
        assert s.active == r.active  # the resumed run draws the same blocks
    with pytest.raises(CheckpointError):
        LISA().load_state_dict(None)
