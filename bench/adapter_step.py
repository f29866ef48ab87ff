"""Training-step time and peak memory of adapters, side by side with PEFT (issue 2).

Anchor: Llama hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8192, batch 8 x 256,
adapters r=16 on all linear layers, AdamW, CPU fp32.  In one process, steps of every
configuration are interleaved round-robin (so load changes on the machine hit all alike):

  bound   the frozen base: every weight frozen, forward + input-gradient backward
  full    full fine-tuning
  peft-*  PEFT 0.21 LoRA / DoRA
  ours-*  lowrank LoRA / DoRA

Peak RSS is measured per configuration in a fresh subprocess (its own VmHWM).  Page faults per
step are counted in the shared process: under glibc's default malloc, large freed blocks go
back to the system and each step touches fresh pages again.  ``--allocator lowrank`` first
makes the same call as ``lowrank train`` (:func:`lowrank.train.keep_freed_heap`: glibc keeps
freed memory, as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment would), in
the timing process and in each peak-RSS process, so every configuration runs that way.
``x_bound_paired`` is [median, min, max] over rounds of the step time divided by the bound's step
in the same round.

    .venv/bin/python bench/adapter_step.py [--rounds 6] [--no-memory] [--allocator glibc|lowrank]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
import warnings

import torch
from _anchor import adamw, anchor_llama, peak_rss_bytes

warnings.filterwarnings("ignore")
B, T, R = 8, 256, 16
CONFIGS = ["bound", "full", "peft-lora", "ours-lora", "peft-dora", "ours-dora"]


def build(name: str):
    import lowrank

    model = anchor_llama()
    if name == "bound":
        for p in model.parameters():
            p.requires_grad_(False)
        # make the embedding output require grad so backward runs through every layer (input grads only)
        model.model.embed_tokens.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif name.startswith("peft-"):
        import peft

        model = peft.get_peft_model(
            model,
            peft.LoraConfig(r=R, lora_alpha=R, lora_dropout=0.0, target_modules="all-linear",
                            use_dora=name.endswith("dora")),
        )
    elif name.startswith("ours-"):
        lowrank.adapt(model, name.split("-")[1], rank=R, alpha=R)
    return model, adamw(model)


def step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def matmul_rate(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


KEEP_FREED = "from lowrank.train import keep_freed_heap; keep_freed_heap()"


def peak_rss_of(name: str, prelude: str) -> int:
    return peak_rss_bytes("adapter_step", name, B, T, steps=3, prelude=prelude)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--allocator", choices=["glibc", "lowrank"], default="glibc",
                    help="glibc: its defaults; lowrank: keep freed memory, as `lowrank train` does")
    args = ap.parse_args()
    prelude = KEEP_FREED if args.allocator == "lowrank" else ""
    if prelude:
        from lowrank.train import keep_freed_heap

        assert keep_freed_heap(), "glibc's mallopt is not available here"
    names = args.configs.split(",")
    ids = torch.randint(0, 8192, (B, T), generator=torch.Generator().manual_seed(0))
    built = {n: build(n) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}  # minor page faults (fresh pages touched)
    for n in names:  # warm-up: allocator, optimizer state
        step(*built[n], ids)
    for _ in range(args.rounds):
        for n in names:
            f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            step(*built[n], ids)
            times[n].append(time.perf_counter() - t)
            faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
    rate = matmul_rate()
    med = {n: statistics.median(v) for n, v in times.items()}
    # multiply work of the frozen base: forward 2*P*T*B + input-gradient backward 2*P*T*B (linear layers)
    model = built[names[0]][0]
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    base_flops = 4 * lin * B * T
    rows = []
    for n in names:
        row = {"config": n, "median_step_s": round(med[n], 3)}
        if "bound" in med:
            row["x_bound"] = round(med[n] / med["bound"], 3)
            # the same ratio taken within each round (steps run back to back), then its median and
            # spread: less exposed to the machine changing speed between rounds
            paired = sorted(t / b for t, b in zip(times[n], times["bound"]))
            row["x_bound_paired"] = [round(statistics.median(paired), 3), round(paired[0], 3), round(paired[-1], 3)]
        if n.startswith("ours-") and f"peft-{n[5:]}" in med:
            row["x_peft"] = round(med[n] / med[f"peft-{n[5:]}"], 3)
        row["matmul_rate_fraction"] = round(base_flops / med[n] / rate, 3)
        row["page_faults_per_step"] = int(statistics.median(faults[n]))
        if not args.no_memory:
            row["peak_rss_gb"] = round(peak_rss_of(n, prelude) / 1e9, 3)
        rows.append(row)
    print(f"allocator: {args.allocator}")
    print(f"machine matmul rate (1024^3 fp32): {rate / 1e9:.0f} GFLOP/s; frozen-base multiply work {base_flops / 1e9:.0f} GFLOP/step")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
