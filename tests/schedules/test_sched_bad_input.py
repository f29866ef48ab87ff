"""Schedules refuse bad settings when built, refuse to run unattached when attach prepares the first
step, and a corrupt saved state leaves them as they were; full-weight parameterisations refuse a
bad alpha, a second parameterisation of a layer, and merging into a released base weight."""

from __future__ import annotations

import pytest
import torch

import lowrank
from lowrank.adapters.factorized import parameterise
from lowrank.errors import CheckpointError
from lowrank.schedules import LISA, Cuttlefish, OwLore, ReLoRA, SwitchLoRA
from conftest import tiny_llama


@pytest.mark.parametrize("build, key", [
    (lambda: ReLoRA(total_steps=0), "total_steps"),
    (lambda: ReLoRA(warmup_steps=-5), "warmup_steps"),
    (lambda: ReLoRA(min_lr_ratio=-1.0), "min_lr_ratio"),
    (lambda: ReLoRA(every=True), "every"),
    (lambda: ReLoRA(prune_ratio="0.9"), "prune_ratio"),
    (lambda: LISA(True, 5), "n_layers"),
    (lambda: SwitchLoRA(total_steps=100, interval=float("nan")), "interval"),
    (lambda: SwitchLoRA(total_steps=100, freeze_steps=-1), "freeze_steps"),
    (lambda: SwitchLoRA(total_steps=100.5), "total_steps"),
    (lambda: SwitchLoRA(total_steps=100, n_candidates=0), "n_candidates"),
    (lambda: Cuttlefish(max_full_steps=-1), "max_full_steps"),
    (lambda: Cuttlefish(check_every=2.5), "check_every"),
    (lambda: OwLore(outlier_threshold=float("inf")), "outlier_threshold"),
])
def test_bad_settings_are_refused_at_construction(build, key):
    with pytest.raises(lowrank.ConfigError, match=f"'{key}'"):
        build()


def test_a_schedule_that_prepares_the_first_step_must_be_attached():
    model = tiny_llama()
    lowrank.adapt(model, "lora", rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = ReLoRA(every=10, warmup_steps=5)
    with pytest.raises(lowrank.ConfigError, match="call attach"):
        sched.step(model, opt, 0)
    sched.attach(model, opt)
    assert opt.param_groups[0]["lr"] == 0.0  # the warm-up's first step, set before it runs


@pytest.mark.parametrize("sched, bad", [
    (ReLoRA(every=3), {"name": "relora", "t": 7, "restarts": "x"}),
    (LISA(), {"name": "lisa", "t": 5, "rng": torch.zeros(3, dtype=torch.uint8), "active": []}),
])
def test_a_corrupt_state_leaves_the_schedule_as_it_was(sched, bad):
    before = sched.state_dict()
    with pytest.raises(CheckpointError, match="corrupt"):
        sched.load_state_dict({**before, **bad})
    after = sched.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        same = torch.equal(after[k], before[k]) if isinstance(before[k], torch.Tensor) else after[k] == before[k]
        assert same, k


@pytest.mark.parametrize("method", ["lowrank", "lost", "sltrain", "cola"])
@pytest.mark.parametrize("alpha", [0, -4, float("nan")])
def test_parameterisations_refuse_a_bad_alpha(method, alpha):
    model = tiny_llama()
    with pytest.raises(lowrank.ConfigError, match="alpha"):
        lowrank.adapt(model, method, rank=2, alpha=alpha)
    assert not any(isinstance(m, lowrank.AdaptedLayer) for m in model.modules())


def test_one_full_weight_parameterisation_per_layer_and_no_merge_into_a_released_weight():
    model = tiny_llama()
    lowrank.adapt(model, "lowrank", rank=4)
    with pytest.raises(lowrank.AlreadyAdaptedError, match="already parameterised"):
        lowrank.adapt(model, "sltrain", rank=4, name="second")
    assert lowrank.adapter_names(model) == ["default"]
    with pytest.raises(lowrank.AlreadyAdaptedError, match="replaces the base weight that the other's update reads"):
        lowrank.adapt(model, "dora", rank=4, name="third")  # DoRA's norm reads a W that lowrank replaced
    released = tiny_llama()
    parameterise(released, "lowrank", rank=4)
    with pytest.raises(lowrank.MergeError, match="released"):
        lowrank.merge(released)
    assert not any(layer.merged for _, layer in lowrank.adapted_layers(released))
