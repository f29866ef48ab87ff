"""One bench row in its own process: ``python -m lowrank.bench.worker CONFIG.json``.

Running each method in a fresh interpreter makes its peak resident memory (``getrusage``) its
own: memory an earlier method freed but the allocator kept cannot inflate a later one.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    with open(argv[1], encoding="utf-8") as fh:
        cfg = json.load(fh)
    from ..errors import LowRankError
    from ..train import TrainConfig, Trainer, keep_freed_heap
    from .runner import _write_train_config

    keep_freed_heap()  # as `lowrank train`: every method's process keeps its freed memory for reuse
    try:
        trainer = Trainer(TrainConfig.from_dict(cfg))
        _write_train_config(trainer)
        trainer.fit()
    except LowRankError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
