"""The NF4 kernels compiled for an H100 (sm_90) on this CPU-only machine: Triton's compiler and the ptxas in
the triton wheel build them through our wrappers (kernels/bench/compile_check.py). The interpreter tests in
test_kernels.py never compile a kernel, so they cannot see what only the compiler refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("bitsandbytes")

SCRIPT = r"""
import json, sys
from workbench.kernels.bench import compile_check as cc
want = lambda label: ("bfloat16 nested" in label or "bf16" in label
                      or ("float32 nested" in label and ("M=16" in label or "M=512" in label)))
cases = [c for c in cc.default_cases() if want(c[0])]
cases += [c for c in cc.bench_cases() if "4096x4096" in c[0] and (" M=64 " in c[0] or " M=512 " in c[0])]
json.dump(cc.check(cases, 90), sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path_factory.mktemp("triton_cache")), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert rows, "nothing was compiled"
    return rows


def test_every_kernel_compiles_for_sm90_and_fits_a_block(compiled):
    from workbench.kernels.bench.compile_check import max_shared

    failed = [(r["case"], r["error"]) for r in compiled if not r["ok"]]
    assert not failed, failed  # e.g. nested absmax: two return types in _scales (interpreter-only tests passed)
    too_big = [(r["case"], r["shared"]) for r in compiled if r["shared"] > max_shared(90)]
    assert not too_big, too_big


def test_bf16_kernels_keep_to_registers_and_use_tensor_cores(compiled):
    rows = {r["case"]: r for r in compiled}
    assert all(r["ok"] for r in rows.values()), "see test_every_kernel_compiles_for_sm90_and_fits_a_block"
    for case, r in rows.items():
        if "odd K" in case:
            continue  # the gathering tile for K % 64 != 0 (tiny models): correct, not tuned
        if "bfloat16" in case or "bf16" in case or case.startswith("bench"):
            assert r["stack"] == 0 and r["spill_bytes"] == 0, (case, r)
    assert rows["forward M=512 bfloat16 nested"]["hgmma"] > 0  # Hopper wgmma for prefill / training
    assert rows["backward M=512 bfloat16 nested"]["hgmma"] > 0
    assert rows["forward M=16 bfloat16 nested"]["tensor_core"] > 0  # verification-sized M: mma.sync
    gemv = rows["forward M=1 bfloat16 nested"]
    assert gemv["kernel"] == "_nf4_gemv_kernel"
    # packed weights load as 8/16-byte vectors: one byte per instruction (33 in the SASS, from a mask on
    # element columns 2j < K) made decode issue a load per weight byte; the uint8 absmax keeps 1-2
    assert gemv["byte_loads"] <= 2, gemv


def test_float32_matmul_uses_tensor_cores_without_a_large_stack(compiled):
    # Triton's "ieee" float32 dot spilled 3.3-10.7 KB per thread at these tiles; tf32x3 keeps (almost) all in
    # registers and runs on tensor cores
    for case in ("forward M=16 float32 nested", "forward M=512 float32 nested", "backward M=512 float32 nested"):
        r = next(r for r in compiled if r["case"] == case)
        assert r["ok"], r
        assert r["tensor_core"] > 0 and r["stack"] <= 256, (case, r)


def test_gemv_loop_spends_one_fma_per_code_and_row():
    # the per-block sums of code * x: a chain of FMAs in each thread (gemv._fma_combine), where tl.sum of
    # the products compiled to a multiply per pair of codes, an FMA and then an add (0.53 FFMA + 0.52 FMUL +
    # 0.59 FADD per code at M=1, decode 2); the block sums are accumulated per block and summed over the
    # blocks after the loop
    code = r"""
import json, sys
from workbench.kernels.bench.decode_probe import compiled_loop
json.dump([dict(compiled_loop("gemv", M, d), M=M) for M in (1, 2, 4) for d in (2, 3, 4)], sys.stdout)
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in json.loads(proc.stdout):
        ops, codes, M = r["loop_ops"], r["codes"], r["M"]
        assert ops.get("FFMA", 0) >= M * codes, r
        assert ops.get("FMUL", 0) + ops.get("FADD", 0) <= 0.5 * M * codes, r
