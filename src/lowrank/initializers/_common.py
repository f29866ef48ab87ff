"""Shared pieces of the initialisation strategies: SVDs, factor writing, residual bases, calibration.

Precision: every init reads W (and gradients / activations) upcast to float32 (float64 stays
float64), computes there, and writes the factors in the adapter's dtype; a residual base weight is
cast back to the base layer's dtype by the core.  With a bf16/fp16 base the residual is therefore
rounded once: ``W_res + s B A`` equals W to the base dtype's precision, not exactly.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.adapter import Adapter, FactorAdapter
from ..core.init import Init
from ..core.io import record_base_delta
from ..core.layers import BaseLayer
from ..errors import CalibrationError, ConfigError, ShapeError


# ---- per-layer stats ------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """What ``collect`` hands to ``__call__`` for one target layer."""

    path: str
    data: dict[str, torch.Tensor] = field(default_factory=dict)


class PathInit(Init):
    """An init whose ``collect`` only remembers each layer's path (for error messages)."""

    def collect(self, model: nn.Module, layers: dict[str, BaseLayer], calibration: Any) -> dict[str, LayerStats]:
        return {p: LayerStats(p) for p in layers}


def path_of(stats: Any) -> str:
    return stats.path if isinstance(stats, LayerStats) else "<layer>"


def parse_options(init: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` updated by ``given``; an unknown key raises ConfigError naming the init."""
    import difflib

    unknown = sorted(set(given) - set(defaults))
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(defaults), n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(
            f"init {init!r} has no option {unknown[0]!r}{more}; its options are: {', '.join(defaults) or 'none'}"
        )
    return {**defaults, **given}


def check_option(init: str, key: str, value: Any, ok: bool, want: str) -> None:
    if not ok:
        raise ConfigError(f"init {init!r}: option {key}={value!r} is invalid; expected {want}")


# ---- linear algebra -------------------------------------------------------------------------------
def work_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def weight_of(base: BaseLayer) -> torch.Tensor:
    """W (out, in) upcast for linear algebra (a copy; the base is never touched here)."""
    w = base.weight
    return w.detach().to(work_dtype(w))


def numerical_rank_tol(s: torch.Tensor, shape: tuple[int, int]) -> float:
    return float(s.max()) * max(shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0


def check_rank(init: str, path: str, s: torch.Tensor, rank: int, shape: tuple[int, int]) -> None:
    """Raise ShapeError when W has fewer than ``rank`` numerically non-zero singular values."""
    k = int((s > numerical_rank_tol(s, shape)).sum())
    if k < rank:
        raise ShapeError(
            f"init {init!r}: rank {rank} exceeds the numerical rank {k} of {path!r} ({shape[0]}x{shape[1]})"
        )


def randomized_svd(
    w: torch.Tensor, rank: int, *, niter: int = 4, oversample: int = 8, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD by a Gaussian range finder with ``niter`` subspace iterations (Halko et al. 2011).

    Returns U (m, rank), S (rank,), Vh (rank, n).  The sketch is seeded, so the result is deterministic.
    Each subspace iteration multiplies by W W^T and re-orthonormalises (QR), which sharpens the
    captured subspace by a factor (s_{r+p+1} / s_r)^2 per iteration.
    """
    m, n = w.shape
    if m < n:  # a wide W: sketch W^T = V S U^T (as torch.svd_lowrank does; the sketch is on the short side)
        v, s, uh = randomized_svd(w.mT, rank, niter=niter, oversample=oversample, seed=seed)
        return uh.mT, s, v.mT
    q = min(rank + oversample, m, n)
    g = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=g, dtype=w.dtype).to(w.device)  # (n, q)
    y = w @ omega  # (m, q) samples of the range of W
    basis, _ = torch.linalg.qr(y)
    for _ in range(niter):  # subspace (power) iteration, re-orthonormalised each half step
        z, _ = torch.linalg.qr(w.T @ basis)  # (n, q)
        basis, _ = torch.linalg.qr(w @ z)  # (m, q)
    small = basis.T @ w  # (q, n) = Q^T W
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = basis @ u_small  # (m, q)
    return u[:, :rank], s[:rank], vh[:rank]


def svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(w, full_matrices=False)


# ---- writing factors --------------------------------------------------------------------------------
@torch.no_grad()
def set_factors(adapter: FactorAdapter, a: torch.Tensor, b: torch.Tensor) -> None:
    """Write A (r, in) and B (out, r) into the adapter's own tensors, in its dtype."""
    adapter.A.copy_(a.to(adapter.A.dtype))
    adapter.B.copy_(b.to(adapter.B.dtype))


@torch.no_grad()
def residual_base(adapter: Adapter, base: BaseLayer, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """W - left @ right (the part the adapter now carries), recorded so saving/loading can rebuild it."""
    w = weight_of(base)
    left, right = left.to(w.dtype), right.to(w.dtype)
    record_base_delta(adapter, left, right)
    return w - left @ right


def moved_part(adapter: FactorAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """(s B, A) as stored (after the cast to the adapter dtype), so W_res + s B A == W exactly in fp32."""
    return adapter.scaling * adapter.B.detach().float(), adapter.A.detach().float()


# ---- calibration ------------------------------------------------------------------------------------
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def batches_of(calibration: Iterable[Any] | None, init: str) -> list[Any]:
    if calibration is None:
        raise CalibrationError(
            f"init {init!r} reads calibration batches: pass adapt(..., calibration=[{{'input_ids': ...}}, ...])"
        )
    if isinstance(calibration, (Mapping, torch.Tensor, str, bytes)):
        raise CalibrationError(
            f"init {init!r}: calibration must be an iterable of batches (e.g. a list of dicts), "
            f"got a single {type(calibration).__name__}"
        )
    try:
        out = list(calibration)
    except TypeError:
        raise CalibrationError(f"init {init!r}: calibration is not iterable ({type(calibration).__name__})") from None
    if not out:
        raise CalibrationError(f"init {init!r}: calibration is empty; it needs at least one batch")
    return out


def _call(model: nn.Module, batch: Any, init: str, i: int, **extra: Any) -> Any:
    if not isinstance(batch, Mapping):
        raise CalibrationError(
            f"init {init!r}: calibration batch {i} is a {type(batch).__name__}; expected a dict of model inputs"
        )
    try:
        return model(**batch, **extra)
    except CalibrationError:
        raise
    except (RuntimeError, ValueError, IndexError, TypeError, KeyError) as e:
        raise CalibrationError(f"init {init!r}: the model rejected calibration batch {i}: {e}") from None


def _accepts_labels(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return "labels" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def batch_loss(model: nn.Module, batch: Any, init: str, i: int, loss_fn: LossFn | None) -> torch.Tensor:
    """The training loss of one batch: ``loss_fn(model, batch)``, the model's own ``.loss``, or
    next-token cross-entropy for causal LMs given only ``input_ids``."""
    if loss_fn is not None:
        try:
            loss = loss_fn(model, batch)
        except CalibrationError:
            raise
        except Exception as e:  # the user's own function: whatever it raised, name it and the batch
            raise CalibrationError(f"init {init!r}: loss_fn failed on calibration batch {i}: "
                                   f"{type(e).__name__}: {e}") from None
    else:
        extra = {}
        if isinstance(batch, Mapping) and "labels" not in batch and "input_ids" in batch and _accepts_labels(model):
            extra = {"labels": batch["input_ids"]}
        out = _call(model, batch, init, i, **extra)
        loss = getattr(out, "loss", None) if not isinstance(out, torch.Tensor) else None
        if loss is None:
            raise CalibrationError(
                f"init {init!r}: calibration batch {i} gives no loss; include 'labels' in the batches or pass "
                "init_options={'loss_fn': fn} with fn(model, batch) -> scalar loss"
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise CalibrationError(f"init {init!r}: the loss of calibration batch {i} is not a scalar tensor")
    return loss.reshape(())


def weight_gradients(
    model: nn.Module,
    layers: dict[str, BaseLayer],
    batches: list[Any],
    init: str,
    loss_fn: LossFn | None,
    *,
    squared: bool = False,
) -> dict[str, torch.Tensor]:
    """Mean over batches of dL/dW (or of (dL/dW)^2, the empirical Fisher) for every target W, as (out, in).

    Only the target weights require grad during the passes; every flag and ``.grad`` is restored.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    weights = {path: b.module.weight for path, b in layers.items()}
    saved_grads = {path: w.grad for path, w in weights.items()}
    sums: dict[str, torch.Tensor] = {}
    reached: set[str] = set()
    try:
        for p in params:
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                loss = batch_loss(model, batch, init, i, loss_fn)
                if not loss.requires_grad:
                    raise CalibrationError(f"init {init!r}: the loss of batch {i} does not depend on the target weights")
                loss.backward()
                for path, w in weights.items():
                    g = w.grad
                    if g is None:
                        g = torch.zeros_like(w)
                    else:
                        reached.add(path)
                    g = g.detach().to(work_dtype(w))
                    if layers[path].transposed:
                        g = g.T
                    g = g * g if squared else g
                    sums[path] = sums[path] + g if path in sums else g.clone()
                    w.grad = None
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for path, w in weights.items():
            w.grad = saved_grads[path]
    missing = [p for p in layers if p not in reached]
    if missing:  # its adapter would start from a zero gradient: no direction to align with
        raise CalibrationError(
            f"init {init!r}: the calibration loss does not reach {missing[0]!r}"
            + (f" (and {len(missing) - 1} more target(s))" if len(missing) > 1 else "")
            + "; leave it out of the targets or use a loss that depends on it")
    return {p: g / len(batches) for p, g in sums.items()}


def _token_mask(batch: Any) -> torch.Tensor | None:
    """Which token positions of a batch are data: attention_mask != 0 and labels != -100 (as PEFT's
    EVA), or None when the batch carries neither."""
    if not isinstance(batch, Mapping):
        return None
    mask = None
    for key, keep in (("attention_mask", lambda t: t != 0), ("labels", lambda t: t != -100)):
        t = batch.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2 and not t.is_floating_point():
            m = keep(t)
            mask = m if mask is None or mask.shape != m.shape else mask & m
    return mask


def input_covariances(
    model: nn.Module, layers: dict[str, BaseLayer], batches: list[Any], init: str
) -> dict[str, tuple[torch.Tensor, int]]:
    """Per target layer, the centred scatter (X - 1 mu^T)^T (X - 1 mu^T) (in, in) in float64 over
    every input row seen, and the row count.  Rows at padding (attention_mask 0) or unlabelled
    (labels -100) positions are left out when the layer sees one row per token of the batch."""
    acc: dict[str, list[Any]] = {p: [None, None, 0] for p in layers}   # X^T X, column sums, rows
    hooks = []
    current: list[torch.Tensor | None] = [None]

    def hook_for(path: str, width: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach()
            mask = current[0]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device)]                               # (kept tokens, in)
            x = x.reshape(-1, width).to(torch.float64)                 # (tokens, in)
            a = acc[path]
            cov, total = x.T @ x, x.sum(0)
            a[0] = cov if a[0] is None else a[0] + cov
            a[1] = total if a[1] is None else a[1] + total
            a[2] += x.shape[0]

        return hook

    try:
        for path, b in layers.items():
            hooks.append(b.module.register_forward_pre_hook(hook_for(path, b.in_features), with_kwargs=True))
        with torch.no_grad():
            for i, batch in enumerate(batches):
                current[0] = _token_mask(batch)
                _call(model, batch, init, i)
    finally:
        for h in hooks:
            h.remove()
    missing = [p for p, (c, _, _) in acc.items() if c is None]
    if missing:
        raise CalibrationError(f"init {init!r}: calibration batches never reached {missing[0]!r}")
    return {p: (c - torch.outer(t, t) / max(n, 1), n) for p, (c, t, n) in acc.items()}
