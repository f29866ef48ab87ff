"""The configuration of one training run: a dataclass, readable from TOML or YAML."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import is_finite_real
from ..errors import ConfigError

TASKS = ("finetune", "pretrain")
PATH_FIELDS = ("out", "model", "data")  # may be given as os.PathLike; kept as str
SCHEDULES = ("cosine", "linear", "constant")
SEED_MAX = 2**32 - 1  # the data order seeds torch generators from seed * 1_000_003 + epoch
_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")

#: what a task uses when --model / --data are not given
TASK_DEFAULTS = {
    "finetune": {"model": "minilm", "data": "stdlib-docstrings"},
    "pretrain": {"model": "llama-small", "data": "stdlib-text"},
}

#: fields that must match for --resume to continue a run (the rest may change between sessions);
#: steps too: the learning-rate schedule is laid out over them
RESUME_FIELDS = (
    "task", "model", "data", "method", "rank", "lr", "optimizer", "steps", "batch_size", "grad_accum", "seq_len",
    "seed", "method_options", "optimizer_options", "lr_schedule", "warmup_steps", "min_lr_ratio", "grad_clip",
    "text_column", "label_column", "eval_size",
)


@dataclass
class TrainConfig:
    """Everything ``lowrank train`` takes.  ``None`` means "the task's / recipe's default"."""

    out: str = "runs/train"
    task: str = "finetune"
    model: str | None = None
    data: str | None = None
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    lr: float | None = None
    optimizer: str | None = None  # None/"adamw": the recipe's optimizer; else a lowrank.optim name
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    seq_len: int | None = None  # default 64 for classification, 128 for language modelling
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None  # default: 10% of the steps, at most 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at the end only
    eval_size: int | None = None  # cap on held-out examples/windows
    eval_batch_size: int = 32
    checkpoint_every: int = 100  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # 0: keep every checkpoint
    resume: bool = False
    overwrite: bool = False
    text_column: str = "text"
    label_column: str = "label"
    log_every: int = 1
    progress: bool = True
    save_final: bool = True
    threads: int | None = None
    device: str = "cpu"

    def resolved(self) -> "TrainConfig":
        """A copy with task defaults filled in and every value checked (ConfigError names the field)."""
        paths = {k: os.fspath(v) for k in PATH_FIELDS if isinstance(v := getattr(self, k), os.PathLike)}
        c = dataclasses.replace(self, **paths)
        _check_field_types(c)  # before anything below reads a value of the wrong type
        c = dataclasses.replace(c, method_options=dict(c.method_options), optimizer_options=dict(c.optimizer_options))
        if c.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {c.task!r}")
        c.model = c.model or TASK_DEFAULTS[c.task]["model"]
        c.data = c.data or TASK_DEFAULTS[c.task]["data"]
        for name in ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_every"):
            v = getattr(c, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            v = getattr(c, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if c.seq_len is not None and (not isinstance(c.seq_len, int) or c.seq_len < 2):
            raise ConfigError(f"seq_len must be an integer >= 2, got {c.seq_len!r}")
        if c.rank is not None and not _positive_int(c.rank):
            raise ConfigError(f"rank must be a positive integer, got {c.rank!r}")
        if c.lr is not None and not (is_finite_real(c.lr) and c.lr >= 0):
            raise ConfigError(f"lr must be a finite non-negative number, got {c.lr!r}")
        # rank/lr given as method options are passed to the recipe as --rank/--lr are: the same checks
        for name, top, ok, want in (("rank", c.rank, _positive_int, "a positive integer"),
                                    ("lr", c.lr, lambda v: is_finite_real(v) and v >= 0, "a finite non-negative number")):
            v = c.method_options.get(name)
            if v is None:
                continue
            if not ok(v):
                raise ConfigError(f"method_options {name} must be {want}, got {v!r}")
            if top is not None and _norm_num(top) != _norm_num(v):
                raise ConfigError(f"{name} {top!r} (--{name}) and method_options {name}={v!r} disagree: give it once")
        if not isinstance(c.seed, int) or isinstance(c.seed, bool) or not 0 <= c.seed <= SEED_MAX:
            raise ConfigError(f"seed must be an integer from 0 to {SEED_MAX}, got {c.seed!r}")
        if c.threads is not None and not _positive_int(c.threads):
            raise ConfigError(f"threads must be a positive integer, got {c.threads!r}")
        if c.lr_schedule not in SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {c.lr_schedule!r}")
        if c.warmup_steps is None:
            c.warmup_steps = min(100, c.steps // 10)
        if c.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {c.warmup_steps}")
        if not 0.0 <= c.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {c.min_lr_ratio}")
        if not (is_finite_real(c.grad_clip) and c.grad_clip >= 0):
            raise ConfigError(f"grad_clip must be a finite number >= 0 (0 disables), got {c.grad_clip}")
        if c.eval_size is not None and c.eval_size < 1:
            raise ConfigError(f"eval_size must be a positive integer, got {c.eval_size}")
        if not _DEVICE.match(c.device):
            raise ConfigError(f"device must be cpu, cuda[:N] or auto, got {c.device!r}")
        if not c.out:
            raise ConfigError("out (the output directory) is required")
        if c.optimizer_options and not c.optimizer:
            raise ConfigError("optimizer_options apply to --optimizer; without it the recipe builds its own "
                              "optimizer (its settings go in method_options)")
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            import difflib

            hints = []
            for u in unknown:
                close = difflib.get_close_matches(u, names, n=1)
                hints.append(f"{u!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown training option(s) {', '.join(hints)}")
        return cls(**{k.replace("-", "_"): v for k, v in d.items()})

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file; keys are the field names."""
        return cls.from_dict({**read_config_file(path), **overrides})


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _norm_num(v: Any) -> Any:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


_WHAT = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a table of options"}


def _check_field_types(c: TrainConfig) -> None:
    """Every field holds its declared type (a config file's ``overwrite = "false"`` is not true)."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(c):
        v = getattr(c, f.name)
        hint = hints[f.name]
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if v is None and type(None) in kinds:
            continue
        kinds = [typing.get_origin(k) or k for k in kinds if k is not type(None)]
        # a float field takes an int; only a bool field takes a bool (bool is an int subclass)
        ok = any(isinstance(v, (int, float) if k is float else k) for k in kinds)
        if not ok or (isinstance(v, bool) and bool not in kinds):
            want = " or ".join(_WHAT.get(k, k.__name__) for k in kinds)
            raise ConfigError(f"{f.name} must be {want}, got {v!r}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"config file {str(p)!r} cannot be read as UTF-8 text: {e}") from None
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"config file {str(p)!r} must be .toml, .yaml/.yml or .json")
    except ConfigError:
        raise
    except Exception as e:  # parse errors of any of the three formats
        raise ConfigError(f"config file {str(p)!r} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a table/mapping of options")
    return {k.replace("-", "_"): v for k, v in data.items()}


def parse_options(text: str | None) -> dict[str, Any]:
    """``--method-options``: a JSON object, or ``key=value,key=value`` (values parsed as JSON when they can be)."""
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"options {text!r} are not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"options {text!r} must be a JSON object")
        return d
    out: dict[str, Any] = {}
    for part in _split_top(text):
        if "=" not in part:
            raise ConfigError(f"option {part!r} is not key=value (options: {text!r})")
        k, v = part.split("=", 1)
        k = k.strip().replace("-", "_")
        v = v.strip()
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            low = v.lower()
            out[k] = True if low == "true" else False if low == "false" else None if low in ("none", "null") else v
    return out


def _split_top(text: str) -> list[str]:
    """Split on commas/spaces outside brackets, so ``betas=[0.9,0.95]`` stays one option."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch in ", " and depth == 0:
            if cur:
                parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p for p in parts if p.strip()]


__all__ = ["TrainConfig", "parse_options", "read_config_file", "TASKS", "TASK_DEFAULTS"]
