"""Training checkpoints: safetensors for every tensor, JSON for everything else, nothing pickled.

A checkpoint is a directory ``checkpoints/step-00000100/`` holding

* ``model.safetensors`` — the model tensors a rebuilt model would not already have: every
  trainable parameter, and every tensor changed in place since the recipe built the model
  (ReLoRA merges into the frozen base, for instance) or created after it;
* ``state.safetensors`` + ``state.json`` — optimizer, LR scheduler and schedule-callback
  states, RNG states (Python, NumPy, torch) and the data position, with tensors in the
  safetensors file and the structure around them in JSON.

It is written into a hidden temporary directory, each file fsynced, and then renamed into
place in one ``os.replace``: a process killed at any moment leaves either the complete new
checkpoint or none (plus a stale temporary directory that the next run removes).  Loading
checks every file; a checkpoint that does not load is skipped for the previous one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ---- nested state <-> (JSON, tensors) -------------------------------------------------------------
def encode(obj: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """JSON-able form of ``obj``; tensors go into ``tensors`` and are referenced by key.

    Dicts keep non-string keys and tuples stay tuples (tagged), so ``decode`` gives back an
    equal structure (``optimizer.state_dict()`` has int keys and tuple betas).
    """
    import numpy as np

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        t = obj.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        tensors[key] = t.contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj)).clone()
        return {"__ndarray__": key}
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise CheckpointError(f"{where} has a key of type {type(k).__name__}; checkpoints take str/int keys")
            items.append([k, encode(v, tensors, f"{where}[{k!r}]")])
        return {"__dict__": items}
    raise CheckpointError(
        f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints store tensors, numbers, "
        "strings, lists, tuples and dicts only (nothing is pickled)"
    )


def decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy()
        if "__dtype__" in obj:
            dtype = getattr(torch, obj["__dtype__"], None) if isinstance(obj["__dtype__"], str) else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {obj['__dtype__']!r}")
            return dtype
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__dict__"]}
        return {k: decode(v, tensors) for k, v in obj.items()}
    return obj


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory: clone the later ones."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        t = t.contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (0, -len(out) - 1)
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


# ---- files --------------------------------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(
    root: Path,
    step: int,
    model_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state_tensors: dict[str, torch.Tensor] = {}
        encoded = encode(state, state_tensors)
        save_file(_unshared(model_tensors), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(_unshared(state_tensors), str(tmp / "state.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, "state": encoded}))
        for f in ("model.safetensors", "state.safetensors", "state.json"):
            _fsync_file(tmp / f)
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same step (after a resume): replace it whole
            old = root / f".old-step-{step:08d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old_step, path in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (temporary directories are not listed)."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def clean_temporaries(root: Path) -> list[Path]:
    """Remove the temporary directories a killed writer left behind."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def read_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]]:
    """(step, model tensors, state) of one checkpoint; CheckpointError if any file is missing or corrupt."""
    for name in ("state.json", "model.safetensors", "state.safetensors"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        meta = json.loads((path / "state.json").read_text())
        model_tensors = load_file(str(path / "model.safetensors"))
        state_tensors = load_file(str(path / "state.safetensors"))
    except FileNotFoundError as e:  # removed since the check above
        raise CheckpointError(f"checkpoint {path} is incomplete: {e.filename or 'a file'} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}/state.json is not valid JSON: {e}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable tensor file (truncated?): {e}") from None
    if not isinstance(meta, dict) or "state" not in meta or "step" not in meta:
        raise CheckpointError(f"checkpoint {path}/state.json lacks 'step' or 'state'")
    if not isinstance(meta["step"], int) or isinstance(meta["step"], bool) or meta["step"] < 0:
        raise CheckpointError(f"checkpoint {path}/state.json: step must be a non-negative integer, got {meta['step']!r}")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"checkpoint {path}/state.json: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format {version}, newer than this lowrank")
    try:
        state = decode(meta["state"], state_tensors)
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path}: state.json refers to tensor {e} missing from state.safetensors") from None
    except (TypeError, ValueError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {path}/state.json is corrupt: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}/state.json is corrupt: its state is a {type(state).__name__}, not a table")
    return int(meta["step"]), model_tensors, state


def latest_checkpoint(root: Path) -> tuple[Path, int, dict[str, torch.Tensor], dict[str, Any], list[str]] | None:
    """The newest checkpoint that reads back whole, and why any newer ones were skipped."""
    skipped: list[str] = []
    for step, path in reversed(list_checkpoints(root)):
        try:
            s, model_tensors, state = read_checkpoint(path)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        return path, s, model_tensors, state, skipped
    if skipped:
        raise CheckpointError("no checkpoint under " + str(root) + " reads back: " + "; ".join(skipped))
    return None


__all__ = [
    "encode",
    "decode",
    "write_checkpoint",
    "read_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "clean_temporaries",
]
