"""The run directory: who owns it, who is writing to it, and what starting over or resuming may do to it.

- A run directory is claimed with a marker file (`.workbench-run`). Names a run writes (model/, recipe.yaml,
  metrics.jsonl, report.*, hub_upload/, ...) that are already there stop a new run unless it resumes or
  overwrites, whether or not workbench wrote them.
- One process at a time writes a run directory: an exclusive lock (flock on `.workbench.lock`, released by
  the kernel when its process dies, kill -9 included). A second run on the same directory stops at once;
  a cached run (a teacher another recipe needs) is waited for instead.
- `output.overwrite=true` replaces the old run only once the new one has loaded its data and models: until
  then nothing is touched, and then the old outputs are moved aside as a whole and deleted.
- `resume=true` continues only the recipe it was trained with; a changed recipe needs
  `allow_recipe_changes=true`, and each change is logged to recipe_changes.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from workbench.config import Recipe, RecipeError, build, storage_error, yaml_load

log = logging.getLogger(__name__)

MARKER = ".workbench-run"
LOCK = ".workbench.lock"
CHANGES = "recipe_changes.jsonl"
# everything a run writes into its directory (what overwrite replaces, and what a new run refuses to clobber)
OUTPUTS = ("checkpoints", "model", "adapter", "tensorboard", "final_metrics.json", "metrics.jsonl", "recipe.yaml",
           CHANGES, "report.md", "report.html", "report.json", "report_plots", "hub_upload", ".hub_upload.json", "deepspeed_config.json")
# keys that may differ on resume without allow_recipe_changes: where results go, what the report shows, when
# to log and checkpoint, and (recorded) a longer or shorter step budget
_FREE = ("name", "description", "resume", "allow_recipe_changes", "output.", "eval.", "train.log_every",
         "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints")
_RECORDED_FREE = ("train.max_steps",)

_held: dict[Path, int] = {}  # run directories this process holds the lock of -> file descriptor


# --------------------------------------------------------------------------------------------- locking


def lock(out: Path, wait: bool = False) -> bool:
    """Hold the run directory `out` (created if missing) for this process until it exits or `unlock`.
    Another process holding it: wait for it (`wait`) or stop with a RecipeError naming that process.
    Returns False when this process held it already (then nothing changes), else True."""
    import fcntl

    out = Path(out).resolve()
    if out in _held:
        return False
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output.dir: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        if not wait:
            os.close(fd)
            raise RecipeError(f"{out} is in use by another workbench run ({holder}); wait for it to finish or "
                              "choose another output.dir") from None
        log.info("%s is in use by another workbench run (%s): waiting for it", out, holder)
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}).encode())
    _held[out] = fd
    return True


def unlock(out: Path) -> None:
    fd = _held.pop(Path(out).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on {info['host']}"
    except (ValueError, KeyError, OSError):
        return "a process that is starting"


# --------------------------------------------------------------------------------------------- checks


def existing_outputs(out: Path) -> list[str]:
    return [n for n in OUTPUTS if (Path(out) / n).exists()]


def is_run(out: Path) -> bool:
    """Whether `out` was written by a workbench run (its marker; or, before markers, its checkpoints or
    final metrics)."""
    from workbench.trainer import checkpoints

    out = Path(out)
    return (out / MARKER).is_file() or bool(checkpoints(out)) or (out / "final_metrics.json").is_file()


def _lies_in(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both resolved: links, '..', '~')."""
    path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return path == folder or folder in path.parents


def check_source(name: str | None, key: str, out: Path) -> None:
    """A model the run loads must not lie in what the run replaces or writes in its directory (model/,
    adapter/, checkpoints/, ...): output.overwrite deleted it once the run had loaded it (a failed run then
    left it lost), and the final save replaced it (a teacher there became the student in the report)."""
    if not name or ":" in name:
        return
    src = Path(name).expanduser()
    if not src.exists():
        return
    for entry in OUTPUTS:
        if _lies_in(src, Path(out) / entry):
            raise RecipeError(f"{key}: {name} lies in {Path(out) / entry}, which this run replaces; copy it elsewhere "
                              "or choose another output.dir")


def check(recipe: Recipe) -> str:
    """Decide, before anything is loaded, what this run may do in its directory; raises a RecipeError when
    it may not start. Returns 'fresh', 'resume' or 'overwrite'."""
    from workbench.trainer import latest_checkpoint

    out = recipe.output_dir
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output.dir: {out} exists and is not a directory")
    found = existing_outputs(out)
    if not found:
        return "resume" if recipe.resume else "fresh"
    if recipe.output.overwrite:
        return "overwrite"
    if not is_run(out):
        raise RecipeError(f"output.dir: {out} holds files workbench did not write ({', '.join(found)}); choose "
                          "another output.dir, or pass output.overwrite=true to replace them")
    if not recipe.resume:
        prior = latest_checkpoint(out) or ((out / "model").exists() and out / "model") or out
        raise RecipeError(f"{out} already holds a run ({prior}); pass resume=true to continue it "
                          "or output.overwrite=true to start over")
    if latest_checkpoint(out) is None and (out / "model").exists():
        raise RecipeError(f"{out} holds a final model from a different recipe or step budget and no "
                          "checkpoint to resume from; pass output.overwrite=true or another output.dir")
    return "resume"


def recipe_changes(recipe: Recipe) -> tuple[dict, dict]:
    """What differs between `recipe` and the recipe.yaml the run directory was trained with so far:
    (changes that need allow_recipe_changes, changes that are only recorded); each key -> [old, new]."""
    path = recipe.output_dir / "recipe.yaml"
    if not path.is_file():
        return {}, {}
    try:
        old = build(Recipe, yaml_load(path.read_text()))
    except (RecipeError, ValueError) as e:
        raise RecipeError(f"{path}: the recipe this run was trained with does not load ({e}); pass "
                          "output.overwrite=true or another output.dir") from None
    a, b = _flatten(old.to_dict()), _flatten(recipe.to_dict())
    diff = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
    free = {k: v for k, v in diff.items() if k.startswith(_FREE)}
    recorded = {k: v for k, v in diff.items() if k in _RECORDED_FREE}
    needs = {k: v for k, v in diff.items() if k not in free and k not in recorded}
    return needs, recorded


def check_resume(recipe: Recipe, step: int, is_main: bool) -> None:
    """Refuse to continue a run with a changed recipe unless allow_recipe_changes; record what changed
    (recipe_changes.jsonl) and write the recipe now in force to recipe.yaml."""
    needs, recorded = recipe_changes(recipe)
    if needs and not recipe.allow_recipe_changes:
        shown = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in list(needs.items())[:6])
        more = f" (and {len(needs) - 6} more)" if len(needs) > 6 else ""
        raise RecipeError(f"resume: the recipe differs from the one {recipe.output_dir} was trained with "
                          f"({shown}{more}); resume with the same recipe, or pass allow_recipe_changes=true "
                          "to continue with the new one (the changes are recorded)")
    changed = {**needs, **recorded}
    if changed and is_main:
        for k, (old, new) in changed.items():
            log.warning("resume at step %d with %s changed: %r -> %r", step, k, old, new)
        with (recipe.output_dir / CHANGES).open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "changed": changed}) + "\n")
        write_file(recipe.output_dir / "recipe.yaml", recipe.to_yaml())


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{key}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            out[f"{key}.#"] = len(v)
            for i, x in enumerate(v):
                out.update(_flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------------------------- writing


def claim(recipe: Recipe) -> None:
    """Mark the run directory as this recipe's run (main process)."""
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"recipe": recipe.name, "fingerprint": recipe.fingerprint(),
                                          "started": time.time()}))


def clear_for_overwrite(recipe: Recipe) -> list[str]:
    """Remove every output of the previous run in the directory (called once the new run has loaded its
    data and models). Each entry is first moved into one hidden folder (a rename: atomic), which is then
    deleted, so the directory never holds a mix of old and new outputs. Returns what was removed."""
    out = recipe.output_dir
    found = existing_outputs(out)
    if not found:
        return []
    trash = out / f".overwritten-{os.getpid()}-{time.time_ns()}"
    trash.mkdir()
    for name in found:
        os.replace(out / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)
    log.info("output.overwrite: removed the previous run's %s from %s", ", ".join(found), out)
    return found


# ---------------------------------------------------------------- a model directory written by a tool, whole

def refuse_to_replace(dest: Path, overwrite: bool, option: str, source: Path | None = None) -> None:
    """A tool's destination must not exist or be an empty directory unless the user passed --overwrite, and
    never be (or hold) the `source` it is made from: --overwrite would have deleted the source."""
    if source is not None and source.exists() and _lies_in(source, dest):
        raise FileExistsError(f"{option} {dest} would replace {source}, which it is made from: choose another "
                              f"{option}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty: choose another {option} or pass --overwrite")


def partial_dir(dest: Path) -> Path:
    """The sibling directory a tool writes `dest` into (emptied first), moved into place when complete."""
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


@contextlib.contextmanager
def writing(tmp: Path, what):
    """Around writing the partial directory `tmp` of `what`: if that fails, `tmp` is removed (it holds nothing
    complete, and on a full disk the space a retry needs), and the file system's refusal (disk full, quota,
    read-only, permission) becomes a StorageError naming `what`."""
    try:
        yield
    except BaseException as e:
        err = storage_error(e, what, into=tmp if tmp.exists() else tmp.parent)  # before the space is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if err is not None:
            raise err from e
        raise


def write_together(files: dict[Path, bytes], what: str) -> None:
    """Write every file beside its destination first and move them into place only once all are written:
    on a full disk (or any failure) no file is left half written and none of the previous ones replaced; the
    file system's refusal is a StorageError naming `what`."""
    partial = {path: path.with_name(f".{path.name}.partial") for path in files}
    made = []  # directories made here: removed again if the files cannot be written
    try:
        for path, data in files.items():
            made += [d for d in (path.parent, *path.parent.parents) if not d.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            partial[path].write_bytes(data)
    except BaseException as e:
        err = storage_error(e, what, into=path.parent)
        for tmp in partial.values():
            tmp.unlink(missing_ok=True)
        for d in sorted(made, key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        if err is not None:
            raise err from e
        raise
    for path, tmp in partial.items():
        os.replace(tmp, path)


def write_file(path: Path, text: str) -> None:
    """`text` into `path`, whole or not at all (write_together)."""
    write_together({Path(path): text.encode()}, path)


def move_into_place(tmp: Path, dest: Path) -> None:
    """Replace `dest` (a directory, a file, or nothing) by the completed `tmp`. The old one is renamed aside
    and deleted only once `tmp` has taken its place: killed meanwhile (deleting a large model takes a
    while), `dest` holds the old or the new one whole, never part of one."""
    old = dest.with_name(f".{dest.name}.replaced")
    remove(old)  # left by a replacement that was killed
    if dest.exists() or dest.is_symlink():
        os.replace(dest, old)
    os.replace(tmp, dest)
    remove(old)


def remove(path: Path) -> None:
    """Delete a directory (renamed to a hidden name first, so that no half-deleted one is left under its
    own name by a kill), a file or a link; nothing if it does not exist."""
    if path.is_dir() and not path.is_symlink():
        for left in path.parent.glob(".*.removing"):  # left by a removal that was killed
            shutil.rmtree(left, ignore_errors=True)
        gone = path.with_name(f".{path.name}.removing")
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
