"""Peak memory and time of the distillation loss: our chunked, output-layer-fused loss against the naive
dense one (full student and teacher logits), forward + backward, at several vocabulary sizes.

    python -m workbench.bench.kd_loss_memory                 # vocab 32k and 128k, appends to BENCHMARKS.md
    python -m workbench.bench.kd_loss_memory --vocab 4096 --tokens 256 --no-record   # a quick look
    python -m workbench.bench.kd_loss_memory --liger     # Liger-Kernel's fused linear JSD setting, scaled to 24 GB

Each measurement runs in a fresh process: peak memory is the rise of the process's peak resident set
(ru_maxrss) over its resident set just before the loss, so it counts everything the loss allocates,
whatever the allocator. Both sides compute the same objective (0.5 forward KL at T=2 + 0.5 cross-entropy;
with --liger, generalised JSD beta 0.5 at T=1, the objective of Liger's LigerFusedLinearJSDLoss) from the
same student hidden states and output layer, and the teacher's hidden states and output layer. --liger is
Liger's published setting (hidden 4096 on both sides, vocabulary 128,256; they use 8,192 tokens on an H100)
with as many tokens as the dense loss fits in this machine's 24 GB (3,072: 16.6 GB for the loss, 4 GB for
the two output layers; --tokens).

    python -m workbench.bench.kd_loss_memory --liger --gpu --no-record   # on a CUDA GPU, Liger's own setting

--gpu measures on the GPU in bf16 (peak = torch.cuda.max_memory_allocated over the allocation before the
loss) with 8,192 tokens unless --tokens says otherwise, and adds Liger-Kernel's LigerFusedLinearJSD itself
(`liger_kernel`, when importable) on the same tensors, at its default (bf16 weight-gradient accumulation)
and with accum_dtype=float32 (ours always accumulates in float32): the Liger table is what issue 17 compares with.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from workbench.bench import _report

REPO = Path(__file__).resolve().parents[2]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


OBJECTIVES = {"kl_ce": "0.5 forward KL (T=2) + 0.5 CE", "jsd": "generalised JSD (beta 0.5, T=1)"}


def _one(variant: str, vocab: int, tokens: int, hidden: int, t_hidden: int, reps: int, objective: str,
         chunk: int = 0, device: str = "cpu") -> dict:
    import torch

    from workbench.config import LossTerm
    from workbench.losses import LogitObjective, ModelOutputs, _teacher_rows, auto_chunk, chunked_logit_loss

    torch.manual_seed(0)
    fn = LogitObjective([LossTerm("forward_kl", 0.5, 2.0), LossTerm("cross_entropy", 0.5)] if objective == "kl_ce"
                        else [LossTerm("jsd", 1.0, beta=0.5)])
    if variant == "dense":  # the textbook loss: full logits, autograd through the divergence's formula
        for m in fn.losses:
            m.closed_form = False
    gpu = device != "cpu"
    kw = dict(device=device, dtype=torch.bfloat16 if gpu else torch.float32)
    # scaled in place: a scaled copy would leave a freed [V, H] temporary in the peak before the loss starts
    h = torch.randn(tokens, hidden, **kw).mul_(0.5)
    W = torch.nn.Parameter(torch.randn(vocab, hidden, **kw).mul_(0.02))
    ht = torch.randn(tokens, t_hidden, **kw).mul_(0.5)
    Wt = torch.randn(vocab, t_hidden, **kw).mul_(0.02)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    rows = {"labels": labels}
    liger = None
    if variant.startswith("liger"):  # Liger-Kernel's fused linear JSD (same beta convention: 0 forward KL, 1 reverse)
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

        if objective != "jsd":
            raise SystemExit("the liger variant computes the JSD objective only (--objective jsd or --liger)")
        # liger32: its float32 accumulation of the weight gradient, the precision ours keeps
        liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0,
                                    accum_dtype=torch.float32 if variant == "liger32" else None)

    def step():
        x = h.clone().requires_grad_()
        if variant == "dense":
            s_logits = x @ W.T  # [N, V]
            with torch.no_grad():
                t_logits = ht @ Wt.T
            total, _ = fn(s_logits, t_logits, rows)
        elif liger is not None:
            # labels only mask ignore_index (-100): none here. Liger returns the mean over tokens, our
            # objective the sum (the trainer divides by the batch's tokens): scaled to ours for the comparison
            total = liger(x, W, ht, Wt, labels) * tokens
        else:
            # the teacher's logits chunk by chunk, as the trainer's (one buffer per loss call)
            teacher_rows = _teacher_rows(ModelOutputs(final_hidden=ht, head_weight=Wt), ht.shape[0], None)
            total, _ = chunked_logit_loss(fn, x, rows, teacher_rows, W, None, chunk=chunk)
        total.backward()
        value = total.item()
        W.grad = None
        return value

    if gpu:
        step()  # compile / autotune outside the timing; the peak is reset after it
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 1024
    else:
        before = _rss_kib()
    times, value = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        value = step()
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 1024 if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "vocab": vocab, "peak_mib": (peak - before) / 1024,
            "seconds": sorted(times)[len(times) // 2], "loss": value,
            "chunk": None if variant == "dense" else chunk or auto_chunk(vocab, hidden)}


def _measure(variant, vocab, tokens, hidden, t_hidden, reps, objective, chunk=0, gpu=False) -> dict:
    cmd = [sys.executable, "-m", "workbench.bench.kd_loss_memory", "--child", variant, "--vocab", str(vocab),
           "--tokens", str(tokens), "--hidden", str(hidden), "--teacher-hidden", str(t_hidden), "--reps", str(reps),
           "--objective", objective, "--chunk", str(chunk)] + (["--gpu"] if gpu else [])
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, nargs="*", default=[32_000, 128_000])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--teacher-hidden", type=int, default=384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--objective", choices=sorted(OBJECTIVES), default="kl_ce")
    ap.add_argument("--liger", action="store_true", help="hidden 4096 both sides, vocab 128,256, JSD, 3,072 tokens "
                                                          "(unless --tokens says otherwise), one repetition")
    ap.add_argument("--chunk", type=int, nargs="*", default=[0],
                    help="rows per chunk of ours, one measurement each (0: auto_chunk's choice)")
    ap.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    ap.add_argument("--gpu", action="store_true", help="measure on the CUDA GPU in bf16, with Liger-Kernel's "
                                                       "LigerFusedLinearJSD when importable (8,192 tokens with --liger)")
    ap.add_argument("--child", choices=["dense", "ours", "liger", "liger32"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sizes = {"--vocab": args.vocab, "--tokens": [args.tokens], "--hidden": [args.hidden],
             "--teacher-hidden": [args.teacher_hidden], "--reps": [args.reps]}
    for flag, values in sizes.items():
        if not values or min(values) < 1:
            ap.error(f"{flag} must be at least 1")
    if min(args.chunk, default=0) < 0:
        ap.error("--chunk must be >= 0 (0: auto_chunk's choice)")
    if args.liger:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        args.vocab, args.hidden, args.teacher_hidden, args.objective = [128_256], 4096, 4096, "jsd"
        # dense: 16.6 GB + 4 GB of weights on this 24 GB machine; a GPU takes Liger's own 8,192
        args.tokens = args.tokens if "--tokens" in given else 8192 if args.gpu else 3072
        args.reps = args.reps if "--reps" in given else 1
    if args.child:
        print(json.dumps(_one(args.child, args.vocab[0], args.tokens, args.hidden, args.teacher_hidden, args.reps,
                              args.objective, args.chunk[0], "cuda" if args.gpu else "cpu")))
        return 0
    import torch

    if args.gpu and not torch.cuda.is_available():
        print("error: --gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    with_liger = False
    if args.gpu and args.objective == "jsd":
        try:
            import liger_kernel  # noqa: F401

            with_liger = True
        except ImportError:
            print("liger_kernel is not installed: no Liger column", file=sys.stderr)

    rows = []
    for v in args.vocab:
        d = _measure("dense", v, args.tokens, args.hidden, args.teacher_hidden, args.reps, args.objective,
                     gpu=args.gpu)
        lg = [_measure(k, v, args.tokens, args.hidden, args.teacher_hidden, args.reps, args.objective, gpu=True)
              for k in ("liger", "liger32")] if with_liger else None
        for c in args.chunk:
            o = _measure("ours", v, args.tokens, args.hidden, args.teacher_hidden, args.reps, args.objective, c,
                         gpu=args.gpu)
            rows.append((v, d, o, lg))
    machine = _report.machine()
    peak = ("bf16 on the GPU, one untimed step first; peak = torch.cuda.max_memory_allocated over the allocation "
            "before the loss" if args.gpu else "peak = rise of peak RSS over the RSS before the loss")
    lines = [
        f"### KD loss: chunked + fused vs dense ({time.strftime('%Y-%m-%d')})",
        "",
        f"Machine: {machine}. {args.tokens} tokens, student width {args.hidden}, teacher width "
        f"{args.teacher_hidden}; objective {OBJECTIVES[args.objective]}; forward + backward, median of "
        f"{args.reps}; {peak}, fresh process each.",
        "",
        "| vocab | rows per chunk | dense peak MiB | ours peak MiB | memory ratio (dense/ours) | dense s | ours s | time ratio (ours/dense) | same loss |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for v, d, o, _ in rows:
        same = abs(d["loss"] - o["loss"]) <= (1e-2 if args.gpu else 1e-3) * max(1.0, abs(d["loss"]))
        lines.append(f"| {v:,} | {o['chunk']} | {d['peak_mib']:.0f} | {o['peak_mib']:.0f} | {d['peak_mib'] / max(o['peak_mib'], 1e-9):.1f}x "
                     f"| {d['seconds']:.2f} | {o['seconds']:.2f} | {o['seconds'] / d['seconds']:.2f} | {same} |")
    if with_liger:
        lines += ["", "Liger: LigerFusedLinearJSD at its default (weight gradient accumulated in bf16) and with "
                      "accum_dtype=float32 (accumulated in float32, as ours always is).", "",
                  "| vocab | Liger accumulates | rows per chunk (ours) | Liger peak MiB | ours peak MiB | "
                  "ours / Liger memory | Liger s | ours s | ours / Liger time | Liger loss per token | "
                  "ours loss per token |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for v, _, o, lgs in rows:
            for acc, lg in zip(("bf16", "float32"), lgs):
                lines.append(f"| {v:,} | {acc} | {o['chunk']} | {lg['peak_mib']:.0f} | {o['peak_mib']:.0f} | "
                             f"{o['peak_mib'] / max(lg['peak_mib'], 1e-9):.2f} | {lg['seconds']:.3f} | "
                             f"{o['seconds']:.3f} | {o['seconds'] / lg['seconds']:.2f} | "
                             f"{lg['loss'] / args.tokens:.6f} | {o['loss'] / args.tokens:.6f} |")
    text = "\n".join(lines)
    _report.publish(text, record=not args.no_record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
