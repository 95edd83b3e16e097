"""The run directory: what overwrite and resume may do to it, files workbench did not write, one process at a
time (a lock), and what a push publishes of it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from conftest import fast_recipe
from workbench import hub, rundir, trainer
from workbench.config import HubConfig, RecipeError, load_recipe
from workbench.train import run


def _lora(tmp_path, teacher, *extra):
    return fast_recipe("sft_tiny", tmp_path, "student.tiny=null", f"student.name_or_path={teacher}",
                       "student.adapter={method: lora, r: 4, alpha: 8}", "train.max_steps=2", *extra)


def test_overwrite_replaces_every_output_of_the_old_run_and_the_push_takes_the_new_one(tmp_path, tiny_teacher,
                                                                                       accelerator):
    run(_lora(tmp_path, tiny_teacher), accelerator)
    hub.stage(tmp_path, HubConfig(repo_id="me/x"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2", "output.overwrite=true"), accelerator)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "hub_upload").exists()
    folder = hub.stage(tmp_path, HubConfig(repo_id="me/x"))
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and "adapter" not in card
    assert "model.safetensors" in {p.name for p in folder.iterdir()}
    assert yaml.safe_load((folder / "recipe.yaml").read_text())["student"]["adapter"]["method"] == "none"


def test_overwrite_touches_nothing_until_the_new_run_has_loaded_its_data(tmp_path, accelerator):
    first = run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2"), accelerator)
    before = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RecipeError, match="fewer than seq_len=100000 tokens"):
        run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2", "output.overwrite=true", "data.seq_len=100000"),
            accelerator)
    after = {p.relative_to(tmp_path): p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k.name != rundir.LOCK} == \
        {k: v for k, v in before.items() if k.name != rundir.LOCK}  # the old run, untouched
    assert json.loads((tmp_path / "final_metrics.json").read_text())["student_val_ppl"] == first["student_val_ppl"]


@pytest.mark.parametrize("name", ["recipe.yaml", "metrics.jsonl", "report.md", "hub_upload/notes.txt"])
def test_files_workbench_did_not_write_stop_a_run(tmp_path, accelerator, name):
    f = tmp_path / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text("mine")
    with pytest.raises(RecipeError, match="holds files workbench did not write"):
        run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2"), accelerator)
    assert f.read_text() == "mine"


def test_stage_keeps_a_hub_upload_folder_it_did_not_write(tmp_path, accelerator):
    run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2"), accelerator)
    (tmp_path / "hub_upload").mkdir()
    (tmp_path / "hub_upload" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by workbench"):
        hub.stage(tmp_path, HubConfig(repo_id="me/x"))
    assert (tmp_path / "hub_upload" / "notes.txt").read_text() == "mine"
    (tmp_path / "hub_upload" / "notes.txt").unlink()
    (tmp_path / "hub_upload").rmdir()
    hub.stage(tmp_path, HubConfig(repo_id="me/x"))
    hub.stage(tmp_path, HubConfig(repo_id="me/x"))  # its own folder is replaced


def test_output_dir_expands_home_and_the_name_cannot_leave_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_recipe("sft_tiny", ["output.dir=~/runs/x"]).output_dir == tmp_path / "runs" / "x"
    for bad in ("../../x", "a/b", "..", ""):
        with pytest.raises(RecipeError, match="must be a plain name"):
            load_recipe("sft_tiny", [f"name={bad}"])


def test_resume_refuses_a_changed_recipe_unless_allowed_and_records_the_change(tmp_path, accelerator):
    run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.lr=1e-3"),
        accelerator)
    (tmp_path / "final_metrics.json").unlink()  # as if stopped after its last checkpoint
    with pytest.raises(RecipeError, match=r"train.lr: 0.001 -> 0.5.*allow_recipe_changes=true"):
        run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.lr=0.5",
                        "resume=true"), accelerator)
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["train"]["lr"] == 1e-3
    run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=6", "train.checkpoint_every=2", "train.lr=0.5",
                    "resume=true", "allow_recipe_changes=true"), accelerator)
    (change,) = [json.loads(line) for line in (tmp_path / rundir.CHANGES).read_text().splitlines()]
    assert change["step"] == 4 and change["changed"] == {"train.lr": [1e-3, 0.5], "train.max_steps": [4, 6]}
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["train"]["lr"] == 0.5
    # what only the report or the schedule of checkpoints sees is not a change of the recipe
    assert rundir.recipe_changes(fast_recipe("sft_tiny", tmp_path, "train.max_steps=6", "train.lr=0.5",
                                             "train.checkpoint_every=5", "eval.prompts=3")) == ({}, {})


_HOLD = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b'{"pid": %d, "host": "elsewhere"}' % os.getpid())
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_the_same_directory_stops_with_a_clear_message(tmp_path, accelerator):
    tmp_path.mkdir(exist_ok=True)
    holder = _hold(tmp_path / rundir.LOCK, 30)
    try:
        with pytest.raises(RecipeError, match=rf"in use by another workbench run \(pid {holder.pid} on elsewhere\)"):
            run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2"), accelerator)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "metrics.jsonl").exists()
    run(fast_recipe("sft_tiny", tmp_path, "train.max_steps=2"), accelerator)  # the kernel freed the dead holder's lock
    assert [r["step"] for r in trainer.read_metrics(tmp_path)].count(2) == 2  # train record + final, once each


def test_a_cached_run_being_trained_elsewhere_is_waited_for(tmp_path):
    holder = _hold(tmp_path / rundir.LOCK, 1.5)
    t0 = time.perf_counter()
    assert rundir.lock(tmp_path, wait=True) is True
    waited = time.perf_counter() - t0
    assert rundir.lock(tmp_path) is False  # reentrant in this process
    rundir.unlock(tmp_path)
    holder.wait()
    assert waited > 1.0


def test_the_push_publishes_names_not_local_paths(tmp_path, tiny_teacher, accelerator):
    data = tmp_path / "private" / "corpus.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n" * 20}) + "\n" for i in range(40)))
    out = tmp_path / "run"
    run(fast_recipe("kd_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                    f"data.dataset={data}", "train.max_steps=2"), accelerator)
    folder = hub.stage(out, HubConfig(repo_id="me/x"))
    for f in folder.iterdir():  # every file that is text: card, recipe, configs, tokenizer
        if f.suffix in (".md", ".yaml", ".json", ".txt"):
            text = f.read_text()
            assert str(tmp_path) not in text and "/private/" not in text, f.name
    card = (folder / "README.md").read_text()
    assert "datasets:" not in card and "corpus.jsonl" in card
    published = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert published["data"]["dataset"] == "corpus.jsonl" and published["teacher"]["name_or_path"] == "model"
    assert published["output"]["dir"] is None
    # an adapter's config names its base: published as a name too
    lora = tmp_path / "lora"
    run(_lora(lora, tiny_teacher), accelerator)
    folder = hub.stage(lora, HubConfig(repo_id="me/y"))
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "model" and str(tmp_path) not in (folder / "README.md").read_text()


@pytest.mark.parametrize("old_kind", ["dir", "file", "none"])
def test_a_replacement_killed_while_deleting_leaves_one_whole_version(tmp_path, monkeypatch, old_kind):
    """move_into_place (the final model, the adapter, checkpoints, the hub folder, consolidate, quantize):
    killed while the old version is deleted (a large model takes seconds), `dest` holds the new version
    whole; the next replacement clears what was left. rundir.remove never leaves a half-deleted directory
    under its own name either (old checkpoints)."""
    import shutil
    from pathlib import Path

    dest, tmp = tmp_path / "model", tmp_path / "model.tmp"
    if old_kind == "dir":
        dest.mkdir()
        for i in range(3):
            (dest / f"old-{i}").write_text("old")
    elif old_kind == "file":
        dest.write_text("old")
    tmp.mkdir()
    (tmp / "new").write_text("new")
    real = shutil.rmtree

    def killed(path, *a, **k):  # deletes one file, then the process is gone
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
            raise KeyboardInterrupt
        real(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed)
    try:
        rundir.move_into_place(tmp, dest)
    except KeyboardInterrupt:
        pass
    assert sorted(p.name for p in dest.iterdir()) == ["new"] and not tmp.exists()
    monkeypatch.setattr(shutil, "rmtree", real)
    tmp.mkdir()
    (tmp / "newer").write_text("newer")
    rundir.move_into_place(tmp, dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in dest.iterdir()) == ["newer"]

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        rundir.remove(dest)
    assert not dest.exists()
    monkeypatch.setattr(shutil, "rmtree", real)
    (tmp_path / "other").mkdir()
    rundir.remove(tmp_path / "other")
    assert list(tmp_path.iterdir()) == []


def test_a_model_inside_what_the_run_replaces_is_refused_before_anything_loads(tmp_path, tiny_teacher, capsys):
    """The student (or teacher) read from the run directory's own model/ with output.overwrite=true: the
    overwrite deleted it once loaded (a run that failed then had lost it); a teacher there was replaced by
    the student at the end, and the report compared the student with itself. --dry-run says so."""
    import shutil

    from conftest import FAST, one_error_line
    from workbench.train import main

    out = tmp_path / "run"
    shutil.copytree(tiny_teacher, out / "model")
    for args in (["recipe=sft_tiny", "student.tiny=null", f"student.name_or_path={out / 'model'}"],
                 ["recipe=kd_tiny", "teacher.recipe=null", f"teacher.name_or_path={out}/./model"]):
        line = one_error_line(main([args[0], *FAST, *args[1:], f"output.dir={out}", "output.overwrite=true", "--dry-run"]),
                              capsys.readouterr().err)
        role = args[2].split(".")[0]  # student / teacher
        assert line.startswith(f"error: {role}.name_or_path: ") and line.endswith(
            f"lies in {out / 'model'}, which this run replaces; copy it elsewhere or choose another output.dir"), line
    assert (out / "model" / "config.json").is_file()
