"""Where the NF4 kernels' time goes on a CUDA GPU: the same kernels with each way of turning 4-bit codes into
values (kernels/matmul.py `_decode`: 0 table load per element, the shipped default; 1 select tree; 2
tl.gather from registers; 3 no decode at all, wrong values, the floor the rest of the kernel sets; at M=1
also ACC2D, which accumulates scaled codes times x in two dimensions and reduces once at the end, and
FIXUP, split-K in one launch), and the
dequantise-then-cuBLAS route for large M with our byte-wise dequantisation against bitsandbytes'.

    python -m workbench.kernels.bench.decode_probe [--out DIR]
    python -m workbench.kernels.bench.decode_probe --sass [--no-record]    # no GPU needed

Writes decode_probe.md to --out (default $OUT or the current directory). Diagnostic: bench_nf4 is the
benchmark of record. --sass compiles the GEMV and the small-M GEMM for sm_90 on this machine (Triton's
compiler and ptxas, kernels/bench/compile_check.py) and counts the machine instructions of their main loop
per 4-bit code, for each decode, next to a model of the shared-memory bank conflicts of the lookups.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from .bench_nf4 import _bench_time, _best, _configs, _copy_bandwidth, _graph_time

from ..gemv import GEMV_DECODES as DECODES


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
                    # the select tree: slower than the table load on the H200 (2026-12-04); the byte table is
                    # the GEMV's alone, tried with its 1-D accumulator only (each variant costs compile time)
                    if d != 1 and (d != 4 or (fn is nf4_gemv and not acc)):
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


def lds_wavefronts(words: torch.Tensor, banks: int = 32) -> float:
    """Mean shared-memory wavefronts per warp-wide load, `words` [loads, 32 lanes] of 4-byte word addresses:
    per load, the most distinct words any one bank must serve (lanes reading the same word share it)."""
    bank = words % banks
    key = torch.unique(bank * (1 << 20) + words + torch.arange(len(words))[:, None] * (1 << 30))  # distinct
    load, b = key // (1 << 30), (key % (1 << 30)) // (1 << 20)
    per = torch.zeros(len(words), banks, dtype=torch.long).index_put_((load, b), torch.ones_like(load), accumulate=True)
    return per.max(1).values.float().mean().item()


def bank_model(rows: int = 512, K: int = 4096) -> dict:
    """Modelled wavefronts per warp-wide table lookup in the GEMV, nibble tables (16 entries, decodes 0-2's
    values) vs the byte table (decode 4), for NF4 weights of N(0, 0.02) quantised by bitsandbytes. Lanes as
    Triton lays out the GEMV's byte tile at its default tile on sm_90 (TTGIR: 8 contiguous bytes per lane,
    16 lanes per row, 2 rows per warp); the k-th lookup of a warp reads the k-th byte of each lane."""
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(0)
    W = (torch.randn(rows, K, generator=g) * 0.02).to(torch.bfloat16)
    packed = F.quantize_4bit(W, blocksize=64, quant_type="nf4")[0].reshape(rows, K // 2).long()
    lane = torch.arange(32)
    loads = [packed[r + lane // 16, (lane % 16) * 8 + k + c] for r in range(0, rows, 2)
             for c in range(0, K // 2, 128) for k in range(8)]
    b = torch.stack(loads)
    return {"nibble table, high nibbles": lds_wavefronts(b >> 4), "nibble table, low nibbles": lds_wavefronts(b & 15),
            "byte table, high values": lds_wavefronts(b), "byte table, low values": lds_wavefronts(256 + b),
            "byte table, uniform random bytes": lds_wavefronts(torch.randint(0, 256, b.shape, generator=g))}


def compiled_loop(kind: str, M: int, decode: int, arch: int = 90) -> dict:
    """compile_check.resources of the GEMV ("gemv") or fused GEMM ("matmul") for x [M, 4096] @ W [4096, 4096]
    bf16 nested at the default tile, compiled for sm_`arch` (nothing runs), with `codes`: the 4-bit codes one
    thread handles per iteration of the main loop."""
    from workbench.kernels.gemv import default_config as gemv_config, nf4_gemv
    from workbench.kernels.matmul import default_config as mm_config, nf4_matmul

    from .compile_check import _fake_weight, compile_only, resources

    w = _fake_weight(4096, 4096, torch.bfloat16, True)
    with compile_only(arch) as launched:
        (nf4_gemv if kind == "gemv" else nf4_matmul)(torch.zeros(M, 4096, dtype=torch.bfloat16), w, DECODE=decode)
    cfg = gemv_config(4096, 4096) if kind == "gemv" else mm_config(M, 4096, 4096)
    tile = cfg["BLOCK_N"] * cfg["BLOCK_K"] if kind == "gemv" else cfg["BLOCK_COLS"] * cfg["BLOCK_RED"]
    return dict(resources(launched[0][1]), codes=tile / (cfg["num_warps"] * 32))


def sass_table(arch: int = 90) -> str:
    """Markdown: the main loop's SASS instructions per 4-bit code of the GEMV (M = 1, 2, 4) and the M = 16
    GEMM at their default tiles, for each decode, and the bank model; compiled here, nothing runs."""
    import triton

    from workbench.evaluation import machine

    lines = [f"### NF4 GEMV machine code per 4-bit code, compiled for sm_{arch} without a GPU ({time.strftime('%Y-%m-%d')})",
             "", f"Machine: {machine()}; triton {triton.__version__} (its ptxas and cuobjdump), torch {torch.__version__}. "
             "`python -m workbench.kernels.bench.decode_probe --sass`: W 4096 x 4096 bf16 with nested absmax, "
             "default tiles; the main loop's instructions (a backward branch to its target) over the 4-bit codes one "
             "thread handles per iteration. FFMA, LDS (shared-memory loads), LDG (global loads), BAR (barriers): "
             "per code.", "",
             "| kernel | M | decode | regs | loop instructions | per code | FFMA | LDS | LDG | BAR |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    cases = [("gemv", M, d) for M in (1, 2, 4) for d in (0, 2, 4)] + [("matmul", 16, d) for d in (0, 2)]
    for kind, M, d in cases:
        r = compiled_loop(kind, M, d, arch)
        ops, codes = r["loop_ops"], r["codes"]
        lines.append(f"| {kind} | {M} | {d} ({DECODES[d]}) | {r['regs']} | {r['loop_instructions']} | "
                     f"{r['loop_instructions'] / codes:.2f} | {ops.get('FFMA', 0) / codes:.2f} | "
                     f"{ops.get('LDS', 0) / codes:.2f} | {ops.get('LDG', 0) / codes:.2f} | {ops.get('BAR', 0)} |")
    lines += ["", "| table lookups in the GEMV (model) | wavefronts per warp-wide load |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in bank_model().items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sass", action="store_true", help="machine code per 4-bit code, compiled here (no GPU)")
    ap.add_argument("--no-record", action="store_true", help="with --sass: do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.sass:
        from workbench.bench._report import publish

        publish(sass_table(), record=not args.no_record)
        return 0
    if not torch.cuda.is_available():
        print("decode_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
