"""LISA: Layerwise Importance Sampling for memory-efficient LLM fine-tuning (Pan et al., 2024),
arXiv:2403.17919.

Every ``interval`` optimizer steps, ``n_layers`` of the model's transformer blocks are drawn
at random (uniformly, without replacement) and only they train until the next draw; the
embeddings, the output head and everything outside the block stack always train.  A block
that is not sampled has ``requires_grad = False``, no gradient and *no optimizer state* (its
Adam moments are dropped when it leaves the sample), so optimizer memory is that of
``n_layers`` blocks plus the always-trained parts.  (LMFlow's two implementations differ here:
its callback keeps every block's moments, its ``LISATrainer`` drops the active blocks' moments at
every draw; here a block that stays in the sample keeps its moments, one that leaves loses them.)

:class:`~lowrank.schedules.owlore.OwLore` is the same schedule with non-uniform probabilities.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .base import Schedule, check_int, find_blocks, generator_state


class LISA(Schedule):
    name = "lisa"
    sets_up_next_step = True
    paper = "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language Model Fine-Tuning (Pan et al., 2024), arXiv:2403.17919"

    def __init__(self, n_layers: int = 2, interval: int = 20, *, seed: int = 0):
        super().__init__()
        check_int(self.name, "n_layers", n_layers, 1)
        check_int(self.name, "interval", interval, 1)
        check_int(self.name, "seed", seed, 0)
        self.n_layers, self.interval = n_layers, interval
        self.g = torch.Generator().manual_seed(seed)
        self.active: list[int] = []
        self.blocks_path = ""
        self._trainable: set[int] | None = None  # block parameters that were trainable at attach

    # -- which blocks -----------------------------------------------------------------------------
    def probabilities(self, n_blocks: int) -> torch.Tensor:
        return torch.full((n_blocks,), 1.0 / n_blocks)

    def sample(self, n_blocks: int) -> list[int]:
        p = self.probabilities(n_blocks)
        k = min(self.n_layers, n_blocks)
        return sorted(torch.multinomial(p, k, replacement=False, generator=self.g).tolist())

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.blocks_path, blocks = find_blocks(model)
        if self.n_layers > len(blocks):
            raise ConfigError(
                f"{self.name} option 'n_layers'={self.n_layers} exceeds the {len(blocks)} blocks of {self.blocks_path!r}"
            )
        if self._trainable is None:
            self._trainable = {id(p) for p in blocks.parameters() if p.requires_grad}
        self.setup(model, blocks)
        if not self.active:
            self.active = self.sample(len(blocks))
        self.apply(blocks, optimizer)
        super().attach(model, optimizer)

    def setup(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        """Hook for subclasses (OwLore reads the weights here)."""

    @torch.no_grad()
    def apply(self, blocks: nn.ModuleList, optimizer: torch.optim.Optimizer) -> None:
        """Only the sampled blocks train; the others lose their gradients and optimizer state."""
        assert self._trainable is not None
        for i, block in enumerate(blocks):
            on = i in self.active
            for p in block.parameters():
                if id(p) not in self._trainable:
                    continue  # frozen before LISA (e.g. an adapter's base weight): stays frozen
                p.requires_grad_(on)
                if not on:
                    p.grad = None
                    optimizer.state.pop(p, None)

    def on_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.t % self.interval == 0:
            blocks = model.get_submodule(self.blocks_path)
            self.active = self.sample(len(blocks))
            self.apply(blocks, optimizer)

    # -- resuming -----------------------------------------------------------------------------------
    state_keys = ("t", "rng", "active")

    def extra_state(self) -> dict[str, Any]:
        return {"rng": generator_state(self.g), "active": list(self.active)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.g.set_state(state["rng"])
        self.active = [int(i) for i in state["active"]]
