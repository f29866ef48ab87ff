"""The training loop, its configuration and its checkpoints (see :mod:`lowrank.train.loop`)."""

from .allocator import keep_freed_heap
from .checkpoint import latest_checkpoint, list_checkpoints, read_checkpoint, write_checkpoint
from .config import TASK_DEFAULTS, TrainConfig, parse_options, read_config_file
from .loop import MetricsLog, Trainer, TrainResult, optimizer_state_bytes, peak_rss_bytes, seed_everything, train

__all__ = [
    "Trainer",
    "TrainConfig",
    "TrainResult",
    "train",
    "parse_options",
    "read_config_file",
    "TASK_DEFAULTS",
    "MetricsLog",
    "optimizer_state_bytes",
    "peak_rss_bytes",
    "seed_everything",
    "write_checkpoint",
    "read_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "keep_freed_heap",
]
