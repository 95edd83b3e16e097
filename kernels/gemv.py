"""NF4 GEMV for decode (M = 1..4 rows): out = x @ W^T, W [N, K] NF4, K a multiple of the block size.

Memory-bound: each program streams BLOCK_N rows of packed bytes over its share of K (split-K across
programs keeps every SM busy when N is small) and never forms the dense weight. Per 64-element
quantisation block it accumulates code * x in float32 (a chain of FMAs per thread, `_fma_combine`) and
multiplies by the block's absmax once into a [BLOCK_N, BLOCK_K / 64] accumulator, summed over the blocks
only after the loop; the M rows reuse the decoded codes. DECODE 4 ("byte table") turns each packed
byte into both of its codes' values with one lookup in a 512-entry table (`NF4Weight.byte_table`), where
the other decodes split the nibbles and look each up. Split partials (float32) are summed by the wrapper.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul import _INTERPRETED, DECODES, DEFAULT_DECODE, _decode, _scales, check_decode
from .nf4_weight import NF4Weight, dequantize_reference, finish_split


@triton.jit
def _fma_combine(a1, x1, b1, y1, a2, x2, b2, y2):
    """tl.reduce over (codes, x, codes, x): the sum of products. What it returns for a partial sum is (sum, 1,
    -0, 1), so combining it with the next pair multiplies by constants the compiler folds: a thread's own
    elements cost one FMA each, not a multiply and then an add."""
    return (a1 * x1 + b1 * y1 + a2 * x2 + b2 * y2, tl.full((), 1.0, tl.float32), tl.full((), -0.0, tl.float32),
            tl.full((), 1.0, tl.float32))


@triton.jit
def _nf4_gemv_kernel(
    x_ptr,  # [M, K] activations, row stride stride_xm
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr,  # W [N, K] NF4 (DECODE 4: the byte table)
    out_ptr,  # [M, N] output dtype, or float32 [SPLIT, M, N] partials when SPLIT > 1 (unless FIXUP)
    bias_ptr,  # [N] or a dummy
    ws_ptr, cnt_ptr,  # FIXUP: float32 [M, N] and int32 [N tiles] workspaces, zero on entry and on exit
    N, K, stride_xm,
    M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DECODE: tl.constexpr = 0,  # how 4-bit codes become values (matmul._decode; 4: per byte, the byte table)
    ACC2D: tl.constexpr = False,  # scale the codes, accumulate [BLOCK_N, BLOCK_K / 2] and reduce once at the end
    FIXUP: tl.constexpr = False,  # SPLIT > 1 in one launch: atomic partial sums, the last program writes out
    CHAIN: tl.constexpr = True,  # per-block sums through _fma_combine (False: tl.sum of the products)
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    j = tl.arange(0, BLOCK_K // 2)
    kk = tl.arange(0, BLOCK_K)
    b = tl.arange(0, BLOCK_K // BLOCKSIZE)
    per_split = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k_start = split * per_split
    NB: tl.constexpr = BLOCK_K // BLOCKSIZE
    shp: tl.constexpr = (BLOCK_N, NB, BLOCKSIZE // 2)  # a row's bytes by quantisation block
    if ACC2D:  # no cross-lane reduction inside the loop: two multiplies and two FMAs per byte and row
        acc0 = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    else:  # per-block sums of code * x times the block's scale, reduced over the blocks after the loop
        acc0 = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    if DECODE == 4:
        table = tl.load(code_ptr + tl.arange(0, 512))  # [value of the high nibble; value of the low nibble]
    for k0 in range(k_start, tl.minimum(k_start + per_split, K), BLOCK_K):
        col_ok = (k0 // 2 + j) < K // 2  # in bytes: contiguous, so the packed loads vectorise
        byte = tl.load(packed_ptr + rn[:, None].to(tl.int64) * (K // 2) + k0 // 2 + j[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0)
        if DECODE == 4:  # one gather for both tables: Triton stages its source in shared memory per gather
            idx = byte.to(tl.int32).reshape(BLOCK_N * BLOCK_K // 2)
            both = tl.gather(table, tl.join(idx, idx + 256).reshape(BLOCK_N * BLOCK_K), 0)
            hi, lo = tl.split(both.reshape(BLOCK_N, BLOCK_K // 2, 2))
        else:
            hi = _decode(code_ptr, (byte >> 4).to(tl.int32), DECODE)  # [BLOCK_N, BLOCK_K / 2] weights of columns 2j
            lo = _decode(code_ptr, (byte & 15).to(tl.int32), DECODE)  # columns 2j + 1
        blk = rn[:, None].to(tl.int64) * (K // BLOCKSIZE) + k0 // BLOCKSIZE + b[None, :]
        s = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk,
                    row_ok[:, None] & ((k0 + b * BLOCKSIZE) < K)[None, :], BLOCKSIZE2, NESTED)  # [BLOCK_N, BK/64]
        if ACC2D:
            sf = tl.broadcast_to(s[:, :, None], (BLOCK_N, NB, BLOCKSIZE // 2))
            sf = sf.reshape(BLOCK_N, BLOCK_K // 2)
            hi = hi * sf
            lo = lo * sf
        for m in tl.static_range(M):
            xk = tl.load(x_ptr + m * stride_xm + k0 + kk, mask=(k0 + kk) < K, other=0.0).to(tl.float32)
            xe, xo = tl.split(xk.reshape(BLOCK_K // 2, 2))  # columns 2j and 2j + 1
            if ACC2D:
                contrib = hi * xe[None, :] + lo * xo[None, :]  # [BLOCK_N, BLOCK_K / 2]
            else:
                xe3 = tl.broadcast_to(xe[None, :], (BLOCK_N, BLOCK_K // 2)).reshape(shp)
                xo3 = tl.broadcast_to(xo[None, :], (BLOCK_N, BLOCK_K // 2)).reshape(shp)
                if CHAIN:
                    per_block, _, _, _ = tl.reduce((hi.reshape(shp), xe3, lo.reshape(shp), xo3), 2, _fma_combine)
                else:
                    per_block = tl.sum((hi.reshape(shp) * xe3 + lo.reshape(shp) * xo3), axis=2)
                contrib = per_block * s  # [BLOCK_N, NB]
            if m == 0:
                acc0 += contrib
            elif m == 1:
                acc1 += contrib
            elif m == 2:
                acc2 += contrib
            else:
                acc3 += contrib
    for m in tl.static_range(M):
        if m == 0:
            acc = acc0
        elif m == 1:
            acc = acc1
        elif m == 2:
            acc = acc2
        else:
            acc = acc3
        acc = tl.sum(acc, axis=1)
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + m * N + rn, acc.to(out_ptr.dtype.element_ty), mask=row_ok)
        elif FIXUP:
            tl.atomic_add(ws_ptr + m * N + rn, acc, mask=row_ok, sem="relaxed")
        else:
            tl.store(out_ptr + (split * M + m) * N + rn, acc, mask=row_ok)
    if SPLIT > 1 and FIXUP:
        # release: this program's partial sums are visible before its arrival is; acquire: the last to
        # arrive sees everyone's, reads them back atomically (at L2, not a stale L1) and leaves the
        # workspace zero (no other program touches these entries again in this launch)
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            for m in tl.static_range(M):
                total = tl.atomic_add(ws_ptr + m * N + rn, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=row_ok)
                tl.store(ws_ptr + m * N + rn, tl.zeros((BLOCK_N,), dtype=tl.float32), mask=row_ok)
                if HAS_BIAS:
                    total += tl.load(bias_ptr + rn, mask=row_ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + m * N + rn, total.to(out_ptr.dtype.element_ty), mask=row_ok)
            tl.store(cnt_ptr + pid_n, 0)


GEMV_DECODES = {**DECODES, 4: "byte table"}


def default_config(N: int, K: int) -> dict:
    # CHAIN off under TRITON_INTERPRET=1: the interpreter runs a tl.reduce with a Python combine about 80x
    # slower than tl.sum (a 40 x 320 GEMV at M=4: 7.2 s against 0.09 s); the same sum in another order
    n_tiles = triton.cdiv(N, 32)
    split = max(1, min(K // 1024, triton.cdiv(4 * 132, n_tiles)))
    return dict(BLOCK_N=32, BLOCK_K=256, SPLIT=split, num_warps=4, num_stages=3, DECODE=DEFAULT_DECODE,
                CHAIN=not _INTERPRETED)


def nf4_gemv(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, **config) -> torch.Tensor:
    """x [..., K] with at most 4 rows in total @ W^T -> [..., N]."""
    N, K = w.shape
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, expected {K}")
    if K % w.blocksize:
        raise ValueError("nf4_gemv needs K to be a multiple of the quantisation block; use nf4_matmul")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if not 1 <= M <= 4:
        raise ValueError(f"nf4_gemv takes 1 to 4 rows, got {M}; use nf4_matmul")
    cfg = {**default_config(N, K), **config}
    check_decode(cfg["DECODE"], GEMV_DECODES)
    if cfg["BLOCK_K"] % w.blocksize:
        raise ValueError("BLOCK_K must be a multiple of the quantisation block size")
    split = cfg.pop("SPLIT")
    fixup = split > 1 and cfg.get("FIXUP", False)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    dst = out if split == 1 or fixup else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), split)
    ws, cnt = _fixup_workspace(x.device, M * N, grid[0]) if fixup else (w.code, w.code)
    try:
        _nf4_gemv_kernel[grid](
            x2, *w.kernel_args(byte_table=cfg["DECODE"] == 4), dst, bias if bias is not None else w.code, ws, cnt,
            N, K, x2.stride(0),
            M=M, SPLIT=split, BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=w.nested,
            HAS_BIAS=bias is not None and (split == 1 or fixup), **cfg,
        )
    except BaseException:
        _WORKSPACES.pop(x.device, None)  # a launch that did not finish may leave it non-zero
        raise
    if split > 1 and not fixup:
        finish_split(dst, out, bias)
    return out.reshape(*lead, N)


_WORKSPACES: dict = {}  # device -> (float32 partial sums, int32 arrival counters), zero between calls


def _fixup_workspace(device: torch.device, elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FIXUP's zeroed workspaces on `device`, grown as needed (each launch leaves them zero again)."""
    ws, cnt = _WORKSPACES.get(device, (None, None))
    if ws is None or ws.numel() < elems or cnt.numel() < tiles:
        size = max(elems, 0 if ws is None else ws.numel())
        ws = torch.zeros(size, dtype=torch.float32, device=device)
        cnt = torch.zeros(max(tiles, 0 if cnt is None else cnt.numel()), dtype=torch.int32, device=device)
        _WORKSPACES[device] = (ws, cnt)
    return ws, cnt


def reference(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    W = dequantize_reference(w, torch.float32)
    out = x.float() @ W.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
