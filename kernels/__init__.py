"""Triton kernels for bitsandbytes' NF4 layout (importable as `workbench.kernels`): dequantisation,
a fused dequant-GEMM (forward and the transposed input-gradient product), a skinny GEMM/GEMV for
decode and speculative verification, an autograd Function and a drop-in `bnb.nn.Linear4bit`
replacement. On a CPU the kernels run only under TRITON_INTERPRET=1 (tests)."""

from .nf4_weight import NF4Weight, absmax_reference, dequantize_reference
