"""Structures II (issue 8): trainable parameters, step time and peak memory next to LoRA.

Anchor: Llama hidden 512, intermediate 1376, 8 layers, 8 heads, vocab 8192 (33.7M), batch
B x T (default 8 x 256), adapters at rank 16 on all linear layers (LoReFT: on the 8 decoder
layers' outputs), AdamW, CPU fp32, model in train mode (DropLoRA masks, routers balance).
In one process the steps of all configurations are interleaved round-robin, so load changes on
a shared machine hit all alike; each configuration's median step is divided by LoRA's.  Peak RSS
is the VmHWM of a fresh subprocess per configuration (build + 2 steps).

    .venv/bin/python bench/structures_ii.py [--rounds 3] [--batch 8] [--seq 256] [--no-memory] [--only a,b]
    .venv/bin/python bench/structures_ii.py --micro     # one adapted layer, forward + backward

``--micro``: one anchor-shaped layer (512 -> 1376 and 1376 -> 512), T = batch x seq tokens,
forward + backward (input and adapter gradients), LoRA r=16 vs the adapters whose hot path was
tuned: C3A b=32 through DFT GEMMs (current) and through the module's FFT branch (rfft/irfft under
autograd, the previous algorithm), Kronecker chunked with recomputation (current) and through
the previous autograd einsums.  The model configs ``c3a-b32-rfft`` and ``kron-einsum`` patch the
previous forwards onto the same adapters, for before/after in one process.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings

import torch
from _anchor import adapted_anchor, comparison_parser, interleaved_medians, peak_rss_bytes, selected, train_step

warnings.filterwarnings("ignore")
R = 16
# name -> (method, options); block sizes divide 512 and 1376 (= 32 x 43)
CONFIGS: dict[str, tuple[str, dict]] = {
    "lora": ("lora", {}),
    "moslora": ("moslora", {}),
    "melora": ("melora", {"n_blocks": 4}),
    "droplora": ("droplora", {}),
    "mora-sharing": ("mora", {"compression": "sharing"}),
    "mora-rotation": ("mora", {"compression": "rotation"}),
    "c3a-b32": ("c3a", {"block_size": 32}),
    "c3a-b32-rfft": ("c3a", {"block_size": 32}),  # the previous forward (rfft/einsum/irfft under autograd)
    "bone-b16": ("bone", {}),
    "kron": ("kron", {}),
    "kron-einsum": ("kron", {}),  # the previous forward (autograd through two einsums), for comparison
    "wara": ("wara", {}),
    "hydra": ("hydra", {}),
    "hydralora": ("hydralora", {"n_heads": 3, "balance_weight": 0.01}),
    "smora": ("smora", {}),
    "flylora": ("flylora", {}),
    "loreft": ("loreft", {"targets": r"model\.layers\.\d+"}),
}


def einsum_kron(self, x, base_out, base):
    """Kron's forward before the chunked Function: autograd keeps the (..., r, n1, m2) X B_kᵀ."""
    m1, n1, m2, n2 = self.shapes
    XB = torch.einsum("...jl,kml->...kjm", x.reshape(*x.shape[:-1], n1, n2), self.kron_B)
    Y = torch.einsum("kij,...kjm->...im", self.kron_A, XB)
    return base_out + self.scaling * Y.reshape(*x.shape[:-1], self.out_features)


def rfft_c3a(self, x, base_out, base):
    """C3A's forward before the DFT-GEMM Function: rfft, complex einsum, irfft, under autograd."""
    k = self.c3a_kernel.float()
    m, n, b = k.shape
    xf = torch.fft.rfft(x.float().reshape(*x.shape[:-1], n, b), dim=-1)
    yf = torch.einsum("...nf,mnf->...mf", xf, torch.fft.rfft(k, dim=-1).conj())
    y = torch.fft.irfft(yf, n=b, dim=-1).reshape(*x.shape[:-1], m * b) / self.in_features
    return base_out + y.to(base_out.dtype)


def build(name: str):
    import lowrank

    method, opts = CONFIGS[name]
    model, opt = adapted_anchor(method, rank=R, alpha=R, **opts)
    previous = {"kron-einsum": einsum_kron, "c3a-b32-rfft": rfft_c3a}.get(name)
    if previous is not None:
        import types

        for _, layer in lowrank.adapted_layers(model):
            a = layer.adapters["default"]
            a.forward = types.MethodType(previous, a)
    return model, opt


step = train_step


def peak_rss(name: str, batch: int, seq: int) -> float:
    return peak_rss_bytes("structures_ii", name, batch, seq) / 1e9


def micro(rounds: int, tokens: int) -> None:
    import lowrank
    from lowrank.adapters import c3a as c3a_mod
    from torch import nn

    def layer(i, o, method, **opts):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(i, o))
        lowrank.adapt(m, method, rank=R, alpha=R, **opts)
        with torch.no_grad():
            for _, p in lowrank.trainable_parameters(m):
                p.normal_(0, 0.02)
        return m

    from lowrank.adapters.kron import Kron

    chunked_kron = Kron.forward

    variants = {  # name -> (method, options, setup run before each call)
        "lora": ("lora", {}, lambda: None),
        "c3a-b32 gemm": ("c3a", {"block_size": 32}, lambda: setattr(c3a_mod, "GEMM_DFT_MAX_BLOCK", 64)),
        "c3a-b32 rfft": ("c3a", {"block_size": 32}, lambda: setattr(c3a_mod, "GEMM_DFT_MAX_BLOCK", 0)),
        "kron chunked": ("kron", {}, lambda: setattr(Kron, "forward", chunked_kron)),
        "kron einsum": ("kron", {}, lambda: setattr(Kron, "forward", einsum_kron)),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {tokens} tokens, forward + backward, "
          f"median of {rounds} interleaved rounds")
    for i, o in ((512, 1376), (1376, 512)):
        x = torch.randn(tokens, i, requires_grad=True)
        built = {n: (layer(i, o, meth, **opts), setup) for n, (meth, opts, setup) in variants.items()}
        times: dict[str, list[float]] = {n: [] for n in built}
        for r in range(rounds + 1):
            for n, (m, setup) in built.items():
                setup()
                t = time.perf_counter()
                m(x).square().mean().backward()
                if r:
                    times[n].append(time.perf_counter() - t)
        c3a_mod.GEMM_DFT_MAX_BLOCK, Kron.forward = 64, chunked_kron
        base = statistics.median(times["lora"])
        print(f"{i} -> {o}: " + ", ".join(
            f"{n} {statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / base:.2f}x)" for n, v in times.items()))


def main() -> None:
    ap = comparison_parser()
    ap.add_argument("--micro", action="store_true", help="one adapted layer instead of the model")
    args = ap.parse_args()
    if args.micro:
        return micro(max(args.rounds, 9), args.batch * args.seq)
    names = selected(CONFIGS, args.only)
    torch.manual_seed(0)
    ids = torch.randint(0, 8192, (args.batch, args.seq))
    built = {n: build(n) for n in names}
    counts = {n: sum(p.numel() for p in built[n][0].parameters() if p.requires_grad) for n in names}
    medians = interleaved_medians(built, ids, args.rounds)
    del built
    mem = {} if args.no_memory else {n: peak_rss(n, args.batch, args.seq) for n in names}
    base = medians["lora"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}x{args.seq}, "
          f"rank {R}, {args.rounds} interleaved rounds")
    print(f"{'config':<14} {'trainable':>11} {'vs LoRA':>8} {'median step s':>14} {'x LoRA':>7} {'peak RSS GB':>12}")
    rows = []
    for n in names:
        med = medians[n]
        row = {"config": n, "trainable": counts[n], "params_vs_lora": counts[n] / counts["lora"],
               "step_s": med, "step_vs_lora": med / base, "peak_rss_gb": mem.get(n)}
        rows.append(row)
        rss = f"{mem[n]:.2f}" if n in mem else "-"
        print(f"{n:<14} {counts[n]:>11,} {row['params_vs_lora']:>8.2f} {med:>14.2f} {row['step_vs_lora']:>7.2f} {rss:>12}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
