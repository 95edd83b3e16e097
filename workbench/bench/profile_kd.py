"""Where the time of one distillation step goes, ours against TRL's GKDTrainer, in the `vs_trl` setting
(tiny teacher and student, 8 x 256 tokens, generalised JSD beta 0.5, lambda 0), under torch.profiler.

    python -m workbench.bench.profile_kd                  # 3 warm-up + 10 profiled steps each, appends to BENCHMARKS.md
    python -m workbench.bench.profile_kd --steps 4 --no-record
    python -m workbench.bench.profile_kd --teacher smollm2 --warmup 1 --steps 2   # SmolLM2 and its pruned copy

Parts of a step: ours are the trainer's own profiler labels (`wb/...`, trainer._region); TRL's are the
same parts wrapped from outside (its student's and teacher's forward, `generalized_jsd_loss`, the
accelerator's backward, gradient clipping and the optimizer step). Our loss forms its gradient during
its forward pass (chunked), so our "backward" is the student's alone; TRL's holds the loss's backward too.
"other" is the step's wall time minus the parts (data loading, the Trainer's or our loop's bookkeeping).
Each framework runs in a fresh process; the step's wall time comes from the optimizer-step hook, without
the profiler's per-op overhead removed (both pay it alike). The top operators (self CPU time) show what
the parts are made of.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from torch.optim import optimizer as _optim

from workbench.bench import _report, vs_trl

PARTS = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer")


class _StepClock:
    """torch.profiler stepped from the optimizer-step hook: `warmup` steps unprofiled, then `steps`
    profiled ones, timed (wall) between consecutive optimizer steps."""

    def __init__(self, warmup: int, steps: int):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.n, self.stamps = 0, []
        self.warmup, self.steps = warmup, steps
        self.prof = profile(activities=[ProfilerActivity.CPU],
                            schedule=schedule(wait=0, warmup=warmup, active=steps, repeat=1))

    def __enter__(self):
        self.prof.__enter__()
        self.hook = _optim.register_optimizer_step_post_hook(self._after_step)
        return self

    def _after_step(self, *_):
        self.n += 1
        if self.warmup <= self.n <= self.warmup + self.steps:
            self.stamps.append(time.perf_counter())
        self.prof.step()

    def __exit__(self, *exc):
        self.hook.remove()
        self.prof.__exit__(*exc)

    def table(self, prefix: str) -> dict:
        if len(self.stamps) < self.steps + 1:
            raise RuntimeError(f"only {len(self.stamps) - 1} profiled steps of {self.steps} completed")
        events = self.prof.key_averages()
        wall = (self.stamps[-1] - self.stamps[0]) / self.steps
        parts = {e.key[len(prefix):]: e.cpu_time_total / 1e6 / self.steps for e in events if e.key.startswith(prefix)}
        ops = sorted((e for e in events if not e.key.startswith(("wb/", "trl/", "ProfilerStep"))),
                     key=lambda e: -e.self_cpu_time_total)[:12]
        return {"step_s": wall, "parts_s": parts,
                "top_ops": [(e.key, e.self_cpu_time_total / 1e6 / self.steps, e.count // self.steps) for e in ops]}


def _wrap(fn, name: str):
    def wrapped(*a, **k):
        with torch.profiler.record_function("trl/" + name):
            return fn(*a, **k)
    return wrapped


def _child(framework: str, warmup: int, steps: int, out: str, teacher_name: str = "tiny",
           student_layers: int = 15) -> dict:
    import dataclasses

    accelerator, recipe, tok, packed, teacher, student = vs_trl.setting_setup(teacher_name, out, 0, student_layers)
    recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_steps=warmup + steps + 1))
    clock = _StepClock(warmup, steps)
    if framework == "ours":
        from workbench import trainer as T

        with clock:
            T.train(recipe, accelerator, student, tok, packed, teacher=teacher, kd_vocab=len(tok))
        return {**clock.table("wb/"), "vocab": len(tok)}
    trainer = vs_trl.trl_trainer(recipe, student, teacher, tok, packed, recipe.train.max_steps, 0.0, out)
    student.forward = _wrap(student.forward, "student_forward")
    teacher.forward = _wrap(teacher.forward, "teacher_forward")
    trainer.generalized_jsd_loss = _wrap(trainer.generalized_jsd_loss, "loss")
    trainer.accelerator.backward = _wrap(trainer.accelerator.backward, "backward")
    clip = trainer.accelerator.clip_grad_norm_
    trainer.accelerator.clip_grad_norm_ = _wrap(clip, "clip")
    with _LabelledOptimizerStep(), clock:  # (its hook runs before the clock's: the label ends within the step)
        trainer.train()
    r = clock.table("trl/")
    r["parts_s"]["optimizer"] = r["parts_s"].pop("optimizer_step", 0.0) + r["parts_s"].pop("clip", 0.0)
    r["vocab"] = len(tok)
    return r


class _LabelledOptimizerStep:
    """Labels every optimizer step "trl/optimizer_step", through torch's global optimizer hooks."""

    def __enter__(self):
        self.hooks = [_optim.register_optimizer_step_pre_hook(self._pre),
                      _optim.register_optimizer_step_post_hook(self._post)]
        return self

    def _pre(self, *_):
        self.label = torch.profiler.record_function("trl/optimizer_step")
        self.label.__enter__()

    def _post(self, *_):
        self.label.__exit__(None, None, None)

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-record", action="store_true")
    vs_trl.add_setting_args(ap)
    ap.add_argument("--child", nargs=2, metavar=("FRAMEWORK", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        ap.error("--warmup must be >= 0 and --steps >= 1")
    vs_trl.check_setting_args(ap, args)
    if args.child:
        print("RESULT " + json.dumps(_child(args.child[0], args.warmup, args.steps, args.child[1], args.teacher,
                                            args.student_layers)))
        return 0
    res = {}
    for fw in ("trl", "ours"):
        out = str(_report.REPO / "outputs" / "bench_profile_kd" / f"{args.teacher}-{fw}")
        cmd = [sys.executable, "-m", "workbench.bench.profile_kd", "--warmup", str(args.warmup), "--steps",
               str(args.steps), "--teacher", args.teacher, "--student-layers", str(args.student_layers),
               "--child", fw, out]
        done = subprocess.run(cmd, cwd=_report.REPO, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{fw} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        res[fw] = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
        print(fw, res[fw], flush=True)
    import trl

    lines = [f"### Where a KD step's time goes: ours vs TRL GKDTrainer ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}, trl {trl.__version__}. The `vs_trl` setting at lambda 0 (" + (
                 "tiny teacher 5.5M, student 1.3M" if args.teacher == "tiny" else
                 f"{vs_trl.TEACHER_NAMES[args.teacher]}, student: its copy pruned to {args.student_layers} blocks") +
             f", {vs_trl.BATCH} x {vs_trl.SEQ} tokens, vocabulary {res['ours']['vocab']:,}, generalised JSD beta 0.5); "
             f"torch.profiler over {args.steps} steps after {args.warmup} warm-up steps, ms per step. Ours: "
             "the loss forms its gradient in its forward pass, so our backward is the student's only; TRL's "
             "backward includes the loss's.", "",
             "| part | TRL ms | ours ms | ours / TRL |", "| --- | ---: | ---: | ---: |"]
    for part in (*PARTS, "other", "step"):
        v = {}
        for fw, r in res.items():
            p = r["parts_s"]
            v[fw] = (r["step_s"] if part == "step" else r["step_s"] - sum(p.get(k, 0.0) for k in PARTS)
                     if part == "other" else p.get(part, 0.0))
        ratio = f"{v['ours'] / v['trl']:.2f}x" if v["trl"] > 1e-6 else ""
        lines.append(f"| {'**step (wall)**' if part == 'step' else part.replace('_', ' ')} | {1e3 * v['trl']:.1f} | "
                     f"{1e3 * v['ours']:.1f} | {ratio} |")
    for fw, r in res.items():
        lines += ["", f"Top operators, {fw} (self CPU ms per step, calls per step): " + "; ".join(
            f"`{k}` {1e3 * s:.1f} ({n})" for k, s, n in r["top_ops"][:8])]
    _report.publish("\n".join(lines), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
