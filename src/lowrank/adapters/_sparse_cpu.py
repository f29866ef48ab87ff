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
             dx, want_gv)                        gv[k] = Σ_t dy[t, i_k] x[t, j_k]   (Sᵀ's order)

The backward reads each row of dy_itᵀ once for both of its products: the input gradient's
row sum and the value gradient's dot product with the x tile's row.

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


def _item_pointer(context, builder, ty, value, indices):
    """&ary[indices] of a numba array value (LLVM IR)."""
    a = context.make_array(ty)(context, builder, value)
    shape, strides = cgutils.unpack_tuple(builder, a.shape, ty.ndim), cgutils.unpack_tuple(builder, a.strides, ty.ndim)
    return cgutils.get_item_pointer2(context, builder, a.data, shape, strides, ty.layout, indices)


def _rows_contiguous(*arrays) -> bool:
    """The vector intrinsics load whole rows: every 2-d array must be C-contiguous."""
    return all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)


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
        if not _rows_contiguous(src, dst):
            return None

        def codegen(context, builder, sig, args):
            src_ty, dst_ty = sig.args[0], sig.args[3]
            s, si_, sj_, d, di_, dj_ = args
            elt = context.get_data_type(src_ty.dtype)
            vec_ptr = ir.VectorType(elt, 8).as_pointer()
            align = context.get_abi_sizeof(elt)

            def row(ty, ary, i, j, k):  # &ary[i + k, j] as a pointer to 8 elements
                p = _item_pointer(context, builder, ty, ary, [builder.add(i, ir.Constant(i.type, k)), j])
                return builder.bitcast(p, vec_ptr)

            rows = [builder.load(row(src_ty, s, si_, sj_, a), align=align) for a in range(8)]
            for j, col in enumerate(_swap_blocks(builder, rows)):
                p = row(dst_ty, d, di_, dj_, j)
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


def _load_index(context, builder, ty, value, k):
    """ty[k] of a 1-d integer array, widened to k's type."""
    v = builder.load(_item_pointer(context, builder, ty, value, [k]))
    return builder.sext(v, k.type) if v.type.width < k.type.width else v


def _row_pointer(context, builder, ty, value, row, vec):
    """&ary[row, 0] of a 2-d array as a pointer to a whole-tile vector."""
    return builder.bitcast(_item_pointer(context, builder, ty, value, [row, ir.Constant(row.type, 0)]), vec.as_pointer())


def _splat(builder, value, vec):
    """value in every lane of vec."""
    one = builder.insert_element(ir.Constant(vec, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vec, None), ir.Constant(ir.VectorType(ir.IntType(32), vec.count), [0] * vec.count))


def _sum_lanes(builder, v):
    """Σ of v's lanes, adding the upper half onto the lower half until one lane is left."""
    width = v.type.count
    while width > 1:
        width //= 2
        lanes = ir.VectorType(ir.IntType(32), width)
        v = builder.fadd(
            builder.shuffle_vector(v, v, ir.Constant(lanes, list(range(width)))),
            builder.shuffle_vector(v, v, ir.Constant(lanes, list(range(width, 2 * width)))),
        )
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


def _row_tile_codegen(context, builder, sig, args):
    """dst[i, :TILE] = Σ_k val_k · src[col_k, :TILE] over row i of a CSR matrix, the whole tile row
    accumulating in registers; with (other, out, b) also out[b, k] = src[col_k, :TILE] · other[i, :TILE]
    for each of those k, from the same load of src's row."""
    crow_ty, col_ty, val_ty, src_ty, dst_ty = sig.args[:5]
    crow, col, val, src, dst, i = args[:6]
    elt = context.get_data_type(src_ty.dtype)
    vec = ir.VectorType(elt, TILE)
    align = context.get_abi_sizeof(elt)
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{TILE}f{8 * align}")
    sampled = len(args) > 6
    if sampled:
        other_ty, out_ty = sig.args[6], sig.args[7]
        other, out, b = args[6:]
        other_row = builder.load(_row_pointer(context, builder, other_ty, other, i, vec), align=align)
    acc = cgutils.alloca_once_value(builder, ir.Constant(vec, None))  # zeros; promoted to registers
    start = _load_index(context, builder, crow_ty, crow, i)
    stop = _load_index(context, builder, crow_ty, crow, builder.add(i, ir.Constant(i.type, 1)))
    with cgutils.for_range_slice(builder, start, stop, ir.Constant(i.type, 1), intp=i.type) as (k, _):
        j = _load_index(context, builder, col_ty, col, k)
        v = builder.load(_item_pointer(context, builder, val_ty, val, [k]))
        row = builder.load(_row_pointer(context, builder, src_ty, src, j, vec), align=align)
        builder.store(builder.call(fma, [_splat(builder, v, vec), row, builder.load(acc)]), acc)
        if sampled:
            dot = _sum_lanes(builder, builder.fmul(row, other_row))
            builder.store(dot, _item_pointer(context, builder, out_ty, out, [b, k]))
    builder.store(builder.load(acc), _row_pointer(context, builder, dst_ty, dst, i, vec), align=align)
    return context.get_dummy_value()


@intrinsic
def _csr_row_tile(typingctx, crow, col, val, src, dst, i):
    """dst[i, :TILE] = Σ_k val_k · src[col_k, :TILE] over row i of a CSR matrix (in registers)."""
    if not _rows_contiguous(src, dst):
        return None
    return types.void(crow, col, val, src, dst, i), _row_tile_codegen


@intrinsic
def _csr_row_tile_sampled(typingctx, crow, col, val, src, dst, i, other, out, b):
    """The same, and out[b, k] = src[col_k, :TILE] · other[i, :TILE] for each k of row i."""
    if not _rows_contiguous(src, dst, other):
        return None
    return types.void(crow, col, val, src, dst, i, other, out, b), _row_tile_codegen


@numba.njit(fastmath=_FAST, cache=True, inline="always")
def _tile_move(src, si, dst, di, na, nj, add):  # pragma: no cover - compiled
    """dst[di + j, a] = src[si + a, j] (or += when `add`) for a < na, j < nj: a tile transposed in
    8 x 8 blocks held in registers, edges element by element.  `add` is a constant at every call
    site, so the compiled code carries no branch per element."""
    a8, j8 = na - na % 8, nj - nj % 8
    for j0 in range(0, j8, 8):  # dst's strips of 8 rows outer: each is finished while in cache
        for a0 in range(0, a8, 8):
            if add:
                _block_add_t(src, si + a0, j0, dst, di + j0, a0)
            else:
                _block_t(src, si + a0, j0, dst, di + j0, a0)
    for a in range(na):
        for j in range(j8 if a < a8 else 0, nj):
            if add:
                dst[di + j, a] += src[si + a, j]
            else:
                dst[di + j, a] = src[si + a, j]


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
def _rows_sampled(crow, col, val, src, acc, other, out, b, nt):  # pragma: no cover - compiled
    """_rows, and out[b, k] = src[col_k, :nt] · other[i, :nt] for every entry k (row i)."""
    if nt == TILE:
        for i in range(crow.shape[0] - 1):
            _csr_row_tile_sampled(crow, col, val, src, acc, i, other, out, b)
        return
    _rows(crow, col, val, src, acc, nt)  # the last, partial tile: plain loops
    for i in range(crow.shape[0] - 1):
        for k in range(crow[i], crow[i + 1]):
            s = src[col[k], 0] * other[i, 0]  # (in the arrays' dtype)
            for a in range(1, nt):
                s += src[col[k], a] * other[i, a]
            out[b, k] = s


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _add_x_st(x, crow, col, val, y_at, y_width):  # pragma: no cover - compiled
    n_tok, n_in = x.shape
    n_out = crow.shape[0] - 1  # Σ out_i
    for b in numba.prange((n_tok + TILE - 1) // TILE):
        t0 = b * TILE
        nt = min(n_tok, t0 + TILE) - t0
        xt = np.empty((n_in, TILE), x.dtype)  # this tile of x, feature-major (columns < nt)
        _tile_move(x, t0, xt, 0, nt, n_in, False)  # xt[:, :nt] = x[t0:t0 + nt]ᵀ
        acc = np.empty((n_out, TILE), x.dtype)
        _rows(crow, col, val, xt, acc, nt)  # S xtᵀ on the tile, all layers
        r0 = 0
        for i in range(y_at.shape[0]):  # layer i's rows go to its own y_i
            y = numba.carray(_pointer(y_at[i], x[0, 0]), (n_tok, y_width[i]))
            _tile_move(acc, r0, y, t0, y_width[i], nt, True)  # y[t0:t0 + nt] += acc[r0:, :nt]ᵀ
            r0 += y_width[i]


@numba.njit(parallel=True, fastmath=_FAST, cache=True)
def _add_dy_s(dy_at, dy_width, x, crow_t, col_t, val_t, dx, gv_tiles):  # pragma: no cover - compiled
    n_tok, n_in = x.shape
    n_out = dy_width.sum()  # Σ out_i
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
                _tile_move(dy, t0, dyt, r0, nt, dy_width[i], False)
            r0 += dy_width[i]
        acc = np.empty((n_in, TILE), x.dtype)
        if gv_tiles.shape[0] > 0:  # Σ_i S_iᵀ dy_itᵀ, and this tile's share of dyᵀ x at the support
            xt = np.empty((n_in, TILE), x.dtype)
            _tile_move(x, t0, xt, 0, nt, n_in, False)  # xt[:, :nt] = x[t0:t0 + nt]ᵀ
            _rows_sampled(crow_t, col_t, val_t, dyt, acc, xt, gv_tiles, b, nt)
        else:
            _rows(crow_t, col_t, val_t, dyt, acc, nt)  # Σ_i S_iᵀ dy_itᵀ on the tile
        if dx.shape[0] > 0:
            _tile_move(acc, 0, dx, t0, n_in, nt, True)


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


def add_dy_s(dys, x, crow_t, col_t, val_t, dx, want_gv: bool):
    """dx += Σ_i dy_i S_i in place (skipped when dx is None) and, if asked, the value gradient of
    the stacked S in Sᵀ's order (nnz,).  dys: C-contiguous (T, out_i) arrays, or (None, out_i)
    for an output without a gradient."""
    n_tiles = (x.shape[0] + TILE - 1) // TILE
    gv_tiles = np.zeros((n_tiles if want_gv else 0, col_t.shape[0]), x.dtype)
    if x.shape[0] > 0:
        dx_arr = dx if dx is not None else np.zeros((0, x.shape[1]), x.dtype)
        width = np.array([w for _, w in dys], dtype=np.int64)
        _add_dy_s(_addresses([a for a, _ in dys]), width, x, crow_t, col_t, val_t, dx_arr, gv_tiles)
    return gv_tiles.sum(axis=0) if want_gv else None


def use_threads(n: int) -> None:
    """Run the kernels on n threads (the caller's torch setting), within numba's pool."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
