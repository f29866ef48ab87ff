"""CPU kernels for a sparse S with a fixed support on token-major activations (numba).

torch's CSR @ dense needs the dense operand feature-major, (features, T), while activations are
token-major, (T, features): through torch every sparse product costs two full transposed copies
(xᵀ in, the product out), and those copies cost more than the products.  These kernels read and
write activations in their own layout: they walk the tokens in tiles, transpose one tile into a
small buffer that stays in cache, run the sparse rows on it there, and add the tile's result back
— no (features, T) tensor exists.  Tiles run in parallel; every output element and every partial
sum of the value gradient belongs to one tile, so results do not depend on the thread count.

    add_x_st(x, crow, col, val, y)                y (T, out) += x Sᵀ          S (out, in) as CSR
    add_dy_s(dy, x, crow_t, col_t, val_t,          dx (T, in) += dy S         Sᵀ as CSR
             crow, col, dx, gv)                   gv[k] = Σ_t dy[t, i_k] x[t, j_k]   (S's order)

Compiled on first use and cached on disk (``cache=True``).  ``_sparse`` imports this module only
when it runs a kernel (numba loads LLVM) and uses torch's kernels on feature-major copies when
numba is not installed.
"""

from __future__ import annotations

import numba
import numpy as np

TILE = 128  # tokens per tile: a (features x 128) fp32 tile of a 704-wide layer is 352 KiB (L2)
_FAST = {"reassoc", "contract", "nsz", "arcp"}  # vectorise sums; keep NaN/inf semantics


@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _tile_t(src, t0, nt, dst):  # pragma: no cover - compiled
    """dst[:, :nt] = src[t0:t0 + nt, :]ᵀ, in 8 x 8 blocks (both sides stay in cache lines)."""
    n = src.shape[1]
    a8, n8 = nt - nt % 8, n - n % 8
    for a0 in range(0, a8, 8):
        for j0 in range(0, n8, 8):
            for a in range(8):
                for j in range(8):
                    dst[j0 + j, a0 + a] = src[t0 + a0 + a, j0 + j]
        for a in range(a0, a0 + 8):
            for j in range(n8, n):
                dst[j, a] = src[t0 + a, j]
    for a in range(a8, nt):
        for j in range(n):
            dst[j, a] = src[t0 + a, j]

@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _tile_add_t(acc, nt, dst, t0):  # pragma: no cover - compiled
    """dst[t0:t0 + nt, :] += acc[:, :nt]ᵀ, in 8 x 8 blocks."""
    n = dst.shape[1]
    a8, n8 = nt - nt % 8, n - n % 8
    for a0 in range(0, a8, 8):
        for j0 in range(0, n8, 8):
            for a in range(8):
                for j in range(8):
                    dst[t0 + a0 + a, j0 + j] += acc[j0 + j, a0 + a]
        for a in range(a0, a0 + 8):
            for j in range(n8, n):
                dst[t0 + a, j] += acc[j, a]
    for a in range(a8, nt):
        for j in range(n):
            dst[t0 + a, j] += acc[j, a]

@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _rows(crow, col, val, src, acc, nt):  # pragma: no cover - compiled
    """acc[i, :nt] += Σ_k val_k · src[col_k, :nt] over row i of a CSR matrix, for every row."""
    for i in range(crow.shape[0] - 1):
        for k in range(crow[i], crow[i + 1]):
            v = val[k]
            j = col[k]
            for a in range(nt):
                acc[i, a] += v * src[j, a]

@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _add_x_st(x, crow, col, val, y, tile):  # pragma: no cover - compiled
    n_tok, n_in = x.shape
    n_out = y.shape[1]
    for b in numba.prange((n_tok + tile - 1) // tile):
        t0 = b * tile
        nt = min(n_tok, t0 + tile) - t0
        xt = np.empty((n_in, tile), x.dtype)  # this tile of x, feature-major (columns < nt)
        _tile_t(x, t0, nt, xt)
        acc = np.zeros((n_out, tile), x.dtype)
        _rows(crow, col, val, xt, acc, nt)  # S xtᵀ on the tile
        _tile_add_t(acc, nt, y, t0)

@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _add_dy_s(dy, x, crow_t, col_t, val_t, crow, col, dx, gv_tiles, tile):  # pragma: no cover - compiled
    n_tok, n_out = dy.shape
    n_in = x.shape[1]
    for b in numba.prange((n_tok + tile - 1) // tile):
        t0 = b * tile
        nt = min(n_tok, t0 + tile) - t0
        dyt = np.empty((n_out, tile), dy.dtype)  # this tile of dy, feature-major (columns < nt)
        _tile_t(dy, t0, nt, dyt)
        if dx.shape[0] > 0:
            acc = np.zeros((n_in, tile), dy.dtype)
            _rows(crow_t, col_t, val_t, dyt, acc, nt)  # Sᵀ dytᵀ on the tile
            _tile_add_t(acc, nt, dx, t0)
        if gv_tiles.shape[0] > 0:  # this tile's share of dyᵀ x at the support
            xt = np.empty((n_in, tile), dy.dtype)
            _tile_t(x, t0, nt, xt)
            for i in range(n_out):
                for k in range(crow[i], crow[i + 1]):
                    j = col[k]
                    s = dyt[i, 0] * xt[j, 0]  # (in the arrays' dtype)
                    for a in range(1, nt):
                        s += dyt[i, a] * xt[j, a]
                    gv_tiles[b, k] = s


def add_x_st(x, crow, col, val, y) -> None:
    """y += x Sᵀ in place; x (T, in) and y (T, out) C-contiguous numpy arrays of one float dtype."""
    _add_x_st(x, crow, col, val, y, TILE)


def add_dy_s(dy, x, crow_t, col_t, val_t, crow, col, dx, want_gv: bool):
    """dx += dy S in place (skipped when dx is None) and, if asked, the value gradient (nnz,)."""
    n_tiles = (dy.shape[0] + TILE - 1) // TILE
    gv_tiles = np.zeros((n_tiles if want_gv else 0, col.shape[0]), dy.dtype)
    dx_arr = dx if dx is not None else np.zeros((0, x.shape[1]), dy.dtype)
    _add_dy_s(dy, x, crow_t, col_t, val_t, crow, col, dx_arr, gv_tiles, TILE)
    return gv_tiles.sum(axis=0) if want_gv else None


def use_threads(n: int) -> None:
    """Run the kernels on n threads (the caller's torch setting), within numba's pool."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
