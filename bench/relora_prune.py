"""ReLoRA's optimizer-state handling at a restart, at micro scale (issue 5, investigation only).

    .venv/bin/python bench/relora_prune.py [--cosine]

Runs the ReLoRA recipe on the short pretraining task of ``tests/test_pretrain_run.py`` (tiny
Llama, 160 steps, restarts every 50) with the optimizer state of the factors at each restart
(a) reset to zero (the recipe's default), (b) magnitude-pruned 99 % per moment tensor
independently (the paper / reference code), (c) pruned 99 % with ONE mask per parameter, the
positions where the second moment survives, applied to both moments.  Prints the eval loss of
each for two restart warm-up lengths.  Without ``--cosine`` the LR is constant between restart
warm-ups (what the recipe does when ``total_steps`` is not given); with it, the jagged cosine
over the 160 steps.  The variant (c) exists only in this script (monkeypatched over
``lowrank.schedules.relora.prune_state``); nothing in the library changes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import lowrank.schedules.relora as relora  # noqa: E402
from lowrank.recipes import TaskInfo, get_recipe  # noqa: E402
import test_pretrain_run as task  # noqa: E402

_independent = relora.prune_state


def _joint(optimizer, params, mode, ratio):
    """Prune m and v with the mask of v (no surviving m over a zeroed v: no m / eps steps)."""
    for p in params:
        st = optimizer.state.get(p) or {}
        m, v = st.get("exp_avg"), st.get("exp_avg_sq")
        if m is None or v is None:
            continue
        k = math.ceil(ratio * v.numel() - 1e-9)
        if k >= v.numel():
            m.zero_(), v.zero_()
            continue
        drop = v <= v.flatten().kthvalue(k).values
        v.masked_fill_(drop, 0.0)
        m.masked_fill_(drop, 0.0)


def run(mode, prune_fn, restart_warmup, total_steps):
    relora.prune_state = prune_fn
    try:
        model = task._model()
        prep = get_recipe("relora").build(model, TaskInfo("pretrain"), lr=3e-3, rank=task.RANK, every=50,
                                          optimizer_reset=mode, restart_warmup_steps=restart_warmup,
                                          total_steps=total_steps)
        model, opt, cbs = prep.model, prep.optimizer, prep.callbacks
        train, evald = task._language(task.STEPS * task.BATCH, 1), task._language(64, 2)
        for s in range(task.STEPS):
            ids = train[s * task.BATCH:(s + 1) * task.BATCH]
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            for cb in cbs:
                cb.step(model, opt, s)
        model.eval()
        with torch.no_grad():
            return model(input_ids=evald, labels=evald).loss.item()
    finally:
        relora.prune_state = _independent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cosine", action="store_true", help="jagged cosine over the run (total_steps = 160)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    total = task.STEPS if args.cosine else None
    for mode, fn, label in [("reset", _independent, "reset"), ("prune", _independent, "prune 99%, per moment"),
                            ("prune", _joint, "prune 99%, one mask (v)")]:
        for rw in (10, 25):
            print(f"{label:26s} restart warm-up {rw:2d}: eval loss {run(mode, fn, rw, total):.3f}", flush=True)


if __name__ == "__main__":
    main()
