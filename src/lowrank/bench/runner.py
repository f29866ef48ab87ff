"""``lowrank bench``: several methods on the same task, seed, data order, steps and batch, one table.

Each method runs through the same :class:`~lowrank.train.Trainer` as ``lowrank train``, by
default in its own Python process (``isolate=True``) so that its peak resident memory is its
own.  With ``isolate=False`` the methods run one after another in this process and peak
memory is sampled (psutil, every 10 ms) during each run: memory retained by the allocator from
an earlier method can then inflate a later one, which the report says.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LowRankError, TrainingError, UnknownNameError
from ..recipes import get_recipe, recipes
from ..train import TASK_DEFAULTS, MetricsLog, TrainConfig
from ..train.loop import check_config

#: the representative default sets; names not registered (yet) are skipped with a note
DEFAULT_METHODS = {
    "finetune": ["full", "head", "lora", "dora", "pissa", "galore"],
    "pretrain": ["full", "lowrank", "sltrain", "relora", "galore", "fira", "apollo"],
}
#: steps, batch size, sequence length of the default runs (chosen so `lowrank bench` fits in minutes on 2 cores)
TASK_BUDGET = {
    "finetune": {"steps": 100, "batch_size": 16, "seq_len": 64, "eval_every": 50},
    "pretrain": {"steps": 150, "batch_size": 8, "seq_len": 128, "eval_every": 50},
}

COLUMNS = [
    "method", "kind", "status", "trainable_params", "optimizer_state_bytes", "train_state_bytes",
    "peak_memory_bytes", "median_step_s", "tokens_per_s", "eval_loss", "eval_accuracy",
    "gap_eval_loss", "gap_eval_accuracy", "time_s", "overhead_fraction",
]


@dataclass
class BenchConfig:
    out: str = "runs/bench"
    task: str = "finetune"
    methods: list[str] | None = None
    model: str | None = None
    data: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    seed: int = 0
    rank: int | None = None
    #: options for every method ({"key": value}) or per method ({"lora": {...}, "dora": {...}})
    method_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int | None = None
    eval_size: int | None = None
    isolate: bool = True
    threads: int | None = None
    device: str = "cpu"
    progress: bool = True
    text_column: str = "text"
    label_column: str = "label"


@dataclass
class BenchResult:
    out: Path
    rows: list[dict[str, Any]]
    config: BenchConfig
    total_s: float
    skipped: list[str]
    context: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def resolve_methods(task: str, methods: list[str] | None) -> tuple[list[str], list[str]]:
    """The methods to run (checked now, before anything trains) and the default ones skipped."""
    if methods is not None:
        if not methods:
            raise ConfigError("--methods names no method (leave it out for the default set)")
        out = []
        for m in methods:
            r = get_recipe(m)  # UnknownNameError with suggestions
            if task not in r.tasks:
                raise ConfigError(f"method {m!r} is a {'/'.join(r.tasks)} recipe; it does not apply to task {task!r}")
            if m in out:
                raise ConfigError(f"method {m!r} is listed twice in --methods")
            out.append(m)
        return out, []
    known = set(recipes())
    run, skipped = [], []
    for m in DEFAULT_METHODS[task]:
        if m in known and task in get_recipe(m).tasks:
            run.append(m)
        else:
            skipped.append(m)
    return run, skipped


def _per_method(options: dict[str, Any]) -> bool:
    """``--method-options`` given per method ({"dora": {...}, ...}) rather than for every method."""
    known = set(recipes())
    return bool(options) and all(k in known and isinstance(v, dict) for k, v in options.items())


def _options_for(method: str, methods: list[str], options: dict[str, Any]) -> dict[str, Any]:
    if _per_method(options):
        return dict(options.get(method, {}))
    return dict(options)


def check_inputs(cfg: "BenchConfig", methods: list[str]) -> None:
    """What can be checked before any method trains: the budget, every method's full training
    configuration (options, rank, device, ...), model, data, --out.  Nothing is written."""
    from ..data import check_data_name
    from ..models import check_model_name
    from .report import REPORT_FILES

    for name in ("steps", "batch_size", "seq_len"):  # None: the task's budget; 0 is not
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if _per_method(cfg.method_options):
        stray = sorted(set(cfg.method_options) - set(methods))
        if stray:
            raise ConfigError(f"--method-options name {', '.join(map(repr, stray))}, not among --methods ({', '.join(methods)})")
    for m in methods:
        try:
            check_config(train_config(cfg, m, methods))
        except UnknownNameError:
            raise
        except LowRankError as e:  # name the method whose configuration is refused
            try:
                wrapped = type(e)(f"method {m!r}: {e}")
            except Exception:
                raise e from None
            raise wrapped from None
    if cfg.model is not None:
        check_model_name(cfg.model)
    if cfg.data is not None:
        check_data_name(cfg.data)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {str(out)!r} is a file")
    parent = next((q for q in (out, *out.parents) if q.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {str(out)!r} cannot be created: {str(parent)!r} is not a writable directory")
    for name in REPORT_FILES.values():
        if (out / name).is_dir():
            raise ConfigError(f"{str(out / name)!r} is a directory, where the bench writes its {name} report")
    for q in (out / "runs", *(out / "runs" / m for m in methods)):
        if q.exists() and not q.is_dir():
            raise ConfigError(f"{str(q)!r} is a file, where the bench writes a run directory")


def train_config(cfg: BenchConfig, method: str, methods: list[str]) -> TrainConfig:
    budget = TASK_BUDGET[cfg.task]
    steps = cfg.steps if cfg.steps is not None else budget["steps"]
    eval_every = cfg.eval_every if cfg.eval_every is not None else (budget["eval_every"] if cfg.steps is None else max(1, steps // 3))
    return TrainConfig(
        out=str(Path(cfg.out) / "runs" / method),
        task=cfg.task,
        model=cfg.model,
        data=cfg.data,
        method=method,
        method_options=_options_for(method, methods, cfg.method_options),
        rank=cfg.rank,
        steps=steps,
        batch_size=cfg.batch_size if cfg.batch_size is not None else budget["batch_size"],
        seq_len=cfg.seq_len if cfg.seq_len is not None else budget["seq_len"],
        seed=cfg.seed,
        eval_every=eval_every,
        eval_size=cfg.eval_size,
        checkpoint_every=0,
        overwrite=True,
        save_final=False,
        progress=cfg.progress,
        threads=cfg.threads,
        device=cfg.device,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
    )


def _run_isolated(tc: TrainConfig) -> tuple[int, str]:
    # the worker writes OUT/runs/METHOD/train_config.json itself, once its Trainer has set up: a
    # method that cannot start leaves the directory of its previous run as it was
    with tempfile.TemporaryDirectory(prefix="lowrank-bench-") as tmp:
        cfg_path = Path(tmp) / "train_config.json"
        cfg_path.write_text(json.dumps(tc.to_dict(), indent=2))
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = subprocess.Popen(
            [sys.executable, "-m", "lowrank.bench.worker", str(cfg_path)], stderr=subprocess.PIPE, env=env
        )
        tail = bytearray()
        assert proc.stderr is not None
        while True:  # forward the child's progress bar, keep the end for error messages
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail += chunk
            del tail[:-8192]
        rc = proc.wait()
    return rc, tail.decode("utf-8", errors="replace")


def _run_inline(tc: TrainConfig) -> tuple[int, str, int]:
    import psutil

    from ..train import Trainer

    proc = psutil.Process()
    peak = [proc.memory_info().rss]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        trainer = Trainer(tc)
        _write_train_config(trainer)
        trainer.fit()
        rc, msg = 0, ""
    except LowRankError as e:
        rc, msg = 2, f"error: {e}"
    finally:
        stop.set()
        th.join()
    return rc, msg, peak[0]


def _write_train_config(trainer: Any) -> None:
    """OUT/runs/METHOD/train_config.json, once the method's Trainer has set up (and made the directory)."""
    (trainer.out / "train_config.json").write_text(json.dumps(trainer.config.to_dict(), indent=2))


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or "Error" in ln:
            return ln
    return lines[-1] if lines else "failed"


def run_bench(config: BenchConfig | None = None, **overrides: Any) -> BenchResult:
    """Run every method, then write results.md, results.csv, loss.png and report.html into ``out``."""
    from .report import write_reports

    cfg = config if config is not None else BenchConfig()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if cfg.task not in TASK_BUDGET:
        raise ConfigError(f"task must be one of {', '.join(TASK_BUDGET)}, got {cfg.task!r}")
    methods, skipped = resolve_methods(cfg.task, cfg.methods)
    if not methods:
        raise ConfigError(f"no method to run for task {cfg.task!r}")
    check_inputs(cfg, methods)
    out = Path(cfg.out)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for i, m in enumerate(methods, 1):
        print(f"[{i}/{len(methods)}] {m}", file=sys.stderr, flush=True)
        tc = train_config(cfg, m, methods)
        tm = time.perf_counter()
        if cfg.isolate:
            rc, tail = _run_isolated(tc)
            peak = None
        else:
            rc, tail, peak = _run_inline(tc)
        elapsed = time.perf_counter() - tm
        rows.append(_row(m, tc, rc, tail, peak, elapsed))
    total = time.perf_counter() - t0
    if not any(r["status"] == "ok" for r in rows):  # nothing to report: the reports of a previous bench stay
        failures = "; ".join(f"{r['method']}: {r['status'].removeprefix('error: ')}" for r in rows)
        raise TrainingError(f"no method ran ({failures}); the reports in {str(out)!r} were not written")
    out.mkdir(parents=True, exist_ok=True)
    _add_gaps(rows)
    context = _context(cfg, methods, rows, total)
    result = BenchResult(out, rows, cfg, total, skipped, context)
    result.files = write_reports(result)
    return result


def _row(method: str, tc: TrainConfig, rc: int, tail: str, peak: int | None, elapsed: float) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(method=method, kind=get_recipe(method).kind, time_s=elapsed)
    summary_path = Path(tc.out) / "summary.json"
    if rc != 0 or not summary_path.exists():
        row["status"] = _error_line(tail) if tail else f"failed (exit {rc})"
        return row
    s = json.loads(summary_path.read_text())
    row.update({k: s.get(k) for k in ("trainable_params", "optimizer_state_bytes", "train_state_bytes",
                                      "median_step_s", "tokens_per_s", "eval_loss", "eval_accuracy",
                                      "overhead_fraction")})
    row["peak_memory_bytes"] = peak if peak is not None else s.get("peak_rss_bytes")
    row["status"] = "ok"
    row["_summary"] = s
    row["_metrics"] = MetricsLog.read(Path(tc.out) / "metrics.jsonl")
    return row


def _add_gaps(rows: list[dict[str, Any]]) -> None:
    ref = next((r for r in rows if r["method"] == "full" and r["status"] == "ok"), None)
    if ref is None:
        return
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["eval_loss"] is not None and ref["eval_loss"] is not None:
            r["gap_eval_loss"] = r["eval_loss"] - ref["eval_loss"]
        if r.get("eval_accuracy") is not None and ref.get("eval_accuracy") is not None:
            r["gap_eval_accuracy"] = r["eval_accuracy"] - ref["eval_accuracy"]


def _context(cfg: BenchConfig, methods: list[str], rows: list[dict[str, Any]], total: float) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    first = ok[0]["_summary"] if ok else {}
    tc = train_config(cfg, methods[0], methods)
    loops = sum(r["_summary"]["time_s"]["loop"] for r in ok)
    compute = sum(r["_summary"]["time_s"]["forward_backward"] + r["_summary"]["time_s"]["optimizer"] for r in ok)
    evals = sum(r["_summary"]["time_s"]["eval"] for r in ok)
    setups = sum(r["_summary"]["time_s"]["setup"] for r in ok)
    return {
        "task": cfg.task,
        "model": first.get("model", cfg.model or TASK_DEFAULTS[cfg.task]["model"]),
        "data": first.get("data", cfg.data or TASK_DEFAULTS[cfg.task]["data"]),
        "objective": first.get("objective"),
        "steps": tc.steps,
        "batch_size": tc.batch_size,
        "seq_len": tc.seq_len,
        "seed": cfg.seed,
        "eval_every": tc.eval_every,
        "methods": methods,
        "isolate": cfg.isolate,
        "memory_note": (
            "peak resident set size of each method's own process (getrusage ru_maxrss): interpreter, torch, data "
            "and model included, so differences between rows are what the method costs"
            if cfg.isolate else
            "peak resident set size sampled every 10 ms while the method ran in the bench's process; memory kept "
            "by the allocator from earlier methods can inflate later rows"
        ),
        "total_s": total,
        "loop_s": loops,
        "compute_s": compute,
        "eval_s": evals,
        "setup_s": setups,
        "outside_compute_fraction_of_loops": (loops - compute - evals) / loops if loops else None,
        "outside_training_s": total - loops,
        "python": sys.version.split()[0],
    }


__all__ = ["BenchConfig", "BenchResult", "run_bench", "resolve_methods", "DEFAULT_METHODS", "TASK_BUDGET", "COLUMNS"]
