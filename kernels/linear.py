"""The NF4 linear layer on our kernels: an autograd Function (forward: skinny GEMV or fused GEMM for few
rows, our dequantisation then cuBLAS for many; input gradient likewise, transposed; the frozen 4-bit weight
gets no gradient) and `TritonLinear4bit`, a
`bnb.nn.Linear4bit` whose forward uses it. `replace_linear4bit(model)` switches every NF4 layer of a loaded
model (peft-wrapped or not) in place: same Params4bit storage, same QuantState, so saving, peft and merging
behave exactly as with bitsandbytes."""

from __future__ import annotations

import os

import bitsandbytes as bnb
import torch

from .dequant import dequantize_nf4, dequantize_nf4_bytes
from .gemv import nf4_gemv
from .matmul import nf4_matmul
from .nf4_weight import NF4Weight

GEMV_MAX_ROWS = 4
# From this many rows on, dequantise the weight once (byte-wise kernel, bit-identical to bitsandbytes') and
# hand the product to cuBLAS, as bitsandbytes does, instead of the fused kernel, which decodes each weight
# tile once per row tile. Measured on an H200 (BENCHMARKS.md, 2026-12-04): at M=512 the fused kernel took
# 110 us even with no decode at all (4096x4096) against 42.6 us for our dequantisation + cuBLAS; at M=16
# the fused kernel (21.1 us) beat the route (17.2 + 13.6 us). 64 lies between the two measured sizes.
DEQUANT_MIN_ROWS = 64
DEQUANT_BYTES_PER_PROGRAM = 1024  # of the byte-wise dequantisation: the fastest measured on the H200


def _dense(w: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in `dtype`, bit-identical to bitsandbytes' dequantisation."""
    N, K = w.shape
    if (N * K) % w.blocksize == 0 and (2 * DEQUANT_BYTES_PER_PROGRAM) % w.blocksize == 0:
        return dequantize_nf4_bytes(w, dtype, bytes_per_program=DEQUANT_BYTES_PER_PROGRAM)
    return dequantize_nf4(w, dtype)


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("quant.kernel=triton needs a CUDA GPU (TRITON_INTERPRET=1 runs it on a CPU, slowly, "
                           "for tests); use quant.kernel=bnb on this machine")


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T + bias: the GEMV for up to 4 rows, the fused GEMM otherwise."""
    rows = x.numel() // x.shape[-1]
    if rows <= GEMV_MAX_ROWS and w.shape[1] % w.blocksize == 0:
        return nf4_gemv(x, w, bias)
    if rows >= DEQUANT_MIN_ROWS:
        return torch.nn.functional.linear(x, _dense(w, x.dtype), bias)
    return nf4_matmul(x, w, bias)


def nf4_linear_grad_input(grad_out: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """grad_out [..., N] @ W -> [..., K]: the transposed fused GEMM for few rows, dequantise + cuBLAS for
    many (the dense weight is made again here rather than kept from the forward: memory over time)."""
    rows = grad_out.numel() // grad_out.shape[-1]
    if rows >= DEQUANT_MIN_ROWS:
        return grad_out @ _dense(w, grad_out.dtype)
    return nf4_matmul(grad_out, w, transpose=True)


def _nf4_weight(weight, quant_state) -> NF4Weight:
    """NF4Weight.from_bnb, kept on the QuantState while the weight's storage is the same: building it reads
    the nested offset to the host (a device sync per layer per call) and makes a float32 code table."""
    key = (weight.data_ptr(), quant_state.absmax.data_ptr(), weight.device)
    cached = getattr(quant_state, "_workbench_nf4", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = NF4Weight.from_bnb(weight, quant_state)
    quant_state._workbench_nf4 = (key, w)
    return w


class NF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, quant_state):
        # x [..., K] compute dtype; weight: Params4bit (packed, frozen); bias [N] or None
        w = _nf4_weight(weight, quant_state)
        ctx.w = w
        ctx.has_bias = bias is not None
        return nf4_linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_linear_grad_input(grad_out, ctx.w)  # [..., N] @ W -> [..., K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


class TritonLinear4bit(bnb.nn.Linear4bit):
    """bnb.nn.Linear4bit computed with workbench.kernels (NF4 only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_device(x)
        quant_state = self.weight.quant_state
        if quant_state is None:
            raise RuntimeError("weight is not quantised yet; move the layer to a CUDA device first")
        in_dtype = x.dtype
        compute = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(compute)
        return NF4LinearFunction.apply(x.to(compute), self.weight, bias, quant_state).to(in_dtype)


def replace_linear4bit(model: torch.nn.Module) -> int:
    """Switch every NF4 bnb.nn.Linear4bit in `model` to TritonLinear4bit, in place; returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            qs = module.weight.quant_state
            if qs is not None and qs.quant_type != "nf4":
                raise ValueError(f"quant.kernel=triton supports NF4 only, found {qs.quant_type}")
            module.__class__ = TritonLinear4bit
            n += 1
    return n
