"""NF4 -> dense dequantisation, bit-identical to `bitsandbytes.functional.dequantize_4bit`.

Each program writes BLOCK consecutive elements of the flattened weight; every byte is read by the two
elements it holds (the second read hits L1). The scale products are done in float32 and rounded once, and
the nested absmax is decoded with two roundings (multiply, then add the offset), as bitsandbytes does; FMA
contraction is switched off so the compiler cannot fuse those two steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
