"""C3A: Parameter-Efficient Fine-Tuning via Circular Convolution (Chen et al., ACL 2025).

The update is a block-circulant matrix: W is cut into (out/b) × (in/b) blocks of size b, and
block (i, j) of ΔW is the circulant matrix C(w_ij) of a trainable length-b kernel w_ij (row k of
C(w) is w cyclically shifted right by k, PEFT's convention):

    h = W x + (1 / in) · ΔW x,     (ΔW x)_i = Σ_j  w_ij ⋆ x_j       (circular correlation)

computed in the frequency domain, never as a matrix: by the convolution theorem the DFT of
(ΔW x)_i is Σ_j X_j ⊙ conj(W_ij), one small (in/b) -> (out/b) complex matmul per frequency.  As in
PEFT (``C3AConfig``) the kernels start at zero and the update is divided by ``in``.  The layout
is PEFT's: one parameter ``c3a_kernel`` of shape (out/b, in/b, b), so adapters move between the
two unchanged.

Two transforms, same function (see :func:`block_circular_conv`).  For small blocks (b <= 64,
e.g. b = 32 when gcd(in, out) = 32) the real DFT of length b is one GEMM against a fixed
(b, 2·(b/2+1)) cos/sin matrix whose output is laid out frequency-major, so the per-frequency
mixing is a plain batched real matmul with no permute copies.  A custom autograd Function runs
the adjoint in backward (a block-circulant matrix transposed is block-circulant with the
conjugate spectrum) and saves only x and the kernel's spectrum.  For larger blocks the
O(b log b) FFT (rfft/irfft) wins and autograd differentiates it.

Trainable parameters per layer: out · in / b.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.fft import irfft, rfft

from ..core.adapter import Adapter
from ..core.layers import BaseLayer
from ..errors import ConfigError, ShapeError
from ..registry import register_method
from ._shared import backward_as_forward

#: largest block size computed with DFT matrices (GEMMs); above it the FFT is faster on CPU
#: (one 2048 -> 2048 layer, 1024 tokens, forward + backward: DFT-GEMM 59/46/55 ms vs FFT
#: 66/52/36 ms at b = 32/64/128)
GEMM_DFT_MAX_BLOCK = 64


@functools.lru_cache(maxsize=32)
def dft_matrices(b: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The real-linear maps of ``rfft`` and ``irfft(n=b)`` as matrices.

    F (b, 2f): x @ F = [Re X_0 .. Re X_{f-1}, Im X_0 .. Im X_{f-1}] for X = rfft(x), f = b//2 + 1.
    G (2f, b): that same layout @ G = irfft(X, n=b) (it ignores Im X_0, as irfft does).
    Built from torch.fft itself in float64, so they are the FFT's maps exactly.
    """
    X = rfft(torch.eye(b, dtype=torch.float64), dim=-1)  # (b, f): row q = spectrum of e_q
    F = torch.cat([X.real, X.imag], dim=1)  # (b, 2f)
    f = X.shape[1]
    unit = torch.eye(f, dtype=torch.complex128)
    G = torch.cat([irfft(unit, n=b, dim=-1), irfft(1j * unit, n=b, dim=-1)])  # (2f, b)
    return F.to(dtype=dtype, device=device), G.to(dtype=dtype, device=device)


def _to_spectrum(x2: torch.Tensor, F: torch.Tensor, n: int) -> torch.Tensor:
    """(N·n, b) blocks -> (2, f, N, n): real/imag, frequency, token, block; one GEMM, no permute."""
    return (F.T @ x2.T).view(2, F.shape[1] // 2, -1, n)


def _mix(X: torch.Tensor, Mr: torch.Tensor, Mi: torch.Tensor) -> torch.Tensor:
    """Per frequency, Y_f = X_f M_f in complex arithmetic on split parts: (2, f, N, n) -> (2, f, N, m)."""
    _, f, N, _ = X.shape
    Y = X.new_empty(2, f, N, Mr.shape[2])  # both halves contiguous: BLAS batched calls, no copies
    torch.bmm(X[0], Mr, out=Y[0]).baddbmm_(X[1], Mi, alpha=-1)  # Re: Xr Mr - Xi Mi
    torch.bmm(X[0], Mi, out=Y[1]).baddbmm_(X[1], Mr)  # Im: Xr Mi + Xi Mr
    return Y


def _from_spectrum(Y: torch.Tensor, G: torch.Tensor, addend: torch.Tensor | None) -> torch.Tensor:
    """(2, f, N, m) -> (N·m, b) blocks (+ ``addend`` when given, fused in the GEMM)."""
    Yt = Y.view(G.shape[0], -1).T  # (N·m, 2f), a transposed view: no copy
    return Yt @ G if addend is None else torch.addmm(addend, Yt, G)


class _BlockCircularGemm(torch.autograd.Function):
    """y = addend + blockcirc(x) with the DFTs as GEMMs; saves x and the spectrum only."""

    @staticmethod
    def forward(ctx, x, addend, Mr, Mi, F, G):  # x (..., n·b); M (f, n, m) spectrum of conj(w)ᵀ
        f, n, m = Mr.shape
        b = F.shape[0]
        X = _to_spectrum(x.reshape(-1, b), F, n)  # (2, f, N, n)
        add = None if addend is None else addend.reshape(-1, b)
        y = _from_spectrum(_mix(X, Mr, Mi), G, add)  # (N·m, b)
        ctx.save_for_backward(x, Mr, Mi, F, G)
        ctx.has_addend = addend is not None
        return y.view(*x.shape[:-1], m * b)

    @staticmethod
    def backward(ctx, gy):
        return backward_as_forward(_BlockCircularGemm._backward, ctx, gy)

    @staticmethod
    def _backward(ctx, gy):
        x, Mr, Mi, F, G = ctx.saved_tensors
        f, n, m = Mr.shape
        b = F.shape[0]
        # per block y = Gᵀ M Fᵀ x (column vectors), so dL/dx = F Mᵀ G gy: the same pipeline with
        # Gᵀ as the forward transform, the transposed real map of M (conj Mᵀ), and Fᵀ as the inverse
        GY = _to_spectrum(gy.reshape(-1, b), G.T, m)  # (2, f, N, m): dL/dY
        gx = dMr = dMi = None
        if ctx.needs_input_grad[0]:
            gx = _from_spectrum(_mix(GY, Mr.transpose(1, 2), -Mi.transpose(1, 2)), F.T, None).view(x.shape)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            X = _to_spectrum(x.reshape(-1, b), F, n).transpose(2, 3)  # recomputed: (2, f, n, N)
            dMr = torch.bmm(X[0], GY[0]).baddbmm_(X[1], GY[1])  # (f, n, m)
            dMi = torch.bmm(X[0], GY[1]).baddbmm_(X[1], GY[0], alpha=-1)
        return gx, (gy if ctx.has_addend else None), dMr, dMi, None, None


def block_circular_conv(x: torch.Tensor, kernel: torch.Tensor, addend: torch.Tensor | None = None) -> torch.Tensor:
    """y = ΔW x (+ addend) for the block-circulant ΔW of ``kernel`` (m, n, b); x (..., n·b) -> (..., m·b).

    Block (i, j) has entries w_ij[(q - p) mod b], so y_i[p] = Σ_j Σ_q w_ij[q - p] x_j[q], a circular
    cross-correlation; its DFT is Σ_j X_j ⊙ conj(W_ij).  For real x and w the half spectrum
    suffices (f = b//2 + 1 frequencies).  The kernel's spectrum is computed once per call.
    """
    m, n, b = kernel.shape
    Wc = rfft(kernel, dim=-1).conj()  # (m, n, f)
    if b <= GEMM_DFT_MAX_BLOCK and x.dtype in (torch.float32, torch.float64):
        F, G = dft_matrices(b, x.dtype, x.device)
        M = Wc.permute(2, 1, 0)  # (f, n, m)
        Mr, Mi = M.real.contiguous(), M.imag.contiguous()
        with torch.autocast(x.device.type, enabled=False):  # in-place batched products need one dtype
            if addend is not None and (addend.dtype != x.dtype or not addend.is_contiguous()):
                return addend + _BlockCircularGemm.apply(x, None, Mr, Mi, F, G)
            return _BlockCircularGemm.apply(x, addend, Mr, Mi, F, G)
    xf = rfft(x.reshape(*x.shape[:-1], n, b), dim=-1)  # (..., n, f) complex
    yf = torch.einsum("...nf,mnf->...mf", xf, Wc)  # (..., m, f)
    y = irfft(yf, n=b, dim=-1).reshape(*x.shape[:-1], m * b)  # (..., out)
    return y if addend is None else addend + y


def circulant(kernel: torch.Tensor) -> torch.Tensor:
    """The explicit (m·b, n·b) block-circulant matrix of ``kernel``, by indexing (exact, no FFT)."""
    m, n, b = kernel.shape
    p = torch.arange(b, device=kernel.device)
    idx = (p[None, :] - p[:, None]) % b  # entry (p, q) of block (i, j) is w_ij[(q - p) mod b]
    return kernel[:, :, idx].permute(0, 2, 1, 3).reshape(m * b, n * b)  # (m, n, b, b) -> (m b, n b)


@register_method
class C3A(Adapter):
    name = "c3a"
    paper = "Parameter-Efficient Fine-Tuning via Circular Convolution (Chen et al., ACL 2025), arXiv:2407.19342"
    formula = "h = W x + (1/in) blockcirc(w) x, computed as circular convolutions by FFT"
    params_formula = "out * in / b"
    test_options = {"block_size": 16}

    def __init__(
        self,
        base: BaseLayer,
        *,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        block_size: int = 256,
        init_weights: str = "zeros",
    ):
        super().__init__(base, rank=rank, alpha=alpha, dropout=dropout)
        b = self.block_size = int(block_size)
        self.c3a_kernel = nn.Parameter(torch.zeros(self.out_features // b, self.in_features // b, b))
        if init_weights == "gaussian":
            nn.init.normal_(self.c3a_kernel)
        elif init_weights == "kaiming_uniform":  # PEFT's non-identity options, same bounds
            bound = (1.0 / self.in_features) ** 0.5
            nn.init.uniform_(self.c3a_kernel, -bound, bound)
        elif init_weights == "xavier_uniform":
            bound = (6.0 / (self.in_features + self.out_features)) ** 0.5
            nn.init.uniform_(self.c3a_kernel, -bound, bound)

    INITS = ("zeros", "gaussian", "kaiming_uniform", "xavier_uniform")

    @classmethod
    def validate(
        cls, base: BaseLayer, rank: int, path: str, block_size: int = 256, init_weights: str = "zeros", **options: Any
    ) -> None:
        if init_weights not in cls.INITS:
            raise ConfigError(f"c3a option init_weights={init_weights!r}: choose one of {cls.INITS}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"c3a option block_size must be a positive integer, got {block_size!r}")
        i, o = base.in_features, base.out_features
        if i % block_size or o % block_size:
            raise ShapeError(
                f"c3a block_size={block_size} must divide both dimensions of {path!r} ({o}x{i}); "
                f"common divisors are e.g. {_divisors(i, o)}"
            )

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer) -> torch.Tensor:
        kernel = self.c3a_kernel.float() / self.in_features  # (out/b, in/b, b), PEFT's 1/in folded in
        x = x.float()
        if base_out.dtype == x.dtype:
            return block_circular_conv(x, kernel, addend=base_out)  # W x + b + ΔW x / in, one pass
        return base_out + block_circular_conv(x, kernel).to(base_out.dtype)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        return (circulant(self.c3a_kernel.float()) / self.in_features).to(self.c3a_kernel.dtype)  # (out, in)

    @classmethod
    def trainable_count(cls, in_features: int, out_features: int, rank: int, block_size: int = 256, **options: Any) -> int:
        return (out_features // block_size) * (in_features // block_size) * block_size

    # ---- PEFT interop --------------------------------------------------------------------------
    @classmethod
    def peft_config(cls, rank: int, alpha: float, options: dict[str, Any]) -> dict[str, Any] | None:
        init = options.get("init_weights", "zeros")
        return {"peft_type": "C3A", "block_size": int(options.get("block_size", 256)),
                "init_weights": True if init == "zeros" else init, "r": rank}

    @classmethod
    def from_peft_config(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if config.get("peft_type") != "C3A" or config.get("block_size_pattern"):
            return None
        init = config.get("init_weights", True)
        opts: dict[str, Any] = {"block_size": int(config["block_size"])}
        if init not in (True, None):
            opts["init_weights"] = "xavier_uniform" if init is False else init
        return opts


def _divisors(i: int, o: int) -> list[int]:
    import math

    g = math.gcd(i, o)
    return [d for d in range(1, g + 1) if g % d == 0][-4:]
