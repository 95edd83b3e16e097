"""Everyday mistakes end in one clear line and exit status 2, no traceback; --dry-run finds everything that
can be found without training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import FAST, REPO, one_error_line
from workbench.train import main


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    return one_error_line(code, capsys.readouterr().err)


# YAML aliases, each level nine of the one before: 500 bytes that expand to 9^9 strings
BOMB = "[&a [x,x,x,x,x,x,x,x,x], " + ", ".join(f"&{c} [{','.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_data")
    doc = json.dumps({"text": "def f(x):\n    return x\n" * 30})
    (d / "empty.jsonl").write_text("")
    (d / "malformed.jsonl").write_text(f"{doc}\n{doc}\n\n{{oops\n{doc}\n")
    (d / "number.jsonl").write_text(f"{doc}\n{doc}\n" + json.dumps({"text": 12}) + "\n")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (d / "random.parquet").write_bytes(bytes(range(256)) * 64)  # (was told 'not UTF-8 text ...; a binary file?')
    (d / "body.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (d / "deep.jsonl").write_text(f"{doc}\n{doc}\n" + "[" * 5000 + "]" * 5000 + "\n")  # (json: RecursionError)
    (d / "array.jsonl").write_text(f"{doc}\n[1, 2]\n{doc}\n")
    (d / "dup.yaml").write_text("name: dup\ntrain:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    (d / "syntax.yaml").write_text("name: syntax\ntrain:\n  lr: [1,\n")
    (d / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (d / "blank.yaml").write_text("# nothing here\n")
    (d / "task.jsonl").write_text(json.dumps({"prompt": "a", "choices": ["b", "c"], "label": 5}) + "\n")
    return d


@pytest.mark.parametrize("args, says", [
    (["data.dataset={d}/empty.jsonl"], "empty.jsonl is empty"),
    (["data.dataset={d}/malformed.jsonl"], "malformed.jsonl:4: not a JSON object"),
    (["data.dataset={d}/number.jsonl"], "number.jsonl:3: 'text' is of type int, not a string"),
    (["data.dataset={d}/binary.txt"], "binary.txt:2: not UTF-8 text"),
    (["data.dataset={d}/random.parquet"], "random.parquet: not a readable Parquet file (Parquet magic bytes not found"),
    (["data.dataset={d}/body.jsonl"], "data.text_field: 'text' not in columns ['body']"),
    (["data.dataset={d}/deep.jsonl"], "deep.jsonl:3: not a JSON object a row can be (nested too deeply to read)"),
    (["data.dataset={d}/array.jsonl"], "array.jsonl:2: not a JSON object (a JSON list)"),
    (["eval.task_file={d}/task.jsonl", "eval.report=true"], "task.jsonl:1: need prompt"),
    (["eval.prompts=100000", "eval.report=true"], "eval.prompts: only"),
    (["student.config.vocab_size=100"], "student.config.vocab_size: set from the tokenizer"),
    (["distill.losses=[{name: hidden_mse, layer_map: [[1, 7]]}]", "teacher.tiny=llama-2layer-64",
      "teacher.recipe=null"], "distill.losses.0.layer_map: pair [1, 7] out of range"),
    (["train.lr=.inf"], "train.lr: must be a finite number"),
    (["distill.losses.0.weight=.inf"], "distill.losses.0.weight: must be a finite number"),
])
def test_dry_run_finds_it(capsys, files, args, says):
    recipe = "kd_tiny" if any("losses" in a or "teacher" in a for a in args) else "sft_tiny"
    line = _one_line_error(capsys, [f"recipe={recipe}", *FAST, *[a.replace("{d}", str(files)) for a in args], "--dry-run"])
    assert says in line, line


@pytest.mark.parametrize("name, says", [("dup.yaml", "line 4, column 3: duplicate key 'lr' (first on line 3)"),
                                        ("syntax.yaml", "invalid YAML at line 4"),
                                        ("latin1.yaml", "not UTF-8 text"),
                                        ("blank.yaml", "the recipe is empty")])
def test_bad_recipe_files(capsys, files, name, says):
    assert says in _one_line_error(capsys, [f"recipe={files / name}", "--dry-run"])


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_yaml_alias_bomb_is_refused(tmp_path, where):
    """500 bytes of YAML aliases that expand to 9^9 strings, in a recipe file or an override: one line at
    once (it ran for minutes towards 10^9 strings). Run in a process limited to 2 GiB and 120 s, so that a
    regression fails here instead of taking the machine's memory."""
    import resource

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"name: bomb\ndescription: {BOMB}\n")
    args = [f"recipe={bomb}"] if where == "file" else ["recipe=sft_tiny", f"data.dataset={BOMB}"]
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # noqa: E731
    p = subprocess.run([sys.executable, "workbench/train.py", *args, "--dry-run"], cwd=REPO, capture_output=True,
                       text=True, timeout=120, preexec_fn=limit)
    line = one_error_line(p.returncode, p.stderr)
    assert "YAML aliases expand this to more than 100,000 values" in line
    assert (str(bomb) if where == "file" else "override data.dataset") in line


@pytest.mark.parametrize("args, says", [
    (["data.seq_len=100000"], "fewer than seq_len=100000 tokens"),
    (["data.max_documents=2", "data.val_fraction=0.5", "data.seq_len=4096"], "fewer than seq_len"),
    # blocks longer than the student's positions (2,048): trained on positions it was not made for
    (["data.max_documents=200", "data.seq_len=2049"],
     "data.seq_len=2049: training blocks take 2049 positions, more than the 2048 the models were made for"),
])
def test_mistakes_found_while_loading(capsys, tmp_path, args, says):
    assert says in _one_line_error(capsys, ["recipe=sft_tiny", *FAST, f"output.dir={tmp_path}", *args])


def test_a_run_directory_that_holds_a_run_and_another_tokenizer(capsys, tmp_path, tiny_teacher):
    assert main(["recipe=sft_tiny", *FAST, f"output.dir={tmp_path}", "train.max_steps=2"]) == 0
    capsys.readouterr()
    assert "already holds a run" in _one_line_error(capsys, ["recipe=sft_tiny", *FAST, f"output.dir={tmp_path}",
                                                             "train.max_steps=2"])
    # a teacher with another tokenizer than the student's trained BPE
    line = _one_line_error(capsys, ["recipe=kd_tiny", *FAST, f"output.dir={tmp_path / 'kd'}", "teacher.recipe=null",
                                    f"teacher.name_or_path={tmp_path / 'model'}", "data.tokenizer=bpe", "data.vocab_size=300"])
    assert "vocabular" in line or "tokenizer" in line, line


@pytest.fixture
def offline(monkeypatch):
    """No Hub: an id not in the local cache fails at once (as HF_HUB_OFFLINE=1 makes it), not after
    huggingface_hub's retries on a machine without network access."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("args, says", [
    (["teacher.recipe=null", "teacher.name_or_path=nobody/no-such-model"],
     "data.tokenizer=auto: cannot load 'nobody/no-such-model': no such local directory, and as a Hub id:"),
    (["teacher.recipe=null", "teacher.name_or_path=a/b/c"], "cannot load 'a/b/c': no such directory"),
    (["teacher.recipe=null", "teacher.tiny=llama-2layer-64", "data.tokenizer={bad}"],
     "data.tokenizer={bad}: cannot load '{bad}': tokenizer.json is not valid JSON: Expecting value"),
    (["teacher.recipe=null", "teacher.name_or_path={copy}"], "teacher: cannot load '{copy}': "),
])
def test_models_that_cannot_be_loaded(capsys, tmp_path, offline, tiny_teacher, args, says):
    """A misspelt Hub id (offline here), a path that is neither a directory nor a Hub id, a tokenizer whose
    tokenizer.json is damaged, a model directory copied without its weights: transformers' OSError /
    ValueError become one line naming the key and the name, not a traceback."""
    import shutil

    bad, copy = tmp_path / "damaged_tokenizer", tmp_path / "no_weights"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_text("{}")
    (bad / "tokenizer.json").write_text("not json")
    shutil.copytree(tiny_teacher, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    fill = {"{bad}": str(bad), "{copy}": str(copy)}

    def filled(text):
        for k, v in fill.items():
            text = text.replace(k, v)
        return text

    line = _one_line_error(capsys, ["recipe=kd_tiny", *FAST, f"output.dir={tmp_path / 'out'}", *map(filled, args)])
    assert filled(says) in line, line


def test_divergence_is_one_line_on_the_command_line(tmp_path):
    """Run as a user runs it: the huge learning rate's divergence prints one error line, no traceback,
    exit status 2, and no model."""
    cmd = [sys.executable, "workbench/train.py", "recipe=sft_tiny", *FAST, f"output.dir={tmp_path}",
           "train.lr=1e6", "train.warmup_steps=0", "train.max_steps=30", "train.checkpoint_every=0",
           "train.grad_clip=0"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and done.stderr.count("error:") == 1, done.stderr[-3000:]
    assert "non-finite" in done.stderr and not (tmp_path / "model").exists()


def test_divergence_while_sampling_on_policy_is_one_line(capsys, tmp_path, tiny_teacher):
    """GKD at lambda 1 with a huge learning rate and finiteness checked every 20 steps: the poisoned
    student's next generation meets NaN probabilities before any check; that is the same one line (not
    the sampler's traceback), exit status 2, and no model."""
    line = _one_line_error(capsys, [
        "recipe=kd_tiny", *FAST, f"output.dir={tmp_path}", "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
        "train.lr=1e6", "train.warmup_steps=0", "train.max_steps=30", "train.checkpoint_every=0", "train.grad_clip=0",
        "train.log_every=20", "train.eval_every=100", "distill.onpolicy.method=gkd", "distill.onpolicy.lmbda=1.0",
        "distill.onpolicy.prompt_tokens=8", "distill.onpolicy.max_new_tokens=8"])
    assert "non-finite probabilities when sampling" in line and not (tmp_path / "model").exists()


def test_running_out_of_memory_is_one_line_that_says_what_to_lower(capsys, tmp_path, monkeypatch):
    """A micro-batch too big for the machine (train.micro_batch_size=100000 asked the CPU allocator for 24.4
    GiB) ended in a traceback of the allocator's RuntimeError; on a GPU, torch.OutOfMemoryError's."""
    import torch

    from workbench import trainer
    from workbench.config import out_of_memory
    from workbench.train import main

    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 26214400000 bytes. Error code 12 (Cannot allocate memory)")
    gpu = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB")
    assert out_of_memory(cpu) == "out of memory (24.4 GiB asked for)"
    assert out_of_memory(gpu) == "out of memory on the GPU (2.00 GiB asked for)"
    assert out_of_memory(MemoryError()) == "out of memory" and out_of_memory(RuntimeError("shape mismatch")) is None

    def forward(*a, **k):
        raise cpu

    monkeypatch.setattr(trainer, "forward_for_losses", forward)
    out = tmp_path / "run"
    code = main(["recipe=sft_tiny", *FAST, f"output.dir={out}"])
    line = one_error_line(code, capsys.readouterr().err)
    assert line == ("error: out of memory (24.4 GiB asked for): lower train.micro_batch_size (train.grad_accum_steps "
                    "keeps the batch), data.seq_len or distill.chunk_size; the run stopped: change them (with "
                    "allow_recipe_changes=true) and rerun with resume=true, which starts from the beginning (no "
                    "checkpoint was saved)")
