"""Where the NF4 kernels' time goes on a CUDA GPU: the same kernels with each way of turning 4-bit codes into
values (kernels/matmul.py `_decode`: 0 table load per element, the shipped default; 1 select tree; 2
tl.gather from registers; 3 no decode at all, wrong values, the floor the rest of the kernel sets; at M=1
also ACC2D, which accumulates scaled codes times x in two dimensions and reduces once at the end, and
FIXUP, split-K in one launch), and the
dequantise-then-cuBLAS route for large M with our byte-wise dequantisation against bitsandbytes'.

    python -m workbench.kernels.bench.decode_probe [--out DIR]

Writes decode_probe.md to --out (default $OUT or the current directory). Diagnostic: bench_nf4 is the
benchmark of record.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from .bench_nf4 import _bench_time, _best, _configs, _copy_bandwidth, _graph_time

DECODES = {0: "table load", 1: "select tree", 2: "tl.gather", 3: "none (floor)"}


def run(out_dir: str, shapes=((4096, 4096), (8192, 8192))) -> str:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from workbench.kernels import NF4Weight
    from workbench.kernels.nf4_weight import absmax_reference
    from workbench.kernels.dequant import dequantize_nf4, dequantize_nf4_bytes
    from workbench.kernels.gemv import nf4_gemv
    from workbench.kernels.matmul import nf4_matmul

    copy_bw = _copy_bandwidth()
    name = torch.cuda.get_device_name(0)
    lines = [f"### NF4 decode probe ({time.strftime('%Y-%m-%d')}, {name}, copy bandwidth {copy_bw / 1e12:.2f} TB/s)",
             "", "| K x N | what | us | % copy BW | vs cuBLAS bf16 | note |", "| --- | --- | ---: | ---: | ---: | --- |"]

    def row(shape, what, us, moved, cublas, note=""):
        line = (f"| {shape} | {what} | {us:.1f} | {100 * moved / (us * 1e-6) / copy_bw:.0f}% | "
                f"{cublas / us:.2f}x | {note} |")
        lines.append(line)
        print(line, flush=True)

    for K, N in shapes:
        torch.manual_seed(0)
        shape = f"{K}x{N}"
        R = max(2, min(16, -(-(256 << 20) // (N * K // 2))))
        Ws = [torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(R)]
        quant = [F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True) for W in Ws]
        nf4 = [NF4Weight.from_bnb(q, s) for q, s in quant]
        flat = [dataclasses.replace(w, absmax=absmax_reference(w), absmax2=None, code2=None, offset=0.0) for w in nf4]
        dense = Ws[: max(2, min(8, -(-(256 << 20) // (N * K * 2))))]
        W0 = F.dequantize_4bit(*quant[0])
        for M in (1, 16):
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            ref = x.float() @ W0.float().t()
            cublas = _graph_time([lambda W=W: torch.matmul(x, W.t()) for W in dense])
            bnb_t = _graph_time([lambda q=q, s=s: bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in quant])
            moved = nf4[0].nbytes() + M * (K + N) * 2
            row(shape, f"M={M} cuBLAS bf16", cublas, N * K * 2 + M * (K + N) * 2, cublas)
            row(shape, f"M={M} bitsandbytes", bnb_t, moved, cublas)
            kind_cfgs = _configs(M, K, N)
            fn = nf4_gemv if kind_cfgs[0][0] == "gemv" else nf4_matmul
            if M == 1:  # smaller tiles too: the shipped ones take 112-180 registers per thread (sm_90 ptxas)
                kind_cfgs = kind_cfgs + [("gemv", dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT=sp, num_warps=wp, num_stages=3))
                                         for bn, bk, sp, wp in [(8, 256, 2, 2), (4, 512, 1, 2), (8, 512, 1, 4)]]

            def variant(what, weights, moved_bytes, acc=False, cfgs=kind_cfgs, exact=True, **flags):
                """The fastest of `cfgs` with the kernel flags `flags` (DECODE, FIXUP; ACC2D with acc), one row."""
                flags.update({"ACC2D": True} if acc else {})
                what += ", ACC2D" if acc else ""
                b = _best(fn, x, weights, [dict(c, **flags) for _, c in cfgs], True, ref, label=f"M={M} {what}",
                          exact_check=exact)
                if b:
                    tile = {k: v for k, v in b[1].items() if k not in flags}
                    row(shape, f"M={M} ours, {what}", b[0], moved_bytes, cublas, f"{cfgs[0][0]} {tile}")

            accs = (False, True) if M == 1 else (False,)  # ACC2D: 255 registers and a stack at M=4
            for acc in accs:
                # the scales decoded once ahead (float32 absmax, 4.5 bits per weight instead of 4.127): no
                # dependent load chain (uint8 absmax -> code2 table -> absmax2) inside the loop
                variant("decode 2, float32 scales", flat, flat[0].nbytes() + M * (K + N) * 2, acc, DECODE=2)
                if M == 1:  # split-K in one launch (atomic partial sums; the last program writes out) vs two
                    variant("decode 2, split-K in one launch", nf4, moved, acc, DECODE=2, FIXUP=True,
                            cfgs=[kc for kc in kind_cfgs if kc[1]["SPLIT"] > 1])
                for d, label in DECODES.items():
                    if d != 1:  # the select tree: slower than the table load on the H200 (2026-12-04)
                        variant(f"decode {d} ({label})", nf4, moved, acc, exact=d != 3, DECODE=d)
        # dequantisation alone, then the large-M route: dequantise into a workspace + cuBLAS
        ws = torch.empty(N, K, dtype=torch.bfloat16, device="cuda")
        dq_moved = nf4[0].nbytes() + N * K * 2
        t_bnb_dq = _bench_time([lambda q=q, s=s: F.dequantize_4bit(q, s) for q, s in quant])
        row(shape, "dequant bitsandbytes", t_bnb_dq, dq_moved, t_bnb_dq)
        t_old = _bench_time([lambda w=w: dequantize_nf4(w, torch.bfloat16, out=ws) for w in nf4])
        row(shape, "dequant ours (element-wise, shipped)", t_old, dq_moved, t_bnb_dq, "vs column: bnb dequant")
        best_dq = None
        for d in (0, 1, 2):
            for nbytes, warps in ((512, 4), (1024, 4), (2048, 8)):
                try:
                    got = dequantize_nf4_bytes(nf4[0], torch.bfloat16, out=ws, bytes_per_program=nbytes, decode=d,
                                               num_warps=warps)
                    exact = torch.equal(got, W0)
                    t = _bench_time([lambda w=w: dequantize_nf4_bytes(w, torch.bfloat16, out=ws, bytes_per_program=nbytes,
                                                                      decode=d, num_warps=warps) for w in nf4])
                except Exception as e:  # noqa: BLE001
                    print(f"  dequant bytes decode {d} {nbytes}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                row(shape, f"dequant ours byte-wise, decode {d}, {nbytes} B/program", t, dq_moved, t_bnb_dq,
                    f"bit-exact vs bnb: {exact}; vs column: bnb dequant")
                if exact and (best_dq is None or t < best_dq[0]):
                    best_dq = (t, d, nbytes, warps)
        for M in (64, 512, 4096):  # 64: where kernels.linear switches from the fused kernel to the route
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            moved = nf4[0].nbytes() + M * (K + N) * 2
            cublas = _bench_time([lambda W=W: torch.matmul(x, W.t()) for W in dense])
            row(shape, f"M={M} cuBLAS bf16", cublas, moved, cublas)
            row(shape, f"M={M} bitsandbytes", _bench_time(
                [lambda q=q, s=s: bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in quant]), moved, cublas)
            if best_dq:
                _, d, nbytes, warps = best_dq

                def route(w):
                    return torch.matmul(x, dequantize_nf4_bytes(w, torch.bfloat16, out=ws, bytes_per_program=nbytes,
                                                                decode=d, num_warps=warps).t())
                row(shape, f"M={M} ours: byte-wise dequant + cuBLAS", _bench_time(
                    [lambda w=w: route(w) for w in nf4]), moved, cublas, f"decode {d}, {nbytes} B/program")
            if M <= 512:
                ref = x.float() @ W0.float().t()
                for d in (2, 3):
                    b = _best(nf4_matmul, x, nf4, [dict(c, DECODE=d) for _, c in _configs(M, K, N)[:2]], False, ref,
                              exact_check=d != 3)
                    if b:
                        row(shape, f"M={M} ours fused, decode {d} ({DECODES[d]})", b[0], moved, cublas)
        del Ws, quant, nf4, dense, ws
        torch.cuda.empty_cache()
    md = "\n".join(lines) + "\n"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "decode_probe.md"), "w") as f:
        f.write(md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
