"""Pretraining a tiny Llama from scratch on standard-library source (bytes): GaLore and Fira
against full-rank AdamW and a pure low-rank factorisation W = B A of the same rank.

Each run: 2 blocks, hidden 64, vocab 256 (bytes), batch 8 x 32, 600 steps, 30 warm-up steps then a
constant lr, rank 4 (1/16 of the hidden size), refresh gap 50, scale 0.25.  Learning rates: the
best of a grid measured once per method (AdamW {1e-3, 3e-3}: 1e-3; factorisation {3e-3, 1e-2}:
3e-3; GaLore {1e-2, 3e-2}: 3e-2; Fira: 3e-2, the GaLore recipe).  The test runs seed 0 (model init
and batch order); the margins asserted below hold on each of seeds 0, 1, 2, measured once with this
setup (eval loss, nats/byte):

    seed | AdamW  GaLore  Fira   factorisation | GaLore-AdamW  fact.-GaLore  fact.-Fira
      0  | 1.746  1.799   1.624  1.879         |   +0.053        0.080        0.255
      1  | 1.778  1.864   1.674  1.910         |   +0.086        0.046        0.236
      2  | 1.765  1.913   1.684  1.993         |   +0.148        0.080        0.309

Running all three seeds here would cost ~3x this file's 21-28 s (each run is 600 steps), so one seed
runs and its margins are the ones that survived all three.  The runs are deterministic; the
margins leave room for BLAS differences across machines.
"""

from __future__ import annotations

import importlib
import inspect
import math

import pytest
import torch
from torch import nn

import lowrank.optim as lo

STEPS, B, T, RANK = 600, 8, 32, 4
MODULES = ["textwrap", "string", "json.encoder", "json.decoder", "shlex", "fnmatch", "glob", "csv",
           "difflib", "heapq", "bisect", "argparse"]


def corpus():
    text = "".join(inspect.getsource(importlib.import_module(m)) for m in MODULES)
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    n = int(0.9 * len(data))
    return data[:n], data[n:]


def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))


class Factorised(nn.Module):
    """W = B A, rank r, both factors trained (the GaLore paper's "low-rank" baseline)."""

    def __init__(self, lin: nn.Linear, r: int):
        super().__init__()
        out_f, in_f = lin.weight.shape
        s = math.sqrt(0.02 / math.sqrt(r))                 # entries of B A with std 0.02, as Llama's init
        self.A = nn.Parameter(torch.randn(r, in_f) * s)
        self.B = nn.Parameter(torch.randn(out_f, r) * s)

    def forward(self, x):
        return x @ self.A.T @ self.B.T


def factorise(m: nn.Module, r: int) -> nn.Module:
    for name, mod in list(m.named_modules()):
        for cn, child in list(mod.named_children()):
            if isinstance(child, nn.Linear) and ".layers." in f"{name}.{cn}":
                setattr(mod, cn, Factorised(child, r))
    return m


def train(kind: str, lr: float) -> float:
    tr, ev = corpus()
    m = factorise(model(), RANK) if kind == "lowrank" else model()
    if kind in ("adamw", "lowrank"):
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    else:
        opt = getattr(lo, kind)(m, lr=lr, rank=RANK, update_gap=GAP, scale=0.25)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    g = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(STEPS):
        ix = torch.randint(0, len(tr) - T - 1, (B,), generator=g)
        x = torch.stack([tr[i:i + T] for i in ix])
        loss = m(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    m.eval()
    with torch.no_grad():
        xs = ev[: (len(ev) // T) * T].view(-1, T)[:64]
        return float(m(input_ids=xs, labels=xs).loss)


GAP = 50
LRS = {"adamw": 1e-3, "lowrank": 3e-3, "galore": 3e-2, "fira": 3e-2}


@pytest.fixture(scope="module")
def losses():
    return {k: train(k, lr) for k, lr in LRS.items()}


def test_galore_and_fira_against_adamw_and_low_rank(losses):
    full, low, gal, fir = losses["adamw"], losses["lowrank"], losses["galore"], losses["fira"]
    print(f"eval loss (nats/byte): adamw {full:.3f}  lowrank {low:.3f}  galore {gal:.3f}  fira {fir:.3f}")
    assert gal < full + 0.16                 # GaLore within 0.16 of full-rank AdamW (seeds 0-2: 0.05-0.15)
    assert fir < full - 0.04                 # Fira below AdamW (seeds 0-2: by 0.08-0.12)
    assert gal < low - 0.03                  # GaLore below the same-rank factorisation (seeds 0-2: 0.05-0.08)
    assert fir < low - 0.15                  # Fira clearly below it (seeds 0-2: 0.24-0.31)
