"""NF4 matmul benchmark on a CUDA GPU: our Triton kernels vs bf16 cuBLAS (torch.matmul) vs bitsandbytes
(bnb.matmul_4bit), for LLM weight shapes and decode-to-prefill batch sizes.

    python -m workbench.kernels.bench.bench_nf4 [--quick] [--out DIR]

Per (K x N weight, M rows, pass): microseconds (median), ratio to cuBLAS bf16 and to bitsandbytes, and achieved
bandwidth (bytes a kernel must move: packed weights + scales + activations + output) as a fraction of a
measured device-to-device copy. Small M is timed as CUDA-graph replays of launches over R rotated weight
copies (more than the L2 holds), large M with triton.testing.do_bench, which flushes the L2 before every
run. From M = 512 on, the input gradient (grad_out [M, N] @ W -> [M, K] vs cuBLAS bf16 vs bitsandbytes'
dequantise-then-matmul, which is what its backward does) is timed too. From kernels.linear.DEQUANT_MIN_ROWS
rows on, "ours" is what the layer runs there: our byte-wise dequantisation, then cuBLAS. Below that, a few
tile configurations of each kernel are tried and the fastest is reported with its config.
Writes nf4_bench.md / nf4_bench.json to --out (default $OUT or the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]  # (K in_features, N out_features)
MS = [1, 2, 4, 8, 16, 64, 512, 4096]  # decode, speculative verification (2-16), prefill / training
DGRAD_MIN_M = 512  # from this M on, the input gradient (x @ W, the transposed kernel) is timed as well


def _copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    import triton.testing

    n = 1 << 28  # 256M bf16 = 512 MiB each way
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    del a, b
    return 2 * n * 2 / (ms * 1e-3)


def _graph_time(fns, reps: int = 50) -> float:
    """Median microseconds per call of CUDA-graph replays of `fns` (one launch per rotated input)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / len(fns))
    return sorted(times)[len(times) // 2]


def _bench_time(fns) -> float:
    import triton.testing

    i = [0]

    def call():  # rotate inputs as well; do_bench also flushes the L2 between runs
        fns[i[0] % len(fns)]()
        i[0] += 1

    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median") * 1e3


def _time(fns, small: bool) -> float:
    return _graph_time(fns) if small else _bench_time(fns)


def _configs(M: int, K: int, N: int):
    """(kind, config) candidates for our kernels at this size."""
    if M <= 4:
        out = []
        for bn, bk, warps in [(16, 512, 4), (32, 256, 4), (32, 512, 8), (64, 256, 8)]:
            tiles = -(-N // bn)
            split = max(1, min(K // bk, -(-4 * 132 // tiles)))
            out.append(("gemv", dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT=split, num_warps=warps, num_stages=3)))
        return out
    if M <= 16:
        out = []
        for bc, br, warps in [(64, 128, 4), (64, 256, 4), (128, 128, 4), (32, 256, 4)]:
            tiles = -(-N // bc)
            split = max(1, min(K // br, -(-2 * 132 // tiles)))
            out.append(("matmul", dict(BLOCK_M=16, BLOCK_COLS=bc, BLOCK_RED=br, GROUP_M=1, SPLIT=split,
                                       num_warps=warps, num_stages=4)))
        return out
    # larger tiles: each fits sm_90's shared memory with no local memory (kernels/bench/compile_check.py)
    if M <= 64:
        return [("matmul", dict(BLOCK_M=64, BLOCK_COLS=bc, BLOCK_RED=br, GROUP_M=8, SPLIT=1, num_warps=w, num_stages=s))
                for bc, br, w, s in [(64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3)]]
    return [("matmul", dict(BLOCK_M=bm, BLOCK_COLS=bc, BLOCK_RED=br, GROUP_M=8, SPLIT=1, num_warps=w, num_stages=s))
            for bm, bc, br, w, s in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 256, 64, 8, 3),
                                     (128, 64, 128, 4, 3)]]


def _best(fn, x, ws, cfgs, small: bool, ref, label: str = "", exact_check: bool = True):
    """(microseconds, config, rel err) of the fastest of `cfgs` for fn(x, w, **cfg) over the rotated weights
    `ws`, among those that run (a config the compiler or the GPU refuses is reported and skipped) and, unless
    exact_check is off, are right; None if none is."""
    best = None
    for cfg in cfgs:
        try:
            y = fn(x, ws[0], **cfg)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if exact_check and not err < 2e-2:
                print(f"  {label} {cfg}: WRONG (rel err {err:.3g})", flush=True)
                continue
            t = _time([lambda w=w: fn(x, w, **cfg) for w in ws], small)
        except Exception as e:  # noqa: BLE001
            print(f"  {label} {cfg}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        if best is None or t < best[0]:
            best = (t, cfg, err)
    return best


def _bench_one(K, N, M, mode, quant, nf4, dense, copy_bw) -> dict | None:
    """One (shape, M, pass): cuBLAS bf16, bitsandbytes and the fastest of our configs; None if all failed."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from workbench.kernels.gemv import nf4_gemv
    from workbench.kernels.linear import DEQUANT_MIN_ROWS, nf4_linear, nf4_linear_grad_input
    from workbench.kernels.matmul import nf4_matmul

    small = M <= 64
    route = M >= DEQUANT_MIN_ROWS  # what the layer runs there: our dequantisation, then cuBLAS
    W0 = F.dequantize_4bit(*quant[0]).float()
    if mode == "fwd":
        x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        ref = x.float() @ W0.t()
        t_cublas = _time([lambda W=W: torch.matmul(x, W.t()) for W in dense], small)
        t_bnb = _time([lambda q=q, s=s: bnb.matmul_4bit(x, q.t(), quant_state=s) for q, s in quant], small)
        cands = [("dequant+cuBLAS", {})] if route else _configs(M, K, N)
    else:  # input gradient: g [M, N] @ W [N, K]; bitsandbytes' backward dequantises W, then one matmul
        x = torch.randn(M, N, dtype=torch.bfloat16, device="cuda")
        ref = x.float() @ W0
        t_cublas = _time([lambda W=W: torch.matmul(x, W) for W in dense], small)
        t_bnb = _time([lambda q=q, s=s: torch.matmul(x, F.dequantize_4bit(q, s).to(torch.bfloat16))
                       for q, s in quant], small)
        cands = [("dequant+cuBLAS", {})] if route else \
            [(kind, dict(cfg, transpose=True)) for kind, cfg in _configs(M, N, K)]
    kind = cands[0][0]  # one kind of kernel per (M, pass)
    fn = {"gemv": nf4_gemv, "matmul": nf4_matmul,
          "dequant+cuBLAS": nf4_linear if mode == "fwd" else nf4_linear_grad_input}[kind]
    best = _best(fn, x, nf4, [cfg for _, cfg in cands], small, ref, label=f"K={K} N={N} M={M} {mode} {kind}")
    if best is None:
        return None
    t, cfg, err = best
    moved = nf4[0].nbytes() + M * K * 2 + M * N * 2
    row = dict(K=K, N=N, M=M, mode=mode, ours_us=t, cublas_us=t_cublas, bnb_us=t_bnb, kernel=kind, config=cfg,
               rel_err=err, bandwidth_frac=moved / (t * 1e-6) / copy_bw,
               speedup_vs_cublas=t_cublas / t, speedup_vs_bnb=t_bnb / t)
    print(f"K={K:5d} N={N:5d} M={M:4d} {mode:5s} ours {t:8.1f} us ({kind})  cuBLAS bf16 {t_cublas:8.1f}  "
          f"bnb {t_bnb:8.1f}  x{row['speedup_vs_cublas']:.2f} vs cuBLAS  x{row['speedup_vs_bnb']:.2f} vs bnb  "
          f"{100 * row['bandwidth_frac']:.0f}% of copy BW", flush=True)
    return row


def run(shapes, ms, out_dir: str, rotate_bytes: int = 256 << 20) -> list[dict]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import triton

    from workbench.kernels import NF4Weight

    copy_bw = _copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for K, N in shapes:
        torch.manual_seed(0)
        dense_bytes = N * K * 2
        R = max(2, min(16, -(-rotate_bytes // (N * K // 2))))  # NF4 copies to exceed the L2 several times
        Rd = max(2, min(8, -(-rotate_bytes // dense_bytes)))
        Ws = [torch.randn(N, K, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(max(R, Rd))]
        quant = [F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=True) for W in Ws[:R]]
        nf4 = [NF4Weight.from_bnb(q, s) for q, s in quant]
        dense = Ws[:Rd]
        for M in ms:
            for mode in ("fwd", "dgrad") if M >= DGRAD_MIN_M else ("fwd",):
                row = _bench_one(K, N, M, mode, quant, nf4, dense, copy_bw)
                if row is not None:
                    rows.append(row)
        del Ws, quant, nf4, dense
        torch.cuda.empty_cache()
    versions = dict(torch=torch.__version__, triton=triton.__version__, bitsandbytes=bnb.__version__,
                    cuda=torch.version.cuda, gpu=props.name)
    md = _markdown(rows, versions, copy_bw)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "nf4_bench.json"), "w") as f:
        json.dump(dict(versions=versions, copy_bandwidth=copy_bw, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, "nf4_bench.md"), "w") as f:
        f.write(md)
    print(md)
    return rows


def _markdown(rows, versions, copy_bw) -> str:
    lines = [f"### NF4 matmul: ours vs cuBLAS bf16 vs bitsandbytes ({time.strftime('%Y-%m-%d')})", "",
             f"GPU: {versions['gpu']}; torch {versions['torch']} (CUDA {versions['cuda']}), triton {versions['triton']}, "
             f"bitsandbytes {versions['bitsandbytes']}. Measured copy bandwidth {copy_bw / 1e12:.2f} TB/s (read+write). "
             "M <= 64: CUDA-graph replays over rotated weight copies; larger M: do_bench with L2 flush. Median us.", "",
             "| K x N | M | pass | ours us | kernel | cuBLAS bf16 us | bnb us | vs cuBLAS | vs bnb | % copy BW |",
             "| --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['mode']} | {r['ours_us']:.1f} | {r['kernel']} | {r['cublas_us']:.1f} | "
                     f"{r['bnb_us']:.1f} | {r['speedup_vs_cublas']:.2f}x | {r['speedup_vs_bnb']:.2f}x | "
                     f"{100 * r['bandwidth_frac']:.0f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, M in {1, 16, 512}")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,4096x11008 (K x N)")
    ap.add_argument("--ms", default=None, help="e.g. 1,4,512")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_nf4 needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    if args.quick:
        shapes, ms = shapes[:1], [1, 16, 512]
    run(shapes, ms, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
