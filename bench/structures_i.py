"""Structures I (issue 7): trainable parameters, adapter file size, step time and peak memory next to LoRA.

Anchor: Llama hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8192 (33.7M), batch
B x T (default 8 x 256), adapters at rank 16 on all linear layers (plus VeRA at the paper's
r=256), AdamW lr 1e-4, CPU fp32, train mode.  In one process the steps of all configurations
are interleaved round-robin, so load changes on a shared machine hit all alike; each
configuration's median step is divided by LoRA's.  The adapter file is written with
``lowrank.save_adapter`` and its safetensors size reported.  Peak RSS is measured per
configuration in a fresh subprocess (build + 2 steps).

    .venv/bin/python bench/structures_i.py [--rounds 3] [--batch 8] [--seq 256] [--no-memory] [--only a,b]
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from _anchor import adapted_anchor, comparison_parser, interleaved_medians, peak_rss_bytes, selected, train_step

warnings.filterwarnings("ignore")
R = 16
# name -> (method, rank, options)
CONFIGS: dict[str, tuple[str, int, dict]] = {
    "lora": ("lora", R, {}),
    "vera": ("vera", R, {}),
    "vera-r256": ("vera", 256, {}),
    "nola": ("nola", R, {}),
    "randlora": ("randlora", R, {}),
    "lori": ("lori", R, {}),
    "asymmetric": ("asymmetric", R, {}),
    "singlora": ("singlora", R, {}),
    "lamda": ("lamda", R, {}),
    "loldu": ("loldu", R, {}),
    "svfit": ("svfit", R, {}),
    "salt": ("salt", R, {"lora_rank": 4}),
    "pmss": ("pmss", R, {}),
    "denselora": ("denselora", R, {}),
}


def build(name: str):
    method, rank, opts = CONFIGS[name]
    return adapted_anchor(method, rank=rank, **opts)


step = train_step


def file_size(model) -> int:
    import lowrank

    with tempfile.TemporaryDirectory() as d:
        lowrank.save_adapter(model, Path(d) / "a")
        return (Path(d) / "a" / "adapter_model.safetensors").stat().st_size


def peak_rss(name: str, batch: int, seq: int) -> float:
    return peak_rss_bytes("structures_i", name, batch, seq) / 1e9


def main() -> None:
    ap = comparison_parser()
    ap.add_argument("--memory-only", action="store_true")
    args = ap.parse_args()
    if args.memory_only:
        for n in selected(CONFIGS, args.only):
            print(f"peak RSS {n}: {peak_rss(n, args.batch, args.seq):.2f} GB", flush=True)
        return
    names = selected(CONFIGS, args.only)
    torch.manual_seed(0)
    ids = torch.randint(0, 8192, (args.batch, args.seq))
    built = {n: build(n) for n in names}
    counts = {n: sum(p.numel() for p in built[n][0].parameters() if p.requires_grad) for n in names}
    sizes = {n: file_size(built[n][0]) for n in names}
    print("trainable:", counts, "file bytes:", sizes, flush=True)
    medians = interleaved_medians(built, ids, args.rounds)
    del built
    base = medians["lora"]
    print("step s (median):", {n: round(medians[n], 3) for n in names},
          "x LoRA:", {n: round(medians[n] / base, 2) for n in names}, flush=True)
    mem = {}
    for n in [] if args.no_memory else names:
        mem[n] = peak_rss(n, args.batch, args.seq)
        print(f"peak RSS {n}: {mem[n]:.2f} GB", flush=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}x{args.seq}, "
          f"rank {R} (vera-r256: 256), {args.rounds} interleaved rounds")
    print(f"{'config':<11} {'trainable':>10} {'vs LoRA':>8} {'file KB':>9} {'median step s':>14} {'x LoRA':>7} {'peak RSS GB':>12}")
    rows = []
    for n in names:
        med = medians[n]
        row = {"config": n, "trainable": counts[n], "params_vs_lora": counts[n] / counts["lora"],
               "file_bytes": sizes[n], "step_s": med, "step_vs_lora": med / base, "peak_rss_gb": mem.get(n)}
        rows.append(row)
        rss = f"{mem[n]:.2f}" if n in mem else "-"
        print(f"{n:<11} {counts[n]:>10,} {row['params_vs_lora']:>8.3f} {sizes[n] / 1e3:>9.1f} {med:>14.2f} "
              f"{row['step_vs_lora']:>7.2f} {rss:>12}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
