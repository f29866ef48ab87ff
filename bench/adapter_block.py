"""Where our LoRA's time over the frozen base goes, on one anchor Llama block (issue 2).

One decoder block of the anchor (hidden 512, intermediate 1376, 8 heads), batch 8 x 256
(T = 2048 tokens), forward plus backward with the block input requiring grad, so every
configuration computes every input gradient (the whole-model step of `adapter_step.py` also
has layer 0, where our LoRA skips the q/k/v input gradient that the bound computes).
Configurations, interleaved round-robin in one process, median of ``--rounds``:

  bound      every weight frozen: forward + input-gradient backward
  plumbing   our LoRA's fused autograd node with the rank-r products taken out (diagnostic):
             the same dispatch, the same saved input, only the base GEMMs
  ours-rN    our LoRA at rank N on the block's seven linear layers
  peft-r16   PEFT 0.21 LoRA at rank 16

``plumbing`` against ``bound`` is what the adapter machinery costs; ``ours-r1`` against
``plumbing`` is what the low-rank products cost when they do almost no multiply work.

    .venv/bin/python bench/adapter_block.py [--rounds 30] [--ranks 1,16,64]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")
B, T = 8, 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _BaseGemmsOnly(torch.autograd.Function):
    """Our fused LoRA node's signature and saved input, computing only y_i = x W_i^T and
    dx = sum_i g_i W_i (the diagnostic ``plumbing`` configuration; bias-free layers only)."""

    @staticmethod
    def forward(ctx, x, xa, scales, *params):  # per layer W (out, in), b, A, B
        Ws = params[0::4]
        ctx.save_for_backward(x, *Ws)
        ctx.set_materialize_grads(False)
        return tuple(x @ W.t() for W in Ws)  # (T, out_i)

    @staticmethod
    def backward(ctx, *gs):
        x, *Ws = ctx.saved_tensors
        gx = None
        for g, W in zip(gs, Ws):
            if g is not None:
                gx = g @ W if gx is None else gx.addmm_(g, W)  # (T, in)
        return (gx, None, None, *([None] * (4 * len(gs))))


class _Swapped(torch.nn.Module):
    """Runs ``block`` with LoRA's fused node replaced by ``fn``."""

    def __init__(self, block: torch.nn.Module, fn: type[torch.autograd.Function]):
        super().__init__()
        self.block, self.fn = block, fn

    def forward(self, *args, **kwargs):
        from lowrank.adapters import lora

        with _patched(lora, "_LoRALinear", self.fn):
            return self.block(*args, **kwargs)


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def build(base: torch.nn.Module, name: str) -> torch.nn.Module:
    import lowrank

    block = copy.deepcopy(base)
    for p in block.parameters():
        p.requires_grad_(False)
    if name == "bound":
        return block
    if name == "plumbing":
        lowrank.adapt(block, "lora", rank=1, alpha=1, targets=TARGETS)
        return _Swapped(block, _BaseGemmsOnly)
    if name.startswith("peft-r"):
        import peft

        r = int(name[6:])
        return peft.get_peft_model(block, peft.LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
    r = int(name[6:])  # ours-rN
    lowrank.adapt(block, "lora", rank=r, alpha=r, targets=TARGETS)
    return block


def main() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ranks", default="1,16")
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=8192)
    cfg._attn_implementation = "sdpa"
    base = LlamaDecoderLayer(cfg, 0).train()
    x0 = torch.randn(B, T, cfg.hidden_size)
    pos = LlamaRotaryEmbedding(cfg)(x0, torch.arange(T)[None].expand(B, T))

    def run(block) -> None:
        x = x0.clone().requires_grad_(True)
        y = block(x, position_embeddings=pos, attention_mask=None, is_causal=True)
        (y[0] if isinstance(y, tuple) else y).sum().backward()

    names = ["bound", "plumbing", *(f"ours-r{r}" for r in args.ranks.split(","))]
    if not args.no_peft:
        names.append("peft-r16")
    blocks = {n: build(base, n) for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for b in blocks.values():  # warm-up (allocator; the first call also learns q/k/v's shared input)
        run(b), run(b)
    for _ in range(args.rounds):
        for n, b in blocks.items():
            t = time.perf_counter()
            run(b)
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"one anchor block, T = {B * T}, fwd + bwd, median of {args.rounds} interleaved rounds")
    for n in names:
        print(f"{n:10s} {med[n] * 1e3:7.1f} ms  {med[n] / med['bound']:.3f}x bound")


if __name__ == "__main__":
    main()
