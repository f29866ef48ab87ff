"""CPU kernels for sparse matrices with a fixed support on token-major activations (numba).

torch's CSR @ dense needs the dense operand feature-major, (features, T), while activations are
token-major, (T, features): through torch every sparse product costs two full transposed copies
(xᵀ in, the product out), and those copies cost more than the products.  These kernels read and
write activations in their own layout: they walk the tokens in tiles, transpose one tile into a
small buffer that stays in cache (8 x 8 blocks through vector shuffles), run the sparse rows on
it there, and add the tile's result back — no (features, T) tensor exists.  Tiles run in
parallel; every output element and every partial sum of the value gradient belongs to one tile,
so results do not depend on the thread count.

A group of layers that read one x (q/k/v, gate/up) runs as one call on their stacked
S = [S_1; ...; S_n] (Σout, in): the x tile is transposed once, and the input gradient of the
whole group is summed inside the tile and added back once.  Each layer's own output y_i (or
gradient dy_i) is a separate (T, out_i) tensor, passed as its address.

    add_x_st(x, crow, col, val, ys)              y_i (T, out_i) += x S_iᵀ      stacked S as CSR
    add_dy_s(dys, x, crow_t, col_t, val_t,        dx (T, in) += Σ_i dy_i S_i   stacked Sᵀ as CSR
             crow, col, dx, want_gv)             gv[k] = Σ_t dy[t, i_k] x[t, j_k]   (S's order)

Compiled on first use and cached on disk (``cache=True``).  ``_sparse`` imports this module only
when it runs a kernel (numba loads LLVM) and uses torch's kernels on feature-major copies when
numba is not installed.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TILE = 128  # tokens per tile: a (features x 128) fp32 tile of a 704-wide layer is 352 KiB (L2)
_FAST = {"reassoc", "contract", "nsz", "arcp"}  # vectorise sums; keep NaN/inf semantics


def _swap_blocks(builder, rows):
    """Transpose 8 vectors of 8 as a matrix: swap the off-diagonal b x b blocks for b = 4, 2, 1
    (each swap is one two-input shuffle per vector; the three stages together transpose)."""
    rows = list(rows)
    i32x8 = ir.VectorType(ir.IntType(32), 8)
    for b in (4, 2, 1):
        keep = ir.Constant(i32x8, [lane if not lane & b else 8 + lane - b for lane in range(8)])
        take = ir.Constant(i32x8, [lane + b if not lane & b else 8 + lane for lane in range(8)])
        for p in range(8):
            if not p & b:
                top, bottom = rows[p], rows[p + b]
                rows[p] = builder.shuffle_vector(top, bottom, keep)
                rows[p + b] = builder.shuffle_vector(top, bottom, take)
    return rows


def _block_intrinsic(add: bool):
    """dst[di + j, dj + a] (+)= src[si + a, sj + j] for a, j < 8: one 8 x 8 block transposed in
    registers (eight vector loads, 24 shuffles, eight vector stores).  Any float dtype."""

    @intrinsic
    def block(typingctx, src, si, sj, dst, di, dj):
        def codegen(context, builder, sig, args):
            src_ty, dst_ty = sig.args[0], sig.args[3]
            s, si_, sj_, d, di_, dj_ = args
            elt = context.get_data_type(src_ty.dtype)
            vec_ptr = ir.VectorType(elt, 8).as_pointer()
            align = context.get_abi_sizeof(elt)

            def pointer(ty, ary, i, j, k):
                a = context.make_array(ty)(context, builder, ary)
                shape, strides = cgutils.unpack_tuple(builder, a.shape, 2), cgutils.unpack_tuple(builder, a.strides, 2)
                row = builder.add(i, ir.Constant(i.type, k))
                p = cgutils.get_item_pointer2(context, builder, a.data, shape, strides, ty.layout, [row, j])
                return builder.bitcast(p, vec_ptr)

            rows = [builder.load(pointer(src_ty, s, si_, sj_, a), align=align) for a in range(8)]
            for j, col in enumerate(_swap_blocks(builder, rows)):
                p = pointer(dst_ty, d, di_, dj_, j)
                builder.store(builder.fadd(builder.load(p, align=align), col) if add else col, p, align=align)
            return context.get_dummy_value()

        return types.void(src, si, sj, dst, di, dj), codegen

    return block


_block_t = _block_intrinsic(add=False)
_block_add_t = _block_intrinsic(add=True)


@intrinsic
def _pointer(typingctx, address, like):
    """The integer `address` as a pointer to `like`'s type (for numba.carray on a torch tensor)."""

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return types.CPointer(like)(address, like), codegen


def _array_parts(context, builder, ty, value):
    a = context.make_array(ty)(context, builder, value)
    return a, cgutils.unpack_tuple(builder, a.shape, ty.ndim), cgutils.unpack_tuple(builder, a.strides, ty.ndim)


def _load_index(context, builder, ty, value, k):
    """ty[k] of a 1-d integer array, widened to k's type."""
    a, shape, strides = _array_parts(context, builder, ty, value)
    v = builder.load(cgutils.get_item_pointer2(context, builder, a.data, shape, strides, ty.layout, [k]))
    return builder.sext(v, k.type) if v.type.width < k.type.width else v


def _row_pointer(context, builder, ty, value, row, vec):
    """&ary[row, 0] of a 2-d array as a pointer to a whole-TILE vector."""
    a, shape, strides = _array_parts(context, builder, ty, value)
    p = cgutils.get_item_pointer2(context, builder, a.data, shape, strides, ty.layout, [row, ir.Constant(row.type, 0)])
    return builder.bitcast(p, vec.as_pointer())


@intrinsic
def _csr_row_tile(typingctx, crow, col, val, src, dst, i):
    """dst[i, :TILE] = Σ_k val_k · src[col_k, :TILE] over row i of a CSR matrix: the whole tile
    row accumulates in registers (one vector load and FMA per TILE column block and non-zero)."""

    def codegen(context, builder, sig, args):
        crow_ty, col_ty, val_ty, src_ty, dst_ty, _ = sig.args
        crow_v, col_v, val_v, src_v, dst_v, i_v = args
        elt = context.get_data_type(src_ty.dtype)
        vec = ir.VectorType(elt, TILE)
        align = context.get_abi_sizeof(elt)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{TILE}f{8 * align}"
        )
        acc = cgutils.alloca_once_value(builder, ir.Constant(vec, None))  # zeros; promoted to registers
        start = _load_index(context, builder, crow_ty, crow_v, i_v)
        stop = _load_index(context, builder, crow_ty, crow_v, builder.add(i_v, ir.Constant(i_v.type, 1)))
        with cgutils.for_range_slice(builder, start, stop, ir.Constant(i_v.type, 1), intp=i_v.type) as (k, _):
            j = _load_index(context, builder, col_ty, col_v, k)
            a, shape, strides = _array_parts(context, builder, val_ty, val_v)
            v = builder.load(cgutils.get_item_pointer2(context, builder, a.data, shape, strides, val_ty.layout, [k]))
            v = builder.shuffle_vector(
                builder.insert_element(ir.Constant(vec, None), v, ir.Constant(ir.IntType(32), 0)),
                ir.Constant(vec, None), ir.Constant(ir.VectorType(ir.IntType(32), TILE), [0] * TILE),
            )  # val_k in every lane
            row = builder.load(_row_pointer(context, builder, src_ty, src_v, j, vec), align=align)
            builder.store(builder.call(fma, [v, row, builder.load(acc)]), acc)
        builder.store(builder.load(acc), _row_pointer(context, builder, dst_ty, dst_v, i_v, vec), align=align)
        return context.get_dummy_value()

    return types.void(crow, col, val, src, dst, i), codegen


@intrinsic
def _sampled_row_tile(typingctx, crow, col, left, right, out, b, i):
    """out[b, k] = left[i, :TILE] · right[col_k, :TILE] for every k in row i of a CSR pattern
    (left's row stays in registers; each dot product is one pass and a halving reduction)."""

    def codegen(context, builder, sig, args):
        crow_ty, col_ty, left_ty, right_ty, out_ty, _, _ = sig.args
        crow_v, col_v, left_v, right_v, out_v, b_v, i_v = args
        elt = context.get_data_type(left_ty.dtype)
        vec = ir.VectorType(elt, TILE)
        align = context.get_abi_sizeof(elt)
        lrow = builder.load(_row_pointer(context, builder, left_ty, left_v, i_v, vec), align=align)
        start = _load_index(context, builder, crow_ty, crow_v, i_v)
        stop = _load_index(context, builder, crow_ty, crow_v, builder.add(i_v, ir.Constant(i_v.type, 1)))
        o, o_shape, o_strides = _array_parts(context, builder, out_ty, out_v)
        with cgutils.for_range_slice(builder, start, stop, ir.Constant(i_v.type, 1), intp=i_v.type) as (k, _):
            j = _load_index(context, builder, col_ty, col_v, k)
            prod = builder.fmul(lrow, builder.load(_row_pointer(context, builder, right_ty, right_v, j, vec), align=align))
            width = TILE
            while width > 1:  # add the upper half onto the lower half
                width //= 2
                half = ir.VectorType(elt, width)
                lo = builder.shuffle_vector(prod, prod, ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(width))))
                hi = builder.shuffle_vector(
                    prod, prod, ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(width, 2 * width)))
                )
                prod = builder.fadd(lo, hi)
                assert prod.type == half
            total = builder.extract_element(prod, ir.Constant(ir.IntType(32), 0))
            builder.store(total, cgutils.get_item_pointer2(context, builder, o.data, o_shape, o_strides, out_ty.layout, [b_v, k]))
        return context.get_dummy_value()

    return types.void(crow, col, left, right, out, b, i), codegen


@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _tile_t(src, t0, nt, dst, r0):  # pragma: no cover - compiled
    """dst[r0:r0 + n, :nt] = src[t0:t0 + nt, :]ᵀ (n = src's width), 8 x 8 blocks in registers."""
    n = src.shape[1]
    a8, n8 = nt - nt % 8, n - n % 8
    for a0 in range(0, a8, 8):
        for j0 in range(0, n8, 8):
            _block_t(src, t0 + a0, j0, dst, r0 + j0, a0)
        for a in range(a0, a0 + 8):
            for j in range(n8, n):
                dst[r0 + j, a] = src[t0 + a, j]
    for a in range(a8, nt):
        for j in range(n):
            dst[r0 + j, a] = src[t0 + a, j]


@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _tile_add_t(acc, r0, nt, dst, t0):  # pragma: no cover - compiled
    """dst[t0:t0 + nt, :] += acc[r0:r0 + n, :nt]ᵀ (n = dst's width), 8 x 8 blocks in registers."""
    n = dst.shape[1]
    a8, n8 = nt - nt % 8, n - n % 8
    for a0 in range(0, a8, 8):
        for j0 in range(0, n8, 8):
            _block_add_t(acc, r0 + j0, a0, dst, t0 + a0, j0)
        for a in range(a0, a0 + 8):
            for j in range(n8, n):
                dst[t0 + a, j] += acc[r0 + j, a]
    for a in range(a8, nt):
        for j in range(n):
            dst[t0 + a, j] += acc[r0 + j, a]


@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _rows(crow, col, val, src, acc, nt):  # pragma: no cover - compiled
    """acc[i, :nt] = Σ_k val_k · src[col_k, :nt] over row i of a CSR matrix, for every row."""
    if nt == TILE:
        for i in range(crow.shape[0] - 1):
            _csr_row_tile(crow, col, val, src, acc, i)
        return
    acc[:, :nt] = 0.0  # the last, partial tile: plain loops
    for i in range(crow.shape[0] - 1):
        for k in range(crow[i], crow[i + 1]):
            v = val[k]
            j = col[k]
            for a in range(nt):
                acc[i, a] += v * src[j, a]


@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _sampled(crow, col, left, right, nt, out, b):  # pragma: no cover - compiled
    """out[b, k] = left[i, :nt] · right[col_k, :nt] for every entry k (row i) of a CSR pattern."""
    if nt == TILE:
        for i in range(crow.shape[0] - 1):
            _sampled_row_tile(crow, col, left, right, out, b, i)
        return
    for i in range(crow.shape[0] - 1):
        for k in range(crow[i], crow[i + 1]):
            j = col[k]
            s = left[i, 0] * right[j, 0]  # (in the arrays' dtype)
            for a in range(1, nt):
                s += left[i, a] * right[j, a]
            out[b, k] = s


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _add_x_st(x, crow, col, val, y_at, y_width):  # pragma: no cover - compiled
    n_tok, n_in = x.shape
    n_out = crow.shape[0] - 1  # Σ out_i
    for b in numba.prange((n_tok + TILE - 1) // TILE):
        t0 = b * TILE
        nt = min(n_tok, t0 + TILE) - t0
        xt = np.empty((n_in, TILE), x.dtype)  # this tile of x, feature-major (columns < nt)
        _tile_t(x, t0, nt, xt, 0)
        acc = np.empty((n_out, TILE), x.dtype)
        _rows(crow, col, val, xt, acc, nt)  # S xtᵀ on the tile, all layers
        r0 = 0
        for i in range(y_at.shape[0]):  # layer i's rows go to its own y_i
            y = numba.carray(_pointer(y_at[i], x[0, 0]), (n_tok, y_width[i]))
            _tile_add_t(acc, r0, nt, y, t0)
            r0 += y_width[i]


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _add_dy_s(dy_at, dy_width, x, crow_t, col_t, val_t, crow, col, dx, gv_tiles):  # pragma: no cover - compiled
    n_tok, n_in = x.shape
    n_out = crow.shape[0] - 1  # Σ out_i
    for b in numba.prange((n_tok + TILE - 1) // TILE):
        t0 = b * TILE
        nt = min(n_tok, t0 + TILE) - t0
        dyt = np.empty((n_out, TILE), x.dtype)  # this tile of [dy_1 ... dy_n], feature-major
        r0 = 0
        for i in range(dy_at.shape[0]):
            if dy_at[i] == 0:  # an output that got no gradient: zeros
                dyt[r0: r0 + dy_width[i], :] = 0.0
            else:
                dy = numba.carray(_pointer(dy_at[i], x[0, 0]), (n_tok, dy_width[i]))
                _tile_t(dy, t0, nt, dyt, r0)
            r0 += dy_width[i]
        if dx.shape[0] > 0:
            acc = np.empty((n_in, TILE), x.dtype)
            _rows(crow_t, col_t, val_t, dyt, acc, nt)  # Σ_i S_iᵀ dy_itᵀ on the tile
            _tile_add_t(acc, 0, nt, dx, t0)
        if gv_tiles.shape[0] > 0:  # this tile's share of dyᵀ x at the support
            xt = np.empty((n_in, TILE), x.dtype)
            _tile_t(x, t0, nt, xt, 0)
            _sampled(crow, col, dyt, xt, nt, gv_tiles, b)


def _addresses(arrays) -> np.ndarray:
    """Each array's data address (0 for None): the kernels view it with its width and x's T."""
    return np.array([0 if a is None else a.ctypes.data for a in arrays], dtype=np.uint64)


def add_x_st(x, crow, col, val, ys) -> None:
    """y_i += x S_iᵀ in place for the stacked S; x (T, in) and every y_i (T, out_i) C-contiguous
    numpy arrays of one float dtype, Σ out_i = S's rows."""
    if x.shape[0] == 0:
        return
    width = np.array([y.shape[1] for y in ys], dtype=np.int64)
    _add_x_st(x, crow, col, val, _addresses(ys), width)


def add_dy_s(dys, widths, x, crow_t, col_t, val_t, crow, col, dx, want_gv: bool):
    """dx += Σ_i dy_i S_i in place (skipped when dx is None) and, if asked, the value gradient of
    the stacked S (nnz,).  dys: C-contiguous (T, out_i) arrays, None for an output without one."""
    n_tiles = (x.shape[0] + TILE - 1) // TILE
    gv_tiles = np.zeros((n_tiles if want_gv else 0, col.shape[0]), x.dtype)
    if x.shape[0] > 0:
        dx_arr = dx if dx is not None else np.zeros((0, x.shape[1]), x.dtype)
        _add_dy_s(_addresses(dys), np.asarray(widths, dtype=np.int64), x, crow_t, col_t, val_t, crow, col, dx_arr, gv_tiles)
    return gv_tiles.sum(axis=0) if want_gv else None


def use_threads(n: int) -> None:
    """Run the kernels on n threads (the caller's torch setting), within numba's pool."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
