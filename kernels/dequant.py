"""NF4 -> dense dequantisation, bit-identical to `bitsandbytes.functional.dequantize_4bit`: element-wise
(`dequantize_nf4`, any shape) and byte-wise (`dequantize_nf4_bytes`, whole quantisation blocks, faster).

Element-wise: each program writes BLOCK consecutive elements of the flattened weight; every byte is read by the two
elements it holds (the second read hits L1). The scale products are done in float32 and rounded once, and
the nested absmax is decoded with two roundings (multiply, then add the offset), as bitsandbytes does; FMA
contraction is switched off so the compiler cannot fuse those two steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .matmul import _decode, _scales, check_decode
from .nf4_weight import NF4Weight, dequantize_reference


@triton.jit
def _dequant_kernel(
    packed_ptr,  # [ceil(n / 2)] uint8, high nibble first
    absmax_ptr,  # [n / BLOCKSIZE] float32, or uint8 when NESTED
    absmax2_ptr,  # [n / BLOCKSIZE / BLOCKSIZE2] float32 (NESTED)
    code2_ptr,  # [256] float32 (NESTED)
    offset,  # float32 scalar (NESTED)
    code_ptr,  # [16] float32 NF4 values
    out_ptr,  # [n] output dtype
    n,  # number of elements N * K
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    byte = tl.load(packed_ptr + i // 2, mask=mask, other=0)
    nib = tl.where(i % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
    value = tl.load(code_ptr + nib)
    blk = i // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    prod = value * scale  # float32, one rounding
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even by hand: Triton's interpreter truncates float32 -> bfloat16 casts
        bits = prod.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + i, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + i, prod.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_bytes_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset, code_ptr,  # as _dequant_kernel
    out_ptr,  # [2 * nbytes] output dtype
    nbytes,  # packed bytes (a multiple of BLOCKSIZE / 2)
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr,
    DECODE: tl.constexpr,
):
    """Byte-wise: each program reads BYTES packed bytes once (contiguous), one scale per quantisation block,
    and writes the 2 * BYTES elements they hold."""
    j = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    byte = tl.load(packed_ptr + j, mask=j < nbytes, other=0)
    hi = _decode(code_ptr, (byte >> 4).to(tl.int32), DECODE)
    lo = _decode(code_ptr, (byte & 15).to(tl.int32), DECODE)
    NB: tl.constexpr = 2 * BYTES // BLOCKSIZE
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    s = _scales(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, blk < 2 * nbytes // BLOCKSIZE, BLOCKSIZE2, NESTED)
    prod = (tl.join(hi, lo).reshape(NB, BLOCKSIZE) * s[:, None]).reshape(2 * BYTES)
    i = tl.program_id(0).to(tl.int64) * 2 * BYTES + tl.arange(0, 2 * BYTES)
    if out_ptr.dtype.element_ty == tl.bfloat16:  # round to nearest even by hand, as _dequant_kernel
        bits = prod.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + i, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=i < 2 * nbytes)
    else:
        tl.store(out_ptr + i, prod.to(out_ptr.dtype.element_ty), mask=i < 2 * nbytes)


def dequantize_nf4_bytes(w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                         bytes_per_program: int = 1024, decode: int = 0, num_warps: int = 4) -> torch.Tensor:
    """dequantize_nf4 for weights whose element count is a multiple of the block size (every LLM weight),
    bit-identical too: each packed byte read once and each block's scale once, where dequantize_nf4 reads
    every byte twice and a scale per element. decode: matmul._decode's DECODE; the table load (0) and 1024
    bytes per program were the fastest on an H200 (17.2 us at 4096 x 4096, bitsandbytes 54.2 us)."""
    N, K = w.shape
    dtype = dtype or w.dtype
    n = N * K
    if n % w.blocksize or (2 * bytes_per_program) % w.blocksize:
        raise ValueError("dequantize_nf4_bytes needs whole quantisation blocks; use dequantize_nf4")
    check_decode(decode)
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=w.packed.device)
    nbytes = n // 2
    _dequant_bytes_kernel[(triton.cdiv(nbytes, bytes_per_program),)](
        *w.kernel_args(), out, nbytes, BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=w.nested,
        BYTES=bytes_per_program, DECODE=decode, num_warps=num_warps, enable_fp_fusion=False,
    )
    return out


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                   block: int = 1024) -> torch.Tensor:
    """[N, K] dense weight in `dtype` (default: the weight's own)."""
    N, K = w.shape
    dtype = dtype or w.dtype
    if out is None:
        out = torch.empty(N, K, dtype=dtype, device=w.packed.device)
    if out.shape != (N, K) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{N}, {K}] tensor")
    n = N * K
    _dequant_kernel[(triton.cdiv(n, block),)](
        *w.kernel_args(), out, n, BLOCKSIZE=w.blocksize, BLOCKSIZE2=w.blocksize2, NESTED=w.nested, BLOCK=block,
        enable_fp_fusion=False,
    )
    return out


def reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The torch reference (see nf4_weight.py)."""
    return dequantize_reference(w, dtype)
