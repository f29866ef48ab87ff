"""A block-level adapter (LoReFT edits a decoder block's output) over layers that carry their own
adapters: widths, file paths and the order of adapting."""

from __future__ import annotations

import json

import pytest
import torch

import lowrank
from conftest import tiny_llama

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
BLOCK = r"model\.layers\.0"


def _perturbed(model, name):
    g = torch.Generator().manual_seed(1)
    for _, layer in lowrank.adapted_layers(model):
        if name in layer.adapters:
            for p in layer.adapters[name].parameters():
                p.data.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("first", ["lora", "mora", "smora", "hydralora"])
def test_loreft_reads_the_block_width_past_the_inner_adapters_own_layers(first):
    """The block's width comes from its last base layer, not from an inner adapter's Linear
    (MoRA's compressed square, HydraLoRA's router)."""
    m = tiny_llama()
    lowrank.adapt(m, first, rank=4, name="a")
    lowrank.adapt(m, "loreft", targets=BLOCK, rank=4, name="b")
    block = dict(lowrank.adapted_layers(m))["model.layers.0"]
    assert tuple(block.adapters["b"].R.shape) == (4, 32)
    lowrank.set_active(m, ["a", "b"])
    m(input_ids=IDS, labels=IDS).loss.backward()


def test_an_adapter_under_a_wrapped_block_saves_plain_paths_and_round_trips(tmp_path):
    m = tiny_llama()
    lowrank.adapt(m, "lora", rank=2, name="a")
    _perturbed(m, "a")
    lowrank.adapt(m, "loreft", targets=BLOCK, rank=4, name="b")
    lowrank.set_active(m, ["a", "b"])
    lowrank.save_adapter(m, tmp_path / "a", name="a")
    lowrank.save_adapter(m, tmp_path / "b", name="b")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in cfg["lowrank"]["shapes"]
    assert not any("base_layer" in k for k in cfg["lowrank"]["shapes"])
    fresh = tiny_llama()
    lowrank.load_adapter(fresh, tmp_path / "a", name="a")
    lowrank.load_adapter(fresh, tmp_path / "b", name="b")
    lowrank.set_active(fresh, ["a", "b"])
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=IDS).logits, m(input_ids=IDS).logits)
    # the other order, loading into a block LoReFT already wraps, is refused and changes nothing
    other = tiny_llama()
    lowrank.load_adapter(other, tmp_path / "b", name="b")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(lowrank.AdapterLoadError, match="sits inside a block"):
        lowrank.load_adapter(other, tmp_path / "a", name="a")
    assert other.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj"]])
def test_layers_inside_an_adapted_block_are_refused_not_silently_skipped(targets):
    """Before, 'all-linear' adapted every layer outside the block and silently left its layers out
    (or failed with 'matched no module')."""
    m = tiny_llama()
    lowrank.adapt(m, "loreft", targets=BLOCK, rank=4, name="b")
    with pytest.raises(lowrank.TargetError, match=r"sits inside 'model.layers.0'.*adapt them first"):
        lowrank.adapt(m, "lora", rank=2, targets=targets, name="a")
    assert [p for p, _ in lowrank.adapted_layers(m)] == ["model.layers.0"]
    lowrank.adapt(m, "lora", rank=2, targets=r".*layers\.1\..*_proj", name="a")  # outside the block: fine
    assert len([p for p, _ in lowrank.adapted_layers(m)]) == 1 + 7


def test_unload_without_merging_unwraps_inner_layers_first():
    m = tiny_llama()
    with torch.no_grad():
        want = m(input_ids=IDS).logits
    lowrank.adapt(m, "lora", rank=2, name="a")
    lowrank.adapt(m, "loreft", targets=BLOCK, rank=4, name="b")
    plain = lowrank.unload(m, merge_adapters=False)
    assert not list(lowrank.adapted_layers(plain))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, want)


def test_a_square_R_keeps_torchs_map_so_earlier_files_load_the_same():
    """rank = width: torch's orthogonal() picks the matrix exponential (no int() involved); kept."""
    from torch.nn.utils.parametrizations import orthogonal

    from lowrank.adapters.loreft import _orthonormal_rows

    torch.manual_seed(3)
    ref = orthogonal(torch.nn.Linear(8, 8, bias=False))
    torch.manual_seed(3)
    ours = _orthonormal_rows(torch.nn.Linear(8, 8, bias=False))
    assert torch.equal(ref.weight, ours.weight)
    with torch.no_grad():
        ref.parametrizations.weight.original.add_(0.1)
        ours.parametrizations.weight.original.add_(0.1)
    assert torch.equal(ref.weight, ours.weight)


def test_shared_modules_and_parametrized_linears_still_adapt():
    """A module registered twice (tied) is adapted once; a weight-normed Linear that carries an
    adapter is a layer, not a wrapped block, so a second adapter on all-linear is not refused."""
    shared = torch.nn.Linear(8, 8)
    m = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
    lowrank.adapt(m, "lora", rank=2)
    assert [p for p, _ in lowrank.adapted_layers(m)] == ["0"]
    wn = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 8)))
    lowrank.adapt(wn, "lora", rank=2, name="a")
    lowrank.adapt(wn, "lora", rank=2, name="b")
    assert set(dict(lowrank.adapted_layers(wn))["0"].adapters) == {"a", "b"}


def test_an_exclude_regex_with_an_inline_flag_works_beside_modules_to_save():
    m = tiny_llama()
    lowrank.adapt(m, "lora", rank=2, exclude=r"(?i).*Q_PROJ", modules_to_save=["model.layers.0.self_attn.o_proj"])
    paths = [p for p, _ in lowrank.adapted_layers(m)]
    assert paths and not any(p.endswith("q_proj") or p == "model.layers.0.self_attn.o_proj" for p in paths)
