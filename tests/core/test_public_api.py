"""The public API beyond the conformance suite: targets, several adapters, meta device, CLI."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

import lowrank
from conftest import tiny_gpt2, tiny_llama


def _ids(seed=7):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_all_linear_skips_output_head():
    model = lowrank.adapt(tiny_llama(), "lora", rank=2)
    paths = {p for p, _ in lowrank.adapted_layers(model)}
    assert "lm_head" not in paths
    assert len(paths) == 2 * 7  # q k v o gate up down per layer
    gpt = lowrank.adapt(tiny_gpt2(), "lora", rank=2)  # tied head, Conv1D blocks
    assert "lm_head" not in {p for p, _ in lowrank.adapted_layers(gpt)}
    assert len(list(lowrank.adapted_layers(gpt))) == 2 * 4


def test_target_forms_list_and_regex():
    by_list = lowrank.adapt(tiny_llama(), "lora", targets=["q_proj", "v_proj"], rank=2)
    by_regex = lowrank.adapt(tiny_llama(), "lora", targets=r".*\.(q|v)_proj", rank=2)
    a = sorted(p for p, _ in lowrank.adapted_layers(by_list))
    b = sorted(p for p, _ in lowrank.adapted_layers(by_regex))
    assert a == b and len(a) == 4
    ex = lowrank.adapt(tiny_llama(), "lora", targets=["q_proj"], exclude=r"model\.layers\.0\..*", rank=2)
    assert [p for p, _ in lowrank.adapted_layers(ex)] == ["model.layers.1.self_attn.q_proj"]


def test_trainable_and_counts():
    model = tiny_llama()
    total_before = sum(p.numel() for p in model.parameters())
    lowrank.adapt(model, "lora", targets=["q_proj"], rank=2)
    trainable, total = lowrank.count_parameters(model)
    assert trainable == 2 * 2 * (32 + 32)
    assert total == total_before + trainable
    assert all("adapters.default" in n for n, _ in lowrank.trainable_parameters(model))


def test_named_adapters_sum_and_switch():
    x = _ids()
    model = tiny_llama()
    lowrank.adapt(model, "lora", targets=["q_proj", "v_proj"], rank=2, name="a")
    lowrank.adapt(model, "lora", targets=["q_proj", "v_proj"], rank=2, name="b")
    for _, layer in lowrank.adapted_layers(model):
        for a in layer.adapters.values():
            nn.init.normal_(a.lora_B.weight, std=0.5)
    with torch.no_grad():
        lowrank.set_active(model, ["a"])
        ya = model(input_ids=x).logits
        lowrank.set_active(model, "b")
        yb = model(input_ids=x).logits
        lowrank.set_active(model, ["a", "b"])
        yab = model(input_ids=x).logits
        with lowrank.disabled(model):
            y0 = model(input_ids=x).logits
    assert not torch.allclose(ya, yb)
    # the two updates add up in weight space: check against merged weights
    with torch.no_grad():
        lowrank.merge(model)
        torch.testing.assert_close(model(input_ids=x).logits, yab, atol=1e-5, rtol=0)
        lowrank.unmerge(model)
    assert {n.split(".adapters.")[1].split(".")[0] for n, _ in lowrank.trainable_parameters(model)} == {"a", "b"}
    lowrank.set_active(model, "a")
    assert {n.split(".adapters.")[1].split(".")[0] for n, _ in lowrank.trainable_parameters(model)} == {"a"}
    assert not torch.allclose(y0, ya)


def test_meta_device_7b_count_without_memory():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    lowrank.adapt(model, "lora", targets=["q_proj", "v_proj"], rank=8)
    trainable, total = lowrank.count_parameters(model)
    assert trainable == 4_194_304  # the LoRA paper / PEFT figure for Llama-2-7B, r=8 on q,v
    assert total == 6_738_415_616 + trainable
    assert next(model.parameters()).device.type == "meta"
    lowrank.adapt(model, "dora", rank=16, name="d")
    assert lowrank.count_parameters(model)[0] == sum(
        16 * (l.base.in_features + l.base.out_features) + l.base.out_features for _, l in lowrank.adapted_layers(model)
    )


def test_cli_methods_and_info():
    from typer.testing import CliRunner

    from lowrank.cli import _load_commands, app

    _load_commands()
    runner = CliRunner()
    out = runner.invoke(app, ["methods"])
    assert out.exit_code == 0, out.output
    for name in ("lora", "rslora", "dora"):
        assert name in out.output
    info = runner.invoke(app, ["info", "dora"])
    assert info.exit_code == 0 and "Weight-Decomposed" in info.output and "r * (in + out) + out" in info.output
    assert "relora" in out.output and "galore" in out.output  # the training recipes are listed too
    info = runner.invoke(app, ["info", "relora"])
    assert info.exit_code == 0 and "schedule recipe" in info.output and "every=100" in info.output
    info = runner.invoke(app, ["info", "LoRA"])
    assert isinstance(info.exception, lowrank.UnknownNameError) and "Did you mean 'lora'?" in str(info.exception)


def test_cli_entry_point_reports_errors_with_exit_2():
    bad = subprocess.run([sys.executable, "-m", "lowrank", "info", "dorra"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'dora'" in bad.stderr.lower()


def test_method_info_api():
    info = lowrank.method_info("rslora")
    assert "sqrt(r)" in info.formula and info.paper
    assert lowrank.method_info("kaiming").kind == "init"
