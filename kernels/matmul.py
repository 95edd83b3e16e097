"""Fused NF4 dequant-GEMM: out = x @ W^T (forward) or out = x @ W (the input gradient, "transposed"),
W [N, K] in bitsandbytes' NF4 layout, never materialised in full.

Each program owns a BLOCK_M x BLOCK_COLS tile of the output and walks the reduction dimension in BLOCK_RED
steps: it loads the packed bytes of the W tile it needs (rows of W are contiguous along K), splits the
nibbles, looks the codes up, scales each 64-element block by its absmax, rounds to the activation dtype (the
same values bitsandbytes' dequantisation gives) and feeds tensor cores with tl.dot. SPLIT > 1 splits the
reduction over programs (skinny M): float32 partials, summed by the wrapper.

When K is a multiple of the quantisation block (every LLM weight) the tile is read as contiguous bytes and
interleaved with tl.join; otherwise every element is gathered by its flat index (odd shapes, correctness).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .nf4_weight import NF4Weight, dequantize_reference, finish_split

# Triton's CPU interpreter multiplies bfloat16 tl.dot operands as raw 16-bit integers; under
# TRITON_INTERPRET=1 the products run in float32 instead (the tile dequantisation is the same code).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# float32 activations: three TF32 tensor-core products (hi*hi + hi*lo + lo*hi), about float32's accuracy.
# Triton's "ieee" float32 dot compiles (sm_90, Triton 3.9) to FMA loops with a 3.3-10.7 KB per-thread stack
# at every tile tried here (kernels/bench/compile_check.py); tf32x3 has none at M >= 64. Triton 3.1 and 3.2
# abort in LLVM on tf32x3 at these tiles, so they keep "ieee".
FP32_PRECISION = "tf32x3" if tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 3) else "ieee"

# How the fused kernels turn 4-bit codes into values by default (see _decode). Measured on an H200
# (kernels/bench/decode_probe.py, BENCHMARKS.md 2026-12-04): tl.gather from registers took the GEMV at
# M=1 from 24.4 to 14.6 us (4096x4096) and the M=16 GEMM from 91.8 to 21.1 us against a table load per
# element; the select tree was slower than either. Triton without tl.gather keeps the table load.
DEFAULT_DECODE = 2 if hasattr(tl, "gather") else 0


DECODES = {0: "table load", 1: "select tree", 2: "tl.gather", 3: "none (wrong values: a diagnostic)"}


def check_decode(decode, allowed=DECODES) -> None:
    """ValueError unless `decode` is one of `allowed` (a kernel would read an unknown one as another)."""
    if decode not in allowed:
        raise ValueError(f"DECODE={decode!r}: expected one of {sorted(allowed)} "
                         f"({', '.join(f'{k}: {v}' for k, v in sorted(allowed.items()))})")


@triton.jit
def _decode(code_ptr, nib, DECODE: tl.constexpr):
    """float32 NF4 values of 4-bit codes `nib` (int32, any shape). DECODE 0: gather from the 16-entry table
    in global memory (one load per element); 1: a 4-level select tree over the table's 16 values (scalar
    loads, then 15 selects per element, no per-element memory access); 2: tl.gather from the table held in
    registers; 3: the code itself as a float (WRONG values: a diagnostic, the kernel without its decode)."""
    if DECODE == 0:
        v = tl.load(code_ptr + nib)
    elif DECODE == 1:
        b0 = (nib & 1) != 0
        b1 = (nib & 2) != 0
        b2 = (nib & 4) != 0
        v0 = tl.where(b1, tl.where(b0, tl.load(code_ptr + 3), tl.load(code_ptr + 2)),
                      tl.where(b0, tl.load(code_ptr + 1), tl.load(code_ptr + 0)))
        v1 = tl.where(b1, tl.where(b0, tl.load(code_ptr + 7), tl.load(code_ptr + 6)),
                      tl.where(b0, tl.load(code_ptr + 5), tl.load(code_ptr + 4)))
        v2 = tl.where(b1, tl.where(b0, tl.load(code_ptr + 11), tl.load(code_ptr + 10)),
                      tl.where(b0, tl.load(code_ptr + 9), tl.load(code_ptr + 8)))
        v3 = tl.where(b1, tl.where(b0, tl.load(code_ptr + 15), tl.load(code_ptr + 14)),
                      tl.where(b0, tl.load(code_ptr + 13), tl.load(code_ptr + 12)))
        v = tl.where((nib & 8) != 0, tl.where(b2, v3, v2), tl.where(b2, v1, v0))
    elif DECODE == 2:
        tab = tl.load(code_ptr + tl.arange(0, 16))
        flat = nib.reshape(nib.numel)
        v = tl.gather(tab, flat, 0).reshape(nib.shape)
    else:
        v = nib.to(tl.float32)
    return v


@triton.jit
def _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, mask, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr):
    """float32 absmax of quantisation blocks `blk` (any shape)."""
    # one return: Triton's compiler (unlike its interpreter) also builds statements after a constexpr
    # branch's return, which gave two return types (float32 and uint8) for a nested absmax
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0) + offset
    else:
        s = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return s


@triton.jit
def _w_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr,
            rows, k0, N, K,
            ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
            NESTED: tl.constexpr, ALIGNED: tl.constexpr, DECODE: tl.constexpr = 0):
    """W[rows, k0:k0+COLS] dequantised to float32, [ROWS, COLS]; zeros outside W."""
    if ALIGNED:  # K % BLOCKSIZE == 0 and k0 % BLOCKSIZE == 0: bytes of a row are contiguous
        j = tl.arange(0, COLS // 2)
        row_ok = rows[:, None] < N
        col_ok = (k0 // 2 + j)[None, :] < K // 2  # in bytes: contiguous, so the loads vectorise
        byte = tl.load(packed_ptr + rows[:, None].to(tl.int64) * (K // 2) + k0 // 2 + j[None, :],
                       mask=row_ok & col_ok, other=0)
        hi = _decode(code_ptr, (byte >> 4).to(tl.int32), DECODE)
        lo = _decode(code_ptr, (byte & 15).to(tl.int32), DECODE)
        vals = tl.join(hi, lo).reshape(ROWS, COLS)  # element 2j is the high nibble of byte j
        b = tl.arange(0, COLS // BLOCKSIZE)
        blk = rows[:, None].to(tl.int64) * (K // BLOCKSIZE) + k0 // BLOCKSIZE + b[None, :]
        s = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk,
                    (rows[:, None] < N) & ((k0 + b * BLOCKSIZE)[None, :] < K), BLOCKSIZE2, NESTED)
        vals = (vals.reshape(ROWS, COLS // BLOCKSIZE, BLOCKSIZE) * s[:, :, None]).reshape(ROWS, COLS)
    else:
        cols = k0 + tl.arange(0, COLS)
        ok = (rows[:, None] < N) & (cols[None, :] < K)
        flat = rows[:, None].to(tl.int64) * K + cols[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=ok, other=0)
        nib = tl.where(flat % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
        s = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, flat // BLOCKSIZE, ok, BLOCKSIZE2, NESTED)
        vals = tl.where(ok, tl.load(code_ptr + nib) * s, 0.0)
    return vals


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # [M, R] activations (R = K forward, N transposed), row stride stride_xm, unit column stride
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr,  # W [N, K] in NF4 (see nf4_weight.py)
    out_ptr,  # [M, C] (C = N forward, K transposed), or float32 [SPLIT, M, C] partials when SPLIT > 1
    bias_ptr,  # [C] or a dummy
    M, N, K, stride_xm, stride_om,
    TRANS: tl.constexpr,  # False: out = x @ W^T; True: out = x @ W
    BLOCK_M: tl.constexpr, BLOCK_COLS: tl.constexpr, BLOCK_RED: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
    ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    DECODE: tl.constexpr = 0,  # how 4-bit codes become values (see _decode)
):
    C = K if TRANS else N  # output columns
    R = N if TRANS else K  # reduction length
    pid = tl.program_id(0)
    split = tl.program_id(1)
    # grouped ordering: GROUP_M row tiles share their column tiles while those are in L2
    n_m, n_c = tl.cdiv(M, BLOCK_M), tl.cdiv(C, BLOCK_COLS)
    group = pid // (GROUP_M * n_c)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_c)) % size_m
    pid_c = (pid % (GROUP_M * n_c)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rc = pid_c * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    per_split = tl.cdiv(tl.cdiv(R, SPLIT), BLOCK_RED) * BLOCK_RED
    r_start = split * per_split
    acc = tl.zeros((BLOCK_M, BLOCK_COLS), dtype=tl.float32)
    for r0 in range(r_start, tl.minimum(r_start + per_split, R), BLOCK_RED):
        rr = r0 + tl.arange(0, BLOCK_RED)
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + rr[None, :],
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        if TRANS:  # W rows are the reduction: tile [BLOCK_RED, BLOCK_COLS] = W[rr, rc]
            w = _w_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr, rr, pid_c * BLOCK_COLS,
                        N, K, BLOCK_RED, BLOCK_COLS, BLOCKSIZE, BLOCKSIZE2, NESTED, ALIGNED, DECODE)
        else:  # W rows are the output columns: tile W[rc, rr], transposed for the product
            w = tl.trans(_w_tile(packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr, rc, r0,
                                 N, K, BLOCK_COLS, BLOCK_RED, BLOCKSIZE, BLOCKSIZE2, NESTED, ALIGNED, DECODE))
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    mask = (rm[:, None] < M) & (rc[None, :] < C)
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rc, mask=rc < C, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_om + rc[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + split * M * C + rm[:, None].to(tl.int64) * C + rc[None, :], acc, mask=mask)


def default_config(M: int, cols: int, red: int) -> dict:
    """A reasonable tile for the problem size (measured choices live in kernels/bench)."""
    if M <= 16:
        n_tiles = triton.cdiv(cols, 64)
        split = max(1, min(16, 264 // max(n_tiles, 1), red // 512))
        return dict(BLOCK_M=16, BLOCK_COLS=64, BLOCK_RED=128, GROUP_M=1, SPLIT=split, num_warps=4, num_stages=3,
                    DECODE=DEFAULT_DECODE)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_COLS=64, BLOCK_RED=64, GROUP_M=8, SPLIT=1, num_warps=4, num_stages=3,
                    DECODE=DEFAULT_DECODE)
    return dict(BLOCK_M=128, BLOCK_COLS=128, BLOCK_RED=64, GROUP_M=8, SPLIT=1, num_warps=8, num_stages=3,
                DECODE=DEFAULT_DECODE)


def nf4_matmul(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, transpose: bool = False,
               **config) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N]; with transpose=True, x [..., N] @ W -> [..., K]."""
    N, K = w.shape
    red, cols = (N, K) if transpose else (K, N)
    if x.shape[-1] != red:
        raise ValueError(f"x has {x.shape[-1]} features, expected {red} for W {tuple(w.shape)} (transpose={transpose})")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, red)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    cfg = {**default_config(M, cols, red), "INPUT_PRECISION": FP32_PRECISION if x.dtype == torch.float32 else "tf32",
           **config}
    if cfg["BLOCK_RED"] % w.blocksize and K % w.blocksize == 0 and not transpose:
        raise ValueError("BLOCK_RED must be a multiple of the quantisation block size")
    aligned = K % w.blocksize == 0 and (cfg["BLOCK_COLS" if transpose else "BLOCK_RED"] % w.blocksize == 0)
    if not aligned and "num_stages" not in config:
        cfg["num_stages"] = 1  # the gathering tile: 3 stages need up to 229 KB of shared memory on sm_90
    check_decode(cfg["DECODE"])
    split = cfg.pop("SPLIT")
    out = torch.empty(M, cols, dtype=x.dtype, device=x.device)
    dst = out if split == 1 else torch.empty(split, M, cols, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_COLS"]), split)
    _nf4_matmul_kernel[grid](
        x2, *w.kernel_args(), dst, bias if bias is not None else w.code, M, N, K, x2.stride(0), out.stride(0),
        TRANS=transpose, SPLIT=split, BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=w.nested,
        ALIGNED=aligned, HAS_BIAS=bias is not None and split == 1,
        DOT_F32=_INTERPRETED, **cfg,
    )
    if split > 1:
        finish_split(dst, out, bias)
    return out.reshape(*lead, cols)


def reference(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
    """Dequantise with the torch reference, then one float32 matmul, cast to x's dtype."""
    W = dequantize_reference(w, x.dtype).float()
    out = x.float() @ (W if transpose else W.t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
