"""Q-GaLore (Zhang et al. 2024, arXiv:2407.08296): GaLore with INT4 projection matrices, the
layer-adaptive refresh gap (both in ``projectors/int4.py``) and, with ``weight_bits=8``, INT8
weights updated by stochastic rounding.

INT8 weights (``weight_bits=8``), as in the reference code (VITA-Group/Q-GaLore, ``QGaLoreLinear`` +
``AdamW8bit.step``): every projected weight W (m, n) is held as 8-bit codes q with a min-max scale
s_g and zero point z_g per group g of ``weight_group_size`` consecutive entries (row-major)::

    W ~ s_g (q - z_g)                  q, z_g in {0..255}; s_g = (max_g - min_g) / 255
    step:  W' = deq(q) (1 - lr wd) - lr D              D = GaLore's direction (fp32 temporary)
           q' = SR(W' / s'_g) + z'_g                   s', z' from W''s group min / max

with stochastic rounding SR(x) = floor(x) + [u < x - floor(x)], u ~ U[0, 1), which is unbiased
(E[SR(x)] = x): an update smaller than half a quantisation step survives in expectation, where
round-to-nearest would drop it every time.  ``stochastic_round=False`` rounds to nearest.

Where the weights live.  The optimizer owns the codes (they are in its typed state, so
``state_bytes`` and ``state_dict()`` include them, 1 + 5 / weight_group_size bytes per weight).
Between uses the parameter itself holds no storage: its ``.data`` is a 0-stride NaN placeholder
of the right shape (one element), so anything that reads the weight without going through the
module fails loudly instead of silently using stale values.  A forward pre-hook on the module
that owns the parameter dequantises it into ``.data`` for the duration of that module's forward;
a ``saved_tensors_hooks`` pack hook replaces every tensor autograd would save that aliases the
dequantised weight (``W``, ``W^T``) by a reference to the codes, and the unpack hook dequantises
again in backward -- the reference's ``W8Linear`` does the same (it saves the INT8 weight and
dequantises in forward and in backward).  So at any time at most the weights of the modules
currently running forward (or being unpacked in backward) exist in floating point, and the
gradient (a full fp32 ``p.grad``, as the reference's ``float_grad``) is the only other full-size
tensor.  Memory saved vs an fp32 model: about 3 bytes per projected weight, all the time.

What must hold for this to be exact: the projected parameter is read only by the forward of
the module that owns it (true for ``nn.Linear`` and transformers' ``Conv1D``).  ``model.state_dict()``
returns the dequantised float weights and ``model.load_state_dict`` re-quantises (round to
nearest) what it loads; the optimizer's ``state_dict`` carries the codes themselves and the
rounding generator, so loading the optimizer state *after* the model's resumes bit-identically.
Move the model to its device / dtype before building the optimizer.

Differences from the reference: its inner optimizer is bitsandbytes' 8-bit blockwise AdamW (the
low-rank moments in 8 bits), ours keeps any ``inner`` optimizer's moments in their own dtype; it
needs numel % group == 0, we zero-pad the last group; its refreshes fall on multiples of the
(growing) gap, ours ``gap`` steps after the previous refresh.  :meth:`QGaLoreOptimizer.unquantize`
writes float weights back into the parameters and removes the hooks (e.g. before export).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .optimizer import LowRankOptimizer, _chunks
from .transforms import State, Transform


# ---------------------------------------------------------------------------------- INT8 codes

@dataclass
class Int8Weight(State):
    codes: Tensor   # (groups * group,) uint8: the weight row-major, zero-padded to whole groups
    scale: Tensor   # (groups,) fp32: quantisation step of each group
    zero: Tensor    # (groups,) uint8: the code of 0.0 in each group


def int8_weight_like(p: Tensor, group: int) -> Int8Weight:
    groups = -(-p.numel() // group)
    return Int8Weight(codes=torch.zeros(groups * group, dtype=torch.uint8, device=p.device),
                      scale=torch.zeros(groups, dtype=torch.float32, device=p.device),
                      zero=torch.zeros(groups, dtype=torch.uint8, device=p.device))


def quantize8_(w: Tensor, st: Int8Weight, group: int, generator: torch.Generator | None = None, *,
               overwrite: bool = False) -> None:
    """Write ``w`` into ``st``: per-group min-max scale and zero point, then round -- stochastically
    when a ``generator`` is given (floor(x + u), u ~ U[0, 1): up with probability frac(x)), else to
    nearest (floor(x + 1/2)).  ``overwrite=True`` lets it use a float32 ``w``'s memory as scratch."""
    flat = w.detach().reshape(-1)
    pad = st.codes.numel() - flat.numel()
    if pad:
        flat = torch.cat([flat.float(), flat.new_zeros(pad, dtype=torch.float32)])
    elif flat.dtype != torch.float32 or not overwrite:
        flat = flat.float() if flat.dtype != torch.float32 else flat.clone()
    x = flat.view(-1, group)                                                           # (groups, group)
    lo, hi = x.amin(1), x.amax(1)
    scale = (hi - lo).clamp_(min=1e-8).div_(255)                                      # (groups,)
    zero = torch.round(-lo / scale).clamp_(0, 255)
    x.mul_((1 / scale)[:, None]).add_(zero[:, None])                                  # x / s + z
    x.add_(0.5 if generator is None else uniform15(x.numel(), generator, x.device).view(x.shape))
    # x >= 0 after the clamp, so the uint8 conversion (truncation) is the floor
    st.codes.copy_(x.clamp_(0, 255).view(-1))
    st.scale.copy_(scale)
    st.zero.copy_(zero)


def uniform15(n: int, generator: torch.Generator, device) -> Tensor:
    """``n`` uniforms in (0, 1), (k + 1/2) / 2^15 for k uniform in 0..2^15-1, cut from a quarter as
    many 63-bit integer draws (4 lanes of 15 bits each): half the cost of ``torch.rand`` here.  For
    stochastic rounding this resolution leaves a bias below 2^-16 of a quantisation step."""
    bits = torch.empty(-(-n // 4), dtype=torch.int64, device=device).random_(generator=generator)
    lanes = bits.view(torch.int16)[:n].bitwise_and_(0x7FFF)       # drop bit 63 (always 0) and its peers
    return lanes.float().add_(0.5).mul_(1 / 32768)


def dequantize8(st: Int8Weight, shape, dtype: torch.dtype, decay: float = 1.0) -> Tensor:
    """decay * s_g (q - z_g), reshaped to ``shape`` (a fresh contiguous tensor)."""
    group = st.codes.numel() // st.scale.numel()
    s = st.scale * decay if decay != 1.0 else st.scale
    x = st.codes.view(-1, group).float().mul_(s[:, None]).sub_((st.zero.float() * s)[:, None])
    return x.view(-1)[: torch.Size(shape).numel()].view(shape).to(dtype)


def int8_update_(st: Int8Weight, delta: Tensor, *, decay: float = 1.0,
                 generator: torch.Generator | None = None) -> None:
    """W <- deq(W) * decay + delta, re-quantised into ``st`` (the hot path of a Q-GaLore step)."""
    w = dequantize8(st, delta.shape, torch.float32, decay).add_(delta)    # a temporary: reuse it
    quantize8_(w, st, st.codes.numel() // st.scale.numel(), generator, overwrite=True)


@dataclass
class QuantWeightState(State):
    opt: State             # the wrapped transform's state (GaLore's)
    weight: Int8Weight     # the parameter's INT8 weight


class Int8Weights(Transform):
    """Wraps a transform: same directions; the state also holds the parameter's INT8 weight
    (so ``state_bytes``, also on a meta model, and ``state_dict`` account for it)."""

    def __init__(self, inner: Transform, group: int):
        self.inner, self.group = inner, group

    def init(self, p: Tensor, index: int = 0) -> QuantWeightState:
        return QuantWeightState(self.inner.init(p, index), int8_weight_like(p, self.group))

    def update(self, grads, states, params, step):
        return self.inner.update(grads, [s.opt for s in states], params, step)

    def hyper(self):
        return self.inner.hyper()

    def set_hyper(self, values):
        self.inner.set_hyper(values)


# ------------------------------------------------------------------------- autograd plumbing

# storage pointer of a dequantised weight currently in a parameter's .data -> (optimizer, param)
_LIVE: dict[int, tuple[Any, Tensor]] = {}


@dataclass
class _Packed:
    """A saved tensor that aliased a dequantised weight: rebuilt from the codes when unpacked."""
    opt: Any
    p: Tensor
    size: torch.Size
    stride: tuple
    offset: int

    def unpack(self) -> Tensor:
        w = dequantize8(self.opt.state[self.p]["s"].weight, self.p.shape, self.p.dtype)
        return w.as_strided(self.size, self.stride, self.offset)


def _pack(t: Tensor):
    if _LIVE:
        try:
            hit = _LIVE.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):   # sparse / exotic tensors have no plain storage
            hit = None
        if hit is not None and t.dtype == hit[1].dtype:
            return _Packed(hit[0], hit[1], t.size(), t.stride(), t.storage_offset())
    return t


def _unpack(x):
    return x.unpack() if isinstance(x, _Packed) else x


# ------------------------------------------------------------------------------ the optimizer

class QGaLoreOptimizer(LowRankOptimizer):
    """A :class:`LowRankOptimizer` whose projected parameters are stored as INT8 codes (see the
    module docstring); the plain group (embeddings, norms, head) is an ordinary float group."""

    def __init__(self, groups, transforms, *, model: nn.Module, weight_group_size: int = 256,
                 stochastic_round: bool = True, seed: int = 0, **kwargs):
        super().__init__(groups, transforms, **kwargs)
        self._qgi = next(i for i, t in enumerate(self._transforms) if isinstance(t, Int8Weights))
        self.weight_group_size, self.stochastic_round = weight_group_size, stochastic_round
        qparams = list(self.param_groups[self._qgi]["params"])
        self._qset = {id(p) for p in qparams}
        self._gens: dict[torch.device, torch.Generator] = {}
        self._seed = seed
        self._live: dict[Tensor, list] = {}      # p -> [refcount, storage ptr]
        self._placeholder: dict[Tensor, Tensor] = {}
        self._handles = []
        self._quantized = True
        tf = self._transforms[self._qgi]
        for p in qparams:                        # quantise now: from here on the codes are the weights
            st = self.state[p]
            st["step"] = 0
            st["s"] = tf.init(p, self._index[p])
            quantize8_(p.data, st["s"].weight, weight_group_size)            # round to nearest, as the reference
            self._placeholder[p] = torch.full((), float("nan"), dtype=p.dtype, device=p.device).expand(p.shape)
            p.data = self._placeholder[p]
        for mod in model.modules():
            mine = [p for p in mod._parameters.values() if p is not None and id(p) in self._qset]
            if not mine:
                continue
            self._handles += [
                mod.register_forward_pre_hook(_pre_hook(self, mine)),
                mod.register_forward_hook(_post_hook(self, mine), always_call=True),
                mod.register_state_dict_post_hook(_sd_hook(self, mod)),
                mod.register_load_state_dict_pre_hook(_load_pre_hook(self, mine)),
                mod.register_load_state_dict_post_hook(_load_post_hook(self, mine)),
            ]

    # -- weights in and out of floating point
    def _generator(self, device: torch.device) -> torch.Generator | None:
        if not self.stochastic_round:
            return None
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._gens[device]

    def weight_of(self, p: Tensor) -> Int8Weight:
        return self.state[p]["s"].weight

    def _materialize(self, p: Tensor) -> None:
        ent = self._live.get(p)
        if ent is None:
            w = dequantize8(self.weight_of(p), p.shape, p.dtype)
            p.data = w
            ptr = w.untyped_storage().data_ptr()
            _LIVE[ptr] = (self, p)
            self._live[p] = [1, ptr]
        else:
            ent[0] += 1

    def _release(self, p: Tensor) -> None:
        ent = self._live.get(p)
        if ent is None:
            return
        ent[0] -= 1
        if ent[0] == 0:
            _LIVE.pop(ent[1], None)
            del self._live[p]
            p.data = self._placeholder[p]

    def unquantize(self) -> None:
        """Write the dequantised weights back into the parameters (float storage again) and remove
        the hooks; the optimizer cannot step afterwards."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p in list(self._live):
            self._live[p][0] = 1
            self._release(p)
        for p in self.param_groups[self._qgi]["params"]:
            p.data = dequantize8(self.weight_of(p), p.shape, p.dtype)
        self._quantized = False

    # -- the step
    def _update(self, gi: int, ps: list[Tensor]) -> None:
        if gi != self._qgi:
            return super()._update(gi, ps)
        if not self._quantized:
            raise ConfigError("q_galore: unquantize() was called; this optimizer can no longer step")
        self._sync_hyper(gi)
        group, tf = self.param_groups[gi], self._transforms[gi]
        buckets: dict[int, list[Tensor]] = {}
        for p in ps:
            st = self.state[p]
            st["step"] += 1
            buckets.setdefault(st["step"], []).append(p)
        lr, wd = group["lr"], group["weight_decay"]
        for step, bp in buckets.items():
            for chunk in _chunks(bp, self.chunk_numel):
                states = [self.state[p]["s"] for p in chunk]
                dirs = tf.update([p.grad for p in chunk], states, chunk, step)     # GaLore's D, (m, n) each
                for p, d, s in zip(chunk, dirs, states):
                    # W <- SR(deq(W) (1 - lr wd) - lr D): the float weight is a per-matrix temporary
                    int8_update_(s.weight, d.mul_(-lr), decay=1.0 - lr * wd, generator=self._generator(p.device))
                del dirs

    # -- (de)serialisation: the codes are in the typed state; add the rounding generators
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sr_generators"] = {str(d): g.get_state() for d, g in self._gens.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._gens = {}
        for d, s in state_dict.get("sr_generators", {}).items():
            g = torch.Generator(device=torch.device(d))
            g.set_state(s)
            self._gens[torch.device(d)] = g
        for p in self._live:                     # a weight dequantised right now shows the loaded codes
            p.data.copy_(dequantize8(self.weight_of(p), p.shape, p.dtype))


# module hooks: the optimizer owns the weights; the model holds the hooks and, through them, the
# optimizer (so the weights live as long as the model does)

def _pre_hook(opt, params):
    def hook(module, args):
        for p in params:
            opt._materialize(p)
        if torch.is_grad_enabled():
            ctx = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
            ctx.__enter__()
            module.__dict__.setdefault("_qgalore_ctx", []).append(ctx)
    return hook


def _post_hook(opt, params):
    def hook(module, args, output):
        stack = module.__dict__.get("_qgalore_ctx")
        if stack:
            stack.pop().__exit__(None, None, None)
        for p in params:
            opt._release(p)
    return hook


def _sd_hook(opt, module):
    def hook(mod, state_dict, prefix, local_metadata):
        for name, p in module._parameters.items():
            if p is not None and id(p) in opt._qset and prefix + name in state_dict:
                state_dict[prefix + name] = dequantize8(opt.weight_of(p), p.shape, p.dtype)
    return hook


def _load_pre_hook(opt, params):
    def hook(module, state_dict, prefix, *rest):
        for p in params:
            opt._materialize(p)               # a real float tensor to copy into
    return hook


def _load_post_hook(opt, params):
    def hook(module, incompatible_keys):
        for p in params:
            quantize8_(p.data, opt.weight_of(p), opt.weight_group_size)   # what was loaded, round to nearest
            opt._release(p)
    return hook


# --------------------------------------------------------------------------------- the factory

def q_galore(model_or_named_parameters, lr: float = 1e-3, rank: int = 128, update_gap: int = 200,
             scale: float = 0.25, inner: str = "adamw", targets=None, *, base: str = "svd", group_size: int = 256,
             cos_threshold: float = 0.4, gamma: int = 2, queue_size: int = 5, weight_bits: int | None = None,
             weight_group_size: int = 256, stochastic_round: bool = True, **options):
    """Q-GaLore: GaLore with INT4 projections (``group_size``) whose refresh gap is multiplied by
    ``gamma`` once the mean |cos| of the last ``queue_size`` successive leading basis vectors is
    >= ``cos_threshold``.  ``weight_bits=8`` also stores the projected weights as INT8 codes
    (groups of ``weight_group_size``) updated with stochastic rounding (``stochastic_round=False``:
    round to nearest); this needs the model itself (its modules get hooks), not named parameters.
    Other options as :func:`lowrank.optim.galore`.
    """
    from .galore import galore
    if "projector" in options:
        raise ConfigError("q_galore fixes projector='int4' (choose the basis it quantises with base=...)")
    if weight_bits not in (None, 8):
        raise ConfigError(f"q_galore: weight_bits must be None (weights in their own dtype) or 8, got {weight_bits!r}")
    if weight_bits is not None:
        if not isinstance(model_or_named_parameters, nn.Module):
            raise ConfigError("q_galore: weight_bits=8 needs the model (an nn.Module), whose modules get the "
                              "hooks that dequantise the INT8 weights; got named parameters")
        if not isinstance(weight_group_size, int) or weight_group_size < 2:
            raise ConfigError(f"q_galore: weight_group_size must be an int >= 2, got {weight_group_size!r}")
    popts = dict(options.pop("projector_options", None) or {})
    popts.update(base=base, group_size=group_size, cos_threshold=cos_threshold, gamma=gamma, queue_size=queue_size)
    layerwise = options.pop("layerwise", False)
    opt = galore(model_or_named_parameters, lr=lr, rank=rank, update_gap=update_gap, scale=scale, projector="int4",
                 inner=inner, targets=targets, projector_options=popts, layerwise=layerwise and weight_bits is None,
                 **options)
    for g in opt.param_groups:
        if g["method"] == "galore":
            g["method"] = "q_galore"
            if weight_bits is not None:
                g.update(weight_bits=weight_bits, weight_group_size=weight_group_size,
                         stochastic_round=stochastic_round)
    if weight_bits is None:
        return opt
    qgi = [i for i, g in enumerate(opt.param_groups) if g["method"] == "q_galore"]
    if not qgi:
        raise ConfigError("q_galore: weight_bits=8 but no parameter is projected (targets matched nothing 2-D)")
    for p in opt.param_groups[qgi[0]]["params"]:
        if not p.is_floating_point():
            raise ConfigError(f"q_galore: {opt.name_of(p)} is {p.dtype}, INT8 storage needs a float weight")
    tfs = list(opt._transforms)
    tfs[qgi[0]] = Int8Weights(tfs[qgi[0]], weight_group_size)
    groups = [dict(g) for g in opt.param_groups]
    return QGaLoreOptimizer(groups, tfs, model=model_or_named_parameters, weight_group_size=weight_group_size,
                            stochastic_round=stochastic_round, seed=options.get("seed", 0), names=opt._names,
                            nonfinite=opt.nonfinite, layerwise=layerwise,
                            accumulation_steps=options.get("accumulation_steps", 1))
