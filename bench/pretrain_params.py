"""Memory and step time of the pretraining parameterisations, side by side in one process.

    .venv/bin/python bench/pretrain_params.py [--hidden 256] [--layers 4] [--rank 64] [--steps 12] [--threads 1]
                                              [--methods a,b,...] [--no-peak]

For each method on the same freshly built Llama (same seed): memory of weights + gradients +
optimizer state, *measured* (bytes of the distinct tensors the model, its .grad fields and the
optimizer state hold after a step; freed dense bases count 0) and *by formula* (the papers'
parameter counts x 4 bytes); and the median time of a full training step (forward, backward,
optimizer step, schedule callback), methods interleaved round-robin so machine load hits all
alike.  Prints ratios to full-rank AdamW and SLTrain's step time relative to the factorised
(``lowrank``) baseline.  ``sltrain-dense`` is SLTrain through the reference implementation's
kernel (a transient dense W = B A + scatter(S) per layer, one GEMM on the activations) and
``sltrain-csr`` through torch's CSR kernels on feature-major copies, instead of the default
token-major sparse kernels: the same function, timed side by side.

The model of ``lowrank bench --task pretrain`` (llama-small, its recipes' rank 32, two threads):

    .venv/bin/python bench/pretrain_params.py --inter 704 --heads 8 --vocab 256 --rank 32 --threads 2 \
        --steps 30 --methods lowrank,sltrain,sltrain-csr,sltrain-dense --no-peak

Peak memory: each method also runs in a fresh subprocess (build, then 2 training steps) that
reports its own VmHWM (peak RSS) and its RSS just before the first step; "step peak" = the
difference = what a training step adds on top of the built model (activations, transients,
gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

from lowrank.adapters.cola import CoLA
from lowrank.adapters.factorized import LowRank
from lowrank.adapters.lost import LOST
from lowrank.adapters.sltrain import SLTrain
from lowrank.core.inject import adapted_layers
from lowrank.recipes import TaskInfo, get_recipe


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).train()


def linear_shapes(model):
    return [
        (m.out_features, m.in_features)
        for p, m in model.named_modules()
        if isinstance(m, nn.Linear) and p != "lm_head"
    ]


def measured_bytes(model, opt):
    seen: set[int] = set()

    def size(t):
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            return 0
        if t.dim() > 0 and all(s == 0 for s in t.stride()):
            return 0  # a freed dense base (zero-stride view)
        key = t.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    weights = sum(size(t) for t in list(model.parameters()) + list(model.buffers()))
    grads = sum(size(p.grad) for p in model.parameters())
    def walk(obj, depth=0):
        if torch.is_tensor(obj):
            return size(obj) if obj.dim() > 0 else 0
        if depth > 5:
            return 0
        if isinstance(obj, dict):
            return sum(walk(v, depth + 1) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v, depth + 1) for v in obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
            return sum(walk(v, depth + 1) for v in vars(obj).values())
        return 0

    state = sum(walk(st) for st in opt.state.values())  # nested states (lowrank.optim) included
    return weights, grads, state


def formula_bytes(method, model_fresh, args):
    """weights / grads / Adam state (2 moments) from the papers' parameter counts, fp32."""
    shapes = linear_shapes(model_fresh)
    total = sum(p.numel() for p in model_fresh.parameters())
    dense_lin = sum(o * i for o, i in shapes)
    other = total - dense_lin  # embeddings, norms, head: trained in full by every method
    r = args.rank
    per = {
        "lowrank": lambda o, i: LowRank.trainable_count(i, o, r),
        "sltrain": lambda o, i: SLTrain.trainable_count(i, o, r, sparsity=args.sparsity),
        "sltrain-dense": lambda o, i: SLTrain.trainable_count(i, o, r, sparsity=args.sparsity),
        "sltrain-csr": lambda o, i: SLTrain.trainable_count(i, o, r, sparsity=args.sparsity),
        "lost": lambda o, i: LOST.trainable_count(i, o, r, sparsity=args.lost_sparsity),
        "cola": lambda o, i: CoLA.trainable_count(i, o, r),
    }
    if method == "full":
        w = t = total
        state = 2 * t
    elif method in per:
        lin = sum(per[method](o, i) for o, i in shapes)
        w = t = other + lin
        state = 2 * t
    elif method == "relora":
        lora = sum(r * (o + i) for o, i in shapes)
        w, t = total + lora, other + lora
        state = 2 * t
    elif method == "galore":
        w = t = total
        proj = sum(2 * r * max(o, i) + r * min(o, i) for o, i in shapes)  # moments of R + projector
        state = 2 * other + proj
    else:
        return None
    return 4 * w, 4 * t, 4 * state


def prepare(method, args):
    model = build(args)
    task = TaskInfo("pretrain")
    if method == "full":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return model, opt, []
    if method == "galore":
        from lowrank.optim.galore import galore

        return model, galore(model, lr=1e-3, rank=args.rank, update_gap=10_000), []
    opts = {"rank": args.rank}
    kernel = None
    if method in ("sltrain-dense", "sltrain-csr"):
        method, kernel = "sltrain", method.split("-")[1]
    if method == "sltrain":
        opts["sparsity"] = args.sparsity
    if method == "lost":
        opts["sparsity"] = args.lost_sparsity
    if method == "relora":
        opts["every"] = 10_000
    prep = get_recipe(method).build(model, task, lr=1e-3, **opts)
    if kernel is not None:
        for _, layer in adapted_layers(prep.model):
            for a in layer.adapters.values():
                a.kernel = kernel
    return prep.model, prep.optimizer, prep.callbacks


def _status_kb(key):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key)))


def peak_of(method, args, batches):
    """In this (fresh) process: build, 2 steps; print peak RSS and RSS before the first step (kB)."""
    model, opt, cbs = prepare(method, args)
    before = _status_kb("VmRSS")
    for i in range(2):
        model(input_ids=batches[i], labels=batches[i]).loss.backward()
        opt.step()
        for cb in cbs:
            cb.step(model, opt, i)
        opt.zero_grad(set_to_none=False)
    print(f"PEAK {_status_kb('VmHWM')} {before}")


def peak_rss(method, argv):
    # VmHWM of a fresh process (not ru_maxrss, which Linux carries over execve from this parent)
    out = subprocess.run([sys.executable, __file__, *argv, "--peak-of", method], capture_output=True, text=True, check=True)
    hwm, before = next(line for line in out.stdout.splitlines() if line.startswith("PEAK")).split()[1:]
    return int(hwm) / 1024, (int(hwm) - int(before)) / 1024  # MiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--sparsity", type=float, default=0.03)
    ap.add_argument("--lost-sparsity", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="full,lowrank,sltrain,sltrain-dense,lost,cola,relora,galore")
    ap.add_argument("--no-peak", action="store_true", help="skip the per-method peak-RSS subprocesses")
    ap.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    try:
        import lowrank.optim.galore  # noqa: F401
    except ImportError:
        methods = [m for m in methods if m != "galore"]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g) for _ in range(4)]
    if args.peak_of:
        peak_of(args.peak_of, args, batches)
        return 0
    passthrough = [a for a in sys.argv[1:]]
    peaks = {} if args.no_peak else {m: peak_rss(m, passthrough) for m in methods}
    runs = {m: prepare(m, args) for m in methods}
    fresh = build(args)

    def step(m, i):
        model, opt, cbs = runs[m]
        ids = batches[i % len(batches)]
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        for cb in cbs:
            cb.step(model, opt, i)
        dt = time.perf_counter() - t0
        return dt

    times: dict[str, list[float]] = {m: [] for m in methods}
    mem = {}
    for m in methods:  # warm-up step, then measure memory with gradients and state present
        step(m, 0)
        mem[m] = measured_bytes(runs[m][0], runs[m][1])
        runs[m][1].zero_grad(set_to_none=False)
    for i in range(args.steps):  # round-robin so that load from other processes hits all methods
        for m in methods:
            times[m].append(step(m, i + 1))
            runs[m][1].zero_grad(set_to_none=False)

    mb = 1 / 2**20
    full_mem = sum(mem["full"]) if "full" in mem else None
    med = {m: statistics.median(v) for m, v in times.items()}
    print(f"Llama h={args.hidden} inter={args.inter} L={args.layers} vocab={args.vocab}, batch {args.batch}x{args.seq}, "
          f"rank {args.rank}, sltrain delta={args.sparsity}, lost rho={args.lost_sparsity}, {args.threads} thread(s), "
          f"median of {args.steps} steps")
    print(f"{'method':<13} {'weights':>8} {'grads':>8} {'optim':>8} {'total MiB':>9} {'formula':>8} {'vs full':>7} "
          f"{'step s':>8} {'vs full':>7} {'peak RSS':>9} {'step peak':>9}")
    for m in methods:
        w, gr, st = mem[m]
        f = formula_bytes(m, fresh, args)
        ftot = f"{sum(f) * mb:8.2f}" if f else "       -"
        rel = f"{(w + gr + st) / full_mem:7.2f}" if full_mem else "      -"
        trel = f"{med[m] / med['full']:7.2f}" if "full" in med else "      -"
        pk = f"{peaks[m][0]:9.1f} {peaks[m][1]:9.1f}" if m in peaks else f"{'-':>9} {'-':>9}"
        print(f"{m:<13} {w*mb:8.2f} {gr*mb:8.2f} {st*mb:8.2f} {(w+gr+st)*mb:9.2f} {ftot} {rel} {med[m]:8.4f} {trel} {pk}")
    for m in ("sltrain", "sltrain-csr", "sltrain-dense"):
        if m in med and "lowrank" in med:
            print(f"{m} step / lowrank step = {med[m] / med['lowrank']:.2f} (target <= 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
