"""Compile every NF4 kernel for a GPU without a GPU: Triton's own compiler and ptxas (both ship in the triton
wheel) build each kernel ahead of time for a CUDA target (default sm_90, H100/H200), through our real wrappers.

    python -m workbench.kernels.bench.compile_check [--arch 90] [--bench] [--out DIR]

TRITON_INTERPRET=1 (the CPU tests) runs the kernels as Python and never compiles them, so a kernel can pass
every CPU test and still fail to build on a GPU. Here a stand-in driver reports the target, every kernel launch
compiles (and stops there: nothing runs, the outputs are never written), and each compiled kernel is read
back with cuobjdump: registers per thread, spill (local memory) bytes, shared memory, and how many tensor-core
instructions (Hopper HGMMA / mma.sync HMMA) its SASS holds. Cases: what `nf4_linear`, the transposed backward
and `dequantize_nf4` launch by default (every dtype, nested absmax or not, with and without bias, aligned and
odd K), and with --bench every tile configuration `bench_nf4` tries. Writes compile_check.md / .json to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch

# Shared memory a block may have (bytes): sm_90 (H100/H200) 227 KiB, sm_80 (A100) 163 KiB, others 99 KiB.
MAX_SHARED = {90: 232448, 80: 166912}


def max_shared(arch: int) -> int:
    return MAX_SHARED.get(arch, 101376)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


class _AOTDriver:
    """The parts of a Triton driver that compiling needs, for a GPU this machine does not have."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.utils = self

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_properties(self, device=0):
        return dict(max_shared_mem=max_shared(self.target.arch), multiprocessor_count=132)


@contextlib.contextmanager
def compile_only(arch: int = 90):
    """Within: Triton kernels compile for sm_`arch` at launch and return without running; yields the list of
    (kernel name, CompiledKernel) launched, in order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter never compiles)")
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launched: list = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        launched.append((self.__name__, kernel))
        return kernel

    saved = dict(vars(driver))  # restored as it was (Triton 3.9 creates the default driver lazily, 3.3 a proxy)
    driver.set_active(_AOTDriver(arch))
    JITFunction.run = compile_instead
    try:
        yield launched
    finally:
        JITFunction.run = run
        vars(driver).update(saved)


def _instructions(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode with modifiers, operands) of every SASS instruction."""
    out = []
    for m in re.finditer(r"/\*([0-9a-f]{4,6})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass):
        out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def main_loop(ins: list[tuple[int, str, str]]) -> Counter:
    """Instructions (`_instructions`) of the kernel's longest loop (the body between a backward branch and
    its target), by opcode without modifiers; empty if the kernel has no loop."""
    loops = [(int(t.group(1), 16), a) for a, op, args in ins
             if op.startswith("BRA") and (t := re.search(r"0x([0-9a-f]+)", args)) and int(t.group(1), 16) < a]
    if not loops:
        return Counter()
    lo, hi = max(loops, key=lambda p: p[1] - p[0])
    return Counter(op.split(".")[0] for a, op, _ in ins if lo <= a <= hi)


def resources(kernel) -> dict:
    """Registers, local and shared memory, tensor-core and global-load instruction counts of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", path], capture_output=True, text=True,
                              check=True).stdout
    field = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))  # noqa: E731
    ins = _instructions(sass)
    ops = Counter(op for _, op, _ in ins)  # with modifiers
    base = Counter()
    for op, n in ops.items():
        base[op.split(".")[0]] += n
    meta = kernel.metadata
    loads = {op: n for op, n in ops.items() if op.split(".")[0] in ("LDG", "LDGSTS")}  # LDG.E.64, LDGSTS.E.128..
    loop = main_loop(ins)
    return dict(regs=field("REG"), spill_bytes=field("LOCAL"), stack=field("STACK"),
                shared=max(field("SHARED"), meta.shared), tensor_core=base["HGMMA"] + base["HMMA"],
                hgmma=base["HGMMA"], global_loads=sum(loads.values()),
                byte_loads=sum(n for op, n in loads.items() if op.endswith(".U8")),
                sass_instructions=sum(ops.values()), loop_instructions=sum(loop.values()), loop_ops=dict(loop),
                num_warps=meta.num_warps, num_stages=meta.num_stages)


def _fake_weight(N: int, K: int, dtype: torch.dtype, nested: bool):
    """An NF4Weight with the right tensor sizes and dtypes and no quantisation (nothing runs)."""
    from workbench.kernels import NF4Weight

    n_blocks = -(-(N * K) // 64)
    common = dict(packed=torch.zeros(-(-(N * K) // 2), dtype=torch.uint8), code=torch.zeros(16),
                  shape=(N, K), blocksize=64, dtype=dtype)
    if nested:
        return NF4Weight(absmax=torch.zeros(n_blocks, dtype=torch.uint8), absmax2=torch.zeros(-(-n_blocks // 256)),
                         code2=torch.zeros(256), offset=0.01, **common)
    return NF4Weight(absmax=torch.zeros(n_blocks), **common)


def default_cases():
    """(label, thunk) for what the layer, its backward and dequantisation launch with their default tiles."""
    from workbench.kernels.dequant import dequantize_nf4, dequantize_nf4_bytes
    from workbench.kernels.linear import nf4_linear
    from workbench.kernels.matmul import nf4_matmul

    cases = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        dt = str(dtype).replace("torch.", "")
        for nested in (True, False):
            w = _fake_weight(4096, 4096, dtype, nested)
            tag = f"{dt} {'nested' if nested else 'plain'}"
            cases.append((f"dequant {tag}", lambda w=w: dequantize_nf4(w)))
            cases.append((f"dequant bytes {tag}", lambda w=w: dequantize_nf4_bytes(w, decode=0)))
            for M in (1, 2, 3, 4, 16):
                x = torch.zeros(M, 4096, dtype=dtype)
                cases.append((f"forward M={M} {tag}", lambda x=x, w=w: nf4_linear(x, w)))
            for M in (64, 512):  # nf4_linear dequantises + cuBLAS here; the fused kernel serves 5..63 rows
                x = torch.zeros(M, 4096, dtype=dtype)
                cases.append((f"forward M={M} {tag}", lambda x=x, w=w: nf4_matmul(x, w)))
            for M in (16, 512):
                g = torch.zeros(M, 4096, dtype=dtype)
                cases.append((f"backward M={M} {tag}", lambda g=g, w=w: nf4_matmul(g, w, transpose=True)))
    w = _fake_weight(4096, 4096, torch.bfloat16, True)
    bias = torch.zeros(4096, dtype=torch.bfloat16)
    for M in (1, 16, 512):
        x = torch.zeros(M, 4096, dtype=torch.bfloat16)
        cases.append((f"forward+bias M={M} bf16 nested", lambda x=x: nf4_linear(x, w, bias)))
    odd = _fake_weight(45, 37, torch.bfloat16, True)  # K % 64 != 0: the gathering tile, dequant
    for M in (1, 512):
        x = torch.zeros(M, 37, dtype=torch.bfloat16)
        cases.append((f"forward M={M} bf16 nested odd K", lambda x=x: nf4_linear(x, odd)))
    cases.append(("backward M=512 bf16 nested odd K",
                  lambda: nf4_matmul(torch.zeros(512, 45, dtype=torch.bfloat16), odd, transpose=True)))
    return cases


def bench_cases():
    """(label, thunk) for every tile configuration bench_nf4 tries (bf16, nested), one per distinct kernel."""
    from workbench.kernels.bench.bench_nf4 import MS, SHAPES, _configs
    from workbench.kernels.gemv import nf4_gemv
    from workbench.kernels.matmul import nf4_matmul

    cases, seen = [], set()
    for K, N in SHAPES:
        w = _fake_weight(N, K, torch.bfloat16, True)
        for M in MS:
            x = torch.zeros(M, K, dtype=torch.bfloat16)
            for kind, cfg in _configs(M, K, N):
                key = (kind, min(M, 4) if kind == "gemv" else M <= 16, tuple(sorted(cfg.items())))
                if key in seen:
                    continue
                seen.add(key)
                fn = nf4_gemv if kind == "gemv" else nf4_matmul
                label = f"bench {kind} M={M} {K}x{N} " + " ".join(f"{k}={v}" for k, v in cfg.items())
                cases.append((label, lambda x=x, w=w, fn=fn, cfg=cfg: fn(x, w, **cfg)))
    return cases


def check(cases, arch: int = 90) -> list[dict]:
    """Compile every case for sm_`arch`; one row per kernel launched (errors recorded, not raised)."""
    rows = []
    with compile_only(arch) as launched:
        for label, thunk in cases:
            launched.clear()
            t0 = time.perf_counter()
            try:
                thunk()
            except Exception as e:  # a kernel the compiler refuses: that is the finding
                root = e
                while root.__cause__ is not None:  # Triton chains call sites; the innermost says what is wrong
                    root = root.__cause__
                rows.append(dict(case=label, kernel="?", ok=False, error=f"{type(root).__name__}: {root}"[:600]))
                continue
            seconds = time.perf_counter() - t0
            for name, kernel in launched:
                rows.append(dict(case=label, kernel=name, ok=True, compile_s=round(seconds, 2), **resources(kernel)))
    return rows


def markdown(rows, arch: int) -> str:
    import triton

    bad = [r for r in rows if not r["ok"]]
    local = [r for r in rows if r["ok"] and r["spill_bytes"] + r["stack"]]
    big = [r for r in rows if r["ok"] and r["shared"] > max_shared(arch)]
    lines = [f"### NF4 kernels compiled for sm_{arch} without a GPU ({time.strftime('%Y-%m-%d')})", "",
             f"triton {triton.__version__} (its ptxas and cuobjdump), torch {torch.__version__}. {len(rows)} kernels "
             f"from {len({r['case'] for r in rows})} launches: {len(bad)} failed to compile, {len(big)} need more shared "
             f"memory than a block may have ({max_shared(arch)} bytes; they would fail at launch), "
             f"{len(local)} use local memory. regs: per thread; stack / spill: local-memory bytes per thread; "
             "shared: bytes per block; TC: tensor-core instructions in the SASS (HGMMA = Hopper wgmma); loads: global "
             "load instructions in the SASS (of them single bytes).", "",
             "| launch | kernel | warps | stages | regs | stack | spill | shared | TC (HGMMA) | loads (bytes) | compile s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['case']} | FAILED: {' '.join(r['error'].split())[:200]} | | | | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['kernel']} | {r['num_warps']} | {r['num_stages']} | {r['regs']} | "
                     f"{r['stack']} | {r['spill_bytes']} | {r['shared']} | {r['tensor_core']} ({r['hgmma']}) | "
                     f"{r['global_loads']} ({r['byte_loads']}) | {r['compile_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default %(default)s: H100/H200)")
    ap.add_argument("--bench", action="store_true", help="also every tile configuration bench_nf4 tries")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    cases = default_cases() + (bench_cases() if args.bench else [])
    rows = check(cases, args.arch)
    md = markdown(rows, args.arch)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compile_check.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "compile_check.md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if all(r["ok"] and r["shared"] <= max_shared(args.arch) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
