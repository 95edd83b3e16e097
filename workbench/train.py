"""Entry point: parse a recipe, build models and data, train, save, report.

    accelerate launch workbench/train.py recipe=kd_tiny [key=value ...]
    python workbench/train.py recipe=kd_tiny train.max_steps=50
    python workbench/train.py recipe=kd_13b_to_7b --dry-run     # validate + print, no weights loaded
    python workbench/train.py --help-recipe                      # every key with its meaning
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import the package, not our siblings
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from workbench import launch_rank, rundir
from workbench.config import (CROSS_TOKENIZER_LOSSES, INTERRUPTED, Recipe, RecipeError, StorageError, WorkbenchError,
                              another_process_stopped, describe_fields, interruptible, list_recipes, load_recipe,
                              out_of_memory, storage_error)

log = logging.getLogger("workbench")

USAGE = """usage: train.py recipe=NAME [key=value ...] [--dry-run] [--help-recipe] [--list]

  recipe=NAME      recipes/NAME.yaml (or a path to a YAML file)
  key=value        override any recipe key, dotted: train.lr=1e-3 distill.losses.0.weight=0.5
  --dry-run        validate the recipe (no weights loaded) and print it resolved
  --help-recipe    list every recipe key with its type and meaning
  --list           list the shipped recipes and what each does
"""


@interruptible
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {a for a in argv if a.startswith("--") or a == "-h"}
    args = [a for a in argv if a not in flags]
    say = print if not launch_rank() else lambda *a, **k: None  # under a launcher: what process 0 prints, once
    if "-h" in flags or "--help" in flags:
        say(USAGE)
        return 0
    if "--help-recipe" in flags:
        for key, tp, doc in describe_fields():
            say(f"{key:36s} {tp:40s} {doc}")
        return 0
    if "--list" in flags:  # each shipped recipe with its description (read, validated, nothing loaded)
        names = list_recipes()
        for name in names:
            try:
                about = load_recipe(name).description or ""
            except WorkbenchError as e:
                about = f"(does not load: {e})"
            say(f"{name:<{max(map(len, names))}}  {about}")
        return 0
    unknown = flags - {"--dry-run"}
    if unknown:
        return _refuse(f"unknown flag(s) {sorted(unknown)}\n\n{USAGE}")
    names = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
    overrides = [a for a in args if not a.startswith("recipe=")]
    if len(names) != 1:
        return _refuse(f"give exactly one recipe=NAME\n\n{USAGE}")
    try:
        with _warnings_once():
            recipe = load_recipe(names[0], overrides)
            validate(recipe)
    except RecipeError as e:
        return _refuse(e)
    if "--dry-run" in flags:
        try:
            check_data(recipe)
        except RecipeError as e:
            return _refuse(e)
        say(recipe.to_yaml())
        say(f"# recipe '{recipe.name}' is valid", file=sys.stderr)
        return 0
    _setup_logging()
    from workbench.distributed import make_accelerator

    try:
        accelerator = make_accelerator(recipe)
    except WorkbenchError as e:
        return _refuse(e)
    code = 0
    try:
        metrics = run(recipe, accelerator)
    except KeyboardInterrupt:  # Ctrl-C outside training's own handling (loading, the report), or twice in it
        if accelerator.is_main_process:
            print(f"error: interrupted{_how_to_go_on(recipe, None)}", file=sys.stderr)
        metrics, code = None, INTERRUPTED
    except Exception as e:  # everyday mistakes, divergence, a full disk, memory: one line, no traceback
        err = e if isinstance(e, WorkbenchError) else storage_error(e)
        oom = out_of_memory(e) if err is None else None
        if oom and (recipe.output_dir / "final_metrics.json").is_file():  # trained: the report ran out
            err = f"{oom}: evaluate with fewer eval.prompts or none (eval.report=false){_how_to_go_on(recipe, None)}"
        elif oom:
            err = (f"{oom}: lower train.micro_batch_size (train.grad_accum_steps keeps the batch), data.seq_len or "
                   f"distill.chunk_size{_how_to_go_on(recipe, 'change them (with allow_recipe_changes=true)')}")
        peer = err is None and oom is None and another_process_stopped(e)
        if peer:
            err = f"{_PEER_STOPPED}{_how_to_go_on(recipe, 'fix that')}"
        if err is None:
            raise
        if isinstance(err, StorageError):
            full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            err = f"{err}{_how_to_go_on(recipe, 'make room' if full else 'fix that')}"
        if accelerator.num_processes > 1 and not getattr(e, "in_every_process", False):
            _stop_alone(accelerator, err, peer)
        if accelerator.is_main_process:
            print(f"error: {err}", file=sys.stderr)
        metrics, code = None, 2
    if metrics and accelerator.is_main_process:
        print(format_summary(metrics))
    # every process leaves the process group before the interpreter shuts down: exiting with gloo's worker
    # threads still alive aborts the process (SIGABRT, "terminate called without an active exception")
    try:
        accelerator.wait_for_everyone()
    except Exception as e:  # the main process failed after training (the report, the push): it said why
        if not another_process_stopped(e):
            raise
        _stop_alone(accelerator, _PEER_STOPPED, peer=True)
    accelerator.end_training()
    return code


_PEER_STOPPED = "another process stopped (its error above, or the launcher's report below, says why)"


def _stop_alone(accelerator, err: str, peer: bool) -> None:
    """Stop this process after an error the others may not share: they may be waiting in a collective this
    one will never join, so it must not wait for them in a barrier (that hung the run for good). It says
    why and exits at once; the launcher then stops the others, and those that saw their collective fail
    first (`peer`) stop without a word, except the main process, which says how to go on. Another process
    says its error only after a wait, in which the launcher stops it if the main process failed too (the
    same error everywhere: said once)."""
    if accelerator.is_main_process:
        print(f"error: {err}", file=sys.stderr)
    elif not peer:
        time.sleep(_REFUSE_WAIT_S)  # (below the main process's progress bar, which stopped mid-line)
        print(f"\nerror: {err} (process {accelerator.process_index})", file=sys.stderr)
    _leave_now(2)  # (no interpreter shutdown: it would wait for, or abort on, the process group's threads)


def _refuse(error) -> int:
    """An error found before the processes of a launch know of each other: every process finds it, and each
    printing it repeated the line once per process. Process 0 prints it; the others wait first, since a
    launcher (torchrun) stops every process once one has failed, perhaps before process 0 printed; if
    process 0 did not fail (a file missing on one node only), they print it after that wait."""
    rank = launch_rank()
    if rank:
        time.sleep(_REFUSE_WAIT_S)
    print(f"error: {error}" + (f" (process {rank})" if rank else ""), file=sys.stderr)
    return 2


_REFUSE_WAIT_S = 10.0


@contextlib.contextmanager
def _warnings_once():
    """The recipe's warnings (a key given twice, ...), which every process of a launch finds alike: said by
    process 0 only."""
    quiet = launch_rank() > 0
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        if quiet:
            log.setLevel(level)


def _how_to_go_on(recipe: Recipe, fix: str | None) -> str:
    """What a run stopped before its end (by the file system, by Ctrl-C) leaves, and how to go on once
    `fix` is done."""
    from workbench.trainer import latest_checkpoint

    out = recipe.output_dir
    if (out / "final_metrics.json").is_file():  # trained and saved: the report or the push failed
        return (f"; the trained model is saved in {out / 'model'}: {fix + ', then ' if fix else ''}python "
                f"workbench/evaluate.py {out} writes the report" + (f" and python -m workbench.hub {out} pushes it"
                                                                     if recipe.output.push_to_hub else ""))
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    return (f"; the run stopped: {fix + ' and ' if fix else ''}rerun with resume=true, which "
            + (f"continues from {ckpt}" if ckpt else "starts from the beginning (no checkpoint was saved)"))


# --------------------------------------------------------------------------------------------- validation


def validate(recipe: Recipe, _chain: tuple[str, ...] = ()) -> None:
    """Everything that can be checked without loading weights or touching the network."""
    from workbench import data, models

    roles = [("student", recipe.student), ("teacher", recipe.teacher)] + [
        (f"teachers.{i}", spec) for i, spec in enumerate(recipe.teachers)]
    for role, spec in roles:
        if spec is None:
            continue
        models.validate_spec(spec, role)
        rundir.check_source(spec.name_or_path, f"{role}.name_or_path", recipe.output_dir)
        if spec.recipe is not None:  # the model another recipe trains: validate that recipe too
            chain = _chain + (recipe.name,)
            dep = load_recipe(spec.recipe)
            if dep.name in chain:
                raise RecipeError(f"{role}.recipe: cycle {' -> '.join(chain + (dep.name,))}")
            try:
                validate(dep, chain)
            except RecipeError as e:
                raise RecipeError(f"{role}.recipe '{spec.recipe}': {e}") from None
    if "triton" in [spec.quant.kernel for spec in [recipe.student, *recipe.teacher_specs]]:
        try:
            import workbench.kernels.linear  # noqa: F401
        except ImportError as e:
            raise RecipeError(f"quant.kernel=triton: the kernels do not import ({e}); pip install -e .[quant]") from e
    if recipe.data.dataset not in data.EMBEDDED:
        data._local_files(recipe.data.dataset)  # raises for a local path with no files
    if recipe.data.tokenizer not in ("auto", "bpe") and models._looks_local(recipe.data.tokenizer):
        if not Path(recipe.data.tokenizer).expanduser().exists():
            raise RecipeError(f"data.tokenizer: no such path '{recipe.data.tokenizer}'")
    if recipe.eval.task_file and recipe.eval.report:
        from workbench.evaluation import read_task_file

        read_task_file(recipe.eval.task_file)  # its lines checked now, not after training
    _validate_layer_maps(recipe)
    if recipe.parallel.pipeline_stages > 1 and models.num_layers(recipe.student) is not None:
        from workbench.pipeline import stage_layers

        stage_layers(models.num_layers(recipe.student), recipe.parallel.pipeline_stages, recipe.parallel.pipeline_blocks)
    if recipe.student.tiny and recipe.train.mixed_precision == "fp16" and recipe.student.dtype != "float32":
        raise RecipeError("student.dtype: fp16 mixed precision needs float32 master weights")


def _validate_layer_maps(recipe: Recipe) -> None:
    """A layer_map's pairs against the models' depths (read from configs; skipped where only the network
    could tell)."""
    from workbench.config import FEATURE_LOSSES
    from workbench.losses import _check_layer_map
    from workbench.models import num_layers

    terms = [(i, t) for i, t in enumerate(recipe.distill.losses) if t.name in FEATURE_LOSSES and t.layer_map]
    if not terms or recipe.teacher is None:
        return
    n_s, n_t = num_layers(recipe.student), num_layers(recipe.teacher)
    if n_s is None or n_t is None:
        return
    for i, t in terms:
        try:
            _check_layer_map(t.layer_map, n_s, n_t, first=0 if t.name.startswith("hidden") else 1)
        except ValueError as e:
            raise RecipeError(f"distill.losses.{i}.{e}") from None


def check_data(recipe: Recipe) -> None:
    """--dry-run's look at local data (the embedded corpus or local files; a Hub dataset would need the
    network): documents readable, a text field of strings, enough documents to split, and the report's
    prompts and items found in the held-out documents."""
    from workbench import data as D
    from workbench.evaluation import check_report_inputs

    if recipe.data.dataset not in D.EMBEDDED and D._local_files(recipe.data.dataset) is None:
        return
    corpus = D.load_corpus(recipe.data)
    check_report_inputs(recipe.eval, corpus.val_texts, corpus.val_rows)


# --------------------------------------------------------------------------------------------- running


def run(recipe: Recipe, accelerator=None) -> dict:
    """Train `recipe` to completion (or to a signal); returns its final metrics ({} if interrupted)."""
    from workbench.distributed import make_accelerator

    accelerator = accelerator or make_accelerator(recipe)
    out = recipe.output_dir
    locked, refused = False, None
    if accelerator.is_main_process:  # one run per directory: a second one stops
        try:
            locked = rundir.lock(out)
        except RecipeError as e:
            refused = str(e)
    if accelerator.num_processes > 1:  # every process stops alike, none waits in a collective for rank 0
        from accelerate.utils import broadcast_object_list

        refused = broadcast_object_list([refused])[0]
    if refused:
        raise RecipeError(refused)
    try:
        return _run(recipe, accelerator)
    finally:
        if locked:
            rundir.unlock(out)


def _run(recipe: Recipe, accelerator) -> dict:
    from accelerate.utils import set_seed

    from workbench import data as D
    from workbench import models as M
    from workbench import trainer as T

    from workbench.distributed import unpartitioned_loading

    out = recipe.output_dir
    if recipe.parallel.pipeline_stages > 1:  # before anything loads
        from workbench.pipeline import check_launch

        check_launch(recipe, accelerator)
    done = _finished_metrics(recipe)
    if done is not None:
        log.info("%s: already trained to step %d in %s; reusing it", recipe.name, done["step"], out)
        if recipe.eval.report and not (out / "report.html").is_file() and accelerator.is_main_process:
            _report(recipe, accelerator)  # an earlier attempt trained but did not get to its report
        return done
    mode = rundir.check(recipe)
    ckpt = T.latest_checkpoint(out) if mode == "resume" else None
    if ckpt is not None:
        step = int(ckpt.name.split("-")[1])  # from the name: its trainer_state.json may be damaged
        rundir.check_resume(recipe, step, accelerator.is_main_process)
    accelerator.wait_for_everyone()

    student_spec = recipe.student
    teacher_specs = []
    for spec in recipe.teacher_specs:
        if spec.recipe is not None:
            spec = dataclasses.replace(spec, name_or_path=str(ensure_trained(spec.recipe, accelerator)), recipe=None)
        # a GGUF model is converted once into a plain checkpoint, which everything downstream loads
        if M.is_gguf(spec.name_or_path):
            spec = dataclasses.replace(spec, name_or_path=M.resolve_source(spec.name_or_path))
        teacher_specs.append(spec)
    teacher_spec = teacher_specs[0] if teacher_specs else None  # (several: the first names 'auto' tokenizers)
    if student_spec.recipe is not None:  # e.g. an SFT student as the base of QLoRA distillation
        path = ensure_trained(student_spec.recipe, accelerator)
        student_spec = dataclasses.replace(student_spec, name_or_path=str(path), recipe=None)

    if M.is_gguf(student_spec.name_or_path):
        student_spec = dataclasses.replace(student_spec, name_or_path=M.resolve_source(student_spec.name_or_path))

    set_seed(recipe.train.seed)
    pretrained = student_spec.name_or_path or (teacher_spec.name_or_path if teacher_spec else None)
    with accelerator.main_process_first():  # the main process fills the caches, the others read them
        corpus = D.load_corpus(recipe.data)
        tokenizer = D.load_tokenizer(recipe.data, corpus, pretrained=pretrained)
        skd = recipe.distill.sequence_kd
        data_corpus = corpus
        if skd.mode != "off":  # the teacher's completions as the training targets (generated once, cached)
            seed = skd.generation_seed(recipe.train.seed)
            key = D._hash([_model_id(teacher_spec, recipe.train.seed), corpus.fingerprint, skd.generation_key(), seed])
            load = lambda: M.load_model(teacher_spec, tokenizer, "teacher", device=accelerator.device).to(  # noqa: E731
                accelerator.device)
            corpus = D.with_teacher_completions(corpus, load, tokenizer, skd, key, seed)
        packed = D.load_packed(recipe.data, tokenizer, corpus)
        calibration = packed  # a pruned student is cut on the data's own rows, with or without sequence KD
        if student_spec.prune is not None and corpus is not data_corpus:
            calibration = D.load_packed(recipe.data, tokenizer, data_corpus)
    log.info("data: %d train / %d validation blocks of %d tokens", len(packed.train), len(packed.val), packed.seq_len)
    from workbench.evaluation import check_report_inputs

    check_report_inputs(recipe.eval, corpus.val_texts, corpus.val_rows)  # found now, not after training

    pruned = None
    if student_spec.prune is not None:  # cut from the teacher (on the main process first; cached)
        from workbench import prune as P

        with accelerator.main_process_first():
            pruned = P.ensure_pruned(teacher_spec.name_or_path, student_spec.prune, calibration.train,
                                     recipe.train.micro_batch_size, recipe.train.seed, accelerator.device,
                                     calibration.key)
        student_spec = dataclasses.replace(student_spec, name_or_path=str(pruned), prune=None)

    # a randomly initialised (tiny) student is built whole, so its weights do not depend on the launch;
    # pretrained ones load partitioned under ZeRO-3 (transformers' zero.Init) to spare host memory
    with unpartitioned_loading() if student_spec.tiny else contextlib.nullcontext():
        student = M.load_model(student_spec, tokenizer, "student", seed=recipe.train.seed, device=accelerator.device)
    sources = [_load_teacher(recipe, i, spec, tokenizer, student, packed, accelerator)
               for i, spec in enumerate(teacher_specs)]
    teacher, kd_vocab, cross = (sources[0].model, sources[0].kd_vocab, sources[0].cross) if sources else (None,) * 3
    from workbench.speculative import check_positions

    check_positions([student] + [s.model for s in sources if s.cross is None], recipe.data.seq_len,  # (same tokens)
                    f"data.seq_len={recipe.data.seq_len}", "training blocks")
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in student.parameters() if p.requires_grad)
    log.info("student: %.2fM parameters, %.3fM trainable", M.count_parameters(student) / 1e6, trainable / 1e6)
    init_ppl = None
    if pruned is not None:  # what pruning alone leaves, before any training
        from workbench.trainer import evaluate_perplexity

        student.to(accelerator.device)
        init_ppl = evaluate_perplexity(student, packed.val, recipe.train.micro_batch_size, recipe.train.eval_batches,
                                       accelerator, recipe.distill.fused)
        info = P.describe(pruned)
        log.info("pruned student: %.2fM of the teacher's %.2fM parameters, blocks %s; validation perplexity "
                 "before training %.2f", info["student_params"] / 1e6, info["teacher_params"] / 1e6,
                 info["kept_layers"], init_ppl)
    if accelerator.is_main_process:  # data and models are loaded: only now may an old run be replaced
        if mode == "overwrite":
            rundir.clear_for_overwrite(recipe)
        rundir.claim(recipe)
    accelerator.wait_for_everyone()

    cache, cached_teacher_ppl = None, None
    for i, (spec, src) in enumerate(zip(teacher_specs, sources)):
        if not recipe.distill.teacher_cache.top_k:
            break
        terms = [t for t in recipe.distill.losses if t.teacher == i]
        if src.cross is not None:
            if src.cache is None:  # built now
                src.cache = _cross_teacher_cache(recipe, spec, src.model, src.cross, packed, accelerator, terms)
        else:
            src.cache, cached_teacher_ppl = _teacher_cache(recipe, spec, src.model, packed, src.kd_vocab, accelerator,
                                                           terms)
        src.model = None  # trained from the cache (and, across tokenizers, the teacher's tokenizer) alone
    if recipe.parallel.pipeline_stages > 1:
        from workbench import pipeline as PP

        teacher, cache = (sources[0].model, sources[0].cache) if sources else (None, None)
        result = PP.train(recipe, accelerator, student, tokenizer, packed, teacher=teacher, kd_vocab=kd_vocab,
                          teacher_cache=cache)
    elif len(sources) > 1:
        result = T.train(recipe, accelerator, student, tokenizer, packed, teachers=sources)
    else:
        teacher, cache = (sources[0].model, sources[0].cache) if sources else (None, None)
        result = T.train(recipe, accelerator, student, tokenizer, packed, teacher=teacher, kd_vocab=kd_vocab,
                         teacher_cache=cache, cross=cross)
    del sources
    if result.interrupted:
        raise SystemExit(130)
    if len(teacher_specs) > 1:
        result.metrics["teachers"] = [spec.name_or_path for spec in teacher_specs]
        cached_teacher_ppl = None  # (whose?)
    elif teacher_spec is not None:
        result.metrics["teacher"] = teacher_spec.name_or_path
    if pruned is not None:
        result.metrics.update(student_init=str(pruned), student_init_val_ppl=init_ppl,
                              student_init_kept_layers=P.describe(pruned)["kept_layers"])
    if cache is not None:
        result.metrics["teacher_val_ppl"] = cached_teacher_ppl
    result.metrics["fingerprint"] = recipe.fingerprint()
    if accelerator.is_main_process:
        rundir.write_file(out / "final_metrics.json", json.dumps(result.metrics, indent=2))
        if recipe.eval.report:  # the trained model is saved already; the report reads it back
            del student, teacher  # the report loads what it evaluates itself: free the training copies
            accelerator.free_memory()
            _report(recipe, accelerator)
        if recipe.output.push_to_hub:  # after the report, so the model card carries its metrics
            from workbench.hub import push

            push(out, recipe.output.hub)
    return result.metrics


def _report(recipe: Recipe, accelerator) -> None:
    from workbench.distributed import unpartitioned_loading
    from workbench.evaluation import report

    log.info("evaluating %s: report.md / report.html", recipe.output_dir)
    with unpartitioned_loading():  # this process alone: no ZeRO-3 partitioning (a collective)
        _, html = report([recipe.output_dir], device=accelerator.device)
    log.info("report: %s", html)


def _load_teacher(recipe, i: int, spec, tokenizer, student, packed, accelerator):
    """Teacher `i` (of recipe.teacher_specs, resolved to a path) -> trainer.TeacherSource: the model, and
    either the vocabulary it shares with the student or, where its terms compare across tokenizers, both
    tokenizers prepared (crosstok.CrossTokenizers)."""
    from workbench import models as M
    from workbench.distributed import unpartitioned_loading
    from workbench.trainer import TeacherSource

    role = "teacher" if not recipe.teachers else f"teachers.{i}"
    teacher_tok = tokenizer
    if spec.name_or_path:
        teacher_tok = M.load_tokenizer(spec.name_or_path, f"{role}.name_or_path")
    terms = [t for t in recipe.distill.losses if t.teacher == i and t.name != "cross_entropy"] or recipe.distill.losses
    src = TeacherSource()
    if any(t.name in CROSS_TOKENIZER_LOSSES for t in terms):  # the teacher in its own tokens
        from workbench.crosstok import CrossTokenizers

        src.cross = CrossTokenizers.build(tokenizer, teacher_tok, any(t.name == "span" for t in terms))
        log.info("%s tokenizer: %d tokens, student's: %d%s", role, len(teacher_tok), len(tokenizer),
                 "" if src.cross.shared is None else f", {src.cross.shared[0].numel()} shared")
        if recipe.distill.teacher_cache.top_k:
            src.cache = _cross_teacher_cache(recipe, spec, None, src.cross, packed, accelerator, terms)
            if src.cache is not None:  # complete: the model is never loaded
                log.info("%s: trained from its cache alone (the model is not loaded)", role)
                return src
    if recipe.parallel.pipeline_stages > 1 and not recipe.distill.teacher_cache.top_k:
        return _last_stage_teacher(recipe, spec, role, tokenizer, teacher_tok, student, src, accelerator)
    with unpartitioned_loading():  # placed (replicated or partitioned) by the trainer
        src.model = M.load_model(spec, tokenizer, role, seed=recipe.train.seed, device=accelerator.device)
    if src.cross is None:
        src.kd_vocab = M.check_same_vocabulary(teacher_tok, tokenizer, src.model, student)
    log.info("%s: %.2fM parameters", role, M.count_parameters(src.model) / 1e6)
    return src


def _last_stage_teacher(recipe, spec, role, tokenizer, teacher_tok, student, src, accelerator):
    """Under pipeline stages the last one alone computes the loss, so it alone loads the teacher; its
    vocabulary check (or any loading error) reaches every stage, so all stop alike."""
    from accelerate.utils import broadcast_object_list

    from workbench import models as M

    last = accelerator.num_processes - 1
    found = [None, None]  # kd_vocab, error
    if accelerator.process_index == last:
        try:
            src.model = M.load_model(spec, tokenizer, role, seed=recipe.train.seed, device=accelerator.device)
            found[0] = M.check_same_vocabulary(teacher_tok, tokenizer, src.model, student)
        except WorkbenchError as e:
            found[1] = str(e)
    src.kd_vocab, error = broadcast_object_list(found, from_process=last)
    if error:
        raise RecipeError(error)
    log.info("%s: loaded by the last pipeline stage (process %d) alone", role, last)
    return src


def _teacher_cache(recipe, spec, teacher, packed, vocab, accelerator, terms=None):
    """Build (or find) the top-k cache of `teacher` on the training blocks (for the logit `terms`, default
    the recipe's); -> (TeacherCache, teacher ppl)."""
    from workbench import teacher_cache as TC
    from workbench.trainer import evaluate_perplexity

    tc = recipe.distill.teacher_cache
    temps = _temperatures(terms or recipe.distill.losses)
    path = TC.cache_path(_model_id(spec, recipe.train.seed), packed.key, tc.top_k, temps, vocab, tc.dtype)
    ppl_file = path / "teacher_val_ppl.json"
    if not (path / "meta.json").exists():
        teacher.to(accelerator.device)
        TC.build(teacher, packed.train, path, tc.top_k, temps, vocab, tc.dtype, accelerator,
                 recipe.train.micro_batch_size)
    if not ppl_file.exists():
        teacher.to(accelerator.device)
        ppl = evaluate_perplexity(teacher, packed.val, recipe.train.micro_batch_size, 0, accelerator)
        if accelerator.is_main_process:
            rundir.write_file(ppl_file, json.dumps(ppl))
        accelerator.wait_for_everyone()
    log.info("training from the top-%d teacher cache %s", tc.top_k, path)
    return TC.TeacherCache(path), json.loads(ppl_file.read_text())


def _cross_teacher_cache(recipe, spec, teacher, cross, packed, accelerator, terms=None):
    """Build (or complete) the top-k cache of a teacher with another tokenizer on the blocks this run
    visits (for its `terms`, default the recipe's); -> teacher_cache.CrossCache (None when it is not
    complete and `teacher` is None: nothing to build it with)."""
    from workbench import teacher_cache as TC
    from workbench.trainer import visited_blocks

    tc = recipe.distill.teacher_cache
    temps = _temperatures(terms or recipe.distill.losses)
    shared = 0 if cross.shared is None else cross.shared[0].numel()
    path = TC.cross_cache_path(_model_id(spec, recipe.train.seed), packed.key, tc.top_k, temps, tc.dtype, shared)
    wanted = visited_blocks(recipe.train, len(packed.train), accelerator.num_processes)
    cache = TC.CrossCache(path)
    if cache.missing(wanted):
        if teacher is None:  # (asked whether it is complete: it is not)
            return None
        teacher.to(accelerator.device)
        TC.build_cross(teacher, cross, packed.train, wanted, path, tc.top_k, temps, tc.dtype, accelerator,
                       recipe.train.micro_batch_size, recipe.distill.fused)
        cache = TC.CrossCache(path)
    log.info("training from the top-%d teacher cache %s (across tokenizers, %d blocks)", tc.top_k, path, len(wanted))
    return cache


def _temperatures(terms) -> list[float]:
    """The temperatures a teacher cache serves: those of the distillation terms."""
    return sorted({t.temperature for t in terms if t.name != "cross_entropy"})


def _model_id(spec, seed: int | None = None) -> str:
    """Identity of a model's weights for cache keys: Hub id + revision, a local directory's files, or a
    tiny config with its overrides and the seed that initialised it."""
    if spec.tiny is not None:
        return json.dumps(["tiny", spec.tiny, spec.config, seed, spec.dtype], sort_keys=True)
    path = Path(spec.name_or_path).expanduser()
    if not path.is_dir():
        return f"{spec.name_or_path}@{spec.revision}"
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    return json.dumps([str(path.resolve()), files])


def ensure_trained(name: str, accelerator) -> Path:
    """The final model of recipe `name`, trained now (resuming an interrupted run) unless cached under
    $WORKBENCH_CACHE/runs/<name>-<fingerprint>[-<corpus>]/model."""
    from workbench.data import EMBEDDED, cache_root, load_corpus

    # the embedded corpus is the running interpreter's standard library: a cache shared by two Pythons
    # must not hand one's teacher (and its tokenizer) to the other
    base = load_recipe(name)
    corpus = "-" + load_corpus(base.data).fingerprint[:8] if base.data.dataset in EMBEDDED else ""

    def cached(dep):
        out = cache_root() / "runs" / f"{dep.name}-{dep.fingerprint()}{corpus}"
        return dataclasses.replace(dep, output=dataclasses.replace(dep.output, dir=str(out)), resume=True)

    own = cached(base)  # trained earlier at the recipe's own precision (a dependent recipe's run)
    if _finished_metrics(own) is not None:
        return own.output_dir / "model"
    # trained here, with this accelerator: its precision is the one the run really has
    dep = cached(load_recipe(name, [f"train.mixed_precision={accelerator.mixed_precision}"]))
    out = dep.output_dir
    # a second process that needs the same cached model waits for the first to train it, then reuses it
    locked = accelerator.is_main_process and rundir.lock(out, wait=True)
    try:
        accelerator.wait_for_everyone()
        if _finished_metrics(dep) is None:
            log.info("teacher recipe '%s' is not cached: training it into %s", name, out)
            run(dep, accelerator)
    finally:
        if locked:
            rundir.unlock(out)
    return out / "model"


def _finished_metrics(recipe: Recipe) -> dict | None:
    """Final metrics of a completed earlier run of this exact recipe in its run directory, if any."""
    if not recipe.resume:
        return None
    path = recipe.output_dir / "final_metrics.json"
    if not path.is_file() or not (recipe.output_dir / "model" / "config.json").is_file():
        return None
    metrics = json.loads(path.read_text())
    same = metrics.get("fingerprint") == recipe.fingerprint()
    return metrics if same and metrics.get("step", -1) >= recipe.train.max_steps else None


def format_summary(m: dict) -> str:
    lines = [f"{m['recipe']}: {m['step']} steps, {m['train_tokens']:,} training tokens, {m['train_seconds']} s",
             f"validation perplexity ({m['val_tokens']:,} held-out tokens):"]
    if m.get("teacher_val_ppl") is not None:
        lines.append(f"  teacher  {m['teacher_val_ppl']:10.3f}")
    lines.append(f"  student  {m['student_val_ppl']:10.3f}")
    return "\n".join(lines)


def _setup_logging() -> None:
    from workbench import third_party_warnings_once

    third_party_warnings_once()
    rank = launch_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file is noise


def _exit(code: int) -> None:
    """End the process. A process of a multi-process run (everything saved, its process group destroyed)
    leaves without interpreter finalisation: C++ destructors run at exit (gloo's, DeepSpeed's) have aborted
    a process that had finished its work (SIGABRT, "terminate called without an active exception"; rare:
    once in CI under DDP and once in a local test run under ZeRO-3, none in 128 launches in a loop), and
    its launcher then reports the whole run as failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _leave_now(code)
    sys.exit(code)


def _leave_now(code: int) -> None:
    """os._exit(code) once what was printed or logged is flushed: no interpreter finalisation."""
    for handler in [*logging.getLogger().handlers, *log.handlers]:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
