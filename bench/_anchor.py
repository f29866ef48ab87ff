"""What the adapter benchmarks share: the anchor Llama, one training step, interleaved timing and
a fresh process's peak RSS (not a benchmark itself).

Anchor (issue 2): Llama hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8192 (33.7M).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

VOCAB = 8192


def anchor_llama():
    """The anchor Llama, built from its config with seed 0, in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
    )
    return LlamaForCausalLM(cfg).train()


def adapted_anchor(method: str, **adapt_options):
    """(model, AdamW over its trainable parameters) for ``lowrank.adapt(anchor, method, ...)``."""
    import lowrank

    model = anchor_llama()
    lowrank.adapt(model, method, **adapt_options)
    return model, adamw(model)


def adamw(model) -> torch.optim.Optimizer | None:
    from lowrank.recipes._defaults import adamw as recipe_adamw

    params = [p for p in model.parameters() if p.requires_grad]
    # every configuration gets the AdamW that `lowrank train` builds: torch's, fused on CPU
    return recipe_adamw(params, lr=1e-4) if params else None


def train_step(model, opt, ids) -> float:
    """Forward (plus any adapter auxiliary loss), backward, optimizer step; the task loss."""
    import lowrank

    loss = model(input_ids=ids, labels=ids).loss
    aux = lowrank.aux_loss(model)
    (loss if aux is None else loss + aux).backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def interleaved_medians(built: dict[str, tuple], ids, rounds: int,
                        step: Callable = train_step) -> dict[str, float]:
    """Median step time of each (model, optimizer), steps interleaved round-robin after one warm-up
    step each, so load changes on a shared machine hit every configuration alike."""
    for m, o in built.values():
        step(m, o, ids)
    times: dict[str, list[float]] = {n: [] for n in built}
    for _ in range(rounds):
        for n, (m, o) in built.items():
            t = time.perf_counter()
            step(m, o, ids)
            times[n].append(time.perf_counter() - t)
    return {n: statistics.median(v) for n, v in times.items()}


def peak_rss_bytes(module: str, name: str, batch: int, seq: int, steps: int = 2, prelude: str = "") -> int:
    """VmHWM of a fresh process that runs ``module.build(name)`` and ``steps`` of ``module.step``.

    VmHWM (the process's own peak), not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a
    child of a large process would report the parent's peak.  ``prelude``: Python run first.
    """
    code = (
        f"{prelude};" if prelude else ""
    ) + (
        f"import sys, torch; sys.path.insert(0, 'bench'); import {module} as s;"
        f"m, o = s.build({name!r}); ids = torch.randint(0, {VOCAB}, ({batch}, {seq}),"
        " generator=torch.Generator().manual_seed(0));"
        f"[s.step(m, o, ids) for _ in range({steps})];"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024  # kB -> bytes


def comparison_parser() -> argparse.ArgumentParser:
    """The options of a side-by-side adapter comparison (rounds, batch, sequence, memory, --only)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated configs (LoRA, the reference, always runs)")
    return ap


def selected(configs, only: str) -> list[str]:
    """The configs named in ``only`` (all when empty), always with the reference ``lora``."""
    wanted = set(only.split(",")) if only else None
    return [n for n in configs if wanted is None or n in wanted or n == "lora"]
