"""Recipes: loading, overrides, strict errors, and every shipped recipe validated without weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import config
from workbench.config import Recipe, RecipeError, describe_fields, list_recipes, load_recipe
from workbench.train import main, validate

SHIPPED = list_recipes()


def test_the_issue_recipes_are_shipped():
    assert {"pretrain_tiny_teacher", "kd_tiny", "sft_tiny", "kd_13b_to_7b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates_without_loading_weights(name, monkeypatch):
    import transformers

    def forbidden(*a, **k):
        raise AssertionError("validation must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", forbidden)
    recipe = load_recipe(name)
    validate(recipe)
    assert recipe.name == name


@pytest.mark.parametrize("name", SHIPPED)
def test_every_recipe_starts_with_its_launch_command_and_hardware(name):
    head = []
    for line in (config.RECIPES_DIR / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    text = "\n".join(head)
    assert f"workbench/train.py recipe={name}" in text
    assert "Hardware:" in text


def test_overrides_are_typed():
    r = load_recipe("kd_tiny", [
        "train.lr=1e-3",  # YAML 1.1 reads this as a string; the schema says float
        "train.max_steps=12",
        "train.gradient_checkpointing=true",
        "train.betas=[0.8, 0.9]",
        "data.max_documents=null",
        "distill.losses.0.weight=0.25",
        "student.config.num_hidden_layers=3",
    ])
    assert r.train.lr == pytest.approx(1e-3) and isinstance(r.train.lr, float)
    assert r.train.max_steps == 12
    assert r.train.gradient_checkpointing is True
    assert r.train.betas == [0.8, 0.9]
    assert r.data.max_documents is None
    assert r.distill.losses[0].weight == 0.25
    assert r.student.config == {"num_hidden_layers": 3}


def test_yaml_12_scalars_no_is_a_string_not_false():
    r = load_recipe("kd_tiny", ["train.mixed_precision=no", "data.tokenizer=off"])
    assert r.train.mixed_precision == "no" and r.data.tokenizer == "off"
    assert load_recipe("kd_tiny", ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(RecipeError, match="expected true/false"):
        load_recipe("kd_tiny", ["resume=yes"])


def test_list_items_can_be_appended_and_replaced():
    r = load_recipe("sft_tiny", ["distill.losses.1={name: cross_entropy, weight: 0.5}"])
    assert [t.weight for t in r.distill.losses] == [1.0, 0.5]
    r = load_recipe("kd_tiny", ["distill.losses=[{name: cross_entropy}]"])
    assert [t.name for t in r.distill.losses] == ["cross_entropy"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("trian.lr=1", "did you mean 'train.lr'"),
        ("train.max_step=5", "did you mean 'train.max_steps'"),
        ("distill.losses.0.temprature=2", "did you mean 'distill.losses.0.temperature'"),
        ("student.tinny=x", "did you mean 'student.tiny'"),
        ("train.max_steps=abc", "train.max_steps: expected an integer"),
        ("train.max_steps=2.5", "train.max_steps: expected an integer"),
        ("train.lr=-1", "train.lr: must be > 0"),
        ("train.gradient_checkpointing=maybe", "expected true/false"),
        ("train.mixed_precision=bf61", "did you mean 'bf16'"),
        ("distill.losses.0.name=forward_kll", "did you mean 'forward_kl'"),
        ("data.val_fraction=1.5", "data.val_fraction: must be in (0, 1)"),
        ("distill.losses.5.weight=1", "index 5 out of range"),
        ("train.lr.x=1", "is a value, not a section"),
        ("resume", "is not key=value"),
        ("distill.losses.0.normalize=true", "normalize: applies to hidden_mse only"),
        ("teacher=5", "teacher: expected a mapping, got 5"),  # the section's name, no trailing dot
        ("data.dataset=", "data.dataset: is empty"),  # the value forgotten: not the current directory
        ("data.tokenizer=", "data.tokenizer: is empty"),
        ("teacher.recipe=", "teacher.recipe: is empty"),
        ("eval.task_file= ", "eval.task_file: is empty"),
        ("distill.losses.0=5", "distill.losses.0: expected a mapping, got 5"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(RecipeError, match=None) as err:
        load_recipe("kd_tiny", [override])
    assert expected in str(err.value)


def test_distillation_loss_without_teacher_is_an_error():
    with pytest.raises(RecipeError, match=r"distill.losses: \['forward_kl'\] need a teacher"):
        load_recipe("sft_tiny", ["distill.losses.0.name=forward_kl"])


def test_model_source_must_be_unique():
    with pytest.raises(RecipeError, match="student.name_or_path/tiny/recipe/prune: give exactly one"):
        load_recipe("sft_tiny", ["student.name_or_path=gpt2"])


def test_unknown_recipe_suggests_a_close_one():
    with pytest.raises(RecipeError, match="did you mean 'kd_tiny'"):
        load_recipe("kd_tin")


def test_unknown_key_in_a_yaml_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("student: {tiny: llama-2layer-64}\ntrain: {warmup: 3}\n")
    with pytest.raises(RecipeError, match="unknown key 'train.warmup'; did you mean 'train.warmup_steps'"):
        load_recipe(str(p))


def test_unknown_tiny_config_is_caught_by_validation():
    with pytest.raises(RecipeError, match="did you mean 'llama-2layer-64'"):
        validate(load_recipe("sft_tiny", ["student.tiny=llama-2layer-46"]))


def test_teacher_recipe_cycle_is_caught(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"teacher: {{recipe: {b}}}\ndistill: {{losses: [{{name: forward_kl}}]}}\n")
    b.write_text(f"teacher: {{recipe: {a}}}\ndistill: {{losses: [{{name: forward_kl}}]}}\n")
    with pytest.raises(RecipeError, match="cycle"):
        validate(load_recipe(str(a)))


def test_missing_local_data_is_caught_by_validation(tmp_path):
    with pytest.raises(RecipeError, match="no .jsonl/.json/.txt/.parquet files"):
        validate(load_recipe("sft_tiny", [f"data.dataset={tmp_path}/nothing/*.jsonl"]))


def test_fingerprint_ignores_output_but_not_training():
    a = load_recipe("kd_tiny")
    assert a.fingerprint() == load_recipe("kd_tiny", ["output.dir=/elsewhere", "resume=true"]).fingerprint()
    assert a.fingerprint() != load_recipe("kd_tiny", ["train.lr=1e-4"]).fingerprint()


def test_every_field_is_documented():
    rows = describe_fields(Recipe)
    assert len(rows) > 40
    undocumented = [key for key, _, doc in rows if not doc]
    assert undocumented == []


def test_cli_dry_run_and_errors(capsys):
    assert main(["recipe=kd_13b_to_7b", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "meta-llama/Llama-2-13b-hf" in out.out and "is valid" in out.err
    assert main(["recipe=kd_tiny", "train.lrr=1", "--dry-run"]) == 2
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert main(["--dry-run"]) == 2
    assert main(["recipe=kd_tiny", "--bogus"]) == 2
    assert main(["--help-recipe"]) == 0
    assert "train.grad_accum_steps" in capsys.readouterr().out
    assert main(["--list"]) == 0  # every shipped recipe, with what it does
    listed = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(listed) == set(SHIPPED)
    assert all(about.strip() == load_recipe(name).description for name, about in listed.items())


@pytest.mark.parametrize("main_process", [True, False])
def test_cli_run_prints_once_and_leaves_the_process_group(monkeypatch, capsys, main_process):
    """Every process waits for the others, then destroys its process group before exiting: a gloo process
    that exits with the group alive can abort in interpreter shutdown ("terminate called without an
    active exception"). Only the main process prints the summary."""
    from workbench import distributed, train

    calls = []

    class FakeAccelerator:
        is_main_process = main_process

        def wait_for_everyone(self):
            calls.append("barrier")

        def end_training(self):
            calls.append("end")

    metrics = {"recipe": "sft_tiny", "step": 1, "train_tokens": 8, "train_seconds": 0.1, "val_tokens": 8,
               "student_val_ppl": 2.0}
    monkeypatch.setattr(distributed, "make_accelerator", lambda recipe: FakeAccelerator())
    monkeypatch.setattr(train, "run", lambda recipe, acc: calls.append("run") or metrics)
    monkeypatch.setattr(train, "_setup_logging", lambda: None)
    assert main(["recipe=sft_tiny"]) == 0
    assert calls == ["run", "barrier", "end"]
    assert ("sft_tiny: 1 steps" in capsys.readouterr().out) == main_process


def test_installed_package_carries_the_recipes(tmp_path):
    """A non-editable install (a wheel, `pip install .`) finds every shipped recipe without the checkout."""
    from conftest import REPO

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--no-compile", "--target", str(site), str(REPO)], check=True, capture_output=True)
    code = ("from workbench.config import RECIPES_DIR, list_recipes, load_recipe; "
            "print(RECIPES_DIR); print(','.join(list_recipes())); load_recipe('kd_tiny')")
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    where, names = done.stdout.split()
    assert where.startswith(str(site)) and set(names.split(",")) == set(list_recipes())


@pytest.mark.parametrize("world", [None, "2"])
def test_exit_skips_finalisation_only_in_multi_process_runs(monkeypatch, world):
    from workbench import train

    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    exits = []

    def fake_os_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(train.os, "_exit", fake_os_exit)
    with pytest.raises(SystemExit) as e:
        train._exit(3)
    assert e.value.code == 3
    assert exits == ([] if world is None else [3])  # os._exit only with other processes



def test_third_party_warnings_show_once_per_run_and_ours_always(tmp_path, monkeypatch):
    """A library that wraps each call in warnings.catch_warnings() (as DeepSpeed's collectives do) resets
    Python's once-per-location memory; the command-line tools still show its deprecation once."""
    import importlib.util
    import warnings

    import workbench

    lib = tmp_path / "somelib.py"
    lib.write_text("import warnings\n\ndef call():\n    with warnings.catch_warnings():\n        pass\n"
                   "    warnings.warn('old API', FutureWarning)\n")
    spec = importlib.util.spec_from_file_location("somelib", lib)
    somelib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(somelib)
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda m, c, f, ln, file=None, line=None: shown.append((str(m), f)))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        workbench.third_party_warnings_once()
        for _ in range(50):
            somelib.call()
        for _ in range(3):  # ours: every time
            warnings.warn_explicit("ours", UserWarning, str(Path(workbench.__file__).parent / "trainer.py"), 1)
    assert [m for m, _ in shown] == ["old API", "ours", "ours", "ours"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["parallel.pipeline_stages=0"], "pipeline_stages: must be >= 1"),
        (["parallel.pipeline_stages=2", "parallel.pipeline_microbatches=3"], "3 does not divide the step's 8 sequences"),
        (["parallel.pipeline_stages=2", "distill.losses.0.name=hidden_mse"], "not with hidden-state and attention losses"),
        (["parallel.pipeline_stages=2", "train.gradient_checkpointing=true"], "not with gradient checkpointing"),
        (["parallel.pipeline_stages=2", "distill.onpolicy.method=gkd"], "not with on-policy training"),
    ],
)
def test_pipeline_recipes_are_checked_without_weights(overrides, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe("kd_tiny", overrides)
    assert expected in str(err.value)


def test_more_pipeline_stages_than_blocks_is_an_error_before_loading():
    from workbench.train import validate

    with pytest.raises(RecipeError, match="5 stages for a student of 4 blocks"):
        validate(load_recipe("kd_tiny", ["parallel.pipeline_stages=5", "parallel.pipeline_microbatches=4"]))
    with pytest.raises(RecipeError, match=r"pipeline_blocks: \[2, 1\] sum to 3, but the student has 4 blocks"):
        validate(load_recipe("kd_tiny", ["parallel.pipeline_stages=2", "parallel.pipeline_blocks=[2, 1]"]))
    with pytest.raises(RecipeError, match="pipeline_blocks: one count >= 1 per stage"):
        load_recipe("kd_tiny", ["parallel.pipeline_stages=2", "parallel.pipeline_blocks=[4]"])
    from workbench.pipeline import stage_layers

    assert stage_layers(6, 2, [4, 2]) == [range(0, 4), range(4, 6)] and stage_layers(5, 2) == [range(0, 3), range(3, 5)]


def test_attention_losses_name_the_attention_they_need():
    with pytest.raises(RecipeError, match="student.attn_implementation: .*flash_attention_2 never forms; set it to eager"):
        load_recipe("kd_tiny_hidden_attn", ["student.attn_implementation=flash_attention_2"])
    with pytest.raises(RecipeError, match="teacher.attn_implementation"):
        load_recipe("kd_tiny_hidden_attn", ["teacher.attn_implementation=flash_attention_2"])
    load_recipe("kd_tiny_hidden_attn", ["student.attn_implementation=eager"])
    with pytest.raises(RecipeError, match="train.compile: attention losses"):
        load_recipe("kd_tiny_hidden_attn", ["train.compile=true"])


def test_an_override_given_twice_counts_the_last_and_says_so(caplog):
    from workbench.config import load_recipe

    r = load_recipe("kd_tiny", ["train.lr=1e-3", "train.max_steps=7", "train.lr=2e-3"])
    assert r.train.lr == 2e-3 and r.train.max_steps == 7
    assert "train.lr given twice ('1e-3', then '2e-3'): the last one counts" in caplog.text
    caplog.clear()
    load_recipe("kd_tiny", ["distill.losses.0={name: forward_kl}", "distill.losses.0.weight=2"])  # not the same key
    assert "given twice" not in caplog.text
