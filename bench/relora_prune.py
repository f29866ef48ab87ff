"""ReLoRA's optimizer-state handling at a restart, at micro scale (issue 5, investigation only).

    .venv/bin/python bench/relora_prune.py [--cosine]

Runs the ReLoRA recipe on the short pretraining task of ``tests/test_pretrain_run.py`` (tiny
Llama, 160 steps, restarts every 50) with the optimizer state of the factors at each restart
(a) reset to zero (the recipe's default), (b) magnitude-pruned 99 % per moment tensor
independently (the paper / reference code), (c) pruned 99 % with ONE mask per parameter, the
positions where the second moment survives, applied to both moments (``optimizer_reset=
"prune-joint"``).  Prints the eval loss of each for two restart warm-up lengths.  Without
``--cosine`` the LR is constant between restart warm-ups (what the recipe does when
``total_steps`` is not given); with it, the jagged cosine over the 160 steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from lowrank.recipes import TaskInfo, get_recipe  # noqa: E402
import test_pretrain_run as task  # noqa: E402


def run(mode, restart_warmup, total_steps):
    model = task._model()
    prep = get_recipe("relora").build(model, TaskInfo("pretrain"), lr=3e-3, rank=task.RANK, every=50,
                                      optimizer_reset=mode, restart_warmup_steps=restart_warmup,
                                      total_steps=total_steps)
    train, evald = task._language(task.STEPS * task.BATCH, 1), task._language(64, 2)
    return task.fit(prep.model, prep.optimizer, prep.callbacks, train, evald)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cosine", action="store_true", help="jagged cosine over the run (total_steps = 160)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    total = task.STEPS if args.cosine else None
    for mode, label in [("reset", "reset"), ("prune", "prune 99%, per moment"), ("prune-joint", "prune 99%, one mask (v)")]:
        for rw in (10, 25):
            print(f"{label:26s} restart warm-up {rw:2d}: eval loss {run(mode, rw, total):.3f}", flush=True)


if __name__ == "__main__":
    main()
