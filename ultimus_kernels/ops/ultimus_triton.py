"""Fused Triton kernels for the Ultimus block: one launch for the forward, one for the backward.

Math (docs/ULTIMUS_MATH.md): q, k, v = W* x + b*; A = softmax_j(s q_i k_j); z = V.A; y = Wo z + bo (+ x).
The backward recomputes q, k, v and A from x; the softmax exponent is s q_i (k_j - k_ext), exact.

Memory layout. x and y are (B, D) row-major (x may have any strides). Weights are made contiguous in
nn.Linear layout: Wq, Wk, Wv (d, D), Wo (D, d). Only x, gy are read and y, gx written; every
intermediate stays on chip, or in L1/L2 where a kernel passes rows between threads through memory (the
half-precision kernels' scratch, the stack's rows). Row offsets are 64-bit: B * D passes 2^31 at B ~ 45 M
for D = 48.
Three designs, each described at its section below:
- one sample per thread (the forward, the stack forward, and the backward and stack backward of blocks
  up to D = 48, d = 8 in size): each thread owns whole rows, and everything per sample is elementwise on
  column vectors; the backward's sums over the batch go through tl.dot;
- the half-precision forward, the bfloat16 backward and the stack forward of the D = 48, d = 8 block
  (sm_80 and later): the products in tl.dot on the tensor cores, the attention one sample per thread as
  above;
- tiles (the backward and stack backward of larger blocks): D and d padded to powers of two,
  BLOCK_DIM and BLOCK_ATT (each >= 16, the smallest tl.dot), with masks; the attention is a
  (BLOCK_B, BLOCK_ATT, BLOCK_ATT) tile.

Precision. Everything is computed in float32 (float64 for float64 inputs); half inputs are upcast on
load and the result is cast back to x's dtype on store. Tensor-core products keep float32 accuracy by
splitting the operands that are not exact in the product's input type: the half-precision kernels and
the stack forward split weights, z, g and the rows between blocks themselves (into two bf16 numbers, or
a tf32 head and the rest); the one-sample-per-thread backward uses tf32x3, or tf32x2 where its rows are
exact in tf32 (float32 accuracy from three or two tensor-core products); the tile kernels use "ieee".
The softmax exponents are s q_i (k_j - k_ext), exact by construction (see _softmax_row).

Determinism. The backward runs a persistent grid of num_programs programs; each sums the weight and
bias gradients of its tiles in registers and writes one partial row, and the host sums the partial
rows in a fixed order. No atomics, so the same input gives bit-identical gradients on every run.
num_programs is a run-time argument in every kernel: at small B it follows the batch size, and as a
constant it would compile each kernel anew for every new number of tiles (the last, partial batch of an
epoch; an evaluation batch).

torch.compile. The launchers are `torch.library.triton_op`s: Dynamo and Inductor see the Triton
kernels themselves (not an opaque call), the ops have fake implementations for free (the checks at
their top run on fake tensors too), and `fullgraph=True` holds.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice
from triton.runtime.errors import OutOfResources

from ..checks import check_grad_output, check_op_inputs, check_stack_op_inputs, refuse_forward_ad
from .autograd import register_fused_ops


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the Triton backend can run on `device`, else why not."""
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        if interpreter_active():
            return None
        return "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before importing triton"
    return f"device type '{device.type}' is not supported by the Triton backend"


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _attn_scale(d, ACC: tl.constexpr):
    # 1/sqrt(d) in the accumulation dtype. Computed here rather than passed in: Triton types a Python
    # float argument as fp32 (too coarse for float64) and Inductor as fp64 (which would promote a
    # float32 kernel).
    return 1.0 / tl.sqrt(d.to(ACC))


# ------------------------------------------------------------------------------------------------
# The forward: one sample per thread
# ------------------------------------------------------------------------------------------------
# Each thread owns whole rows (samples). x arrives as (BLOCK_B, WIDTH) vector loads, one row per thread,
# split into WIDTH column vectors of shape (BLOCK_B,) without moving data; q, k, v, the attention and z
# are d-tuples of such vectors. The block is then elementwise FMAs: no shuffles, no shared memory, no
# padding of D to a power of two or of d to tl.dot's 16 (the tile forward this replaced paid all three:
# ~490 warp-instructions per sample in the offline SASS analysis against ~85 here). Weights come four at a
# time in loads every lane of a warp makes at one address (_weights), one per warp for 32 *
# SAMPLES_PER_THREAD samples, served by L1. D and d are compile-time constants: the d-loops unroll, the
# D-loop stays a loop over WIDTH columns (short code, quick compiles).


@triton.jit
def _split_columns(tile, WIDTH: tl.constexpr):
    """(BLOCK_B, WIDTH), WIDTH in {1, 2, 4} -> a tuple of its WIDTH columns, each (BLOCK_B,)."""
    if WIDTH == 1:
        return (tl.reshape(tile, (tile.shape[0],)),)
    elif WIDTH == 2:
        c0, c1 = tl.split(tile)
        return (c0, c1)
    else:
        even, odd = tl.split(tl.reshape(tile, (tile.shape[0], 2, 2)))  # even = columns 0, 2; odd = 1, 3
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        return (c0, c1, c2, c3)


@triton.jit
def _columns_to_tile(cols, LOG2_WIDTH: tl.constexpr):
    """A tuple of 2^LOG2_WIDTH (BLOCK_B,) vectors -> the (BLOCK_B, 2^LOG2_WIDTH) tile with them as its
    columns, in order: pairs (t, t + half) joined level by level, so the reshape reads them back in order."""
    level = cols
    for lvl in tl.static_range(LOG2_WIDTH):
        nxt = ()
        for t in tl.static_range(1 << (LOG2_WIDTH - lvl - 1)):
            nxt = nxt + (tl.join(level[t], level[t + (1 << (LOG2_WIDTH - lvl - 1))]),)
        level = nxt
    return tl.reshape(level[0], (cols[0].shape[0], 1 << LOG2_WIDTH))


@triton.jit
def _join_columns(cols, WIDTH: tl.constexpr):
    """The inverse of _split_columns."""
    if WIDTH == 1:
        return _columns_to_tile(cols, 0)
    elif WIDTH == 2:
        return _columns_to_tile(cols, 1)
    else:
        return _columns_to_tile(cols, 2)


@triton.jit
def _load_columns(row_ptrs, c, stride_d, row_ok, ACC: tl.constexpr, WIDTH: tl.constexpr):
    """Columns c .. c + WIDTH - 1 of the rows at row_ptrs: one vector load per row when stride_d is 1."""
    offs = c + tl.arange(0, WIDTH)
    tile = tl.load(row_ptrs[:, None] + offs[None, :] * stride_d, mask=row_ok[:, None], other=0.0)
    return _split_columns(tile.to(ACC), WIDTH)


@triton.jit
def _zeros(d: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """d zero vectors of shape (BLOCK_B,)."""
    out = ()
    for i in tl.static_range(d):
        out = out + (tl.zeros((BLOCK_B,), ACC),)
    return out


@triton.jit
def _bias_added(cols, b_ptr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, d: tl.constexpr):
    """cols[i] + b[i]. Added after the loop over D rather than before it: the scalar stays out of the
    loop's live registers (the backward spills less)."""
    if not HAS_BIAS:
        return cols
    out = ()
    for i in tl.static_range(d):
        out = out + (cols[i] + tl.load(b_ptr + i).to(ACC),)
    return out


@triton.jit
def _weights(w_ptr, offset, COUNT: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """w[offset : offset + COUNT] as a tuple of COUNT (BLOCK_B,) vectors, each the same number in every
    entry. Loaded as (BLOCK_B, 4) tiles whose rows all point at the same 16 bytes: one vector load per
    thread for four weights, every lane of a warp at one address (a single L1 wavefront), where a scalar
    load would take four. Triton vectorises it when the address is 16-byte aligned (it specialises on
    that), and falls back to narrower loads otherwise."""
    CHUNK: tl.constexpr = 4 if COUNT % 4 == 0 else (2 if COUNT % 2 == 0 else 1)
    same_row = tl.zeros((BLOCK_B, 1), tl.int32)
    out = ()
    for t in tl.static_range(COUNT // CHUNK):
        tile = tl.load(w_ptr + (offset + t * CHUNK) + same_row + tl.arange(0, CHUNK)[None, :])
        out = out + _split_columns(tile.to(ACC), CHUNK)
    return out


@triton.jit
def _add_columns_times_w(acc, cols, w_ptr, c, ACC: tl.constexpr, D: tl.constexpr, d: tl.constexpr,
                         WIDTH: tl.constexpr):  # fmt: skip
    """acc[i] += sum_t cols[t] * W[i, c + t] for W in (d, D) nn.Linear layout."""
    out = ()
    for i in tl.static_range(d):
        a = acc[i]
        w = _weights(w_ptr, i * D + c, WIDTH, ACC, cols[0].shape[0])
        for t in tl.static_range(WIDTH):
            a += cols[t] * w[t]
        out = out + (a,)
    return out


@triton.jit
def _key_offsets(k, d: tl.constexpr):
    """(k_j - max k, k_j - min k) for every j: the two candidates for k_j - k_ext (see _softmax_row)."""
    k_max = k[0]
    k_min = k[0]
    for j in tl.static_range(1, d):
        k_max = tl.maximum(k_max, k[j])
        k_min = tl.minimum(k_min, k[j])
    below_max = ()
    above_min = ()
    for j in tl.static_range(d):
        below_max = below_max + (k[j] - k_max,)
        above_min = above_min + (k[j] - k_min,)
    return below_max, above_min


@triton.jit
def _softmax_row(q_i, k, below_max, above_min, scale, EXACT_EXP: tl.constexpr, EXP2: tl.constexpr, d: tl.constexpr):
    """Row i of the attention, unnormalised: (p_j = exp(s q_i (k_j - k_ext)) for every j, sum_j p_j), with
    k_ext = max_j k_j where q_i >= 0 else min_j k_j, so every exponent is <= 0 and exactly 0 at the row's
    largest entry (as in _attention), and the row maximum costs O(d)."""
    if EXP2:  # float32: exp(t) = exp2(t log2(e)), log2(e) folded into the scale (0 stays exactly 0)
        sq = (scale * 1.4426950408889634) * q_i
    else:
        sq = scale * q_i
    p = ()
    total = tl.zeros_like(sq)
    for j in tl.static_range(d):
        # sq = 0: the logit is 0 * k_j (k_j - k_ext may overflow for |k| near the dtype's limit)
        dk = tl.where(sq >= 0, tl.where(sq == 0, k[j], below_max[j]), above_min[j])
        if EXACT_EXP:  # float64 on a GPU: libdevice's exp
            pj = libdevice.exp(sq * dk)
        elif EXP2:
            pj = tl.exp2(sq * dk)
        else:
            pj = tl.exp(sq * dk)
        total += pj
        p = p + (pj,)
    return p, total


@triton.jit
def _attend_rows(q, k, v, scale, EXACT_EXP: tl.constexpr, EXP2: tl.constexpr, d: tl.constexpr):
    """z[j] = sum_i v[i] softmax_j(s q[i] k[j]) for d-tuples of (BLOCK_B,) vectors."""
    below_max, above_min = _key_offsets(k, d)
    z = ()
    for j in tl.static_range(d):
        z = z + (tl.zeros_like(k[j]),)
    for i in tl.static_range(d):
        p, total = _softmax_row(q[i], k, below_max, above_min, scale, EXACT_EXP, EXP2, d)
        weight = v[i] / total
        new_z = ()
        for j in tl.static_range(d):
            new_z = new_z + (z[j] + weight * p[j],)
        z = new_z
    return z


@triton.jit
def _copy_rows(src_rows, src_stride_d, dst_rows, row_ok, ACC: tl.constexpr, D: tl.constexpr, WIDTH: tl.constexpr):
    """dst = src for the rows of a tile, through the accumulation dtype."""
    for c in tl.range(0, D, WIDTH):
        offs = c + tl.arange(0, WIDTH)
        tile = tl.load(src_rows[:, None] + offs[None, :] * src_stride_d, mask=row_ok[:, None], other=0.0)
        tl.store(dst_rows[:, None] + offs[None, :], tile.to(ACC).to(dst_rows.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _block_forward_rows(
    src_rows, src_stride_d, dst_rows, row_ok, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wo_ptr, bo_ptr, scale,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, HAS_BO: tl.constexpr, RESIDUAL: tl.constexpr,
    ACC: tl.constexpr, EXACT_EXP: tl.constexpr, EXP2: tl.constexpr, D: tl.constexpr, d: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """One block for the rows of a tile: reads each input row at src_rows (once for q, k, v, again chunk by
    chunk for the residual, from L1), writes each output row at dst_rows (contiguous). dst may be src: a
    thread reads a chunk of its own row before it writes that chunk."""
    q = _zeros(d, ACC, BLOCK_B)
    k = q
    v = q
    for c in tl.range(0, D, WIDTH):
        cols = _load_columns(src_rows, c, src_stride_d, row_ok, ACC, WIDTH)
        q = _add_columns_times_w(q, cols, wq_ptr, c, ACC, D, d, WIDTH)
        k = _add_columns_times_w(k, cols, wk_ptr, c, ACC, D, d, WIDTH)
        v = _add_columns_times_w(v, cols, wv_ptr, c, ACC, D, d, WIDTH)
    q = _bias_added(q, bq_ptr, HAS_BQ, ACC, d)
    k = _bias_added(k, bk_ptr, HAS_BK, ACC, d)
    v = _bias_added(v, bv_ptr, HAS_BV, ACC, d)
    z = _attend_rows(q, k, v, scale, EXACT_EXP, EXP2, d)
    for c in tl.range(0, D, WIDTH):
        if RESIDUAL:
            cols = _load_columns(src_rows, c, src_stride_d, row_ok, ACC, WIDTH)
        if HAS_BO:
            bo = _weights(bo_ptr, c, WIDTH, ACC, BLOCK_B)
        out = ()
        for t in tl.static_range(WIDTH):
            if RESIDUAL:
                y = cols[t]
            else:
                y = tl.zeros_like(z[0])
            if HAS_BO:
                y += bo[t]
            wo = _weights(wo_ptr, (c + t) * d, d, ACC, BLOCK_B)
            for j in tl.static_range(d):
                y += z[j] * wo[j]
            out = out + (y,)
        offs = c + tl.arange(0, WIDTH)
        tl.store(
            dst_rows[:, None] + offs[None, :],
            _join_columns(out, WIDTH).to(dst_rows.dtype.element_ty),
            mask=row_ok[:, None],
        )


@triton.jit
def ultimus_fwd_kernel(
    x_ptr, y_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wo_ptr, bo_ptr, B, stride_xb, stride_xd,
    D: tl.constexpr, d: tl.constexpr, HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    HAS_BO: tl.constexpr, RESIDUAL: tl.constexpr, ACC: tl.constexpr, EXACT_EXP: tl.constexpr, EXP2: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)  # 64-bit: rows * D may pass 2^31
    row_ok = rows < B
    scale = 1.0 / tl.sqrt(tl.full((), d, ACC))
    _block_forward_rows(
        x_ptr + rows * stride_xb, stride_xd, y_ptr + rows * D, row_ok, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
        wo_ptr, bo_ptr, scale, HAS_BQ, HAS_BK, HAS_BV, HAS_BO, RESIDUAL, ACC, EXACT_EXP, EXP2, D, d, WIDTH, BLOCK_B,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The half-precision forward on the tensor cores (D = 48, d = 8)
# ------------------------------------------------------------------------------------------------
# With bf16 or fp16 rows the forward above moves half of float32's bytes for the same float32 FMAs, so
# the FMAs bound it (65% of copy bandwidth for bf16 in the offline model). Here both projections run in
# tl.dot on the tensor cores, with float32 accuracy kept (DOTS):
# - "split" (bf16 rows, HALF = bf16): x is exact in HALF; each weight is split into two HALF numbers,
#   w = hi + lo (to 2^-17 relative for bf16), so x W = x hi + x lo, products exact and summed in float32;
#   z likewise: z Wo^T = (z_hi + z_lo)(wo_hi + wo_lo) as two products of K = 2 d, [z_hi | z_lo] against
#   [wo_hi; wo_hi] and against [wo_lo; wo_lo]. bf16 has float32's range, all but its top 2^-9 (a weight
#   or z beyond ~3.39e38 would round to inf in bf16: no trained block comes near).
# - "tf32" (fp16 rows): the same with float32 parts in tf32 products: x is exact in tf32, the weights
#   and z are split into a tf32 head and the rest (_split_tf32). fp16 parts would overflow past 65504 and
#   lose the low part of small weights.
# K = D = 48 runs as 32 + 16 (no padding to 64), N = 3d = 24 as q | k | v | 0 (32). The attention stays
# one sample per thread, as in the forward above: q | k | v leave the dot's layout (where one row's
# columns are spread over four lanes) through memory, as float32 into the tile's own rows of y (a y row
# of 48 half numbers is 96 bytes, exactly 24 floats, and y's own values overwrite them later: no scratch
# buffer, no extra DRAM traffic), and come back one row per thread. A persistent grid: each program
# splits the weights once and loops over tiles. In the offline model 34 warp-instructions per sample for
# bf16 against 92 for the forward above, 39 for fp16.


@triton.jit
def _qkv_weights(wq_ptr, wk_ptr, wv_ptr, cols, D: tl.constexpr, d: tl.constexpr):
    """[Wq; Wk; Wv; 0] at x's columns `cols`: (4 d, len(cols)) float32, row c d + i is W_c[i, cols]. Its
    transpose takes x to [q | k | v | 0]; itself, [gq | gk | gv | 0] to gx."""
    m = tl.arange(0, 4 * d)
    which = (m // d)[:, None]
    offs = (m % d)[:, None] * D + cols[None, :]
    w = tl.load(wq_ptr + offs, mask=which == 0, other=0.0).to(tl.float32)
    w += tl.load(wk_ptr + offs, mask=which == 1, other=0.0).to(tl.float32)
    return w + tl.load(wv_ptr + offs, mask=which == 2, other=0.0).to(tl.float32)


@triton.jit
def _qkv_bias(bq_ptr, bk_ptr, bv_ptr, HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
              d: tl.constexpr):  # fmt: skip
    """[bq | bk | bv | 0]: (4 d,) float32."""
    n = tl.arange(0, 4 * d)
    b = tl.zeros((4 * d,), tl.float32)
    if HAS_BQ:
        b += tl.load(bq_ptr + n % d, mask=n // d == 0, other=0.0).to(tl.float32)
    if HAS_BK:
        b += tl.load(bk_ptr + n % d, mask=n // d == 1, other=0.0).to(tl.float32)
    if HAS_BV:
        b += tl.load(bv_ptr + n % d, mask=n // d == 2, other=0.0).to(tl.float32)
    return b


@triton.jit
def _split_half(w, HALF: tl.constexpr):
    """w = hi + lo, each in HALF (float32 w; lo carries what hi's rounding dropped)."""
    hi = w.to(HALF)
    return hi, (w - hi.to(tl.float32)).to(HALF)


@triton.jit
def _split_tf32(w):
    """w = head + rest, both float32: head is w with its low 13 mantissa bits cleared (exact in tf32), rest
    what they held, which a tf32 product reads to tf32's precision (w to about 2^-21)."""
    head = (w.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return head, w - head


@triton.jit
def _dot_parts(a, b_hi, b_lo, acc):
    """acc + a (b_hi + b_lo): two tensor-core products, b split into parts (_split_half, _split_tf32)."""
    acc = tl.dot(a, b_hi, acc, input_precision="tf32")  # tf32 for float32 parts; bf16 parts ignore it
    return tl.dot(a, b_lo, acc, input_precision="tf32")


@triton.jit
def _split_parts(w, DOTS: tl.constexpr, HALF: tl.constexpr):
    """w (float32) as the two parts the half-precision forward's products read (see DOTS above)."""
    if DOTS == "split":
        return _split_half(w, HALF)
    else:
        return _split_tf32(w)


@triton.jit
def _z_parts_tile(z, DOTS: tl.constexpr, HALF: tl.constexpr):
    """[z_hi | z_lo] (BLOCK_B, 16) from the 8-tuple z of float32 columns, split as _split_parts does: with
    _wo_parts, z Wo^T is two products of K = 2 d that hold all four terms of (z_hi + z_lo)(wo_hi + wo_lo)."""
    z_hi = ()
    z_lo = ()
    for j in tl.static_range(len(z)):
        hi, lo = _split_parts(z[j], DOTS, HALF)
        z_hi = z_hi + (hi,)
        z_lo = z_lo + (lo,)
    return _columns_to_tile(z_hi + z_lo, 4)


@triton.jit
def _wo_parts(wo_ptr, cols, d: tl.constexpr, DOTS: tl.constexpr, HALF: tl.constexpr):
    """[Wo^T; Wo^T] at output features `cols` ((2 d, len(cols)), Wo in (D, d) nn.Linear layout), split into
    the parts (hi, lo) that _z_parts_tile's products read."""
    k2 = tl.arange(0, 2 * d)[:, None]
    return _split_parts(tl.load(wo_ptr + cols[None, :] * d + k2 % d).to(tl.float32), DOTS, HALF)


@triton.jit
def _row_columns(row_ptrs, c, row_ok, COUNT: tl.constexpr):
    """Columns c .. c + COUNT - 1 of float32 rows, one row per thread, as a COUNT-tuple of (BLOCK_B,) vectors."""
    out = ()
    for t in tl.static_range(COUNT // 4):
        out = out + _load_columns(row_ptrs, c + 4 * t, 1, row_ok, tl.float32, 4)
    return out


@triton.jit
def _attend_through_rows(qkv, scratch, row_ok, scale, d: tl.constexpr):
    """z for the tile whose [q | k | v | 0] came out of a product, qkv (BLOCK_B, 4 d): stored as float32
    into `scratch` (a 3 d-float row per sample), then, after a barrier, read back one row per thread for
    the attention. The caller orders these reads before anything overwrites the rows."""
    n = tl.arange(0, 4 * d)
    tl.store(scratch[:, None] + n[None, :], qkv, mask=row_ok[:, None] & (n < 3 * d)[None, :])
    tl.debug_barrier()
    q = _row_columns(scratch, 0, row_ok, d)
    k = _row_columns(scratch, d, row_ok, d)
    v = _row_columns(scratch, 2 * d, row_ok, d)
    return _attend_rows(q, k, v, scale, False, True, d)


@triton.jit
def ultimus_fwd_half_dot_kernel(
    x_ptr, y_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wo_ptr, bo_ptr, B, stride_xb, stride_xd, num_tiles,
    num_programs, D: tl.constexpr, d: tl.constexpr, HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr,
    HAS_BV: tl.constexpr, HAS_BO: tl.constexpr, RESIDUAL: tl.constexpr, DOTS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    """num_programs is a run-time argument, not a constant: at small B it follows the batch size, and a
    constant would compile the kernel anew for every number of tiles."""
    tl.static_assert(D == 48 and d == 8, "laid out for D = 48 (K = 32 + 16), d = 8 (q | k | v | 0 = 32 columns)")
    cols_a = tl.arange(0, 32)
    cols_b = 32 + tl.arange(0, 16)
    # Once per program: the weights as the products read them.
    w_a = tl.trans(_qkv_weights(wq_ptr, wk_ptr, wv_ptr, cols_a, D, d))  # (32, 4 d)
    w_b = tl.trans(_qkv_weights(wq_ptr, wk_ptr, wv_ptr, cols_b, D, d))  # (16, 4 d)
    b_qkv = _qkv_bias(bq_ptr, bk_ptr, bv_ptr, HAS_BQ, HAS_BK, HAS_BV, d)
    if HAS_BO:
        bo_a = tl.load(bo_ptr + cols_a).to(tl.float32)
        bo_b = tl.load(bo_ptr + cols_b).to(tl.float32)
    else:
        bo_a = tl.zeros((32,), tl.float32)
        bo_b = tl.zeros((16,), tl.float32)
    w_a_hi, w_a_lo = _split_parts(w_a, DOTS, HALF)
    w_b_hi, w_b_lo = _split_parts(w_b, DOTS, HALF)
    wo_a_hi, wo_a_lo = _wo_parts(wo_ptr, cols_a, d, DOTS, HALF)  # [z_hi | z_lo] against [wo_hi; wo_hi] ...
    wo_b_hi, wo_b_lo = _wo_parts(wo_ptr, cols_b, d, DOTS, HALF)  # ... and against [wo_lo; wo_lo]
    scale = 1.0 / tl.sqrt(tl.full((), d, tl.float32))
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)  # 64-bit: rows * D may pass 2^31
        row_ok = rows < B
        x_rows = x_ptr + rows * stride_xb
        x_a = tl.load(x_rows[:, None] + cols_a[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)
        x_b = tl.load(x_rows[:, None] + cols_b[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)
        if DOTS == "tf32":  # x's parts: x itself, exact in HALF (bf16) or in tf32 (fp16 as float32)
            x_a = x_a.to(tl.float32)
            x_b = x_b.to(tl.float32)
        qkv = tl.zeros((BLOCK_B, 4 * d), tl.float32) + b_qkv[None, :]
        qkv = _dot_parts(x_b, w_b_hi, w_b_lo, _dot_parts(x_a, w_a_hi, w_a_lo, qkv))
        # q | k | v to one row per thread through the tile's own rows of y; the barrier before y's stores
        # orders the reads before y overwrites them.
        z = _attend_through_rows(qkv, (y_ptr + rows * D).to(tl.pointer_type(tl.float32)), row_ok, scale, d)
        if RESIDUAL:
            y_a = x_a.to(tl.float32) + bo_a[None, :]
            y_b = x_b.to(tl.float32) + bo_b[None, :]
        else:
            y_a = tl.zeros((BLOCK_B, 32), tl.float32) + bo_a[None, :]
            y_b = tl.zeros((BLOCK_B, 16), tl.float32) + bo_b[None, :]
        z_t = _z_parts_tile(z, DOTS, HALF)  # (BLOCK_B, 2 d): [z_hi | z_lo]
        y_a = _dot_parts(z_t, wo_a_hi, wo_a_lo, y_a)
        y_b = _dot_parts(z_t, wo_b_hi, wo_b_lo, y_b)
        tl.debug_barrier()
        y_rows = y_ptr + rows * D
        tl.store(y_rows[:, None] + cols_a[None, :], y_a.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(y_rows[:, None] + cols_b[None, :], y_b.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])


# The stack: L blocks per launch. Parameters come packed, (L, NUM_PARAMS) in the accumulation dtype,
# each row in the partial-row layout [Wq | Wk | Wv | Wo | bq | bk | bv | bo] (zeros for absent biases).
@triton.jit(do_not_specialize=["L"])
def ultimus_stack_fwd_kernel(
    x_ptr, h_ptr, y_ptr, p_ptr, B, L, stride_xb, stride_xd,
    D: tl.constexpr, d: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, ACC: tl.constexpr,
    EXACT_EXP: tl.constexpr, EXP2: tl.constexpr, H_IS_Y: tl.constexpr, WIDTH: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """The activations go to h, (B, D) in the accumulation dtype: y itself when y has that dtype (H_IS_Y),
    else a scratch copied into y at the end. Block 0 reads x, each later block reads the rows of h its
    thread wrote and overwrites them in place (see _block_forward_rows): they stay in L1/L2 between blocks."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    scale = 1.0 / tl.sqrt(tl.full((), d, ACC))
    NUM_PARAMS: tl.constexpr = 4 * d * D + 3 * d + D
    dD: tl.constexpr = d * D
    h_rows = h_ptr + rows * D
    w = p_ptr
    b = w + 4 * dD
    _block_forward_rows(
        x_ptr + rows * stride_xb, stride_xd, h_rows, row_ok, w, b, w + dD, b + d, w + 2 * dD, b + 2 * d, w + 3 * dD,
        b + 3 * d, scale, HAS_BIAS, HAS_BIAS, HAS_BIAS, HAS_BIAS, RESIDUAL, ACC, EXACT_EXP, EXP2, D, d, WIDTH, BLOCK_B,
    )  # fmt: skip
    for block in range(1, L):
        w = p_ptr + block * NUM_PARAMS
        b = w + 4 * dD
        _block_forward_rows(
            h_rows, 1, h_rows, row_ok, w, b, w + dD, b + d, w + 2 * dD, b + 2 * d, w + 3 * dD, b + 3 * d, scale,
            HAS_BIAS, HAS_BIAS, HAS_BIAS, HAS_BIAS, RESIDUAL, ACC, EXACT_EXP, EXP2, D, d, WIDTH, BLOCK_B,
        )  # fmt: skip
    if not H_IS_Y:
        _copy_rows(h_rows, 1, y_ptr + rows * D, row_ok, ACC, D, WIDTH)


# The stack forward on the tensor cores (D = 48, d = 8; float32, float16 and bfloat16 rows; sm_80 and
# later). A stack of four does four blocks' float32 FMAs for one block's bytes, so the FMAs bound the
# kernel above (36% of copy bandwidth in the offline model). Here both projections of every block run in
# tl.dot, as in the half-precision forward, in tf32 on split float32 parts: the rows between the blocks
# are float32, so both factors are split into a tf32 head and the rest, h W = h_hi w_hi + h_hi w_lo +
# h_lo w_hi (3xTF32, float32 accuracy), and z Wo^T = [z_hi | z_lo] [wo_hi; wo_hi] + [z_hi | z_lo]
# [wo_lo; wo_lo]. The rows stay in registers from block to block as the output products' accumulators;
# q | k | v reach one row per thread through the tile's own rows of y, as in the half-precision forward
# (a float32 y row holds 48 floats, a half one exactly the 24 needed), which y overwrites at the end.
# Each block's weights are read (from L2) and split per tile: L blocks' would not fit in registers.


@triton.jit(do_not_specialize=["L"])
def ultimus_stack_fwd_dot_kernel(
    x_ptr, y_ptr, p_ptr, B, L, stride_xb, stride_xd, num_tiles, num_programs,
    D: tl.constexpr, d: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """p_ptr: the packed parameters, (L, NUM_PARAMS) float32 (see ultimus_stack_fwd_kernel)."""
    tl.static_assert(D == 48 and d == 8, "laid out for D = 48 (K = 32 + 16), d = 8 (q | k | v | 0 = 32 columns)")
    NUM_PARAMS: tl.constexpr = 4 * d * D + 3 * d + D
    dD: tl.constexpr = d * D
    cols_a = tl.arange(0, 32)
    cols_b = 32 + tl.arange(0, 16)
    scale = 1.0 / tl.sqrt(tl.full((), d, tl.float32))
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)  # 64-bit: rows * D may pass 2^31
        row_ok = rows < B
        x_rows = x_ptr + rows * stride_xb
        h_a = tl.load(x_rows[:, None] + cols_a[None, :] * stride_xd, mask=row_ok[:, None], other=0.0).to(tl.float32)
        h_b = tl.load(x_rows[:, None] + cols_b[None, :] * stride_xd, mask=row_ok[:, None], other=0.0).to(tl.float32)
        scratch = (y_ptr + rows * D).to(tl.pointer_type(tl.float32))  # q | k | v, one row per sample
        for block in range(0, L):
            w = p_ptr + block * NUM_PARAMS
            b = w + 4 * dD
            w_a_hi, w_a_lo = _split_tf32(tl.trans(_qkv_weights(w, w + dD, w + 2 * dD, cols_a, D, d)))  # (32, 4 d)
            w_b_hi, w_b_lo = _split_tf32(tl.trans(_qkv_weights(w, w + dD, w + 2 * dD, cols_b, D, d)))  # (16, 4 d)
            qkv = tl.zeros((BLOCK_B, 4 * d), tl.float32) + _qkv_bias(b, b + d, b + 2 * d, HAS_BIAS, HAS_BIAS,
                                                                      HAS_BIAS, d)[None, :]  # fmt: skip
            h_a_hi, h_a_lo = _split_tf32(h_a)
            h_b_hi, h_b_lo = _split_tf32(h_b)
            qkv = _dot_parts(h_a_hi, w_a_hi, w_a_lo, qkv)
            qkv = _dot_parts(h_b_hi, w_b_hi, w_b_lo, qkv)
            qkv = tl.dot(h_a_lo, w_a_hi, qkv, input_precision="tf32")
            qkv = tl.dot(h_b_lo, w_b_hi, qkv, input_precision="tf32")
            tl.debug_barrier()  # every thread has read the previous block's q | k | v before they are overwritten
            z = _attend_through_rows(qkv, scratch, row_ok, scale, d)
            if not RESIDUAL:
                h_a = tl.zeros((BLOCK_B, 32), tl.float32)
                h_b = tl.zeros((BLOCK_B, 16), tl.float32)
            if HAS_BIAS:
                h_a += tl.load(b + 3 * d + cols_a)[None, :]
                h_b += tl.load(b + 3 * d + cols_b)[None, :]
            z_t = _z_parts_tile(z, "tf32", tl.float32)  # (BLOCK_B, 2 d): [z_hi | z_lo]
            wo_a_hi, wo_a_lo = _wo_parts(w + 3 * dD, cols_a, d, "tf32", tl.float32)
            wo_b_hi, wo_b_lo = _wo_parts(w + 3 * dD, cols_b, d, "tf32", tl.float32)
            h_a = _dot_parts(z_t, wo_a_hi, wo_a_lo, h_a)
            h_b = _dot_parts(z_t, wo_b_hi, wo_b_lo, h_b)
        tl.debug_barrier()  # every thread has read its q | k | v before y's rows overwrite them
        y_rows = y_ptr + rows * D
        tl.store(y_rows[:, None] + cols_a[None, :], h_a.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(y_rows[:, None] + cols_b[None, :], h_b.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])


# ------------------------------------------------------------------------------------------------
# The backward for small blocks: one sample per thread, products over the batch on tensor cores
# ------------------------------------------------------------------------------------------------
# Per sample, as in the forward: q, k, v and gz = Wo^T gy from column vectors and scalar weights, then
# the attention backward in registers. The products that sum over samples or need whole rows at once
# go through tl.dot on a tile made of those columns, [gq | gk | gv | 0] (BLOCK_B, 4 * ATT):
# gx = [gq | gk | gv] [Wq; Wk; Wv], the weight gradients [gq | gk | gv]^T x and z^T gy, kept per program
# across its tiles. float32 dots use tf32x3 (three tensor-core products of split operands: fp32
# accuracy, emulated at ~2e-7 relative against fp32's ~2e-7 and one-pass tf32's ~3e-4). For blocks whose
# gradient accumulators would not fit in registers, the tile kernel further below is used instead.


@triton.jit
def _add_columns_times_wo(acc, cols, wo_ptr, c, ACC: tl.constexpr, d: tl.constexpr, WIDTH: tl.constexpr):
    """acc[j] += sum_t cols[t] * Wo[c + t, j] for Wo in (D, d) nn.Linear layout: gz = Wo^T gy."""
    for t in tl.static_range(WIDTH):
        wo = _weights(wo_ptr, (c + t) * d, d, ACC, cols[0].shape[0])
        out = ()
        for j in tl.static_range(d):
            out = out + (acc[j] + cols[t] * wo[j],)
        acc = out
    return acc


@triton.jit
def _attend_rows_backward(q, k, v, gz, scale, EXACT_EXP: tl.constexpr, EXP2: tl.constexpr, d: tl.constexpr):
    """(gq, gk, gv, z) for d-tuples of (BLOCK_B,) vectors, row i of the attention at a time
    (docs/ULTIMUS_MATH.md): gv_i = sum_j A_ij gz_j, gS_ij = A_ij v_i (gz_j - gv_i),
    gq_i = s sum_j gS_ij k_j, gk_j = s sum_i gS_ij q_i; A recomputed exactly as in the forward."""
    below_max, above_min = _key_offsets(k, d)
    z = ()
    gk = ()
    for j in tl.static_range(d):
        z = z + (tl.zeros_like(k[j]),)
        gk = gk + (tl.zeros_like(k[j]),)
    gq = ()
    gv = ()
    for i in tl.static_range(d):
        p, total = _softmax_row(q[i], k, below_max, above_min, scale, EXACT_EXP, EXP2, d)
        inv_total = 1.0 / total
        gv_i = tl.zeros_like(inv_total)
        attn = ()
        for j in tl.static_range(d):
            a_ij = p[j] * inv_total
            gv_i += a_ij * gz[j]
            attn = attn + (a_ij,)
        gq_i = tl.zeros_like(inv_total)
        new_z = ()
        new_gk = ()
        for j in tl.static_range(d):
            va = v[i] * attn[j]
            new_z = new_z + (z[j] + va,)
            g_score = va * (gz[j] - gv_i)
            gq_i += g_score * k[j]
            new_gk = new_gk + (gk[j] + g_score * q[i],)
        z = new_z
        gk = new_gk
        gq = gq + (scale * gq_i,)
        gv = gv + (gv_i,)
    scaled_gk = ()
    for j in tl.static_range(d):
        scaled_gk = scaled_gk + (scale * gk[j],)
    return gq, scaled_gk, gv, z


@triton.jit
def _zero_padded(cols, n: tl.constexpr, width: tl.constexpr, like, ONE_AT: tl.constexpr = -1):
    """cols[:n] followed by zero vectors up to `width` entries (a vector of ones at ONE_AT, if given)."""
    out = ()
    for t in tl.static_range(width):
        if t < n:
            out = out + (cols[t],)
        elif t == ONE_AT:
            out = out + (tl.full(like.shape, 1.0, like.dtype),)
        else:
            out = out + (tl.zeros_like(like),)
    return out


@triton.jit
def _input_gradient_rows(
    gy_rows, gy_stride_d, gx_rows, row_ok, g, wq_ptr, wk_ptr, wv_ptr, RESIDUAL: tl.constexpr, ACC: tl.constexpr,
    D: tl.constexpr, d: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """gx = (gy if RESIDUAL) + [Wq; Wk; Wv]^T [gq | gk | gv] for the rows of a tile, g the 3d-tuple of
    columns: per sample, WIDTH columns of gx at a time, each weight a broadcast vector load."""
    for c in tl.range(0, D, WIDTH):
        if RESIDUAL:
            out = _load_columns(gy_rows, c, gy_stride_d, row_ok, ACC, WIDTH)
        else:
            out = _zeros(WIDTH, ACC, g[0].shape[0])
        for m in tl.static_range(3 * d):
            if m < d:
                w = _weights(wq_ptr, m * D + c, WIDTH, ACC, g[0].shape[0])
            elif m < 2 * d:
                w = _weights(wk_ptr, (m - d) * D + c, WIDTH, ACC, g[0].shape[0])
            else:
                w = _weights(wv_ptr, (m - 2 * d) * D + c, WIDTH, ACC, g[0].shape[0])
            new_out = ()
            for t in tl.static_range(WIDTH):
                new_out = new_out + (out[t] + g[m] * w[t],)
            out = new_out
        gx = _join_columns(out, WIDTH).to(gx_rows.dtype.element_ty)
        tl.store(gx_rows[:, None] + (c + tl.arange(0, WIDTH))[None, :], gx, mask=row_ok[:, None])


@triton.jit
def _add_product(acc, a, rows, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + a^T rows on the tensor cores. "tf32x2": the rows are exact in tf32 (float16 or bfloat16 values),
    so splitting `a` alone into its tf32 head and the rest keeps float32 accuracy in two tf32 products,
    where tf32x3 would split both operands and take three."""
    if PRECISION == "tf32x2":
        head, rest = _split_tf32(a)
        acc = tl.dot(tl.trans(head), rows, acc, input_precision="tf32", out_dtype=ACC)
        return tl.dot(tl.trans(rest), rows, acc, input_precision="tf32", out_dtype=ACC)
    else:
        return tl.dot(tl.trans(a), rows, acc, input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _block_backward_rows(
    x_rows, x_stride_d, gy_rows, gy_stride_d, gx_rows, row_ok, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr,
    wo_ptr, scale, acc_w3, acc_wo_t, HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    RESIDUAL: tl.constexpr, NEED_GX: tl.constexpr, NEED_GW: tl.constexpr, GX_OVER_GY: tl.constexpr,
    ACC: tl.constexpr, EXACT_EXP: tl.constexpr, EXP2: tl.constexpr, PRECISION: tl.constexpr, D: tl.constexpr,
    d: tl.constexpr, WIDTH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DIM: tl.constexpr, LOG2_ATT: tl.constexpr,
    LOG2_ZW: tl.constexpr,
):  # fmt: skip
    """One block's backward for the rows of a tile: writes gx at gx_rows (contiguous rows) if NEED_GX and,
    if NEED_GW, adds the tile's parameter-gradient terms to the accumulators, which it returns:
    acc_w3 = [gWq; gWk; gWv; 0] with [gbq; gbk; gbv; 0] in column D, acc_wo_t = gWo^T with gbo in row d
    (see _param_grad_offsets). GX_OVER_GY: gx_rows are gy_rows, so the tile's gy is read before a barrier
    and gx written after it."""
    ATT: tl.constexpr = 1 << LOG2_ATT  # q, k, v padded to ATT >= 4 columns each: [gq | gk | gv | 0] >= 16
    ZW: tl.constexpr = 1 << LOG2_ZW  # z padded to ZW >= 16 columns (tl.dot's minimum), a ones column at d
    zero = tl.zeros((BLOCK_B,), ACC)
    q = _zeros(d, ACC, BLOCK_B)
    k = q
    v = q
    gz = q
    for c in tl.range(0, D, WIDTH):
        x_cols = _load_columns(x_rows, c, x_stride_d, row_ok, ACC, WIDTH)
        q = _add_columns_times_w(q, x_cols, wq_ptr, c, ACC, D, d, WIDTH)
        k = _add_columns_times_w(k, x_cols, wk_ptr, c, ACC, D, d, WIDTH)
        v = _add_columns_times_w(v, x_cols, wv_ptr, c, ACC, D, d, WIDTH)
        gy_cols = _load_columns(gy_rows, c, gy_stride_d, row_ok, ACC, WIDTH)
        gz = _add_columns_times_wo(gz, gy_cols, wo_ptr, c, ACC, d, WIDTH)
    q = _bias_added(q, bq_ptr, HAS_BQ, ACC, d)
    k = _bias_added(k, bk_ptr, HAS_BK, ACC, d)
    v = _bias_added(v, bv_ptr, HAS_BV, ACC, d)
    gq, gk, gv, z = _attend_rows_backward(q, k, v, gz, scale, EXACT_EXP, EXP2, d)
    if NEED_GW:
        # The weight gradients sum over the tile's samples: tensor-core products of the columns joined into
        # tiles. A column of ones beside x (column D) and beside z (column d) makes the same products sum the
        # bias gradients. Rows past B have gy = 0, hence gz = gq = gk = gv = 0: they add nothing.
        g3 = _columns_to_tile(
            _zero_padded(gq, d, ATT, zero) + _zero_padded(gk, d, ATT, zero) + _zero_padded(gv, d, ATT, zero)
            + _zero_padded(gq, 0, ATT, zero),
            LOG2_ATT + 2,
        )  # fmt: skip
        z_tile = _columns_to_tile(_zero_padded(z, d, ZW, zero, d), LOG2_ZW)
        cols = tl.arange(0, BLOCK_DIM)
        tile_ok = row_ok[:, None] & (cols[None, :] < D)
        x = tl.load(x_rows[:, None] + cols[None, :] * x_stride_d, mask=tile_ok, other=0.0).to(ACC)
        x = tl.where(cols[None, :] == D, 1.0, x)
        gy = tl.load(gy_rows[:, None] + cols[None, :] * gy_stride_d, mask=tile_ok, other=0.0).to(ACC)
        acc_w3 = _add_product(acc_w3, g3, x, PRECISION, ACC)
        acc_wo_t = _add_product(acc_wo_t, z_tile, gy, PRECISION, ACC)
        if GX_OVER_GY:
            tl.debug_barrier()  # every thread has read the gy tile before any gx row overwrites it
    if NEED_GX:
        _input_gradient_rows(gy_rows, gy_stride_d, gx_rows, row_ok, gq + gk + gv, wq_ptr, wk_ptr, wv_ptr, RESIDUAL,
                             ACC, D, d, WIDTH)  # fmt: skip
    return acc_w3, acc_wo_t


@triton.jit
def _param_grad_offsets(D: tl.constexpr, d: tl.constexpr, BLOCK_DIM: tl.constexpr, ATT: tl.constexpr,
                        ZW: tl.constexpr):  # fmt: skip
    """Where the accumulators _block_backward_rows returns go in a partial row [gWq | gWk | gWv | gWo |
    gbq | gbk | gbv | gbo] (see ops/autograd.py): (offsets, mask) for acc_w3 (column D: the biases) and
    for acc_wo_t (row d: gbo)."""
    cols = tl.arange(0, BLOCK_DIM)
    m = tl.arange(0, 4 * ATT)
    which = m // ATT
    i_of_m = m % ATT
    m_ok = (i_of_m < d) & (which < 3)
    j = tl.arange(0, ZW)
    w3_offs = which[:, None] * (d * D) + i_of_m[:, None] * D + cols[None, :]
    b3_offs = 4 * d * D + which[:, None] * d + i_of_m[:, None] + 0 * cols[None, :]
    w3 = (tl.where(cols[None, :] == D, b3_offs, w3_offs), m_ok[:, None] & (cols[None, :] <= D))
    wo_t_offs = 3 * d * D + cols[None, :] * d + j[:, None]
    bo_offs = 4 * d * D + 3 * d + cols[None, :] + 0 * j[:, None]
    wo_t = (tl.where(j[:, None] == d, bo_offs, wo_t_offs), (j[:, None] <= d) & (cols[None, :] < D))
    return w3, wo_t


@triton.jit
def ultimus_bwd_rows_kernel(
    gy_ptr, x_ptr, gx_ptr, part_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wo_ptr,
    B, stride_xb, stride_xd, stride_gyb, stride_gyd, num_tiles, num_programs,
    D: tl.constexpr, d: tl.constexpr, HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    RESIDUAL: tl.constexpr, NEED_GX: tl.constexpr, NEED_GW: tl.constexpr, ACC: tl.constexpr,
    EXACT_EXP: tl.constexpr, EXP2: tl.constexpr, PRECISION: tl.constexpr, WIDTH: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_DIM: tl.constexpr, LOG2_ATT: tl.constexpr, LOG2_ZW: tl.constexpr,
):  # fmt: skip
    """The single block: each program sums its tiles' parameter-gradient terms in registers and writes one
    partial row at the end."""
    ATT: tl.constexpr = 1 << LOG2_ATT
    ZW: tl.constexpr = 1 << LOG2_ZW
    pid = tl.program_id(0)
    scale = 1.0 / tl.sqrt(tl.full((), d, ACC))
    acc_w3 = tl.zeros((4 * ATT, BLOCK_DIM), ACC)
    acc_wo_t = tl.zeros((ZW, BLOCK_DIM), ACC)
    for tile in range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)  # 64-bit: rows * D may pass 2^31
        acc_w3, acc_wo_t = _block_backward_rows(
            x_ptr + rows * stride_xb, stride_xd, gy_ptr + rows * stride_gyb, stride_gyd, gx_ptr + rows * D, rows < B,
            wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wo_ptr, scale, acc_w3, acc_wo_t, HAS_BQ, HAS_BK, HAS_BV,
            RESIDUAL, NEED_GX, NEED_GW, False, ACC, EXACT_EXP, EXP2, PRECISION, D, d, WIDTH, BLOCK_B, BLOCK_DIM,
            LOG2_ATT, LOG2_ZW,
        )  # fmt: skip
    if NEED_GW:
        _store_param_grads(part_ptr + pid * (4 * d * D + 3 * d + D), acc_w3, acc_wo_t, D, d, BLOCK_DIM, ATT, ZW, False)


# ------------------------------------------------------------------------------------------------
# The half-precision backward on the tensor cores (bfloat16 rows, D = 48, d = 8)
# ------------------------------------------------------------------------------------------------
# The backward above spends most of its instructions on float32 FMAs and the weight loads that feed
# them: q | k | v, gz = gy Wo and gx = [gq | gk | gv] [Wq; Wk; Wv] are 2,688 FMAs per sample, and with
# bf16 rows they bound it (35% of copy bandwidth in the offline model). Here every product runs in
# tl.dot on bf16 operands, split as in the half-precision forward: x and gy are exact in bf16, the
# weights, g = [gq | gk | gv | 0] and z (float32) are split into hi + lo, and every product of the
# parts is summed in float32 ((g_hi + g_lo)(W_hi + W_lo) has four terms; the weight gradients g^T x and
# [z | 1]^T gy two, 2^-17 of each term). q | k | v and gz come out of one family of products as the
# columns of one (BLOCK_B, 4 d) tile, [q | k | v | gz], and reach one row per thread through the
# program's own float32 scratch (BLOCK_B x 4 d per program, column-major: with the persistent grid, a few
# MB that stay in L2), where the attention backward runs per sample as above. float16 rows keep the
# backward above: float32 products in tf32x3 gained nothing here (178 warp-instructions per sample
# against its 232, bound by the transposed float32 operands), and float16 splits would overflow.


@triton.jit
def _wo_beside_qkv(wo_ptr, cols, d: tl.constexpr):
    """Wo at output features `cols` in columns 3 d .. 4 d - 1 of a (len(cols), 4 d) float32 tile, zeros
    elsewhere: gy Wo lands beside q | k | v."""
    n = tl.arange(0, 4 * d)[None, :]
    return tl.load(wo_ptr + cols[:, None] * d + (n - 3 * d), mask=n >= 3 * d, other=0.0).to(tl.float32)


@triton.jit
def _split_tile(cols, LOG2_WIDTH: tl.constexpr, HALF: tl.constexpr):
    """A tuple of 2^LOG2_WIDTH float32 (BLOCK_B,) columns -> (hi, lo) (BLOCK_B, 2^LOG2_WIDTH) tiles in HALF."""
    hi = ()
    lo = ()
    for c in tl.static_range(1 << LOG2_WIDTH):
        h, l = _split_half(cols[c], HALF)  # noqa: E741
        hi = hi + (h,)
        lo = lo + (l,)
    return _columns_to_tile(hi, LOG2_WIDTH), _columns_to_tile(lo, LOG2_WIDTH)


@triton.jit
def _scratch_columns(scratch, c, COUNT: tl.constexpr, BLOCK_B: tl.constexpr):
    """Columns c .. c + COUNT - 1 of a column-major (BLOCK_B, n) float32 scratch tile, as (BLOCK_B,) vectors:
    a warp's lanes read 32 consecutive floats per column (coalesced), where row-major reads of one row per
    thread would touch 32 sectors per load."""
    out = ()
    for t in tl.static_range(COUNT):
        out = out + (tl.load(scratch + (c + t) * BLOCK_B + tl.arange(0, BLOCK_B)),)
    return out


@triton.jit
def ultimus_bwd_half_dot_kernel(
    gy_ptr, x_ptr, gx_ptr, part_ptr, scratch_ptr, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wo_ptr,
    B, stride_xb, stride_xd, stride_gyb, stride_gyd, num_tiles, num_programs,
    D: tl.constexpr, d: tl.constexpr, HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr,
    RESIDUAL: tl.constexpr, NEED_GX: tl.constexpr, NEED_GW: tl.constexpr, HALF: tl.constexpr,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Each program sums its tiles' parameter-gradient terms in registers and writes one partial row at the
    end, as ultimus_bwd_rows_kernel does (same layout, see _param_grad_offsets). num_programs: a run-time
    argument, as in ultimus_fwd_half_dot_kernel."""
    tl.static_assert(D == 48 and d == 8, "laid out for D = 48 (K = 32 + 16), d = 8 ([q | k | v | gz] = 32 columns)")
    BLOCK_DIM: tl.constexpr = 64  # the weight-gradient tiles: x and gy with a column of ones at D
    ZW: tl.constexpr = 16  # z and a column of ones at d, padded to tl.dot's 16
    pid = tl.program_id(0)
    cols_a = tl.arange(0, 32)
    cols_b = 32 + tl.arange(0, 16)
    # Once per program: the weights as the products read them, split into hi + lo.
    w3_a_hi, w3_a_lo = _split_half(_qkv_weights(wq_ptr, wk_ptr, wv_ptr, cols_a, D, d), HALF)  # g -> gx
    w3_b_hi, w3_b_lo = _split_half(_qkv_weights(wq_ptr, wk_ptr, wv_ptr, cols_b, D, d), HALF)
    w_a_hi, w_a_lo = tl.trans(w3_a_hi), tl.trans(w3_a_lo)  # x -> [q | k | v | 0]
    w_b_hi, w_b_lo = tl.trans(w3_b_hi), tl.trans(w3_b_lo)
    wo_a_hi, wo_a_lo = _split_half(_wo_beside_qkv(wo_ptr, cols_a, d), HALF)  # gy -> [0 | 0 | 0 | gz]
    wo_b_hi, wo_b_lo = _split_half(_wo_beside_qkv(wo_ptr, cols_b, d), HALF)
    b_qkv = _qkv_bias(bq_ptr, bk_ptr, bv_ptr, HAS_BQ, HAS_BK, HAS_BV, d)
    scale = 1.0 / tl.sqrt(tl.full((), d, tl.float32))
    n = tl.arange(0, 4 * d)
    scratch = scratch_ptr + pid * (BLOCK_B * 4 * d)  # column c of the tile at scratch + c BLOCK_B
    grad_cols = tl.arange(0, BLOCK_DIM)
    acc_w3 = tl.zeros((4 * d, BLOCK_DIM), tl.float32)
    acc_wo_t = tl.zeros((ZW, BLOCK_DIM), tl.float32)
    for tile in tl.range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)  # 64-bit: rows * D may pass 2^31
        row_ok = rows < B
        x_rows = x_ptr + rows * stride_xb
        gy_rows = gy_ptr + rows * stride_gyb
        x_a = tl.load(x_rows[:, None] + cols_a[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)
        x_b = tl.load(x_rows[:, None] + cols_b[None, :] * stride_xd, mask=row_ok[:, None], other=0.0)
        gy_a = tl.load(gy_rows[:, None] + cols_a[None, :] * stride_gyd, mask=row_ok[:, None], other=0.0)
        gy_b = tl.load(gy_rows[:, None] + cols_b[None, :] * stride_gyd, mask=row_ok[:, None], other=0.0)
        qkvg = tl.zeros((BLOCK_B, 4 * d), tl.float32) + b_qkv[None, :]
        qkvg = _dot_parts(x_b, w_b_hi, w_b_lo, _dot_parts(x_a, w_a_hi, w_a_lo, qkvg))
        qkvg = _dot_parts(gy_b, wo_b_hi, wo_b_lo, _dot_parts(gy_a, wo_a_hi, wo_a_lo, qkvg))
        # [q | k | v | gz] to one row per thread through the scratch; the first barrier keeps the previous
        # tile's reads ahead of these stores, the second these stores ahead of the reads.
        tl.debug_barrier()
        r = tl.arange(0, BLOCK_B)
        tl.store(scratch + n[None, :] * BLOCK_B + r[:, None], qkvg)
        tl.debug_barrier()
        q = _scratch_columns(scratch, 0, d, BLOCK_B)
        k = _scratch_columns(scratch, d, d, BLOCK_B)
        v = _scratch_columns(scratch, 2 * d, d, BLOCK_B)
        gz = _scratch_columns(scratch, 3 * d, d, BLOCK_B)
        # Rows past B: gy = 0, hence gz = gq = gk = gv = 0, and they add nothing below.
        gq, gk, gv, z = _attend_rows_backward(q, k, v, gz, scale, False, True, d)
        g_hi, g_lo = _split_tile(gq + gk + gv + _zeros(d, tl.float32, BLOCK_B), 5, HALF)  # (BLOCK_B, 4 d)
        if NEED_GX:
            if RESIDUAL:
                gx_a = gy_a.to(tl.float32)
                gx_b = gy_b.to(tl.float32)
            else:
                gx_a = tl.zeros((BLOCK_B, 32), tl.float32)
                gx_b = tl.zeros((BLOCK_B, 16), tl.float32)
            gx_a = _dot_parts(g_lo, w3_a_hi, w3_a_lo, _dot_parts(g_hi, w3_a_hi, w3_a_lo, gx_a))
            gx_b = _dot_parts(g_lo, w3_b_hi, w3_b_lo, _dot_parts(g_hi, w3_b_hi, w3_b_lo, gx_b))
            gx_rows = gx_ptr + rows * D
            tl.store(gx_rows[:, None] + cols_a[None, :], gx_a.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None])
            tl.store(gx_rows[:, None] + cols_b[None, :], gx_b.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None])
        if NEED_GW:
            # As in _block_backward_rows: the tile's products over its samples, a column of ones beside x
            # (column D) and beside z (column d) summing the bias gradients.
            tile_ok = row_ok[:, None] & (grad_cols[None, :] < D)
            x = tl.load(x_rows[:, None] + grad_cols[None, :] * stride_xd, mask=tile_ok, other=0.0)
            x = tl.where(grad_cols[None, :] == D, 1.0, x)
            gy = tl.load(gy_rows[:, None] + grad_cols[None, :] * stride_gyd, mask=tile_ok, other=0.0)
            z_hi, z_lo = _split_tile(_zero_padded(z, d, ZW, tl.zeros((BLOCK_B,), tl.float32), d), 4, HALF)
            acc_w3 = tl.dot(tl.trans(g_hi), x, acc_w3)
            acc_w3 = tl.dot(tl.trans(g_lo), x, acc_w3)
            acc_wo_t = tl.dot(tl.trans(z_hi), gy, acc_wo_t)
            acc_wo_t = tl.dot(tl.trans(z_lo), gy, acc_wo_t)
    if NEED_GW:
        _store_param_grads(part_ptr + pid * (4 * d * D + 3 * d + D), acc_w3, acc_wo_t, D, d, BLOCK_DIM, d, ZW, False)


@triton.jit
def _add_to_row(row_ptr, offs, mask, value):
    """row[offs] += value, for a row only this program touches: deterministic without atomics."""
    tl.store(row_ptr + offs, tl.load(row_ptr + offs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _store_param_grads(row, acc_w3, acc_wo_t, D: tl.constexpr, d: tl.constexpr, BLOCK_DIM: tl.constexpr,
                       ATT: tl.constexpr, ZW: tl.constexpr, ADD: tl.constexpr):  # fmt: skip
    """Accumulators in _block_backward_rows' layout into the partial row at `row` (see
    _param_grad_offsets), stored, or added to what the row holds (ADD)."""
    w3_at, wo_t_at = _param_grad_offsets(D, d, BLOCK_DIM, ATT, ZW)
    if ADD:
        _add_to_row(row, w3_at[0], w3_at[1], acc_w3)
        _add_to_row(row, wo_t_at[0], wo_t_at[1], acc_wo_t)
    else:
        tl.store(row + w3_at[0], acc_w3, mask=w3_at[1])
        tl.store(row + wo_t_at[0], acc_wo_t, mask=wo_t_at[1])


@triton.jit(do_not_specialize=["L"])
def ultimus_stack_bwd_rows_kernel(
    gy_ptr, x_ptr, gx_ptr, part_ptr, p_ptr, h_ptr, g_ptr, B, L, stride_xb, stride_xd, stride_gyb, stride_gyd,
    num_tiles, num_programs,
    D: tl.constexpr, d: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, NEED_GX: tl.constexpr,
    NEED_GW: tl.constexpr, ACC: tl.constexpr, EXACT_EXP: tl.constexpr, EXP2: tl.constexpr, PRECISION: tl.constexpr,
    WIDTH: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DIM: tl.constexpr, LOG2_ATT: tl.constexpr, LOG2_ZW: tl.constexpr,
):  # fmt: skip
    """The stack, per tile, blocks in reverse. Each program has its own (BLOCK_B, D) scratch rows in the
    accumulation dtype: g, the gradient flowing back, updated in place, and two sets h (at h_ptr, two
    per program) for the blocks' inputs, recomputed from x through the blocks before them rather than
    stored. A recomputation for block l keeps block l - 1's input too (the last forward it runs writes
    block l's input to the second set and leaves block l - 1's in the first), so every other block needs
    none: 4 block forwards per tile for 4 blocks, where recomputing each input from x took 6. The set is
    picked by an offset, not by tl.where on pointers, which would hide the rows' alignment and split
    their vector loads and stores. The program's partial row (L * NUM_PARAMS, zeroed by the host) takes
    each block's terms tile by tile: deterministic, no atomics. The barriers order the scratch rows
    between the per-sample phases (a thread, its own rows) and the tile phases (any thread, any row)."""
    ATT: tl.constexpr = 1 << LOG2_ATT
    ZW: tl.constexpr = 1 << LOG2_ZW
    NUM_PARAMS: tl.constexpr = 4 * d * D + 3 * d + D
    dD: tl.constexpr = d * D
    pid = tl.program_id(0)
    scale = 1.0 / tl.sqrt(tl.full((), d, ACC))
    local = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    h_rows = h_ptr + (local + pid * BLOCK_B) * D  # the first set; the second is BLOCK_B rows on
    SECOND: tl.constexpr = BLOCK_B * D
    g_rows = g_ptr + local * D
    my_row = part_ptr + pid.to(tl.int64) * L * NUM_PARAMS
    for tile in range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        row_ok = rows < B
        x_rows = x_ptr + rows * stride_xb
        _copy_rows(gy_ptr + rows * stride_gyb, stride_gyd, g_rows, row_ok, ACC, D, WIDTH)
        for r in range(0, L):
            block = L - 1 - r
            if r % 2 == 0:  # recompute block's input (into the second set) and block - 1's (left in the first)
                _copy_rows(x_rows, stride_xd, h_rows, row_ok, ACC, D, WIDTH)
                for earlier in range(0, block):
                    w = p_ptr + earlier * NUM_PARAMS
                    b = w + 4 * dD
                    _block_forward_rows(
                        h_rows, 1, h_rows + (earlier == block - 1).to(tl.int32) * SECOND, row_ok, w, b, w + dD, b + d,
                        w + 2 * dD, b + 2 * d, w + 3 * dD, b + 3 * d, scale, HAS_BIAS, HAS_BIAS, HAS_BIAS, HAS_BIAS,
                        RESIDUAL, ACC, EXACT_EXP, EXP2, D, d, WIDTH, BLOCK_B,
                    )  # fmt: skip
            input_rows = h_rows + ((r % 2 == 0) & (block > 0)).to(tl.int32) * SECOND  # block 0's input: x
            tl.debug_barrier()  # the input and g complete before any thread reads other threads' rows
            w = p_ptr + block * NUM_PARAMS
            b = w + 4 * dD
            g_w3, g_wo_t = _block_backward_rows(
                input_rows, 1, g_rows, 1, g_rows, row_ok, w, b, w + dD, b + d, w + 2 * dD, b + 2 * d, w + 3 * dD, scale,
                tl.zeros((4 * ATT, BLOCK_DIM), ACC), tl.zeros((ZW, BLOCK_DIM), ACC), HAS_BIAS, HAS_BIAS, HAS_BIAS,
                RESIDUAL, True, NEED_GW, True, ACC, EXACT_EXP, EXP2, PRECISION, D, d, WIDTH, BLOCK_B, BLOCK_DIM,
                LOG2_ATT, LOG2_ZW,
            )  # fmt: skip
            if NEED_GW:
                row = my_row + block * NUM_PARAMS
                _store_param_grads(row, g_w3, g_wo_t, D, d, BLOCK_DIM, ATT, ZW, True)
            tl.debug_barrier()  # every thread is done reading the input tile before the next block rewrites it
        if NEED_GX:
            _copy_rows(g_rows, 1, gx_ptr + rows * D, row_ok, ACC, D, WIDTH)


# ------------------------------------------------------------------------------------------------
# The backward for larger blocks and the stack backward: tiles and tl.dot
# ------------------------------------------------------------------------------------------------


@triton.jit
def _attention(q, k, d, scale, EXACT_EXP: tl.constexpr, BLOCK_ATT: tl.constexpr):
    """A = softmax_j(s q[i] k[j]) for every row of the tile: (BLOCK_B, BLOCK_ATT, BLOCK_ATT).

    The exponent s q_i k_j - max_j' s q_i k_j' is computed as s q_i (k_j - k_ext), with k_ext the max
    of k over j where q_i >= 0, else the min: a rounded difference keeps its sign and is 0 only for
    equal operands, so every exponent is <= 0 and the largest exactly 0 whatever the compiler fuses
    (a contracted `q k - max` leaves the top entry a rounding error from 0, and exp overflows for large
    finite logits). The row maximum also costs O(d) instead of O(d^2)."""
    valid = tl.arange(0, BLOCK_ATT) < d
    k_max = tl.max(tl.where(valid[None, :], k, float("-inf")), axis=1)
    k_min = tl.min(tl.where(valid[None, :], k, float("inf")), axis=1)
    sq = scale * q
    k_ext = tl.where(sq >= 0, k_max[:, None], k_min[:, None])  # (BLOCK_B, BLOCK_ATT): per row i
    exponent = sq[:, :, None] * (k[:, None, :] - k_ext[:, :, None])
    # k_j - k_ext can overflow for |k| near the dtype's limit; with sq = 0 the logit is sq * k_j = 0.
    exponent = tl.where(sq[:, :, None] == 0, sq[:, :, None] * k[:, None, :], exponent)
    # Padded columns j >= d take no probability mass; padded rows i >= d have v[i] = 0.
    exponent = tl.where(valid[None, None, :], exponent, float("-inf"))
    if EXACT_EXP:  # float64 on a GPU: libdevice's exp (float64 is for gradcheck)
        p = libdevice.exp(exponent)
    else:  # float32: the fast ex2-based exp, ~1e-7 relative; the interpreter: numpy's exp
        p = tl.exp(exponent)
    return p / tl.sum(p, axis=2)[:, :, None]


@triton.jit
def _project(
    x, w_ptr, b_ptr, D, d, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_ATT: tl.constexpr
):
    """x @ W^T + b for W in (d, D) nn.Linear layout: (BLOCK_B, BLOCK_ATT)."""
    a_offs = tl.arange(0, BLOCK_ATT)
    cols = tl.arange(0, BLOCK_DIM)
    # Loaded transposed, (BLOCK_DIM, BLOCK_ATT): wT[n, i] = W[i, n].
    w_t = tl.load(
        w_ptr + a_offs[None, :] * D + cols[:, None], mask=(a_offs[None, :] < d) & (cols[:, None] < D), other=0.0
    ).to(ACC)
    out = tl.dot(x, w_t, input_precision="ieee", out_dtype=ACC)
    if HAS_BIAS:
        out += tl.load(b_ptr + a_offs, mask=a_offs < d, other=0.0).to(ACC)[None, :]
    return out


@triton.jit
def _block_forward(
    x, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, wo_ptr, bo_ptr, D, d, scale,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, HAS_BO: tl.constexpr, RESIDUAL: tl.constexpr,
    ACC: tl.constexpr, EXACT_EXP: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_ATT: tl.constexpr,
):  # fmt: skip
    """One block on a tile x (BLOCK_B, BLOCK_DIM): its output, same shape (padded columns stay 0)."""
    cols = tl.arange(0, BLOCK_DIM)
    a_offs = tl.arange(0, BLOCK_ATT)
    q = _project(x, wq_ptr, bq_ptr, D, d, HAS_BQ, ACC, BLOCK_DIM, BLOCK_ATT)
    k = _project(x, wk_ptr, bk_ptr, D, d, HAS_BK, ACC, BLOCK_DIM, BLOCK_ATT)
    v = _project(x, wv_ptr, bv_ptr, D, d, HAS_BV, ACC, BLOCK_DIM, BLOCK_ATT)
    attn = _attention(q, k, d, scale, EXACT_EXP, BLOCK_ATT)
    z = tl.sum(v[:, :, None] * attn, axis=1)  # (BLOCK_B, BLOCK_ATT)

    # Wo loaded transposed, (BLOCK_ATT, BLOCK_DIM): woT[j, n] = Wo[n, j].
    wo_t = tl.load(
        wo_ptr + cols[None, :] * d + a_offs[:, None], mask=(a_offs[:, None] < d) & (cols[None, :] < D), other=0.0
    ).to(ACC)
    y = tl.dot(z, wo_t, input_precision="ieee", out_dtype=ACC)
    if HAS_BO:
        y += tl.load(bo_ptr + cols, mask=cols < D, other=0.0).to(ACC)[None, :]
    if RESIDUAL:
        y += x
    return y


@triton.jit
def _load_weights(
    wq_ptr, wk_ptr, wv_ptr, wo_ptr, D, d, ACC: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_ATT: tl.constexpr
):
    """Wq, Wk, Wv (BLOCK_ATT, BLOCK_DIM) and Wo (BLOCK_DIM, BLOCK_ATT) in their natural layouts: the
    backward multiplies by W (not W^T)."""
    cols = tl.arange(0, BLOCK_DIM)
    a_offs = tl.arange(0, BLOCK_ATT)
    w_offs = a_offs[:, None] * D + cols[None, :]
    w_mask = (a_offs[:, None] < d) & (cols[None, :] < D)
    wq = tl.load(wq_ptr + w_offs, mask=w_mask, other=0.0).to(ACC)
    wk = tl.load(wk_ptr + w_offs, mask=w_mask, other=0.0).to(ACC)
    wv = tl.load(wv_ptr + w_offs, mask=w_mask, other=0.0).to(ACC)
    wo = tl.load(
        wo_ptr + cols[:, None] * d + a_offs[None, :], mask=(cols[:, None] < D) & (a_offs[None, :] < d), other=0.0
    )
    return wq, wk, wv, wo.to(ACC)


@triton.jit
def _block_backward(
    x, gy, wq, wk, wv, wo, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, D, d, scale,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, RESIDUAL: tl.constexpr,
    ACC: tl.constexpr, EXACT_EXP: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_ATT: tl.constexpr,
):  # fmt: skip
    """One block's backward on a tile: recomputes q, k, v and A from its input x (cheaper than saving
    them) and returns (gx, gq, gk, gv, z) for the gradient gy of its output; the parameter gradients
    are outer products of these with x and gy (the callers sum them)."""
    q = _project(x, wq_ptr, bq_ptr, D, d, HAS_BQ, ACC, BLOCK_DIM, BLOCK_ATT)
    k = _project(x, wk_ptr, bk_ptr, D, d, HAS_BK, ACC, BLOCK_DIM, BLOCK_ATT)
    v = _project(x, wv_ptr, bv_ptr, D, d, HAS_BV, ACC, BLOCK_DIM, BLOCK_ATT)
    attn = _attention(q, k, d, scale, EXACT_EXP, BLOCK_ATT)

    gz = tl.dot(gy, wo, input_precision="ieee", out_dtype=ACC)  # (BLOCK_B, BLOCK_ATT)
    gv = tl.sum(attn * gz[:, None, :], axis=2)  # r[i] = sum_j A[i, j] gz[j], and gv = r
    g_scores = attn * v[:, :, None] * (gz[:, None, :] - gv[:, :, None])
    gq = scale * tl.sum(g_scores * k[:, None, :], axis=2)
    gk = scale * tl.sum(g_scores * q[:, :, None], axis=1)
    z = tl.sum(v[:, :, None] * attn, axis=1)

    gx = tl.dot(gq, wq, input_precision="ieee", out_dtype=ACC)
    gx += tl.dot(gk, wk, input_precision="ieee", out_dtype=ACC)
    gx += tl.dot(gv, wv, input_precision="ieee", out_dtype=ACC)
    if RESIDUAL:
        gx += gy
    return gx, gq, gk, gv, z


# d is never specialised: Triton would turn d == 1 into a Python constant, and _attn_scale needs a tensor.
@triton.jit(do_not_specialize=["d"])
def ultimus_bwd_kernel(
    gy_ptr,
    x_ptr,
    gx_ptr,
    part_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    wv_ptr,
    bv_ptr,
    wo_ptr,
    B,
    D,
    d,
    stride_xb,
    stride_xd,
    stride_gyb,
    stride_gyd,
    num_tiles,
    NUM_PARAMS,
    num_programs,
    HAS_BQ: tl.constexpr,
    HAS_BK: tl.constexpr,
    HAS_BV: tl.constexpr,
    RESIDUAL: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_GW: tl.constexpr,
    ACC: tl.constexpr,
    EXACT_EXP: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_ATT: tl.constexpr,
):
    pid = tl.program_id(0)
    scale = _attn_scale(d, ACC)
    cols = tl.arange(0, BLOCK_DIM)
    a_offs = tl.arange(0, BLOCK_ATT)
    w_mask = (a_offs[:, None] < d) & (cols[None, :] < D)
    w_offs = a_offs[:, None] * D + cols[None, :]
    wo_offs = cols[:, None] * d + a_offs[None, :]
    wo_mask = (cols[:, None] < D) & (a_offs[None, :] < d)
    wq, wk, wv, wo = _load_weights(wq_ptr, wk_ptr, wv_ptr, wo_ptr, D, d, ACC, BLOCK_DIM, BLOCK_ATT)

    # Per-program partial sums of the parameter gradients, kept in registers across tiles.
    acc_wq = tl.zeros((BLOCK_ATT, BLOCK_DIM), ACC)
    acc_wk = tl.zeros((BLOCK_ATT, BLOCK_DIM), ACC)
    acc_wv = tl.zeros((BLOCK_ATT, BLOCK_DIM), ACC)
    acc_wo = tl.zeros((BLOCK_DIM, BLOCK_ATT), ACC)
    acc_bq = tl.zeros((BLOCK_ATT,), ACC)
    acc_bk = tl.zeros((BLOCK_ATT,), ACC)
    acc_bv = tl.zeros((BLOCK_ATT,), ACC)
    acc_bo = tl.zeros((BLOCK_DIM,), ACC)

    for tile in range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)  # 64-bit: rows * D may pass 2^31
        tile_mask = (rows[:, None] < B) & (cols[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xd, mask=tile_mask, other=0.0).to(ACC)
        gy = tl.load(gy_ptr + rows[:, None] * stride_gyb + cols[None, :] * stride_gyd, mask=tile_mask, other=0.0).to(
            ACC
        )

        gx, gq, gk, gv, z = _block_backward(
            x, gy, wq, wk, wv, wo, wq_ptr, bq_ptr, wk_ptr, bk_ptr, wv_ptr, bv_ptr, D, d, scale,
            HAS_BQ, HAS_BK, HAS_BV, RESIDUAL, ACC, EXACT_EXP, BLOCK_DIM, BLOCK_ATT,
        )  # fmt: skip
        if NEED_GX:
            tl.store(gx_ptr + rows[:, None] * D + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_GW:
            # Padded rows have gy = 0, hence gq = gk = gv = 0: they add nothing here.
            acc_wq += tl.dot(tl.trans(gq), x, input_precision="ieee", out_dtype=ACC)
            acc_wk += tl.dot(tl.trans(gk), x, input_precision="ieee", out_dtype=ACC)
            acc_wv += tl.dot(tl.trans(gv), x, input_precision="ieee", out_dtype=ACC)
            acc_wo += tl.dot(tl.trans(gy), z, input_precision="ieee", out_dtype=ACC)
            acc_bq += tl.sum(gq, axis=0)
            acc_bk += tl.sum(gk, axis=0)
            acc_bv += tl.sum(gv, axis=0)
            acc_bo += tl.sum(gy, axis=0)

    if NEED_GW:
        # This program's partial row, [gWq | gWk | gWv | gWo | gbq | gbk | gbv | gbo] (see ops/autograd.py).
        row = part_ptr + pid * NUM_PARAMS
        dD = d * D
        tl.store(row + w_offs, acc_wq, mask=w_mask)
        tl.store(row + dD + w_offs, acc_wk, mask=w_mask)
        tl.store(row + 2 * dD + w_offs, acc_wv, mask=w_mask)
        tl.store(row + 3 * dD + wo_offs, acc_wo, mask=wo_mask)
        tl.store(row + 4 * dD + a_offs, acc_bq, mask=a_offs < d)
        tl.store(row + 4 * dD + d + a_offs, acc_bk, mask=a_offs < d)
        tl.store(row + 4 * dD + 2 * d + a_offs, acc_bv, mask=a_offs < d)
        tl.store(row + 4 * dD + 3 * d + cols, acc_bo, mask=cols < D)


@triton.jit(do_not_specialize=["d", "L"])
def ultimus_stack_bwd_kernel(
    gy_ptr, x_ptr, gx_ptr, part_ptr, p_ptr, B, D, d, L, stride_xb, stride_xd, stride_gyb, stride_gyd, num_tiles,
    NUM_PARAMS, num_programs,
    HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, NEED_GX: tl.constexpr, NEED_GW: tl.constexpr, ACC: tl.constexpr,
    EXACT_EXP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DIM: tl.constexpr, BLOCK_ATT: tl.constexpr,
):  # fmt: skip
    """Per tile, the blocks in reverse; block l's input is recomputed from x through blocks 0..l-1
    (about 1.2 kFLOP per block per sample, all on chip) rather than stored. With L blocks' gradients
    too many to keep in registers, each program adds its tiles' contributions to its own partial row
    (L * NUM_PARAMS, zeroed by the host; cache-resident): deterministic, no atomics."""
    pid = tl.program_id(0)
    scale = _attn_scale(d, ACC)
    cols = tl.arange(0, BLOCK_DIM)
    a_offs = tl.arange(0, BLOCK_ATT)
    dD = d * D
    w_offs = a_offs[:, None] * D + cols[None, :]
    w_mask = (a_offs[:, None] < d) & (cols[None, :] < D)
    wo_offs = cols[:, None] * d + a_offs[None, :]
    wo_mask = (cols[:, None] < D) & (a_offs[None, :] < d)
    my_row = part_ptr + pid.to(tl.int64) * L * NUM_PARAMS

    for tile in range(pid, num_tiles, num_programs):
        rows = tile * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        tile_mask = (rows[:, None] < B) & (cols[None, :] < D)
        x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :] * stride_xd, mask=tile_mask, other=0.0).to(ACC)
        g = tl.load(gy_ptr + rows[:, None] * stride_gyb + cols[None, :] * stride_gyd, mask=tile_mask, other=0.0).to(ACC)
        for r in range(0, L):
            block = L - 1 - r
            h = x
            for earlier in range(0, block):
                w = p_ptr + earlier * NUM_PARAMS
                b = w + 4 * dD
                h = _block_forward(
                    h, w, b, w + dD, b + d, w + 2 * dD, b + 2 * d, w + 3 * dD, b + 3 * d, D, d, scale,
                    HAS_BIAS, HAS_BIAS, HAS_BIAS, HAS_BIAS, RESIDUAL, ACC, EXACT_EXP, BLOCK_DIM, BLOCK_ATT,
                )  # fmt: skip
            w = p_ptr + block * NUM_PARAMS
            b = w + 4 * dD
            wq, wk, wv, wo = _load_weights(w, w + dD, w + 2 * dD, w + 3 * dD, D, d, ACC, BLOCK_DIM, BLOCK_ATT)
            gx, gq, gk, gv, z = _block_backward(
                h, g, wq, wk, wv, wo, w, b, w + dD, b + d, w + 2 * dD, b + 2 * d, D, d, scale,
                HAS_BIAS, HAS_BIAS, HAS_BIAS, RESIDUAL, ACC, EXACT_EXP, BLOCK_DIM, BLOCK_ATT,
            )  # fmt: skip
            if NEED_GW:  # padded rows have g = 0, hence gq = gk = gv = 0: they add nothing
                row = my_row + block * NUM_PARAMS
                _add_to_row(row, w_offs, w_mask, tl.dot(tl.trans(gq), h, input_precision="ieee", out_dtype=ACC))
                _add_to_row(row + dD, w_offs, w_mask, tl.dot(tl.trans(gk), h, input_precision="ieee", out_dtype=ACC))
                _add_to_row(
                    row + 2 * dD, w_offs, w_mask, tl.dot(tl.trans(gv), h, input_precision="ieee", out_dtype=ACC)
                )
                _add_to_row(
                    row + 3 * dD, wo_offs, wo_mask, tl.dot(tl.trans(g), z, input_precision="ieee", out_dtype=ACC)
                )
                _add_to_row(row + 4 * dD, a_offs, a_offs < d, tl.sum(gq, axis=0))
                _add_to_row(row + 4 * dD + d, a_offs, a_offs < d, tl.sum(gk, axis=0))
                _add_to_row(row + 4 * dD + 2 * d, a_offs, a_offs < d, tl.sum(gv, axis=0))
                _add_to_row(row + 4 * dD + 3 * d, cols, cols < D, tl.sum(g, axis=0))
                tl.debug_barrier()  # the next tile reads back what this one wrote, maybe from other threads
            g = gx
        if NEED_GX:
            tl.store(gx_ptr + rows[:, None] * D + cols[None, :], g.to(gx_ptr.dtype.element_ty), mask=tile_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _exact_exp(x: Tensor) -> bool:
    """float64 on a GPU takes libdevice's exp; the interpreter's exp is numpy's, exact already."""
    return x.dtype == torch.float64 and not interpreter_active()


def _tile_config(B: int, D: int, d: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_B, BLOCK_DIM, BLOCK_ATT, num_warps, num_stages) for a problem."""
    BLOCK_DIM = max(16, triton.next_power_of_2(D))
    BLOCK_ATT = max(16, triton.next_power_of_2(d))
    if interpreter_active():
        # The interpreter pays ~10 ms per program whatever its size: few, large tiles.
        return max(16, min(1024, triton.next_power_of_2(max(B, 1)))), BLOCK_DIM, BLOCK_ATT, 4, 1
    # Keep the (BLOCK_B, BLOCK_ATT, BLOCK_ATT) attention tile and the (BLOCK_B, BLOCK_DIM) x tile on chip;
    # for wide D, the backward's tile loop is not software-pipelined (each stage is a copy of the
    # x and gy tiles in shared memory, past the 227 KB an H100 block may have at D = 256).
    BLOCK_B = max(16, min(64, 8192 // (BLOCK_ATT * BLOCK_ATT), 4096 // BLOCK_DIM))
    num_stages = 1 if BLOCK_DIM * BLOCK_ATT >= 4096 else 2
    return BLOCK_B, BLOCK_DIM, BLOCK_ATT, 4, num_stages


# From this batch size up, the per-sample kernels' own work outweighs a few extra small launches.
_LARGE_BATCH = 65536


def _per_sample_weights(B: int, *params: Optional[Tensor]) -> list:
    """The parameters as the per-sample kernels read them: contiguous and, at large B, float32. Every
    thread converts each half-precision weight it reads, one integer instruction per weight per sample
    (~1.6k per sample forward, ~2.7k backward: about a third of the bf16 kernels' instructions in the
    offline model); converting the few thousand numbers once on the host side costs a launch each, which
    only small batches would feel. Exact either way: float32 holds every float16 and bfloat16 value."""
    half = (torch.float16, torch.bfloat16)
    to_float = B >= _LARGE_BATCH
    return [None if p is None else (p.float() if to_float and p.dtype in half else p).contiguous() for p in params]


def _rows_config(B: int, D: int, d: int) -> dict:
    """Launch settings of the one-sample-per-thread forward kernels: BLOCK_B, WIDTH, num_warps."""
    WIDTH = 4 if D % 4 == 0 else 2 if D % 2 == 0 else 1  # columns per vector load (16 B for float32)
    if interpreter_active():
        return dict(BLOCK_B=max(16, min(1024, triton.next_power_of_2(max(B, 1)))), WIDTH=WIDTH, num_warps=4)
    # At large B, two samples per thread halve the weight loads per sample (most of the kernel's load/store
    # pipe) and fit in 128 registers at d <= 8, so 16 warps stay resident per SM to hide DRAM latency.
    # Small batches are bound by one thread's latency instead: one sample per thread halves it
    # (the threshold is a guess from the offline model, not yet timed on a GPU).
    samples_per_thread = 2 if d <= 8 and B >= _LARGE_BATCH else 1
    return dict(BLOCK_B=128 * samples_per_thread, WIDTH=WIDTH, num_warps=4)


def _rows_backward_config(B: int, D: int, d: int, acc: torch.dtype, rows: tuple) -> Optional[dict]:
    """Settings of ultimus_bwd_rows_kernel, or None where its per-program gradient accumulators
    ((4 ATT + ZW) x BLOCK_DIM numbers) would not fit in registers: the tile kernel runs instead. x's tile
    and z's have a spare column for the ones that sum the bias gradients (BLOCK_DIM > D, ZW > d). `rows`:
    the dtypes of the x and gy rows the weight-gradient products read (see _add_product)."""
    BLOCK_DIM = max(16, triton.next_power_of_2(D + 1))
    ATT = max(4, triton.next_power_of_2(d))
    ZW = max(16, triton.next_power_of_2(d + 1))
    if (4 * ATT + ZW) * BLOCK_DIM > 3072:  # D = 48, d = 8 is exactly 3072
        return None
    WIDTH = 4 if D % 4 == 0 else 2 if D % 2 == 0 else 1
    if interpreter_active():
        BLOCK_B = max(16, min(1024, triton.next_power_of_2(max(B, 1))))
    else:
        BLOCK_B = 128  # one sample per thread
    return dict(
        BLOCK_B=BLOCK_B, BLOCK_DIM=BLOCK_DIM, LOG2_ATT=ATT.bit_length() - 1, LOG2_ZW=ZW.bit_length() - 1,
        WIDTH=WIDTH, PRECISION=_product_precision(acc, rows), num_warps=4,
    )  # fmt: skip


def _product_precision(acc: torch.dtype, rows: tuple) -> str:
    """How the backward's weight-gradient products keep the accumulation dtype's accuracy: float64 in
    ieee; float32 in tf32x3, or in tf32x2 where every row they read is float16 or bfloat16."""
    if acc == torch.float64:
        return "ieee"
    return "tf32x2" if all(r in (torch.float16, torch.bfloat16) for r in rows) else "tf32x3"


def _exp_flags(x: Tensor) -> dict:
    """EXACT_EXP: float64 on a GPU takes libdevice's exp. EXP2: float32 computes exp as exp2 with log2(e)
    folded into the scale (one multiply fewer per exponential)."""
    return dict(EXACT_EXP=_exact_exp(x), EXP2=x.dtype != torch.float64)


_TL_HALF = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# num_stages for kernels whose tile loop holds a barrier that orders stores before other threads' loads
# (the half-precision kernels' scratch, the stack backward's rows): Triton before 3.3 could software-
# pipeline such a loop and issue the next tiles' loads ahead of the barrier. Later versions leave loops
# with barriers alone, so this costs nothing there.
_BARRIERED_LOOP = 1
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _half_dots(x: Tensor, D: int, d: int) -> Optional[str]:
    """How ultimus_fwd_half_dot_kernel runs its products for rows like x ("split" for bfloat16 rows, "tf32"
    for float16), or None where the one-sample-per-thread kernels run instead: other dtypes and sizes, and
    GPUs without bf16 and tf32 tensor cores (before sm_80). ultimus_bwd_half_dot_kernel runs where this
    says "split" (float16 keeps the rows backward). Triton's interpreter multiplies the bit patterns of
    bfloat16 tl.dot operands (triton-lang/triton#11584, numbers of order 1e10; its maintainers say it does
    not support bfloat16), so there bfloat16 rows keep the rows kernels."""
    if x.dtype not in _TL_HALF or (D, d) != (48, 8) or not _has_tensor_cores(x.device):
        return None
    if x.dtype == torch.bfloat16 and interpreter_active():
        return None
    return "split" if x.dtype == torch.bfloat16 else "tf32"


def _stack_dots(x: Tensor, D: int, d: int) -> bool:
    """Whether the stack forward runs on the tensor cores (ultimus_stack_fwd_dot_kernel): float32, float16
    and bfloat16 rows of the D = 48, d = 8 block, on sm_80 and later or in the interpreter."""
    return x.dtype in (torch.float32, *_TL_HALF) and (D, d) == (48, 8) and _has_tensor_cores(x.device)


def _has_tensor_cores(device: torch.device) -> bool:
    """bf16 and tf32 tensor cores: a GPU of sm_80 or later. Elsewhere Triton runs only in the interpreter,
    which runs tl.dot in any precision."""
    if device.type != "cuda" or interpreter_active():
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:  # cached: the query is not free on the small-B hot path
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index] >= (8, 0)


_SM_COUNT: dict[int, int] = {}


def _num_programs(num_tiles: int, device: torch.device) -> int:
    """Persistent-grid size for the backward: enough programs to fill the device, no more."""
    if device.type != "cuda" or interpreter_active():
        return max(1, num_tiles)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:  # cached: the property query is not free on the small-B hot path
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return max(1, min(num_tiles, 4 * _SM_COUNT[index]))


def _bias_args(*biases: Optional[Tensor], fallback: Tensor):
    """Triton needs a pointer even for an absent bias: pass `fallback`, never read (HAS_B* = False)."""
    ptrs = [b.contiguous() if b is not None else fallback for b in biases]
    flags = [b is not None for b in biases]
    return ptrs, flags


@torch.library.triton_op("ultimus_triton::fwd", mutates_args=())
def ultimus_triton_fwd(
    x: Tensor,
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    wv: Tensor,
    bv: Optional[Tensor],
    wo: Tensor,
    bo: Optional[Tensor],
    residual: bool,
) -> Tensor:
    B = x.shape[0]
    D, d = check_op_inputs("triton", x, wq, bq, wk, bk, wv, bv, wo, bo, residual)
    refuse_forward_ad("ultimus_triton::fwd", (x, wq, bq, wk, bk, wv, bv, wo, bo))
    y = torch.empty((B, D), dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    dots = _half_dots(x, D, d)
    if dots is not None:
        wq, wk, wv, wo = (w.contiguous() for w in (wq, wk, wv, wo))
        (bq, bk, bv, bo), (has_bq, has_bk, has_bv, has_bo) = _bias_args(bq, bk, bv, bo, fallback=wq)
        BLOCK_B = _rows_config(B, D, d)["BLOCK_B"] if interpreter_active() else 128
        num_tiles = triton.cdiv(B, BLOCK_B)
        P = _num_programs(num_tiles, x.device)
        torch.library.wrap_triton(ultimus_fwd_half_dot_kernel)[(P,)](
            x, y, wq, bq, wk, bk, wv, bv, wo, bo, B, x.stride(0), x.stride(1), num_tiles, P,
            D=D, d=d, HAS_BQ=has_bq, HAS_BK=has_bk, HAS_BV=has_bv, HAS_BO=has_bo, RESIDUAL=residual, DOTS=dots,
            HALF=_TL_HALF[x.dtype], BLOCK_B=BLOCK_B, num_warps=4, num_stages=_BARRIERED_LOOP,
        )  # fmt: skip
        return y
    wq, bq, wk, bk, wv, bv, wo, bo = _per_sample_weights(B, wq, bq, wk, bk, wv, bv, wo, bo)
    (bq, bk, bv, bo), (has_bq, has_bk, has_bv, has_bo) = _bias_args(bq, bk, bv, bo, fallback=wq)
    config = _rows_config(B, D, d)
    torch.library.wrap_triton(ultimus_fwd_kernel)[(triton.cdiv(B, config["BLOCK_B"]),)](
        x, y, wq, bq, wk, bk, wv, bv, wo, bo, B, x.stride(0), x.stride(1),
        D=D, d=d, HAS_BQ=has_bq, HAS_BK=has_bk, HAS_BV=has_bv, HAS_BO=has_bo, RESIDUAL=residual,
        ACC=_TL_ACC[_acc_dtype(x)], **_exp_flags(x), **config,
    )  # fmt: skip
    return y


@contextlib.contextmanager
def _say_what_does_not_fit(op: str, x: Tensor, D: int, d: int):
    """Triton checks a kernel's shared memory against the GPU's when it loads the kernel. The float64 tile
    backward (single block or stack) at D > 128 and d > 16 needs 384 KB of it (sm_90 compile), past an
    H100's 227 KB; GPUs with less stop sooner. Say which call that was and what runs it instead."""
    try:
        yield
    except OutOfResources as exc:
        raise RuntimeError(
            f"ultimus: backend 'triton' cannot run {op} for D={D}, d={d} with {x.dtype} inputs on this GPU "
            f"({exc}); backend='cuda' or 'reference' runs it"
        ) from exc


@torch.library.triton_op("ultimus_triton::bwd", mutates_args=())
def ultimus_triton_bwd(
    gy: Tensor,
    x: Tensor,
    wq: Tensor,
    bq: Optional[Tensor],
    wk: Tensor,
    bk: Optional[Tensor],
    wv: Tensor,
    bv: Optional[Tensor],
    wo: Tensor,
    bo: Optional[Tensor],
    residual: bool,
    need_gx: bool,
    need_gw: bool,
) -> tuple[Tensor, Tensor]:
    B = x.shape[0]
    D, d = check_op_inputs("triton", x, wq, bq, wk, bk, wv, bv, wo, bo, residual)
    check_grad_output(gy, x)
    refuse_forward_ad("ultimus_triton::bwd", (gy, x, wq, bq, wk, bk, wv, bv, wo, bo))
    gy = gy.to(x.dtype)  # read in x's dtype, as every backend does (autograd's gy always is)
    acc = _acc_dtype(x)
    dev = x.device
    num_params = 4 * d * D + 3 * d + D
    gx = torch.empty((B, D) if need_gx else (0,), dtype=x.dtype, device=dev)
    rows_config = _rows_backward_config(B, D, d, acc, (x.dtype,))
    BLOCK_B, BLOCK_DIM, BLOCK_ATT, num_warps, num_stages = _tile_config(B, D, d)
    if rows_config is not None:
        BLOCK_B = rows_config["BLOCK_B"]
    num_tiles = triton.cdiv(B, BLOCK_B)
    P = _num_programs(num_tiles, dev) if (need_gw or need_gx) and B > 0 else 0
    # Parameter-gradient partials, one row per program (see ops/autograd.py for the layout).
    partials = torch.empty((P if need_gw else 0, num_params), dtype=acc, device=dev)
    # The tensor-core backward: bfloat16 rows (float16 keeps the rows kernel, see its section); BLOCK_B,
    # num_tiles and P as the rows kernel's (D = 48, d = 8 has its config).
    if P > 0 and _half_dots(x, D, d) == "split":
        scratch = torch.empty((P * BLOCK_B, 4 * d), dtype=torch.float32, device=dev)  # [q | k | v | gz] rows
        wq, wk, wv, wo = (w.contiguous() for w in (wq, wk, wv, wo))
        (bq, bk, bv), (has_bq, has_bk, has_bv) = _bias_args(bq, bk, bv, fallback=wq)
        torch.library.wrap_triton(ultimus_bwd_half_dot_kernel)[(P,)](
            gy, x, gx, partials, scratch, wq, bq, wk, bk, wv, bv, wo,
            B, x.stride(0), x.stride(1), gy.stride(0), gy.stride(1), num_tiles, P,
            D=D, d=d, HAS_BQ=has_bq, HAS_BK=has_bk, HAS_BV=has_bv, RESIDUAL=residual, NEED_GX=need_gx,
            NEED_GW=need_gw, HALF=_TL_HALF[x.dtype], BLOCK_B=BLOCK_B, num_warps=4, num_stages=_BARRIERED_LOOP,
        )  # fmt: skip
    elif P > 0 and rows_config is not None:
        wq, bq, wk, bk, wv, bv, wo = _per_sample_weights(B, wq, bq, wk, bk, wv, bv, wo)
        (bq, bk, bv), (has_bq, has_bk, has_bv) = _bias_args(bq, bk, bv, fallback=wq)
        torch.library.wrap_triton(ultimus_bwd_rows_kernel)[(P,)](
            gy, x, gx, partials, wq, bq, wk, bk, wv, bv, wo,
            B, x.stride(0), x.stride(1), gy.stride(0), gy.stride(1), num_tiles, P,
            D=D, d=d, HAS_BQ=has_bq, HAS_BK=has_bk, HAS_BV=has_bv, RESIDUAL=residual, NEED_GX=need_gx,
            NEED_GW=need_gw, ACC=_TL_ACC[acc], **_exp_flags(x), **rows_config,
        )  # fmt: skip
    elif P > 0:
        wq, wk, wv, wo = (w.contiguous() for w in (wq, wk, wv, wo))
        (bq, bk, bv), (has_bq, has_bk, has_bv) = _bias_args(bq, bk, bv, fallback=wq)
        with _say_what_does_not_fit("bwd", x, D, d):
            torch.library.wrap_triton(ultimus_bwd_kernel)[(P,)](
                gy, x, gx, partials, wq, bq, wk, bk, wv, bv, wo, B, D, d, x.stride(0), x.stride(1), gy.stride(0),
                gy.stride(1), num_tiles, num_params, P,
                HAS_BQ=has_bq, HAS_BK=has_bk, HAS_BV=has_bv, RESIDUAL=residual, NEED_GX=need_gx, NEED_GW=need_gw,
                ACC=_TL_ACC[acc], EXACT_EXP=_exact_exp(x), BLOCK_B=BLOCK_B, BLOCK_DIM=BLOCK_DIM, BLOCK_ATT=BLOCK_ATT,
                num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    if not need_gw:
        return gx, torch.empty((0,), dtype=acc, device=dev)
    # Fixed-order reduction of the per-program partials: deterministic; one kernel for all eight.
    return gx, partials.sum(0)


def _pack_stack(params: list, bias: bool, D: int, d: int, acc: torch.dtype) -> Tensor:
    """The stack ops' flat parameter list as the kernels read it: (L, 4dD + 3d + D) in `acc`, each row
    [Wq | Wk | Wv | Wo | bq | bk | bv | bo], zeros where there are no biases."""
    per = 8 if bias else 4
    pieces = []
    for i in range(0, len(params), per):
        block = params[i : i + per]
        weights = block[0::2] if bias else block
        pieces += [w.reshape(-1) for w in weights]
        pieces += block[1::2] if bias else [weights[0].new_zeros(3 * d + D)]
    return torch.cat([p.to(acc) for p in pieces]).view(len(params) // per, -1)


@torch.library.triton_op("ultimus_triton::stack_fwd", mutates_args=())
def ultimus_triton_stack_fwd(x: Tensor, params: list[Tensor], bias: bool, residual: bool) -> Tensor:
    B = x.shape[0]
    L, D, d = check_stack_op_inputs("triton", x, params, bias, residual)
    refuse_forward_ad("ultimus_triton::stack_fwd", (x, *params))
    y = torch.empty((B, D), dtype=x.dtype, device=x.device)
    if B == 0:
        return y
    packed = _pack_stack(params, bias, D, d, _acc_dtype(x))
    if _stack_dots(x, D, d):
        BLOCK_B = _rows_config(B, D, d)["BLOCK_B"] if interpreter_active() else 128
        num_tiles = triton.cdiv(B, BLOCK_B)
        P = _num_programs(num_tiles, x.device)
        torch.library.wrap_triton(ultimus_stack_fwd_dot_kernel)[(P,)](
            x, y, packed, B, L, x.stride(0), x.stride(1), num_tiles, P,
            D=D, d=d, HAS_BIAS=bias, RESIDUAL=residual, BLOCK_B=BLOCK_B, num_warps=4, num_stages=_BARRIERED_LOOP,
        )  # fmt: skip
        return y
    config = _rows_config(B, D, d)
    # Between blocks the activations stay in the accumulation dtype: a half-precision y cannot hold them.
    h_is_y = y.dtype == packed.dtype
    h = y if h_is_y else torch.empty((B, D), dtype=packed.dtype, device=x.device)
    torch.library.wrap_triton(ultimus_stack_fwd_kernel)[(triton.cdiv(B, config["BLOCK_B"]),)](
        x, h, y, packed, B, L, x.stride(0), x.stride(1),
        D=D, d=d, HAS_BIAS=bias, RESIDUAL=residual, ACC=_TL_ACC[_acc_dtype(x)], H_IS_Y=h_is_y, **_exp_flags(x),
        **config,
    )  # fmt: skip
    return y


@torch.library.triton_op("ultimus_triton::stack_bwd", mutates_args=())
def ultimus_triton_stack_bwd(
    gy: Tensor, x: Tensor, params: list[Tensor], bias: bool, residual: bool, need_gx: bool, need_gw: bool
) -> tuple[Tensor, Tensor]:
    B = x.shape[0]
    L, D, d = check_stack_op_inputs("triton", x, params, bias, residual)
    check_grad_output(gy, x)
    refuse_forward_ad("ultimus_triton::stack_bwd", (gy, x, *params))
    gy = gy.to(x.dtype)  # read in x's dtype, as every backend does (autograd's gy always is)
    acc, dev = _acc_dtype(x), x.device
    num_params = 4 * d * D + 3 * d + D
    gx = torch.empty((B, D) if need_gx else (0,), dtype=x.dtype, device=dev)
    rows_config = _rows_backward_config(B, D, d, acc, (acc,))  # its products read the scratch rows h, g (in acc)
    BLOCK_B, BLOCK_DIM, BLOCK_ATT, num_warps, _ = _tile_config(B, D, d)
    if rows_config is not None:
        BLOCK_B = rows_config["BLOCK_B"]
    num_tiles = triton.cdiv(B, BLOCK_B)
    P = _num_programs(num_tiles, dev) if (need_gw or need_gx) and B > 0 else 0
    # One zeroed partial row per program, L * num_params long: the kernel adds into it tile by tile.
    partials = torch.zeros((P if need_gw else 0, L * num_params), dtype=acc, device=dev)
    if P > 0 and rows_config is not None:
        packed = _pack_stack(params, bias, D, d, acc)
        h = torch.empty((P * 2 * BLOCK_B, D), dtype=acc, device=dev)  # each program's scratch rows: two sets of h
        g = torch.empty((P * BLOCK_B, D), dtype=acc, device=dev)  # and g
        torch.library.wrap_triton(ultimus_stack_bwd_rows_kernel)[(P,)](
            gy, x, gx, partials, packed, h, g, B, L, x.stride(0), x.stride(1), gy.stride(0), gy.stride(1),
            num_tiles, P, D=D, d=d, HAS_BIAS=bias, RESIDUAL=residual, NEED_GX=need_gx, NEED_GW=need_gw,
            ACC=_TL_ACC[acc], **_exp_flags(x), **rows_config, num_stages=_BARRIERED_LOOP,
        )  # fmt: skip
    elif P > 0:
        packed = _pack_stack(params, bias, D, d, acc)
        with _say_what_does_not_fit("stack_bwd", x, D, d):
            torch.library.wrap_triton(ultimus_stack_bwd_kernel)[(P,)](
                gy, x, gx, partials, packed, B, D, d, L, x.stride(0), x.stride(1), gy.stride(0), gy.stride(1),
                num_tiles, num_params, P,
                HAS_BIAS=bias, RESIDUAL=residual, NEED_GX=need_gx, NEED_GW=need_gw, ACC=_TL_ACC[acc],
                EXACT_EXP=_exact_exp(x), BLOCK_B=BLOCK_B, BLOCK_DIM=BLOCK_DIM, BLOCK_ATT=BLOCK_ATT,
                num_warps=num_warps, num_stages=_BARRIERED_LOOP,
            )  # fmt: skip
    if not need_gw:
        return gx, torch.empty((0,), dtype=acc, device=dev)
    return gx, partials.view(-1) if P == 1 else partials.sum(0)  # fixed-order reduction: deterministic


register_fused_ops(
    ("triton",),
    ultimus_triton_fwd,
    ultimus_triton_bwd,
    stack_fwd_op=ultimus_triton_stack_fwd,
    stack_bwd_op=ultimus_triton_stack_bwd,
)
