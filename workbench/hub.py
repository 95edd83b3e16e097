"""Push a trained student to the Hugging Face Hub: the peft adapter or the merged model, its tokenizer,
the recipe it was trained with and a generated model card (base models, objective, the report's metrics,
intended use). The upload goes through `huggingface_hub` (create_repo, create_branch, upload_folder); the
token is the usual one (HF_TOKEN or `hf auth login`).

    python -m workbench.hub outputs/kd_tiny --repo-id me/kd-tiny [--public] [--revision dev] [--dry-run]

Training pushes by itself with output.push_to_hub=true (settings under output.hub). A dry run writes
exactly the folder that would be uploaded, <run>/hub_upload, and uploads nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from workbench import rundir  # noqa: E402
from workbench.config import (LOGIT_DIVERGENCES, HubConfig, RecipeError, WorkbenchError, build, folded,  # noqa: E402
                              interruptible)
from workbench.evaluation import fmt_metric  # noqa: E402
from workbench.models import is_hub_id  # noqa: E402

log = logging.getLogger(__name__)
UPLOAD_DIR = "hub_upload"
# files of model/ and adapter/ that are for training only, not for loading
_SKIP = {"distill_heads.safetensors"}
_STAGED = ".hub_upload.json"  # beside hub_upload/: the names of the files workbench staged there


def stage(run_dir: str | Path, hub: HubConfig) -> Path:
    """Write <run>/hub_upload: the files to push, exactly (model or adapter files, tokenizer, recipe.yaml,
    README.md model card). Returns its path."""
    from workbench.evaluation import load_run

    run = load_run(run_dir)
    src = _source(run, hub.content)
    folder = run.path / UPLOAD_DIR
    tmp = folder.with_name(folder.name + ".tmp")
    manifest = run.path / _STAGED
    ours = set(json.loads(manifest.read_text())) if manifest.is_file() else set()
    for d in (folder, tmp):  # replaced only when it holds nothing but what an earlier stage wrote
        if d.exists() and (not d.is_dir() or {p.name for p in d.iterdir()} - ours):
            raise FileExistsError(f"{d} exists and was not written by workbench; move it away to stage the upload")
    shutil.rmtree(tmp, ignore_errors=True)
    with rundir.writing(tmp, folder):
        tmp.mkdir()
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in _SKIP:
                shutil.copy2(f, tmp / f.name)
        adapter_cfg = tmp / "adapter_config.json"
        if adapter_cfg.is_file():  # peft records its base as given: a local base is published by name only
            cfg = json.loads(adapter_cfg.read_text())
            cfg["base_model_name_or_path"] = public_name(cfg.get("base_model_name_or_path"))
            adapter_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / "recipe.yaml").write_text(public_recipe(run.recipe).to_yaml())
        report = json.loads((run.path / "report.json").read_text()) if (run.path / "report.json").is_file() else None
        (tmp / "README.md").write_text(model_card(run, src.name == "adapter", hub.repo_id or f"<user>/{run.name}",
                                                  report))
        manifest.write_text(json.dumps(sorted(ours | {p.name for p in tmp.iterdir()})))
    rundir.move_into_place(tmp, folder)
    manifest.write_text(json.dumps(sorted(p.name for p in folder.iterdir())))
    return folder


def _source(run, content: str) -> Path:
    """What to push of this run: its adapter when it trained one (content auto), else its model."""
    adapter, model = run.path / "adapter", run.path / "model"
    trained_adapter = run.recipe.student.adapter.method != "none"
    if content == "adapter" or (content == "auto" and trained_adapter):
        if not trained_adapter or not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter}: this run trained no adapter; push content 'merged'")
        return adapter
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model}: no final model; has the run finished?")
    return model


def public_name(value: str | None) -> str | None:
    """A Hub id as it is; a local path (existing or not) as its last component only: what is published
    names things, it does not show the user's file system."""
    from workbench.data import EMBEDDED

    if value is None or is_hub_id(value) or value in (*EMBEDDED, "auto", "bpe"):
        return value
    return Path(value.rstrip("/")).name or value


def _is_hub_dataset(name: str) -> bool:
    from workbench.data import _local_files

    try:
        return _local_files(name) is None
    except RecipeError:  # a local path whose files are gone
        return False


def public_recipe(recipe):
    """The recipe as published: local paths reduced to their names, no output directory."""
    import dataclasses

    def spec(s):
        return None if s is None else dataclasses.replace(s, name_or_path=public_name(s.name_or_path))

    return dataclasses.replace(
        recipe, student=spec(recipe.student), teacher=spec(recipe.teacher),
        data=dataclasses.replace(recipe.data, dataset=public_name(recipe.data.dataset),
                                 tokenizer=public_name(recipe.data.tokenizer)),
        eval=dataclasses.replace(recipe.eval, task_file=public_name(recipe.eval.task_file)),
        output=dataclasses.replace(recipe.output, dir=None))


class HubPushFailed(WorkbenchError):
    """The Hub refused the upload or could not be reached; the run and its staged folder are kept."""


def push(run_dir: str | Path, hub: HubConfig, token: str | None = None, endpoint: str | None = None) -> str | None:
    """Stage the upload folder and, unless hub.dry_run, push it as one commit; returns the commit URL
    (None for a dry run)."""
    from huggingface_hub import HfApi

    if hub.repo_id is None:
        raise RecipeError("output.hub.repo_id: give the repository to push to ('user-or-org/name')")
    folder = stage(run_dir, hub)
    if hub.dry_run:
        log.info("dry run: the upload would be %s -> %s", folder, hub.repo_id)
        return None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(hub.repo_id, private=hub.private, exist_ok=True, repo_type="model")
        if hub.revision and hub.revision != "main":
            api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=hub.repo_id, revision=hub.revision,
                                 commit_message=hub.commit_message)
    except Exception as e:  # no network, offline mode, no or a wrong token, no write access: the client's own types
        raise HubPushFailed(f"pushing to {hub.repo_id} failed: {folded(e)} (the run is saved: push it later with "
                            f"python -m workbench.hub {run_dir})") from e
    log.info("pushed %s to %s (%s)", folder, url, info.commit_url)
    return info.commit_url


def model_card(run, is_adapter: bool, repo_id: str, report: dict | None) -> str:
    """README.md for the Hub: metadata, what the model is, how it was trained, its metrics, how to use it."""
    r, f = run.recipe, run.final
    student_base = _hub_id(r.student.name_or_path) or (_adapter_base(run.path) if is_adapter else None)
    teacher = _hub_id(r.teacher.name_or_path) if r.teacher is not None else None
    teacher_desc = (teacher or (f"the `{r.teacher.recipe}` recipe's model" if r.teacher and r.teacher.recipe else
                                "a local teacher")) if r.teacher is not None else None
    from workbench.data import EMBEDDED

    data = public_name(r.data.dataset) if r.data.dataset not in EMBEDDED else None
    hub_data = data if data and _is_hub_dataset(r.data.dataset) else None  # metadata names Hub datasets only
    tags = ["workbench", "text-generation"] + (["knowledge-distillation"] if teacher_desc else [])
    if is_adapter:
        tags += [r.student.adapter.method] + ({"nf4": ["qlora", "4-bit"], "int8": ["8-bit"]}.get(r.student.quantize, []))
    meta = ["---", f"library_name: {'peft' if is_adapter else 'transformers'}", "pipeline_tag: text-generation"]
    if student_base:
        meta.append(f"base_model: {student_base}")
    if hub_data:
        meta += ["datasets:", f"- {hub_data}"]
    meta += ["tags:"] + [f"- {t}" for t in tags] + ["---", ""]

    terms = ", ".join(f"{t.weight:g} x {t.name}" + (f" (T={t.temperature:g})" if t.name in LOGIT_DIVERGENCES else "")
                      for t in r.distill.losses)
    student_desc = public_name(r.student.name_or_path) or (
        f"a randomly initialised `{r.student.tiny}` model" if r.student.tiny else
        "a student pruned from the teacher (depth and width, by measured importance)" if r.student.prune else
        f"the `{r.student.recipe}` recipe's model")
    L = [f"# {repo_id.split('/')[-1]}", "",
         (f"A {'peft ' + r.student.adapter.method + ' adapter' if is_adapter else 'language model'} distilled from "
          f"{teacher_desc} into {student_desc}" if teacher_desc else
          f"A {'peft adapter' if is_adapter else 'language model'} trained from {student_desc}")
         + f" with workbench, recipe `{r.name}`"
         + (f": {r.description}." if r.description else "."), "",
         "## Training", "",
         f"- Data: {'the Python standard library source (held-out files for validation)' if not data else data}, "
         f"{r.data.seq_len}-token blocks",
         f"- Objective: {terms}" + (f"; on-policy {r.distill.onpolicy.method}" if r.distill.onpolicy.method != "off" else ""),
         f"- Steps: {f['step']} ({f['train_tokens']:,} tokens), learning rate {r.train.lr:g}",
         ]
    if is_adapter:
        a = r.student.adapter
        L.append(f"- Adapter: {a.method}, r={a.r}, alpha={a.alpha:g}, targets {', '.join(a.target_modules)}"
                 + ({"nf4": " over an NF4 (4-bit) base", "int8": " over an LLM.int8 (8-bit) base"}.get(r.student.quantize, "")))
    L += ["- The exact recipe is in `recipe.yaml`.", "", "## Evaluation", "",
          "| model | validation perplexity | ROUGE-L | accuracy |", "| --- | ---: | ---: | ---: |"]
    tasks = (report or {}).get("tasks", {})
    if f.get("teacher_val_ppl") is not None:
        t = tasks.get("teacher", {})
        L.append(f"| teacher | {f['teacher_val_ppl']:.2f} | {fmt_metric(t.get('rougeL'))} | {fmt_metric(t.get('accuracy'))} |")
    s = tasks.get(run.name, {})
    L.append(f"| this model | {f['student_val_ppl']:.2f} | {fmt_metric(s.get('rougeL'))} | {fmt_metric(s.get('accuracy'))} |")
    L += ["", f"Perplexity on {f['val_tokens']:,} held-out tokens."]
    spec = (report or {}).get("speculative", {}).get(run.name)
    if spec:
        L.append(f"As the draft model for speculative decoding of the teacher (k={spec['draft_len']}, greedy): "
                 f"acceptance rate {spec['acceptance_rate']:.2f}, {spec['tokens_per_target_call']:.2f} tokens per "
                 "teacher forward pass.")
    L += ["", "## Intended use", "",
          "A smaller, cheaper stand-in for its teacher on text like its training data, and a draft model for "
          "speculative decoding of the teacher (they share a tokenizer). It inherits the limitations and biases "
          "of its teacher and data and was not tuned for safety: evaluate it on your own task before use.", "",
          "## How to use", "", "```python"]
    if is_adapter:
        L += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"base = AutoModelForCausalLM.from_pretrained(\"{student_base or '<base model>'}\")",
              f"model = PeftModel.from_pretrained(base, \"{repo_id}\")",
              f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")"]
    else:
        L += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\")",
              f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")"]
    L += ["```", ""]
    return "\n".join(meta + L)


def _hub_id(name: str | None) -> str | None:
    """`name` when it names a Hub repository, not a local path."""
    return name if name and is_hub_id(name) else None


def _adapter_base(run_dir: Path) -> str | None:
    cfg = run_dir / "adapter" / "adapter_config.json"
    return _hub_id(json.loads(cfg.read_text()).get("base_model_name_or_path")) if cfg.is_file() else None


@interruptible
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run directory")
    ap.add_argument("--repo-id", help="user-or-org/name (default: the run's output.hub.repo_id)")
    ap.add_argument("--public", action="store_true", help="create the repository public")
    ap.add_argument("--revision", help="branch (created if missing)")
    ap.add_argument("--content", choices=["auto", "adapter", "merged"])
    ap.add_argument("--dry-run", action="store_true", help="write <run>/hub_upload and push nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from workbench.evaluation import load_run

    try:
        import dataclasses

        hub = load_run(args.run).recipe.output.hub
        changes = {"repo_id": args.repo_id, "revision": args.revision, "content": args.content,
                   "private": False if args.public else None, "dry_run": True if args.dry_run else None}
        hub = build(HubConfig, {**dataclasses.asdict(hub), **{k: v for k, v in changes.items() if v is not None}})
        url = push(args.run, hub)
    except (FileNotFoundError, FileExistsError, WorkbenchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"staged {Path(args.run) / UPLOAD_DIR}" + (f"; pushed: {url}" if url else " (dry run: nothing pushed)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
