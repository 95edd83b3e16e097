"""bitsandbytes' NF4 weight layout, read directly from a `Params4bit` and its `QuantState`, and the torch
reference dequantisation every kernel is checked against.

Layout of a weight W [N, K] (out_features x in_features), flattened row-major, i = n * K + k:
  * packed: uint8 [ceil(N*K/2)], two 4-bit codes per byte, HIGH nibble first (element 2j -> byte j >> 4,
    element 2j + 1 -> byte j & 15);
  * code: float32 [16], the NF4 values (quantiles of N(0, 1) scaled to [-1, 1]);
  * absmax: one scale per `blocksize` (64) consecutive elements, absmax[i // blocksize]; with double
    quantisation ("nested") it is itself uint8, decoded as code2[absmax_q] * absmax2[j // blocksize2]
    + offset (code2: bitsandbytes' 256-value dynamic map, blocksize2 = 256), all in float32;
  * W[i] = dtype(code[nibble(i)] * absmax[i // blocksize]), the product in float32, rounded once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class NF4Weight:
    """Device tensors of one NF4 weight, as the kernels take them (no copies of the packed data)."""

    packed: torch.Tensor  # [ceil(N*K/2)] uint8
    absmax: torch.Tensor  # [n_blocks] uint8 (nested) or float32
    code: torch.Tensor  # [16] float32 NF4 values
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    blocksize: int  # elements per absmax (64)
    dtype: torch.dtype  # dtype of the dequantised weight
    absmax2: torch.Tensor | None = None  # [ceil(n_blocks / blocksize2)] float32, nested only
    code2: torch.Tensor | None = None  # [256] float32, nested only
    offset: float = 0.0  # added to the decoded absmax, nested only
    blocksize2: int = 256
    _byte_table: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @classmethod
    def from_bnb(cls, weight: torch.Tensor, quant_state) -> "NF4Weight":
        """From a `bnb.nn.Params4bit` (or its packed data) and its `QuantState`."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"only NF4 is supported, got {quant_state.quant_type}")
        shape = tuple(quant_state.shape)
        if len(shape) != 2:
            raise ValueError(f"expected a 2-D weight, got shape {shape}")
        packed = weight.data.reshape(-1)
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        common = dict(packed=packed, code=quant_state.code.float(), shape=shape, blocksize=quant_state.blocksize,
                      dtype=quant_state.dtype)
        if quant_state.nested:
            s2 = quant_state.state2
            return cls(absmax=quant_state.absmax, absmax2=s2.absmax.float(), code2=s2.code.float(),
                       offset=float(quant_state.offset), blocksize2=s2.blocksize, **common)
        return cls(absmax=quant_state.absmax.float(), **common)

    def kernel_args(self, byte_table: bool = False) -> tuple:
        """(packed, absmax, absmax2, code2, offset, code) as the kernels take them; the nested-only
        tensors are replaced by the code table (never read) when the absmax is not nested. byte_table:
        `byte_table()` in place of the code table."""
        dummy = self.code
        return (self.packed, self.absmax, self.absmax2 if self.nested else dummy,
                self.code2 if self.nested else dummy, self.offset, self.byte_table() if byte_table else self.code)

    def byte_table(self) -> torch.Tensor:
        """float32 [512]: entry b is the value of packed byte b's high nibble (its first element), entry 256 + b
        that of its low nibble; built once per weight."""
        if self._byte_table is None or self._byte_table.device != self.code.device:
            b = torch.arange(256, device=self.code.device)
            self._byte_table = torch.cat([self.code[b >> 4], self.code[b & 15]]).float().contiguous()
        return self._byte_table

    def n_blocks(self) -> int:
        N, K = self.shape
        return -(-(N * K) // self.blocksize)

    def nbytes(self) -> int:
        """Bytes a kernel must read to use the whole weight."""
        extra = 0 if self.absmax2 is None else self.absmax2.numel() * 4 + 256 * 4
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size() + extra


def absmax_reference(w: NF4Weight) -> torch.Tensor:
    """[n_blocks] float32 scales, decoding the nested absmax as bitsandbytes does (two roundings)."""
    if not w.nested:
        return w.absmax.float()
    j = torch.arange(w.absmax.numel(), device=w.absmax.device)
    return w.code2[w.absmax.long()] * w.absmax2[j // w.blocksize2] + w.offset


def dequantize_reference(w: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[N, K] dequantised weight in plain torch: the reference every kernel is tested against."""
    N, K = w.shape
    n = N * K
    codes = torch.stack([w.packed >> 4, w.packed & 15], dim=1).reshape(-1)[:n].long()
    values = w.code[codes] * absmax_reference(w)[torch.arange(n, device=codes.device) // w.blocksize]
    return values.reshape(N, K).to(dtype or w.dtype)


def finish_split(partials: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Sum split-K float32 partials [SPLIT, M, C] (+ bias) into `out` [M, C]."""
    total = partials.sum(0)
    if bias is not None:
        total += bias.float()
    out.copy_(total)
