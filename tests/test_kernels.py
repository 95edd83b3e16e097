"""Triton NF4 kernels against bitsandbytes and their torch references. On a CPU they run in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest), so shapes stay small; on a GPU the same tests run
compiled."""

from __future__ import annotations

import math

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("triton")
import bitsandbytes.functional as F  # noqa: E402

from workbench.kernels import NF4Weight, dequantize_reference  # noqa: E402
from workbench.kernels import dequant, gemv, matmul  # noqa: E402
from workbench.kernels.linear import TritonLinear4bit, replace_linear4bit  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 128), (33, 70), (7, 9), (3, 65), (96, 192)]  # odd sizes, odd element counts, K % 64 != 0


def _weight(N, K, dtype, nested, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * 2).to(dtype).to(DEVICE)
    packed, state = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=nested)
    return packed, state


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequant_is_bit_identical_to_bitsandbytes(shape, nested, dtype):
    packed, state = _weight(*shape, dtype, nested)
    ref = F.dequantize_4bit(packed, state)
    w = NF4Weight.from_bnb(packed, state)
    got = dequant.dequantize_nf4(w)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))  # bit for bit
    assert torch.equal(dequantize_reference(w).view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape, per_program", [((64, 128), 256), ((96, 192), 1024), ((40, 320), 96)])
def test_bytewise_dequant_is_bit_identical_to_bitsandbytes(shape, per_program, nested, dtype):
    # per_program 1024 > the weight's 4,608 bytes / 5: the last program is partial; 96 is no power of two... of
    # bytes, but a whole number of 64-element blocks, which is all the kernel needs
    packed, state = _weight(*shape, dtype, nested)
    ref = F.dequantize_4bit(packed, state)
    w = NF4Weight.from_bnb(packed, state)
    for decode in (0, 1, 2):
        if per_program == 96 and decode:
            continue  # Triton tensors need power-of-two lengths: 96 bytes only for the table-load check below
        got = dequant.dequantize_nf4_bytes(w, bytes_per_program=per_program if per_program != 96 else 128,
                                           decode=decode)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), decode
    with pytest.raises(ValueError, match="whole quantisation blocks"):
        dequant.dequantize_nf4_bytes(NF4Weight.from_bnb(*_weight(3, 65, dtype, nested)))


@pytest.mark.parametrize("decode", [1, 2, 4])
def test_every_code_decode_gives_the_table_loads_result(decode):
    # _decode's select tree and register gather return the same float32 values as a table load per element,
    # so the GEMV and the fused GEMM (forward and transposed) give the same bits
    packed, state = _weight(64, 256, torch.bfloat16, True, seed=3)
    w = NF4Weight.from_bnb(packed, state)
    x1 = torch.randn(2, 256, dtype=torch.bfloat16, device=DEVICE)
    x16 = torch.randn(16, 256, dtype=torch.bfloat16, device=DEVICE)
    g16 = torch.randn(16, 64, dtype=torch.bfloat16, device=DEVICE)
    assert torch.equal(gemv.nf4_gemv(x1, w, DECODE=decode), gemv.nf4_gemv(x1, w, DECODE=0))
    if decode == 4:  # the byte table: the GEMV's alone
        with pytest.raises(ValueError, match="DECODE=4"):
            matmul.nf4_matmul(x16, w, DECODE=4)
        return
    assert torch.equal(matmul.nf4_matmul(x16, w, DECODE=decode), matmul.nf4_matmul(x16, w, DECODE=0))
    assert torch.equal(matmul.nf4_matmul(g16, w, transpose=True, DECODE=decode),
                       matmul.nf4_matmul(g16, w, transpose=True, DECODE=0))
    # the diagnostic decode 3 (no table) is wrong, so the comparison above can fail
    assert not torch.equal(gemv.nf4_gemv(x1, w, DECODE=3), gemv.nf4_gemv(x1, w, DECODE=0))


def test_byte_table_holds_both_nibbles_values_of_every_byte():
    w = NF4Weight.from_bnb(*_weight(8, 128, torch.bfloat16, True))
    table = w.byte_table()
    assert table.shape == (512,) and table.dtype == torch.float32
    for b in (0, 0x0F, 0x70, 0x8E, 0xF1, 0xFF):
        assert table[b] == w.code[b >> 4] and table[256 + b] == w.code[b & 15]
    assert w.byte_table() is table  # built once per weight


def test_an_unknown_decode_is_refused_not_read_as_another():
    # the kernels branch on DECODE at compile time; an unknown value fell through to the last branch
    # (decode 3: the codes as numbers, wrong values) without a word
    w = NF4Weight.from_bnb(*_weight(8, 128, torch.bfloat16, True))
    x = torch.randn(1, 128, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="DECODE=5"):
        gemv.nf4_gemv(x, w, DECODE=5)
    with pytest.raises(ValueError, match="DECODE=4"):
        dequant.dequantize_nf4_bytes(w, decode=4)
    with pytest.raises(ValueError, match="DECODE=7"):
        matmul.nf4_matmul(x.expand(16, 128), w, DECODE=7)


def test_fused_kernels_decode_from_registers_by_default():
    import triton.language as tl

    expected = 2 if hasattr(tl, "gather") else 0
    assert matmul.default_config(16, 4096, 4096)["DECODE"] == expected
    assert matmul.default_config(512, 4096, 4096)["DECODE"] == expected
    assert gemv.default_config(4096, 4096)["DECODE"] == expected


def _tol(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M, N, K", [(5, 96, 128), (33, 70, 192), (7, 45, 37), (18, 64, 256)])
@pytest.mark.parametrize("transpose", [False, True])
def test_fused_matmul_matches_reference(M, N, K, dtype, transpose):
    packed, state = _weight(N, K, dtype, nested=True, seed=M)
    w = NF4Weight.from_bnb(packed, state)
    x = torch.randn(M, N if transpose else K, dtype=dtype, device=DEVICE)
    bias = torch.randn(K if transpose else N, dtype=dtype, device=DEVICE)
    ref = matmul.reference(x, w, bias, transpose=transpose)
    for split in (1, 3):
        got = matmul.nf4_matmul(x, w, bias, transpose=transpose, SPLIT=split)
        assert got.dtype == dtype and got.shape == ref.shape
        assert _rel(got, ref) < _tol(dtype), split


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("nested", [True, False])
def test_gemv_matches_reference(M, nested):
    for dtype in DTYPES:
        packed, state = _weight(40, 320, dtype, nested, seed=M)
        w = NF4Weight.from_bnb(packed, state)
        x = torch.randn(1, M, 320, dtype=dtype, device=DEVICE)  # leading dims are kept
        ref = gemv.reference(x, w)
        for split in (1, 2):
            got = gemv.nf4_gemv(x, w, SPLIT=split, BLOCK_K=128)
            assert got.shape == (1, M, 40) and _rel(got, ref) < _tol(dtype)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("variant", [dict(ACC2D=True), dict(FIXUP=True), dict(FIXUP=True, ACC2D=True),
                                     dict(DECODE=4, FIXUP=True)])  # split 1 below: FIXUP off, decode 4 alone
def test_gemv_probe_variants_match_the_shipped_path(M, variant):
    # decode_probe's variants. ACC2D: scaled codes times x summed in [BLOCK_N, BLOCK_K / 2], reduced at the end.
    # FIXUP: split-K in one launch, partial sums added atomically; the last program of a tile writes the
    # output (+ bias) and zeroes the workspace and its counter for the next call
    for dtype in (torch.float32, torch.bfloat16):
        packed, state = _weight(40, 320, dtype, True, seed=M)
        w = NF4Weight.from_bnb(packed, state)
        x = torch.randn(M, 320, dtype=dtype, device=DEVICE)
        bias = torch.randn(40, dtype=dtype, device=DEVICE)
        for split in (1, 3):
            shipped = gemv.nf4_gemv(x, w, bias, SPLIT=split, BLOCK_K=64, BLOCK_N=16)
            for _ in range(2):  # FIXUP: the second call starts from the workspace the first left
                got = gemv.nf4_gemv(x, w, bias, SPLIT=split, BLOCK_K=64, BLOCK_N=16, **variant)
                assert _rel(got, gemv.reference(x, w, bias)) < _tol(dtype)
                assert _rel(got, shipped) < (1e-6 if dtype == torch.float32 else _tol(dtype))
        if "FIXUP" in variant:
            ws, cnt = gemv._WORKSPACES[x.device]
            assert not ws.any() and not cnt.any()


@pytest.mark.parametrize("M", [1, 3])
def test_gemv_fma_chain_matches_reference(M):
    # CHAIN (the compiled default: per-block sums through gemv._fma_combine) is off under the interpreter,
    # which runs its Python combine ~80x slower than tl.sum; here it runs on a small weight
    for dtype in (torch.float32, torch.bfloat16):
        w = NF4Weight.from_bnb(*_weight(16, 128, dtype, True, seed=M))
        x = torch.randn(M, 128, dtype=dtype, device=DEVICE)
        bias = torch.randn(16, dtype=dtype, device=DEVICE)
        for split in (1, 2):
            got = gemv.nf4_gemv(x, w, bias, SPLIT=split, BLOCK_K=64, BLOCK_N=16, CHAIN=True)
            assert _rel(got, gemv.reference(x, w, bias)) < _tol(dtype)
            summed = gemv.nf4_gemv(x, w, bias, SPLIT=split, BLOCK_K=64, BLOCK_N=16, CHAIN=False)
            assert _rel(got, summed) < (1e-6 if dtype == torch.float32 else _tol(dtype))


def test_gemv_rejects_what_it_cannot_do():
    packed, state = _weight(8, 70, torch.float32, True)
    w = NF4Weight.from_bnb(packed, state)
    with pytest.raises(ValueError, match="multiple of the quantisation block"):
        gemv.nf4_gemv(torch.randn(1, 70, device=DEVICE), w)


def _layer(N, K, dtype, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N, bias=bias, dtype=dtype)
    q = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.load_state_dict(lin.state_dict())
    q = q.to(DEVICE)  # quantises
    q.support_avx512bf16_for_cpu = False
    return q


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_triton_layer_forward_and_input_gradient_match_bitsandbytes(rows):
    ref = _layer(48, 128, torch.float32)
    ours = _layer(48, 128, torch.float32)
    assert replace_linear4bit(ours) == 1 and isinstance(ours, TritonLinear4bit)
    x = torch.randn(rows, 128, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = ref(x), ours(x2)
    assert _rel(y, y_ref) < 1e-5
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert _rel(x2.grad, x.grad) < 1e-5
    assert _rel(ours.bias.grad, ref.bias.grad) < 1e-6
    assert ours.weight.grad is None  # the 4-bit base stays frozen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_dequantise_once_then_matmul_forward_and_backward(dtype, monkeypatch):
    # from DEQUANT_MIN_ROWS rows on, the layer dequantises (bit-exact) and multiplies densely, as bitsandbytes
    # does, rather than run the fused kernel that decodes every weight tile once per row tile
    from workbench.kernels import linear

    rows = linear.DEQUANT_MIN_ROWS
    ref = _layer(48, 128, dtype, seed=1)
    ours = _layer(48, 128, dtype, seed=1)
    replace_linear4bit(ours)
    calls = []
    monkeypatch.setattr(linear, "nf4_matmul", lambda *a, **k: calls.append(k) or matmul.nf4_matmul(*a, **k))
    x = torch.randn(2, rows // 2, 128, dtype=dtype, device=DEVICE, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y_ref, y = ref(x), ours(x2)
    W = F.dequantize_4bit(ref.weight.data, ref.weight.quant_state).to(dtype)  # one rounding either way
    assert torch.equal(y.detach(), torch.nn.functional.linear(x2.detach(), W, ours.bias.to(dtype)))
    assert _rel(y, y_ref) < _tol(dtype)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert torch.equal(x2.grad, g @ W)
    assert _rel(x2.grad, x.grad) < _tol(dtype)
    assert calls == []  # neither pass used the fused kernel
    ours(x2[:, :2].detach())  # 4 rows: the GEMV; 5..63 rows: the fused kernel
    ours(x2[:, :5].detach())
    assert len(calls) == 1


def test_the_layer_builds_its_kernel_view_of_the_weight_once(monkeypatch):
    # NF4Weight.from_bnb syncs the device (the nested offset, to the host) and copies the code table: once
    # per weight, not per call; a new weight storage (re-quantised, moved) builds it again
    from workbench.kernels import linear

    built = []
    real = NF4Weight.from_bnb
    monkeypatch.setattr(linear.NF4Weight, "from_bnb", classmethod(lambda cls, *a: built.append(1) or real(*a)))
    layer = _layer(48, 128, torch.float32)
    replace_linear4bit(layer)
    x = torch.randn(3, 128, device=DEVICE)
    y1, y2 = layer(x), layer(x)
    assert len(built) == 1 and torch.equal(y1, y2)
    other = _layer(48, 128, torch.float32, seed=5)
    layer.weight, layer.bias = other.weight, other.bias  # another Params4bit with its own QuantState
    y3 = layer(x)
    assert len(built) == 2 and _rel(y3, other(x)) < 1e-5
    layer.weight.data = layer.weight.data.clone()  # same QuantState, new storage
    assert torch.equal(layer(x), y3) and len(built) == 3


def test_qlora_benchmark_step_trains_alike_on_both_kernels(tmp_path):
    """workbench/bench/qlora_memory.py's timed step (run on GPUs by launch_scripts/gpu_bench.sh), on a tiny
    Llama: it runs with bitsandbytes' kernels and with ours, and both train to the same loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.bench.qlora_memory import gpu_step

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                      num_hidden_layers=1, vocab_size=128)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    results = {}
    for kernel in ("bnb", "triton"):
        torch.manual_seed(1)  # the same LoRA initialisation and token ids for both
        results[kernel] = gpu_step(kernel, str(tmp_path), device=DEVICE, tokens=16)
    assert all(math.isfinite(r["loss"]) and r["step_s"] > 0 for r in results.values())
    assert results["triton"]["loss"] == pytest.approx(results["bnb"]["loss"], rel=2e-2)
    # the timed step really ran on our kernels (7 linear layers in the block), and on bnb's without them
    assert results["triton"]["our_layers"] == 7 and results["bnb"]["our_layers"] == 0
    if DEVICE == "cuda":  # memory is measured on a GPU only
        assert all(r["peak_gib"] > r["weights_gib"] > 0 for r in results.values())
    else:
        assert all(r["peak_gib"] is None and r["weights_gib"] is None for r in results.values())
