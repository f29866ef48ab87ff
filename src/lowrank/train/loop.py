"""The training loop behind ``lowrank train`` (and each row of ``lowrank bench``).

    from lowrank.train import Trainer, TrainConfig
    result = Trainer(TrainConfig(task="pretrain", model="llama-tiny", method="lora", steps=100, out="runs/x")).fit()

One step: ``grad_accum`` micro-batches (batch ``i`` of the seeded data stream each), backward,
gradient clipping, ``optimizer.step()``, the LR scheduler, then every recipe callback's
``step(model, optimizer, step)``.  Everything a method adds (an adapter, a low-rank optimizer,
a re-parameterisation, a schedule) enters through the recipe's :class:`~lowrank.recipes.Prepared`,
so the loop has no per-method code.

Conventions a recipe may rely on:

* ``build(model, task, *, lr, rank, **options)`` gets ``lr``/``rank`` only when the user gave
  them (or when the signature has no default for them); ``total_steps`` and ``calibration``
  (a list of training batches) are passed when the signature names them.
* A callback with ``state_dict()``/``load_state_dict()`` is checkpointed; on resume its state is
  loaded and then ``attach(model, optimizer)`` is called (if it has one) *before* the model and
  optimizer tensors are restored, so a schedule that restructures the model can do so first.
* A callback with a true ``manage_lr``/``manages_lr`` attribute owns the learning rate: the loop's
  warmup/decay schedule is then constant.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import shared_input
from ..core.api import aux_loss
from ..data import ClassificationTask, LMTask, load_data, load_task
from ..data.datasets import TextCorpus
from ..errors import CheckpointError, ConfigError, LowRankError, TrainingError, UnknownNameError
from ..models import LoadedModel, load_model
from ..recipes import Prepared, TaskInfo, get_recipe
from .checkpoint import clean_temporaries, latest_checkpoint, list_checkpoints, write_checkpoint
from .config import RESUME_FIELDS, TrainConfig


# ---- helpers ------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    import numpy as np

    st: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(st["python"])
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state: ``lowrank.optim.state_bytes`` when it exists, else the tensors' sizes."""
    try:
        from ..optim import state_bytes  # type: ignore[attr-defined]

        return int(state_bytes(optimizer))
    except Exception:
        pass
    seen: set[int] = set()

    def walk(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            key = x.untyped_storage().data_ptr()
            if key in seen and key != 0:
                return 0
            seen.add(key)
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(walk(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(walk(v) for v in x)
        return 0

    return walk(list(optimizer.state.values()))


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (getrusage)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def lr_multiplier(kind: str, warmup: int, total: int, min_ratio: float):
    """LambdaLR factor after ``s`` completed steps: linear warmup, then cosine/linear decay or constant."""

    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / (warmup + 1)
        if kind == "constant" or total <= warmup:
            return 1.0
        p = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return min_ratio + (1 - min_ratio) * (1 - p)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    return f


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step (``step``, ``loss``, ...) and per evaluation (``eval_loss``)."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        out = []
        if not path.exists():
            return out
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        return out

    @staticmethod
    def truncate(path: Path, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not path.exists():
            return
        keep = [r for r in MetricsLog.read(path) if int(r.get("step", 0)) <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, path)


@dataclass
class TrainResult:
    out: Path
    step: int
    final_eval: dict[str, float]
    summary: dict[str, Any]
    losses: list[float] = field(default_factory=list)


# ---- checks before anything loads -------------------------------------------------------------------
#: what a run writes into --out, and whether it is a directory
_RUN_FILES = {"metrics.jsonl": False, "summary.json": False, "run.json": False, "checkpoints": True, "final": True}


def check_config(config: TrainConfig) -> TrainConfig:
    """``config.resolved()`` and what else can be checked before any model or data loads: the device,
    the recipe and its option names, the optimizer.  ``lowrank bench`` runs it for every method first."""
    c = config.resolved()
    _check_device(c.device)
    recipe = get_recipe(c.method)
    if c.task not in recipe.tasks:
        raise ConfigError(f"method {c.method!r} is a {'/'.join(recipe.tasks)} recipe; it does not apply to task {c.task!r}")
    _check_method_options(c.method, recipe.build, c.method_options)
    _optimizer_factory_name(c)  # an unknown --optimizer fails before anything loads
    return c


def _check_device(device: str) -> None:
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ConfigError(f"device {device!r} is not available: {why}; use --device cpu (or auto)")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) are visible")


def _check_method_options(method: str, build: Any, options: dict[str, Any]) -> None:
    params = inspect.signature(build).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # the recipe takes any option; it checks them itself
    named = {k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL} - {"model", "task"}
    unknown = sorted(set(options) - named)
    if unknown:
        raise ConfigError(
            f"method {method!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(sorted(named - {'lr', 'rank', 'total_steps', 'calibration'})) or 'none'}"
        )


def _optimizer_factory_name(c: TrainConfig) -> str:
    """``--optimizer`` as a ``lowrank.optim`` factory name (or ``adamw``); UnknownNameError otherwise."""
    name = (c.optimizer or "adamw").lower().replace("-", "_")
    if name == "adamw":
        return name
    from .. import optim as lro

    def is_factory(n: str) -> bool:  # optimizer factories take a model and an lr
        f = getattr(lro, n, None)
        if not callable(f) or isinstance(f, type) or not n[0].islower():
            return False
        try:
            return "lr" in inspect.signature(f).parameters
        except (TypeError, ValueError):
            return False

    known = [n for n in getattr(lro, "__all__", []) if is_factory(n)]
    if name not in known:
        raise UnknownNameError("optimizer", str(c.optimizer), ["adamw", *known])
    return name


# ---- the trainer ----------------------------------------------------------------------------------
class Trainer:
    """Builds model, task and recipe from a :class:`TrainConfig`; :meth:`fit` trains."""

    def __init__(self, config: TrainConfig | None = None, **overrides: Any):
        base = config if config is not None else TrainConfig()
        if overrides:
            base = dataclasses.replace(base, **overrides)
        self.config = c = check_config(base)  # everything checkable before anything loads
        self.out = Path(c.out)
        t0 = time.perf_counter()
        if c.threads:
            torch.set_num_threads(int(c.threads))
        self.device = torch.device("cuda" if c.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if c.device == "auto" else c.device))
        self.recipe = get_recipe(c.method)
        existing = self._check_out_dir()  # the directory is touched only once everything below has loaded
        # -- data and model ----------------------------------------------------------------------
        seed_everything(c.seed)
        raw = load_data(c.data, c.text_column, c.label_column)
        objective = "lm" if isinstance(raw, TextCorpus) else "classification"
        self.loaded: LoadedModel = load_model(
            c.model, objective=objective, pretrained=(c.task == "finetune"),
            num_labels=getattr(raw, "num_labels", None), seed=c.seed,
        )
        self.seq_len = c.seq_len or (64 if objective == "classification" else 128)
        maxpos = self.loaded.max_positions
        if maxpos is not None and self.seq_len > maxpos:
            raise ConfigError(
                f"seq_len {self.seq_len} exceeds the {maxpos} positions of model {c.model!r}; use --seq-len {maxpos} or less"
            )
        self.task: LMTask | ClassificationTask = load_task(
            raw, self.loaded.tokenizer, self.seq_len, c.seed, eval_size=c.eval_size
        )
        self.model = self.loaded.model.to(self.device)
        self.task_info = TaskInfo(kind=c.task, head_modules=list(self.loaded.head_modules))
        # -- recipe ----------------------------------------------------------------------------------
        seed_everything(c.seed + 1)  # the method's own randomness does not depend on what loading consumed
        self.prepared = self._build()
        self.model = self.prepared.model
        self.optimizer = self.prepared.optimizer
        self.callbacks = list(self.prepared.callbacks)
        self.scheduler = self._scheduler()
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.total_params = sum(p.numel() for p in self.model.parameters())
        self._baseline = {k: (id(t), t._version) for k, t in self.model.state_dict(keep_vars=True).items()}
        self._prepare_out_dir(existing)
        self.step = 0
        self.micro_index = 0
        self.resumed_from: str | None = None
        self.setup_s = time.perf_counter() - t0

    # -- setup pieces -------------------------------------------------------------------------------
    def _check_out_dir(self) -> list[str]:
        """The run files already in --out (refused unless --resume / --overwrite); nothing is written."""
        c, out = self.config, self.out
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output directory {str(out)!r} is a file")
        existing = [p for p in ("metrics.jsonl", "checkpoints", "final", "summary.json") if (out / p).exists()]
        if existing and not c.resume and not c.overwrite:
            raise ConfigError(
                f"output directory {str(out)!r} already holds a run ({', '.join(existing)}); "
                "pass --resume to continue it, --overwrite to replace it, or choose another --out"
            )
        if c.resume and c.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
        for name, want_dir in _RUN_FILES.items():  # what a run writes must be writable as what it is
            q = out / name
            if q.exists() and q.is_dir() != want_dir and not (c.overwrite and name in existing):
                raise ConfigError(
                    f"{str(q)!r} is a {'directory' if q.is_dir() else 'file'}, where the run writes its "
                    f"{name} {'directory' if want_dir else 'file'}; move it away or choose another --out"
                )
        if c.resume and not list_checkpoints(self.checkpoint_dir):
            finished = [p for p in ("final", "summary.json") if p in existing]
            if finished:
                raise CheckpointError(
                    f"cannot resume the run in {str(out)!r}: it has no checkpoint to resume from (it ran with "
                    f"checkpoint_every 0?) but holds a finished run ({', '.join(finished)}) that training from "
                    "step 0 would replace; pass --overwrite to replace it, or choose another --out"
                )
        parent = next((q for q in (out, *out.parents) if q.exists()), None)
        if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"output directory {str(out)!r} cannot be created: {str(parent)!r} is not writable")
        return existing

    def _prepare_out_dir(self, existing: list[str]) -> None:
        c, out = self.config, self.out
        if existing and not c.resume:  # --overwrite, checked above
            for p in existing:
                q = out / p
                shutil.rmtree(q) if q.is_dir() else q.unlink()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output directory {str(out)!r} cannot be created: {e.strerror}") from None

    def _build(self) -> Prepared:
        c = self.config
        build = self.recipe.build
        params = inspect.signature(build).parameters
        opts = dict(c.method_options)
        _check_method_options(c.method, build, opts)

        def required(name: str) -> bool:
            return name in params and params[name].default is inspect.Parameter.empty

        for name, value, fallback in (("lr", c.lr, 1e-3), ("rank", c.rank, 8)):
            if value is not None:
                opts[name] = value
            elif required(name):
                opts[name] = fallback
        if "total_steps" in params and "total_steps" not in opts:
            opts["total_steps"] = c.steps
        if "calibration" in params and "calibration" not in opts:
            opts["calibration"] = [self._to_device(self.task.train_batch(i, c.batch_size)) for i in range(4)]
        try:
            prepared = build(self.model, self.task_info, **opts)
        except (ConfigError, LowRankError) as e:
            if isinstance(e, UnknownNameError):
                raise
            try:
                wrapped = type(e)(f"method {c.method!r} on model {c.model!r}: {e}")
            except Exception:
                raise e from None
            raise wrapped from None
        except (TypeError, ValueError) as e:
            if not c.method_options:
                raise
            # a value torch (or the recipe) refused, e.g. weight_decay=abc or eps=-1
            raise ConfigError(f"method {c.method!r}: method_options {c.method_options!r} are refused: {e}") from None
        if not isinstance(prepared, Prepared):
            raise ConfigError(f"recipe {c.method!r} returned {type(prepared).__name__}, not a Prepared")
        if c.optimizer and c.optimizer.lower() != "adamw" or (c.optimizer and c.optimizer_options):
            prepared.optimizer = self._optimizer_override(prepared)
        return prepared

    def _optimizer_override(self, prepared: Prepared) -> torch.optim.Optimizer:
        c = self.config
        lr = c.lr if c.lr is not None else prepared.optimizer.param_groups[0]["lr"]
        name = self._optimizer_factory_name()
        if name == "adamw":
            params = [p for p in prepared.model.parameters() if p.requires_grad]
            try:
                return torch.optim.AdamW(params, lr=lr, **c.optimizer_options)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"optimizer adamw: {e} (optimizer_options {c.optimizer_options!r})") from None
        from .. import optim as lro

        try:
            return getattr(lro, name)(prepared.model, lr=lr, **c.optimizer_options)
        except LowRankError:
            raise
        except (TypeError, ValueError) as e:
            raise ConfigError(f"optimizer {name}: {e} (optimizer_options {c.optimizer_options!r})") from None

    def _optimizer_factory_name(self) -> str:
        return _optimizer_factory_name(self.config)

    def _scheduler(self) -> torch.optim.lr_scheduler.LambdaLR:
        c = self.config
        owns_lr = any(getattr(cb, "manage_lr", False) or getattr(cb, "manages_lr", False) for cb in self.callbacks)
        kind = "constant" if owns_lr else c.lr_schedule
        warmup = 0 if owns_lr else int(c.warmup_steps or 0)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_multiplier(kind, warmup, c.steps, c.min_lr_ratio))

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- checkpoints ---------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors a rebuilt model lacks: trainable ones, and any changed in place or created since the build."""
        out: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, t in self.model.state_dict(keep_vars=True).items():
            if id(t) in seen:
                continue  # tied weights are saved once
            seen.add(id(t))
            base = self._baseline.get(k)
            if t.requires_grad or base is None or base[0] != id(t) or base[1] != t._version:
                out[k] = t.detach()
        return out

    def save_checkpoint(self) -> Path:
        c = self.config
        state = {
            "step": self.step,
            "micro_index": self.micro_index,
            "config": {k: getattr(c, k) for k in RESUME_FIELDS},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
            "rng": rng_state(),
        }
        return write_checkpoint(self.checkpoint_dir, self.step, self._model_tensors(), state, c.keep_checkpoints)

    def resume(self) -> bool:
        """Restore the newest readable checkpoint; False when there is none."""
        root = self.checkpoint_dir
        clean_temporaries(root)
        found = latest_checkpoint(root)
        if found is None:
            return False
        path, step, model_tensors, state, skipped = found
        for s in skipped:
            print(f"lowrank: skipping a checkpoint that does not read back: {s}", file=sys.stderr)
        saved = state.get("config", {})
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path}/state.json is corrupt: its config is not a table")
        now = {k: getattr(self.config, k) for k in RESUME_FIELDS}
        diff = [k for k in RESUME_FIELDS if k in saved and _norm(saved[k]) != _norm(now[k])]
        if diff:
            detail = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}" for k in diff)
            raise CheckpointError(f"cannot resume {path}: the run's settings differ ({detail})")
        cb_states = state.get("callbacks", [])
        if len(cb_states) != len(self.callbacks):
            raise CheckpointError(
                f"checkpoint {path} holds state for {len(cb_states)} schedule callback(s), the method has {len(self.callbacks)}"
            )
        for cb, st in zip(self.callbacks, cb_states):
            if hasattr(cb, "load_state_dict"):
                cb.load_state_dict(st)
                if hasattr(cb, "attach"):
                    cb.attach(self.model, self.optimizer)
        try:
            res = self.model.load_state_dict(model_tensors, strict=False)
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}/model.safetensors does not fit the model: {e}") from None
        if res.unexpected_keys:
            raise CheckpointError(
                f"checkpoint {path}/model.safetensors has keys the model lacks: {', '.join(res.unexpected_keys[:5])}"
            )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: the optimizer state does not fit this optimizer: {e}") from None
        try:
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
            self.step, self.micro_index = int(state["step"]), int(state["micro_index"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {path}: its scheduler, random-generator or step state is corrupt: {e}") from None
        MetricsLog.truncate(self.out / "metrics.jsonl", self.step)
        self.resumed_from = str(path)
        return True

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        was = self.model.training
        self.model.eval()
        try:
            if self.device.type == "cpu":
                res = self.task.evaluate(self.model, self.config.eval_batch_size)
            else:
                res = self.task.evaluate(_DeviceModel(self.model, self.device), self.config.eval_batch_size)
        finally:
            self.model.train(was)
        return res

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        c = self.config
        if c.resume and not self.resume():
            print(f"lowrank: no checkpoint in {self.checkpoint_dir}; starting from step 0", file=sys.stderr)
            MetricsLog.truncate(self.out / "metrics.jsonl", 0)  # records of a run killed before its first checkpoint
        (self.out / "run.json").write_text(json.dumps(self.describe(), indent=2, default=str))
        log = MetricsLog(self.out / "metrics.jsonl")
        bar = None
        if c.progress:
            from tqdm.auto import tqdm

            # in a log file (not a terminal) a redraw every 0.1 s would write a line's worth per step
            bar = tqdm(total=c.steps, initial=self.step, desc=c.method, unit="step", dynamic_ncols=True, leave=True,
                       mininterval=0.1 if sys.stderr.isatty() else 20.0)
        t = {"data": 0.0, "forward_backward": 0.0, "optimizer": 0.0, "log": 0.0, "eval": 0.0, "checkpoint": 0.0}
        step_times: list[float] = []
        losses: list[float] = []
        tokens_total = 0
        last_ckpt: tuple[int, str] | None = (self.step, self.resumed_from) if self.resumed_from else None
        last_eval: dict[str, float] = {}
        # learn which adapted layers read one input (q/k/v, gate/up) before the first step, so a
        # fresh and a resumed run compute every step the same way (see core.shared_input)
        shared_input.learn(self.model, **self._to_device(next(iter(self.task.eval_batches(1)))))
        self.model.train()
        t_loop = time.perf_counter()
        try:
            while self.step < c.steps:
                step = self.step + 1
                t0 = time.perf_counter()
                loss_sum, tokens = 0.0, 0
                for _ in range(c.grad_accum):
                    td = time.perf_counter()
                    batch = self._to_device(self.task.train_batch(self.micro_index, c.batch_size))
                    tokens += self.task.tokens(batch)
                    tf = time.perf_counter()
                    t["data"] += tf - td
                    loss = self.model(**batch).loss
                    value = float(loss.detach())  # the task loss is what is logged and compared
                    aux = aux_loss(self.model)  # e.g. router load balancing of mixture adapters
                    if aux is not None:
                        loss = loss + aux
                    if not math.isfinite(value):
                        where = (
                            f"the last good checkpoint is {last_ckpt[1]} (step {last_ckpt[0]})"
                            if last_ckpt else "no checkpoint was written yet"
                        )
                        raise TrainingError(
                            f"loss is {value} at step {step} (method {c.method!r}, lr "
                            f"{self.optimizer.param_groups[0]['lr']:.3g}); stopping: {where}. "
                            + ("Lower the learning rate." if c.grad_clip > 0 else
                               "Lower the learning rate or clip gradients (--grad-clip).")
                        )
                    (loss / c.grad_accum).backward()
                    loss_sum += value
                    self.micro_index += 1
                    t["forward_backward"] += time.perf_counter() - tf
                to = time.perf_counter()
                grad_norm = None
                if c.grad_clip > 0:
                    params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, c.grad_clip))
                lr = self.optimizer.param_groups[0]["lr"]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for cb in self.callbacks:
                    cb.step(self.model, self.optimizer, step)
                self.step = step
                t1 = time.perf_counter()
                t["optimizer"] += t1 - to
                dt = t1 - t0
                step_times.append(dt)
                tokens_total += tokens
                loss_value = loss_sum / c.grad_accum
                losses.append(loss_value)
                if step % c.log_every == 0 or step == c.steps:
                    rec = {"step": step, "loss": loss_value, "lr": lr, "tokens": tokens,
                           "step_s": dt, "tokens_per_s": tokens / dt if dt > 0 else None}
                    if grad_norm is not None:
                        rec["grad_norm"] = grad_norm
                    log.write(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens / dt:,.0f}" if dt > 0 else "-", refresh=False)
                    bar.update(1)
                t["log"] += time.perf_counter() - t1
                if (c.eval_every and step % c.eval_every == 0) or step == c.steps:
                    te = time.perf_counter()
                    last_eval = self.evaluate()
                    log.write({"step": step, **last_eval})
                    t["eval"] += time.perf_counter() - te
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_value:.4f}", eval_loss=f"{last_eval['eval_loss']:.4f}", refresh=False)
                if c.checkpoint_every and (step % c.checkpoint_every == 0 or step == c.steps):
                    tc = time.perf_counter()
                    last_ckpt = (step, str(self.save_checkpoint()))
                    t["checkpoint"] += time.perf_counter() - tc
        finally:
            if bar is not None:
                bar.close()
            log.close()
        loop_s = time.perf_counter() - t_loop
        if not last_eval:  # resumed at the end: nothing left to train, evaluate once
            last_eval = self.evaluate()
        tf = time.perf_counter()
        if c.save_final:
            final = self.out / "final"
            self.prepared.save(self.model, final)
            if hasattr(self.loaded.tokenizer, "save"):
                self.loaded.tokenizer.save(final)
            if isinstance(self.task, ClassificationTask):
                (final / "labels.json").write_text(json.dumps(self.task.label_names))
        final_s = time.perf_counter() - tf
        summary = self._summary(t, loop_s, final_s, step_times, tokens_total, last_eval)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return TrainResult(self.out, self.step, last_eval, summary, losses)

    def _summary(self, t, loop_s, final_s, step_times, tokens_total, last_eval) -> dict[str, Any]:
        compute = t["forward_backward"] + t["optimizer"]
        overhead = max(0.0, loop_s - compute - t["eval"])
        st = sorted(step_times)
        return {
            "method": self.config.method,
            "task": self.config.task,
            "objective": self.task.objective,
            "model": self.loaded.describe(),
            "data": self.task.describe(),
            "steps": self.step,
            "steps_this_session": len(step_times),
            "resumed_from": self.resumed_from,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "optimizer_state_bytes": (opt_bytes := optimizer_state_bytes(self.optimizer)),
            # weights + gradients of the trainable ones + optimizer state, counted from the tensors
            "train_state_bytes": _tensor_bytes(self.model) + opt_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
            "median_step_s": st[len(st) // 2] if st else None,
            "tokens_per_s": tokens_total / sum(step_times) if step_times and sum(step_times) > 0 else None,
            "tokens": tokens_total,
            **{k: v for k, v in last_eval.items()},
            "time_s": {
                "setup": self.setup_s,
                "loop": loop_s,
                **t,
                "other_in_loop": max(0.0, loop_s - sum(t.values())),
                "final_save": final_s,
            },
            "overhead_fraction": overhead / loop_s if loop_s > 0 else None,
            "recipe_info": {k: v for k, v in self.prepared.info.items() if _jsonable(v)},
        }

    def describe(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "recipe": {"name": self.recipe.name, "kind": self.recipe.kind, "description": self.recipe.description},
            "model": self.loaded.describe(),
            "data": self.task.describe(),
            "seq_len": self.seq_len,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "labels": getattr(self.task, "label_names", None),
        }


class _DeviceModel(nn.Module):
    """Moves evaluation batches to the model's device."""

    def __init__(self, model: nn.Module, device: torch.device):
        super().__init__()
        self.inner, self.device = model, device

    def forward(self, **batch):
        return self.inner(**{k: v.to(self.device) for k, v in batch.items()})


def _tensor_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.dim() > 0 and all(s == 0 for s in t.stride()):
            continue  # an expanded placeholder holds no memory
        n = t.numel() * t.element_size()
        total += n * 2 if t.requires_grad else n
    return total


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def train(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Build a :class:`Trainer` and run it: ``train(task="pretrain", model="llama-tiny", method="lora", out="runs/x")``."""
    return Trainer(config, **overrides).fit()


__all__ = ["Trainer", "TrainResult", "train", "check_config", "seed_everything", "optimizer_state_bytes", "peak_rss_bytes", "MetricsLog"]
