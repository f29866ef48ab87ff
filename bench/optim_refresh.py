"""Low-rank optimizers on the anchor Llama (hidden 512, intermediate 1376, 8 layers, vocab 8192,
batch 8 x 256, rank 128, CPU fp32), side by side in one process:

1. subspace refresh of all 56 projected matrices: galore-torch's SVDs vs our projectors
   (randomized cold = first refresh, warm = later refreshes started from the previous basis,
   exact SVD), with the gradient energy each captures relative to the exact rank-r SVD;
2. the non-refresh optimizer step: galore-torch GaLoreAdamW vs ours vs torch AdamW(foreach),
   and ours against its bound: 4 m n r FLOPs per matrix at the measured matmul rate + torch's
   AdamW on everything else (unprojected parameters and the low-rank moments);
3. optimizer-state memory of every method beside AdamW's (formula on a meta model = held bytes);
4. Q-GaLore with INT8 weights (``weight_bits=8``) against Q-GaLore with fp32 weights: bytes the
   projected weights hold between steps, forward+backward and non-refresh step times
   (interleaved), and the peak RSS (VmHWM) of a fresh process running 3 training steps.

Run:  .venv/bin/python bench/optim_refresh.py [--reps 5] [--sections 1234]
Timings on a shared 2-core machine are noisy: medians of --reps runs, all in one process; the
non-refresh steps of the three optimizers are interleaved so they share the same load.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowrank.optim as lo
from lowrank.optim.projectors import make_projector

RANK = 128


def anchor(device="cpu"):
    cfg = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    with torch.device(device):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


def median_time(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_rate(n=1024, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = median_time(lambda: a @ b, reps)
    return 2 * n**3 / t


def energy(G, Q):
    return float((G @ Q).square().sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--sections", default="123", help="which sections to run, e.g. 1 or 23 or 4")
    ap.add_argument("--batch", type=int, default=8, help="section 4: batch size (sequences of 256)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; shared machine: timings are noisy (median of {reps})")
    rate = matmul_rate()
    print(f"matmul rate (1024^3 fp32): {rate / 1e9:.0f} GFLOP/s")
    if args.sections == "4":
        return qgalore_int8_section(reps, args.batch)

    model = anchor()
    ids = torch.randint(0, 8192, (8, 256), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    print(f"forward+backward (8 x 256): {time.perf_counter() - t0:.2f} s")
    _, proj = lo.split_targets(model, None)
    print(f"projected matrices: {len(proj)}")
    grads = [p.grad for _, p in proj]
    oriented = [g if g.shape[0] >= g.shape[1] else g.mT for g in grads]

    if "1" in args.sections:
        refresh_section(grads, oriented, reps)
    ours_ref = (None, None)
    if "2" in args.sections:
        ours_ref = step_section(model, proj, rate, reps)
    if "3" in args.sections:
        memory_section(*ours_ref)
    if "4" in args.sections:
        qgalore_int8_section(reps, args.batch)


def refresh_section(grads, oriented, reps):
    # ---------------------------------------------------------------- 1. refresh
    print("\n## 1. subspace refresh of all projected matrices (rank 128)")
    from galore_torch.galore_projector import GaLoreProjector
    gp = [GaLoreProjector(RANK, update_proj_gap=200, scale=0.25, proj_type="std") for _ in grads]

    def galore_refresh():
        for g, p in zip(grads, gp):
            p.ortho_matrix = None
            p.project(g, 0)
    t_ref = median_time(galore_refresh, max(1, reps // 2))
    # the exact rank-r energy of each matrix, from galore-torch's own SVD basis
    exact = []
    for G, g, p in zip(oriented, grads, gp):
        Q = p.ortho_matrix.mT if g.shape[0] >= g.shape[1] else p.ortho_matrix     # (d, r)
        exact.append(energy(G, Q))

    rows = []
    for label, name, opts in [("randomized (cold, 1 power it.)", "randomized", {}),
                              ("randomized (cold, 0 power it.)", "randomized", {"power_iters": 0}),
                              ("randomized (warm, 1 power it.)", "randomized", {"warm": True}),
                              ("randomized (cold, 1 power it., 8 oversampled + Rayleigh-Ritz)", "randomized",
                               {"oversample": 8})]:
        warm = opts.pop("warm", False)
        pr = make_projector(name, RANK, **opts)
        st = [pr.init(G.shape[1], G, i + 1, False) for i, G in enumerate(oriented)]
        if warm:   # start from the basis of a previous step's gradient (a perturbed one, as after 200 steps)
            g2 = torch.Generator().manual_seed(1)
            prev = [G + 0.5 * G.std() * torch.randn(G.shape, generator=g2) for G in oriented]
            pr.refresh(prev, st, 1)
        start = [s.Q.clone() for s in st] if hasattr(st[0], "Q") else None

        def run():
            for s, q0 in zip(st, start or [None] * len(st)):   # every rep starts from the same basis
                if q0 is not None:
                    s.Q.copy_(q0)
                if hasattr(s, "fresh"):
                    s.fresh = int(warm)
            pr.refresh(oriented, st, 2)
        t = median_time(run, reps)
        cap = [energy(G, pr.basis(s, G)) / e for G, s, e in zip(oriented, st, exact)]
        rows.append((label, t, sum(cap) / len(cap), min(cap)))
    print(f"| refresh | time (s) | speed-up vs galore-torch | energy vs exact SVD (mean / min) |")
    print(f"|---|---|---|---|")
    print(f"| galore-torch (torch.linalg.svd per matrix) | {t_ref:.3f} | 1.0x | 100% |")
    for label, t, mean, mn in rows:
        print(f"| {label} | {t:.3f} | {t_ref / t:.1f}x | {100 * mean:.2f}% / {100 * mn:.2f}% |")



def step_section(model, proj, rate, reps):
    # ---------------------------------------------------------------- 2. non-refresh step
    print("\n## 2. non-refresh optimizer step")
    import galore_torch
    plain, _ = lo.split_targets(model, None)
    params = [p for p in model.parameters()]
    saved = [p.detach().clone() for p in params]
    gsave = [p.grad.clone() for p in params]

    def restore():
        with torch.no_grad():
            for p, s, g in zip(params, saved, gsave):
                p.copy_(s)
                p.grad = g.clone()

    results = {}
    ref = galore_torch.GaLoreAdamW([{"params": [p for _, p in plain]},
                                    {"params": [p for _, p in proj], "rank": RANK, "update_proj_gap": 10**9,
                                     "scale": 0.25, "proj_type": "std"}], lr=1e-4, no_deprecation_warning=True)
    ours = lo.galore(model, lr=1e-4, rank=RANK, update_gap=10**9)
    torch_adamw = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    opts = (("galore-torch GaLoreAdamW", ref), ("lowrank galore (randomized)", ours),
            ("torch AdamW(foreach)", torch_adamw))
    for name, opt in opts:
        restore()
        t_first = median_time(opt.step, 1)            # the first step refreshes / allocates
        print(f"{name}: first step {t_first:.2f} s")
    times = {name: [] for name, _ in opts}
    for _ in range(reps):                             # interleaved, so all see the same machine load
        for name, opt in opts:
            times[name].append(median_time(opt.step, 1))
    for name, _ in opts:
        results[name] = statistics.median(times[name])
        print(f"{name}: non-refresh step {results[name]:.3f} s (all: {', '.join(f'{t:.2f}' for t in times[name])})")
    restore()
    # bound: 4 m n r FLOPs per matrix at the measured rate + torch AdamW(foreach) on the rest
    flops = sum(4 * p.shape[0] * p.shape[1] * RANK for _, p in proj)
    lowrank_like = [torch.nn.Parameter(torch.zeros(max(p.shape), RANK)) for _, p in proj]
    rest = [torch.nn.Parameter(p.detach().clone()) for _, p in plain] + lowrank_like
    for p in rest:
        p.grad = torch.randn_like(p)
    rest_opt = torch.optim.AdamW(rest, lr=1e-4, foreach=True)
    rest_opt.step()
    t_rest = median_time(rest_opt.step, reps)
    bound = flops / rate + t_rest
    t_ours, t_ref_step = results["lowrank galore (randomized)"], results["galore-torch GaLoreAdamW"]
    print(f"projection FLOPs {flops / 1e9:.1f} GFLOP -> {flops / rate:.3f} s at {rate / 1e9:.0f} GFLOP/s; "
          f"AdamW on the rest {t_rest:.3f} s; bound {bound:.3f} s")
    print(f"| step | time (s) | vs galore-torch | vs bound |")
    print(f"|---|---|---|---|")
    for name, t in results.items():
        print(f"| {name} | {t:.3f} | {t_ref_step / t:.2f}x faster | {t / bound:.2f}x bound |")

    return ours, ref


def memory_section(ours=None, ref=None):
    # ---------------------------------------------------------------- 3. memory
    print("\n## 3. optimizer-state memory (fp32)")
    meta = anchor("meta")
    adamw_b = 2 * sum(p.numel() for p in meta.parameters()) * 4
    builders = {
        "galore r128 (randomized/svd)": lambda m: lo.galore(m, rank=RANK),
        "galore r128 dct (indices only)": lambda m: lo.galore(m, rank=RANK, projector="dct"),
        "fira r128": lambda m: lo.fira(m, rank=RANK),
        "apollo r256 (seeded random)": lambda m: lo.apollo(m, rank=256),
        "apollo-mini r1": lambda m: lo.apollo_mini(m),
        "flora r128": lambda m: lo.flora(m, rank=RANK),
        "q-galore r128 (int4 basis)": lambda m: lo.q_galore(m, rank=RANK),
        "q-galore r128 + INT8 weights (codes counted here)": lambda m: lo.q_galore(m, rank=RANK, weight_bits=8),
        "osd r128": lambda m: lo.osd(m, rank=RANK),
    }
    print(f"| optimizer | state (MB) | vs AdamW |")
    print(f"|---|---|---|")
    print(f"| AdamW | {adamw_b / 2**20:.1f} | 100% |")
    for name, b in builders.items():
        sb = lo.state_bytes(b(meta), allocated=False)
        print(f"| {name} | {sb / 2**20:.1f} | {100 * sb / adamw_b:.1f}% |")
    if ours is None:
        return
    held_ours = lo.state_bytes(ours)
    held_ref = sum(v.numel() * v.element_size() for st in ref.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor))
    held_ref += sum(st["projector"].ortho_matrix.numel() * 4 for st in ref.state.values() if "projector" in st)
    print(f"held after a step: ours galore {held_ours / 2**20:.1f} MB (formula "
          f"{lo.state_bytes(ours, allocated=False) / 2**20:.1f} MB), galore-torch {held_ref / 2**20:.1f} MB")


# ---------------------------------------------------------------- 4. Q-GaLore INT8 weights

def qgalore(model, bits):
    # randomized base projector: the bench is about the weights, not about the (exact-SVD) refresh
    return lo.q_galore(model, lr=1e-4, rank=RANK, update_gap=10**9, base="randomized", weight_bits=bits)


def train_step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def _peak_rss_child(bits, batch):
    model = anchor()
    opt = qgalore(model, None if bits == "fp32" else 8)
    ids = torch.randint(0, 8192, (batch, 256), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        train_step(model, opt, ids)
    print([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")][0])


def peak_rss_gb(bits, batch):
    # VmHWM of a fresh process (not ru_maxrss, which survives execve)
    code = (f"import sys; sys.path.insert(0, 'bench'); import optim_refresh as b; "
            f"b._peak_rss_child({bits!r}, {batch})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1e6


def qgalore_int8_section(reps, batch):
    print(f"\n## 4. Q-GaLore INT8 weights (weight_bits=8) vs fp32 weights, batch {batch} x 256")
    ids = torch.randint(0, 8192, (batch, 256), generator=torch.Generator().manual_seed(0))
    runs = {}
    for bits in (None, 8):
        m = anchor()
        o = qgalore(m, bits)
        train_step(m, o, ids)                           # first step: refresh + state allocation
        runs[bits] = (m, o)
    proj = [p for g in runs[8][1].param_groups if g["method"] == "q_galore" for p in g["params"]]
    n = sum(p.numel() for p in proj)
    held8 = sum(p.untyped_storage().nbytes() for p in proj)
    codes = sum(w.codes.numel() + w.scale.numel() * 4 + w.zero.numel()
                for w in (runs[8][1].weight_of(p) for p in proj))
    print(f"projected weights: {len(proj)} matrices, {n / 1e6:.1f}M entries; fp32 {4 * n / 2**20:.1f} MB; "
          f"int8: parameters hold {held8} B, codes+scales+zeros {codes / 2**20:.1f} MB ({8 * codes / n:.2f} bits/weight)")
    sb = {bits: lo.state_bytes(o) for bits, (m, o) in runs.items()}
    print(f"state_bytes: fp32-weight q_galore {sb[None] / 2**20:.1f} MB, int8 {sb[8] / 2**20:.1f} MB "
          f"(difference = the INT8 weights, {(sb[8] - sb[None]) / 2**20:.1f} MB)")
    times = {(bits, k): [] for bits in (None, 8) for k in ("fwd+bwd", "step")}
    for _ in range(reps):                               # interleaved
        for bits, (m, o) in runs.items():
            o.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            m(input_ids=ids, labels=ids).loss.backward()
            t1 = time.perf_counter()
            o.step()
            t2 = time.perf_counter()
            times[(bits, "fwd+bwd")].append(t1 - t0)
            times[(bits, "step")].append(t2 - t1)
    print("| q_galore weights | fwd+bwd (s) | non-refresh step (s) |")
    print("|---|---|---|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for bits in (None, 8):
        print(f"| {'fp32' if bits is None else 'int8 + SR'} | {med[(bits, 'fwd+bwd')]:.3f} | {med[(bits, 'step')]:.3f} |")
    print(f"int8 / fp32: fwd+bwd {med[(8, 'fwd+bwd')] / med[(None, 'fwd+bwd')]:.2f}x, "
          f"step {med[(8, 'step')] / med[(None, 'step')]:.2f}x")
    del runs
    peaks = {"fp32": [], "int8": []}
    for _ in range(3):                                  # interleaved fresh processes; VmHWM varies by ~50 MB
        for k in peaks:
            peaks[k].append(peak_rss_gb(k, batch))
    p = {k: statistics.median(v) for k, v in peaks.items()}
    print(f"peak RSS of a fresh process, 3 steps (median of 3): fp32 {p['fp32']:.3f} GB "
          f"({', '.join(f'{x:.3f}' for x in peaks['fp32'])}), int8 {p['int8']:.3f} GB "
          f"({', '.join(f'{x:.3f}' for x in peaks['int8'])}): saved {1e3 * (p['fp32'] - p['int8']):.0f} MB; "
          f"expected {(4 * n - codes) / 1e6:.0f} MB (fp32 projected weights minus their INT8 codes)")

if __name__ == "__main__":
    main()
