"""The ``torch.optim.Optimizer`` edge: parameter groups, lazily-initialised typed state, the
learning rate and decoupled weight decay, ``state_dict``/``load_state_dict``, non-finite gradient
handling, layer-wise mode, and the ``state_bytes`` accounting.

Each parameter group carries one :class:`~lowrank.optim.transforms.Transform`; ``step()`` hands
it the group's gradients as lists (grouped by step count) and applies ``p <- p(1 - lr wd) - lr d``.
Everything a scheduler, gradient clipping or the Hugging Face ``Trainer`` touch (``param_groups``,
``step``, ``zero_grad``, ``state_dict``) behaves as for any torch optimizer.  As in torch, a group
also shows its transform's hyperparameters (``betas``, ``eps``, ``momentum``, ``scale``,
``update_gap``, ``gamma``, ...; :meth:`Transform.hyper`): they are read back from the group before
every update, so schedulers that cycle momentum (``OneCycleLR``, ``CyclicLR``) and edits by hand
take effect, and ``load_state_dict`` restores them.
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError, LowRankError, ShapeError, TargetError
from .transforms import Factored, Transform, check_positive, flatten_state, load_state, nbytes


class NonFiniteGradientError(LowRankError, FloatingPointError):
    """A NaN/Inf gradient reached an optimizer built with ``nonfinite="raise"``."""


# keys of a param group that define the *shape* of its state; loading a state dict saved with
# different values is refused (the tensors would not fit or would mean something else).  The
# transforms' hyperparameters (betas, eps, momentum, scale, update_gap, ...) are not among them:
# like lr, they are read from the group at every step and restored from a state dict.
COMPAT_KEYS = ("method", "inner", "rank", "projector")


def _chunks(params: list[Tensor], numel: int):
    """Consecutive runs of parameters of about ``numel`` elements (same-shaped neighbours stay together)."""
    out, size = [], 0
    for p in params:
        if out and size + p.numel() > numel:
            yield out
            out, size = [], 0
        out.append(p)
        size += p.numel()
    if out:
        yield out


class LowRankOptimizer(torch.optim.Optimizer):
    #: parameters are updated in chunks of about this many elements (the directions of a chunk
    #: are the step's only full-size temporaries); a refresh batches same-shaped matrices per chunk
    chunk_numel = 8 * 2**20
    def __init__(self, groups: list[dict], transforms: list[Transform], *, names: dict[int, str] | None = None,
                 nonfinite: str = "skip", layerwise: bool = False, accumulation_steps: int = 1):
        if nonfinite not in ("skip", "raise"):
            raise ConfigError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if len(groups) != len(transforms):
            raise ConfigError("one transform per parameter group")
        if layerwise and accumulation_steps != 1:
            raise ConfigError(
                f"layerwise=True updates each parameter inside backward, so it cannot accumulate gradients "
                f"over {accumulation_steps} micro-batches; use layerwise=False with accumulation_steps > 1")
        # defaults: lr, weight_decay and the hyperparameters every group's transform has (so a
        # scheduler that looks for "betas"/"momentum" in defaults, e.g. OneCycleLR, finds them)
        hypers = [tf.hyper() for tf in transforms]
        shared = set.intersection(*(set(h) for h in hypers)) if hypers else set()
        groups = [{**h, **g} for g, h in zip(groups, hypers)]   # each group its own values, before defaults fill in
        super().__init__(groups, {"lr": 1e-3, "weight_decay": 0.0, **{k: hypers[0][k] for k in sorted(shared)}})
        self._transforms = list(transforms)
        self._names = names or {}
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._index: dict[Tensor, int] = {}   # 1-based position over all params (seeds)
        self._group_of: dict[Tensor, int] = {}
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                self._index[p] = len(self._index) + 1
                self._group_of[p] = gi
        self.layerwise = layerwise
        self._fired: set[Tensor] = set()
        self._hooks = []
        if layerwise:
            for p in self._index:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._layerwise_hook))

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_transforms"):  # torch's __init__ adds the groups given at construction
            raise ConfigError("a low-rank optimizer's groups are fixed at construction (each has its transform); "
                              "build a new optimizer to add parameters")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ stepping
    def name_of(self, p: Tensor) -> str:
        return self._names.get(id(p), f"param #{self._index.get(p, '?')}")

    def _finite(self, grads: list[Tensor]) -> bool:
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack(norms)).all())

    def _reject(self, params: list[Tensor]) -> None:
        if self.nonfinite == "raise":
            bad = [self.name_of(p) for p in params if not torch.isfinite(p.grad).all()]
            raise NonFiniteGradientError(
                f"non-finite gradient in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                f"nothing was updated (pass nonfinite='skip' to skip such steps)")
        self.skipped_steps += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_hyper()
        if self.layerwise:          # the updates already ran inside backward
            self._fired.clear()
            return loss
        work = [(gi, [p for p in g["params"] if p.grad is not None]) for gi, g in enumerate(self.param_groups)]
        allp = [p for _, ps in work for p in ps]
        if not allp:
            return loss
        if not self._finite([p.grad for p in allp]):
            self._reject(allp)
            return loss
        for gi, ps in work:
            if ps:
                self._update(gi, ps)
        return loss

    def _check_hyper(self, groups: list[dict] | None = None, where: str = "param group") -> None:
        """Every group's hyperparameters, checked before anything is updated (a bad value, e.g. set by
        hand in ``param_groups``, raises ConfigError naming the group and key; nothing changes)."""
        saved = [tf.hyper() for tf in self._transforms]
        try:
            for gi, g in enumerate(groups or self.param_groups):
                self._sync_hyper(gi, g, where)
        finally:   # transforms may be shared between groups: leave them as they were
            for tf, h in zip(reversed(self._transforms), reversed(saved)):
                tf.set_hyper(h)

    def _sync_hyper(self, gi: int, group: dict | None = None, where: str = "param group") -> None:
        """Hand group ``gi``'s current hyperparameters to its transform (schedulers edit the group)."""
        group, tf = self.param_groups[gi] if group is None else group, self._transforms[gi]
        keys = tf.hyper()
        if keys:
            try:
                tf.set_hyper({k: group.get(k, v) for k, v in keys.items()})
            except ConfigError as e:
                raise ConfigError(f"{where} {gi} ({group.get('method')}): {e}") from None

    def _update(self, gi: int, ps: list[Tensor]) -> None:
        self._sync_hyper(gi)
        group, tf = self.param_groups[gi], self._transforms[gi]
        buckets: dict[int, list[Tensor]] = defaultdict(list)
        for p in ps:
            if p.grad.is_sparse:
                raise ConfigError(f"{self.name_of(p)}: sparse gradients are not supported")
            st = self.state[p]
            if "s" not in st:
                st["step"] = 0
                st["s"] = tf.init(p, self._index[p])
            st["step"] += 1
            buckets[st["step"]].append(p)
        lr, wd = group["lr"], group["weight_decay"]
        for step, bp in buckets.items():
            for chunk in _chunks(bp, self.chunk_numel):
                # directions of one chunk at a time: bounded temporary memory, cache-warm updates
                dirs = tf.directions([p.grad for p in chunk], [self.state[p]["s"] for p in chunk], chunk, step)
                if wd:
                    torch._foreach_mul_(chunk, 1.0 - lr * wd)
                dense = [(p, d) for p, d in zip(chunk, dirs) if not isinstance(d, Factored)]
                if dense:
                    torch._foreach_add_([p for p, _ in dense], [d for _, d in dense], alpha=-lr)
                for p, d in zip(chunk, dirs):
                    if isinstance(d, Factored):  # W -= lr L R, accumulated in the GEMM
                        p.addmm_(d.left, d.right, alpha=-lr)
                del dirs, dense

    def _layerwise_hook(self, p: Tensor) -> None:
        if not self._fired:         # the first update of this backward: check every group before any runs
            self._check_hyper()
        if p in self._fired:
            raise ConfigError(
                f"layer-wise mode: {self.name_of(p)} received a second gradient before optimizer.step(); "
                f"gradient accumulation > 1 cannot work when each update runs inside backward "
                f"(call optimizer.step() after every backward, or use layerwise=False)")
        self._fired.add(p)
        with torch.no_grad():
            if p.grad is None:
                return
            if not torch.isfinite(p.grad).all():
                self._reject([p])
            else:
                self._update(self._group_of[p], [p])
        p.grad = None

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.layerwise = False

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self._index)}   # 0-based, as torch
        state = {}
        for p, st in self.state.items():
            if "s" in st:
                state[index[p]] = {"step": st["step"], **flatten_state(st["s"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ConfigError(f"optimizer state_dict has {len(saved_groups)} param groups, this optimizer "
                              f"{len(self.param_groups)} (saved for another model or targets?)")
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ConfigError(f"optimizer state_dict: param group {gi} ({g.get('method')}) has "
                                  f"{len(sg['params'])} params saved, {len(g['params'])} here")
            for k in COMPAT_KEYS:
                if sg.get(k) != g.get(k):
                    raise ConfigError(f"optimizer state_dict: param group {gi} was saved with {k}={sg.get(k)!r}, "
                                      f"this optimizer has {k}={g.get(k)!r}")
        self._check_hyper(saved_groups, "optimizer state_dict: param group")
        new_state: dict[Tensor, dict] = {}
        saved_state = state_dict["state"]
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                i = self._index[p] - 1
                if i not in saved_state:
                    continue
                flat = saved_state[i]
                where = f"{self.name_of(p)}"
                fresh = self._transforms[gi].init(p, self._index[p])
                new_state[p] = {"step": int(flat["step"]), "s": load_state(fresh, flat, where)}
        # everything validated: commit
        self.state.clear()
        self.state.update(new_state)
        for sg, g in zip(saved_groups, self.param_groups):
            g.update({k: v for k, v in sg.items() if k != "params"})
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


# ---------------------------------------------------------------------- building from a model

_BLOCK = re.compile(r"(^|\.)\d+\.")   # a numeric path component: inside a ModuleList of blocks


def _named(model_or_named) -> tuple[list[tuple[str, Tensor]], set[int], dict[str, nn.Module]]:
    """(trainable named params without duplicates, ids of embedding/head params, module map)."""
    excluded: set[int] = set()
    modules: dict[str, nn.Module] = {}
    if isinstance(model_or_named, nn.Module):
        model = model_or_named
        named = list(model.named_parameters())
        modules = dict(model.named_modules())
        for m in modules.values():
            if isinstance(m, nn.Embedding):
                excluded.update(id(p) for p in m.parameters())
        get_out = getattr(model, "get_output_embeddings", None)
        out = get_out() if callable(get_out) else None
        if out is not None:
            excluded.update(id(p) for p in out.parameters())
    else:
        named = []
        for i, x in enumerate(model_or_named):
            if isinstance(x, dict):
                raise ConfigError(
                    "low-rank optimizers take a model, its named_parameters() or a list of parameters, not "
                    "torch-style param-group dicts: choose the projected weights with targets=[...]")
            named.append(x if isinstance(x, tuple) else (f"param{i}", x))
    seen: set[int] = set()
    uniq = []
    for n, p in named:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            uniq.append((n, p))
    return uniq, excluded, modules


def split_targets(model_or_named, targets: Iterable[str] | None) -> tuple[list, list]:
    """Split trainable parameters into (plain, projected) ``(name, param)`` lists.

    Default targets: 2-D weights inside the transformer blocks (a numeric path component, e.g.
    ``model.layers.3.mlp.up_proj.weight``), excluding embeddings and the output head.  Otherwise
    ``targets`` lists parameter names, module names, module-name suffixes (``"q_proj"``) or glob
    patterns; a module target selects its 2-D weights.
    """
    named, excluded, modules = _named(model_or_named)
    if not named:
        raise TargetError("no trainable parameters to optimize")
    if targets is None:
        proj = {id(p) for n, p in named if p.dim() == 2 and id(p) not in excluded and _BLOCK.search(n)
                and "embed" not in n}
    else:
        if isinstance(targets, str):
            targets = [targets]
        proj = set()
        for t in targets:
            hit = False
            for n, p in named:
                mod = n.rsplit(".", 1)[0] if "." in n else ""
                by_param = n == t or fnmatch.fnmatchcase(n, t)
                by_module = mod == t or mod.endswith("." + t) or (mod and fnmatch.fnmatchcase(mod, t))
                if by_param and p.dim() != 2:
                    raise ShapeError(f"{n}: shape {tuple(p.shape)} is not 2-D and cannot be projected "
                                     f"(target {t!r}); leave it to the plain optimizer")
                if by_param or (by_module and p.dim() == 2):
                    proj.add(id(p))
                    hit = True
                elif by_module:
                    hit = hit or False
            if not hit:
                raise TargetError(f"target {t!r} matches no 2-D trainable parameter")
    plain = [(n, p) for n, p in named if id(p) not in proj]
    projected = [(n, p) for n, p in named if id(p) in proj]
    return plain, projected


def build(model_or_named, *, method: str, lr: float, rank: int, transform: Transform, plain: Transform,
          inner_name: str, targets=None, weight_decay: float = 0.0, nonfinite: str = "skip",
          layerwise: bool = False, accumulation_steps: int = 1, info: dict | None = None) -> LowRankOptimizer:
    """Validate everything, then build a :class:`LowRankOptimizer` with a plain and a projected group."""
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{method}: rank must be a positive int, got {rank!r}")
    check_positive(method, "lr", lr, allow_zero=True)
    check_positive(method, "weight_decay", weight_decay, allow_zero=True)
    plain_np, proj_np = split_targets(model_or_named, targets)
    if not proj_np:
        raise TargetError(
            f"{method}: no parameter is projected (the default targets are 2-D weights inside numbered "
            "blocks, found by name): pass the model or its named_parameters() (a bare list of parameters has "
            "no names to match), or targets=[...]")
    for n, p in proj_np:
        if rank > min(p.shape):
            raise ShapeError(f"{n}: rank {rank} exceeds min(m, n) = {min(p.shape)} of its shape {tuple(p.shape)}")
    names = {id(p): n for n, p in plain_np + proj_np}
    common = {"lr": lr, "weight_decay": weight_decay, "inner": inner_name}
    groups, tfs = [], []
    if plain_np:
        groups.append({"params": [p for _, p in plain_np], **common, "method": "plain"})
        tfs.append(plain)
    if proj_np:
        groups.append({"params": [p for _, p in proj_np], **common, "method": method, "rank": rank, **(info or {})})
        tfs.append(transform)
    return LowRankOptimizer(groups, tfs, names=names, nonfinite=nonfinite, layerwise=layerwise,
                            accumulation_steps=accumulation_steps)


# ---------------------------------------------------------------------- memory accounting

def state_bytes(optimizer: torch.optim.Optimizer, *, allocated: bool = True) -> int:
    """Bytes of optimizer state.

    ``allocated=True``: the bytes the tensors in ``optimizer.state`` actually hold now (any torch
    optimizer).  ``allocated=False`` (lowrank optimizers only): the same figure from the formula,
    by initialising every parameter's state on the ``meta`` device, so nothing is allocated and it
    works on an optimizer built over a meta-device model.  Python ints in the state (step counters,
    seeds, refresh schedule) are not counted.
    """
    if allocated:
        total = 0
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, Tensor):
                    total += v.numel() * v.element_size()
                elif not isinstance(v, (int, float, str)) and v is not None:
                    total += nbytes(v)
        return total
    if not isinstance(optimizer, LowRankOptimizer):
        raise ConfigError("state_bytes(allocated=False) needs a lowrank optimizer (it knows its state's formula)")
    total = 0
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            fake = torch.empty(p.shape, dtype=p.dtype, device="meta")
            total += nbytes(optimizer._transforms[gi].init(fake, optimizer._index[p]))
    return total
