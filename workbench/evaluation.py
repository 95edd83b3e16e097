"""Evaluation of finished runs, written as report.md and a self-contained report.html with plots.

For the main run (and any baseline runs beside it, e.g. sft_tiny next to kd_tiny): validation
perplexity of teacher and students, parameter counts and sizes on disk, training throughput and peak
memory, ROUGE-L of greedy continuations of held-out prompts against the true continuations, accuracy on a
multiple-choice task (the true next line of a held-out document among four lines of it, or a .jsonl task
file), generation samples side by side, and speculative decoding with the teacher as target and each
student as draft. Plots: loss curves per loss term, validation perplexity against steps, accepted drafts
per verification. Metrics go through `evaluate` (our offline modules in workbench/metrics).

    from workbench.evaluation import report
    md, html = report(["outputs/kd_tiny", "outputs/sft_tiny"])
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from workbench import rundir
from workbench.config import EvalConfig, Recipe, RecipeError, load_recipe

log = logging.getLogger(__name__)
logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs each scorer it builds at INFO
METRICS_DIR = Path(__file__).resolve().parent / "metrics"


# --------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """A finished training run directory."""

    path: Path
    final: dict  # final_metrics.json
    recipe: Recipe  # recipe.yaml as trained
    records: list[dict] = field(default_factory=list)  # metrics.jsonl

    @property
    def name(self) -> str:
        return self.final.get("recipe", self.path.name)


def load_run(path: str | Path) -> Run:
    from workbench.trainer import read_metrics

    path = Path(path)
    final = path / "final_metrics.json"
    if not final.is_file():
        raise FileNotFoundError(f"{final} not found: has the run in {path} finished?")
    recipe = load_recipe(str(path / "recipe.yaml")) if (path / "recipe.yaml").is_file() else Recipe()
    try:
        metrics = json.loads(final.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise RecipeError(f"{final}: not the JSON a finished run writes ({e})") from None
    return Run(path, metrics, recipe, read_metrics(path))


def same_val_data(runs: list[Run]) -> bool:
    """Whether the runs were validated on the same blocks: their validation blocks' fingerprints (runs
    whose training data differ, e.g. sequence KD, share them), or for runs made before those were
    recorded, their whole data keys."""
    if all(r.final.get("val_key") for r in runs):
        return len({r.final["val_key"] for r in runs}) == 1
    return len({r.final["data_key"] for r in runs}) == 1


def perplexity_table(runs: list[Run]) -> str:
    """Plain-text table of validation perplexities: each distinct teacher once, then every student."""
    rows, teachers = [], {}
    for r in runs:
        if r.final.get("teacher_val_ppl") is not None:
            teachers.setdefault(r.final.get("teacher", "teacher"), r.final["teacher_val_ppl"])
    rows += [("teacher", _short(name), ppl, None) for name, ppl in teachers.items()]
    rows += [("student", f"{r.name} ({r.path})", r.final["student_val_ppl"], r.final["step"]) for r in runs]
    width = max(len(r[1]) for r in rows)
    lines = [f"validation perplexity on {runs[0].final['val_tokens']:,} held-out tokens (lower is better)",
             f"  {'role':8s} {'model':{width}s} {'steps':>6s} {'ppl':>10s}"]
    for role, name, ppl, step in rows:
        lines.append(f"  {role:8s} {name:{width}s} {'' if step is None else step:>6} {ppl:10.3f}")
    if not same_val_data(runs):
        lines.append("WARNING: these runs used different validation data; their perplexities are not comparable")
    elif len(runs) == 2 and runs[1].final.get("teacher_val_ppl") is None:
        a, b = runs[0].final, runs[1].final
        lines.append(f"  {a['recipe']} / {b['recipe']} perplexity ratio: {a['student_val_ppl'] / b['student_val_ppl']:.3f}")
    return "\n".join(lines)


def run_labels(runs: list[Run]) -> list[str]:
    """One distinct label per run: its recipe name; a name taken already gets the run directory's name,
    then its whole path, then a number (the same directory given twice)."""
    labels: list[str] = []
    for r in runs:
        for label in (r.name, f"{r.name} ({r.path.name})", f"{r.name} ({r.path})"):
            if label not in labels:
                break
        else:
            label = f"{r.name} ({r.path}) #{len(labels) + 1}"
        labels.append(label)
    return labels


def _short(path: str) -> str:
    parts = Path(path).parts
    return str(Path(*parts[-3:])) if len(parts) > 3 else path


# --------------------------------------------------------------------------------------------- tasks


def held_out_prompts(texts: list[str], n: int, context_chars: int, regex: str | None = None) -> list[tuple[str, str]]:
    """`n` (prompt, true continuation) pairs spread evenly over held-out documents. A prompt ends right
    after a match of `regex` (or at the end of a line) and holds at most `context_chars` characters,
    starting at a line start where it can."""
    pattern = re.compile(regex if regex else r"\n", flags=re.M)
    found = []
    for text in texts:
        for m in pattern.finditer(text):
            end = m.end()
            if end >= len(text) or not text[end:].strip():
                continue
            prompt = _tail(text[:end], context_chars)
            if prompt.strip():
                found.append((prompt, text[end : end + 4000]))
    if len(found) < n:
        raise ValueError(f"only {len(found)} prompts in the held-out documents, asked for {n}")
    step = len(found) / max(n, 1)
    return [found[int(i * step)] for i in range(n)]


def held_out_completions(corpus, tok, n: int) -> list[tuple[str, str]]:
    """`n` (prompt, reference) pairs spread evenly over the held-out rows of a chat or prompt/completion
    corpus: the prompt as the model sees it (the tokenizer's chat template with the assistant turn opened,
    when it has one), the reference the completion (or the last assistant message)."""
    rows = corpus.val_rows or []
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} prompts in the held-out documents, asked for {n}")
    from workbench.data import row_prompt

    return [row_prompt(tok, rows[int(i * len(rows) / n)], corpus.format) for i in range(n)]


def task_prompts(corpus, tok, n: int, context_chars: int, regex: str | None = None) -> tuple[list[tuple[str, str]], bool]:
    """`n` (prompt, reference) pairs of `corpus`'s held-out data and whether the prompts are rendered rows
    (data.encode_prompts): held_out_prompts for text, held_out_completions for chat and prompt/completion."""
    if corpus.format == "text":
        return held_out_prompts(corpus.val_texts, n, context_chars, regex), False
    return held_out_completions(corpus, tok, n), True


def _tail(text: str, n: int) -> str:
    """The last `n` characters of `text` at most, starting at a line start when one falls in them."""
    if len(text) <= n:
        return text
    nl = text.find("\n", len(text) - n, len(text) - 1)
    return text[nl + 1 :] if nl >= 0 else text[-n:]


def next_line_items(texts: list[str], n: int, context_chars: int, choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice items from held-out documents: the lines before a line (at most context_chars
    characters) as the prompt, that line and `choices - 1` other lines of the same document as choices."""
    rng = random.Random(seed)
    pool = []
    for text in texts:
        lines = text.split("\n")
        distinct = sorted({ln for ln in lines if len(ln.strip()) >= 8})
        if len(distinct) < choices:
            continue
        for i in range(1, len(lines)):
            if len(lines[i].strip()) >= 8 and "\n".join(lines[max(0, i - 3) : i]).strip():
                pool.append((lines, i, distinct))
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} candidate lines in the held-out documents, asked for {n} items")
    items = []
    for j in range(n):
        lines, i, distinct = pool[int(j * len(pool) / n)]
        others = rng.sample([ln for ln in distinct if ln != lines[i]], choices - 1)
        opts = others + [lines[i]]
        rng.shuffle(opts)
        items.append({"prompt": _tail("\n".join(lines[:i]) + "\n", context_chars), "choices": opts,
                      "label": opts.index(lines[i])})
    return items


def read_task_file(path: str | Path) -> list[dict]:
    """{"prompt", "choices", "label"} items of a .jsonl task file, checked (a RecipeError names the line)."""
    items = []
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"eval.task_file: cannot read {path} as UTF-8 text ({e})") from None
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"eval.task_file: {path}:{i + 1}: not JSON ({e.msg})") from None
        ok = isinstance(item, dict) and {"prompt", "choices", "label"} <= set(item) and isinstance(item["prompt"], str)
        ok = ok and isinstance(item["choices"], list) and len(item["choices"]) >= 2 and all(
            isinstance(c, str) for c in item["choices"])
        ok = ok and isinstance(item["label"], int) and not isinstance(item["label"], bool)
        if not ok or not 0 <= item["label"] < len(item["choices"]):
            raise RecipeError(f"eval.task_file: {path}:{i + 1}: need prompt (a string), choices (a list of at least "
                              "2 strings) and label (an index into choices)")
        items.append(item)
    if not items:
        raise RecipeError(f"eval.task_file: {path} holds no items")
    return items


def check_report_inputs(cfg: EvalConfig, val_texts: list[str], val_rows: list | None = None) -> None:
    """Raise a RecipeError now (before training) for a report that could not be made afterwards: a bad
    task file, more prompts or multiple-choice items than the held-out documents hold."""
    if not cfg.report:
        return
    if cfg.task_file:
        read_task_file(cfg.task_file)
    try:
        if cfg.prompts and val_rows is not None:
            if len(val_rows) < cfg.prompts:
                raise ValueError(f"only {len(val_rows)} prompts in the held-out documents, asked for {cfg.prompts}")
        elif cfg.prompts:
            held_out_prompts(val_texts, cfg.prompts, cfg.context_chars, cfg.prompt_regex)
        if cfg.choice_items and not cfg.task_file:
            next_line_items(val_texts, cfg.choice_items, cfg.context_chars)
    except ValueError as e:
        key = "eval.prompts" if "prompts" in str(e) else "eval.choice_items"
        raise RecipeError(f"{key}: {e}; lower it, raise data.val_fraction, or set eval.report=false") from None


@torch.no_grad()
def choose(model, tok, items: list[dict], batch: int = 16) -> list[int]:
    """The choice with the highest mean log-likelihood per token after its prompt, for each item.
    Prompt and choice are tokenised together (byte-level BPE merges across the seam, e.g. a newline with
    the next line's indentation), and the tokens that end inside the choice are the ones scored."""
    device = next(model.parameters()).device
    limit = getattr(model.config, "max_position_embeddings", 2048)
    seqs = []  # (ids, number of scored tokens at the end)
    for item in items:
        for choice in item["choices"]:
            enc = tok(item["prompt"] + choice, add_special_tokens=False, return_offsets_mapping=True)
            n_c = sum(1 for _, end in enc.offset_mapping if end > len(item["prompt"]))
            ids = enc.input_ids[-limit:]
            n_c = min(max(n_c, 1), len(ids) - 1)
            if len(ids) < 2:
                raise ValueError(f"a prompt and choice of one token cannot be scored: {item['prompt'] + choice!r}")
            seqs.append((ids, n_c))
    scores = []
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        width = max(len(s) for s, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (s, _) in enumerate(chunk):  # right-padded: positions are those of an unpadded row
            ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
        logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        for r, (s, n_c) in enumerate(chunk):  # positions len(s)-n_c-1 .. len(s)-2 predict the scored tokens
            pos = torch.arange(len(s) - n_c - 1, len(s) - 1, device=device)
            tgt = torch.tensor(s[len(s) - n_c :], device=device)
            scores.append(float(logp[r, pos, tgt].mean()))
    out, k = [], 0
    for item in items:
        m = len(item["choices"])
        out.append(max(range(m), key=lambda j: scores[k + j]))
        k += m
    return out


def _greedy(model, tok, prompts: list[str], rendered: bool, max_new: int, batch: int = 8, name: str = "") -> list[str]:
    from tqdm.auto import tqdm

    from workbench.data import encode_prompts
    from workbench.speculative import target_generate

    device = next(model.parameters()).device
    texts = []
    starts = range(0, len(prompts), batch)
    for i in tqdm(starts, desc=f"generating ({name})" if name else "generating", unit="batch", disable=len(starts) < 2):
        enc = encode_prompts(tok, prompts[i : i + batch], device, rendered=rendered)
        out = target_generate(model, enc.input_ids, max_new, attention_mask=enc.attention_mask,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out.sequences[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return texts


def _speculation(teacher, drafts: dict, tok, prompts: list[str], rendered: bool, max_new: int, k: int) -> dict:
    """Speculative decoding (batch 1 per prompt) with each draft against the teacher alone, decoded once:
    {draft name: rates, speed-up, identical tokens}."""
    from tqdm.auto import tqdm

    from workbench.data import encode_prompts
    from workbench.speculative import SpecStats, speculative_generate, target_generate

    device = next(teacher.parameters()).device
    common = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    ids = [encode_prompts(tok, [p], device, rendered=rendered).input_ids for p in prompts]
    alone, ref = SpecStats(), []
    for x in tqdm(ids, desc="teacher alone", unit="prompt", disable=len(ids) < 2):
        a = target_generate(teacher, x, max_new, **common)
        alone.add(a.stats), ref.append(a.sequences)
    out = {}
    for name, draft in drafts.items():
        spec, same = SpecStats(), True
        for x, r in tqdm(list(zip(ids, ref)), desc=f"speculative ({name})", unit="prompt", disable=len(ids) < 2):
            s = speculative_generate(teacher, draft, x, max_new, draft_len=k, **common)
            spec.add(s.stats)
            same = same and torch.equal(r, s.sequences)
        out[name] = {**spec.as_dict(), "teacher_tokens_per_s": alone.tokens_per_second, "identical": same,
                     "speedup": spec.tokens_per_second / max(alone.tokens_per_second, 1e-9), "draft_len": k}
    return out


def paired_interval(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b over paired items and its 95% bootstrap interval (items resampled with replacement)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return float("nan"), float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


# --------------------------------------------------------------------------------------------- evaluation


def evaluate_runs(run_dirs: list[str | Path], cfg: EvalConfig | None = None, device=None) -> dict:
    """Everything the report shows, as plain data. The first run is the main one: its teacher, tokenizer
    and held-out data serve every run; the others are baselines (they must share the tokenizer)."""
    from workbench.data import load_corpus, tokenizer_fingerprint
    from workbench.models import count_parameters, load_tokenizer
    from workbench.speculative import left_padding

    runs = [load_run(d) for d in run_dirs]
    main = runs[0]
    cfg = cfg or main.recipe.eval
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = left_padding(load_tokenizer(main.path / "model", "the tokenizer of a run"))
    for r in runs[1:]:
        if tokenizer_fingerprint(load_tokenizer(r.path / "model", "the tokenizer of a run")) != tokenizer_fingerprint(tok):
            raise ValueError(f"{r.path} uses another tokenizer than {main.path}: the runs cannot be compared")

    models = {label: (r, _load_student(r, device)) for label, r in zip(run_labels(runs), runs)}
    teacher_path = main.final.get("teacher")
    teacher = None
    if teacher_path and Path(teacher_path).is_dir():
        if tokenizer_fingerprint(load_tokenizer(teacher_path, "the teacher's tokenizer")) == tokenizer_fingerprint(tok):
            teacher = _load_teacher(main, teacher_path, device)
        else:  # a cross-tokenizer teacher: its text metrics and drafting need the students' tokens
            log.info("the teacher %s uses another tokenizer: the report scores the students only", teacher_path)

    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "main": main.name, "machine": machine(),
           "val_tokens": main.final["val_tokens"], "same_val_data": same_val_data(runs),
           "models": [], "training": [], "tasks": {}, "rouge_per_prompt": {}, "samples": [], "speculative": {},
           "curves": {},
           "eval": dataclasses.asdict(cfg)}
    if teacher is not None:
        res["models"].append({"role": "teacher", "name": _short(teacher_path), "params": count_parameters(teacher),
                              "disk_bytes": _disk(teacher_path), "val_ppl": main.final.get("teacher_val_ppl"),
                              "held_as": _held_as(teacher)})
    for name, (r, m) in models.items():
        res["models"].append({"role": "student", "name": name, "params": count_parameters(m),
                              "disk_bytes": _disk(r.path / "model"), "val_ppl": r.final["student_val_ppl"],
                              "adapter_bytes": _disk(r.path / "adapter") if (r.path / "adapter").is_dir() else None,
                              "held_as": _held_as(m)})
        f = r.final
        res["training"].append({"name": name, "steps": f["step"], "tokens": f["train_tokens"],
                                "seconds": f["train_seconds"], "tokens_per_s": f["train_tokens"] / max(f["train_seconds"], 1e-9),
                                "peak_memory_mib": f.get("peak_memory_mib"), "peak_memory_kind": f.get("peak_memory_kind"),
                                "losses": [t.name for t in r.recipe.distill.losses]})
        res["curves"][name] = {"loss": {k[len("train/"):]: [(x["step"], x[k]) for x in r.records if k in x]
                                        for k in sorted({k for x in r.records for k in x if k.startswith("train/")})},
                               "val_ppl": [(x["step"], x["val/ppl"]) for x in r.records if "val/ppl" in x]}

    scored = {**({"teacher": teacher} if teacher is not None else {}), **{n: m for n, (_, m) in models.items()}}
    corpus = load_corpus(main.recipe.data) if (cfg.prompts or (cfg.choice_items and not cfg.task_file)) else None
    if cfg.prompts:
        pairs, rendered = task_prompts(corpus, tok, cfg.prompts, cfg.context_chars, cfg.prompt_regex)
        prompts = [p for p, _ in pairs]
        from workbench.speculative import check_prompts_fit

        check_prompts_fit(scored.values(), tok, prompts, rendered, cfg.max_new_tokens,
                          f"eval.max_new_tokens={cfg.max_new_tokens}")
        refs = [tok.decode(tok(ref, add_special_tokens=False).input_ids[: cfg.max_new_tokens]) for _, ref in pairs]
        rouge = _metric("rouge_l")
        gens = {}
        for name, m in scored.items():
            gens[name] = _greedy(m, tok, prompts, rendered, cfg.max_new_tokens, name=name)
            scores = rouge.compute(predictions=gens[name], references=refs)
            res["tasks"].setdefault(name, {})["rougeL"] = scores["rougeL"]
            res["rouge_per_prompt"][name] = scores["rougeL_per_example"]
        res["tasks_info"] = {"rouge_prompts": len(prompts)}
        res["completions"] = {"prompts": prompts, "references": refs, **gens}
        res["samples"] = [{"prompt": prompts[i], "reference": refs[i], **{n: g[i] for n, g in gens.items()}}
                          for i in range(min(cfg.samples, len(prompts)))]
        if teacher is not None and cfg.speculative:
            res["speculative"] = _speculation(teacher, {n: m for n, (_, m) in models.items()}, tok, prompts, rendered,
                                              cfg.max_new_tokens, cfg.draft_len)
    if cfg.choice_items or cfg.task_file:
        items = read_task_file(cfg.task_file) if cfg.task_file else \
            next_line_items(corpus.val_texts, cfg.choice_items, cfg.context_chars)
        acc = _metric("accuracy")
        refs = [it["label"] for it in items]
        for name, m in scored.items():
            res["tasks"].setdefault(name, {})["accuracy"] = acc.compute(predictions=choose(m, tok, items),
                                                                       references=refs)["accuracy"]
        res.setdefault("tasks_info", {})["choice_items"] = len(items)
        res["tasks_info"]["choice_task"] = Path(cfg.task_file).name if cfg.task_file else "next line among 4"
    return res


def _load_student(run: Run, device):
    """The run's student as training held it: a quantised base with its adapter (QLoRA), else the saved model
    (in bf16 on a GPU when it trained in bf16)."""
    from workbench.models import load_for_inference

    s = run.recipe.student
    if s.quantized and (run.path / "adapter" / "adapter_config.json").is_file():
        return load_for_inference(str(run.path / "adapter"), "student", device=device, dtype=_held_dtype(s),
                                  quantize=s.quantize, kernel=s.quant.kernel, int8_threshold=s.quant.int8_threshold)
    dtype = "bfloat16" if device.type == "cuda" and run.recipe.train.mixed_precision == "bf16" else s.dtype
    return load_for_inference(str(run.path / "model"), "student", device=device, dtype=dtype)


def _load_teacher(run: Run, path: str, device):
    """The teacher as the run's recipe holds it (NF4 or int8 with teacher.quantize)."""
    from workbench.models import load_for_inference

    t = run.recipe.teacher
    if t is None:
        return load_for_inference(path, "teacher", device=device)
    return load_for_inference(path, "teacher", device=device, dtype=_held_dtype(t), quantize=t.quantize,
                              kernel=t.quant.kernel, int8_threshold=t.quant.int8_threshold)


def _held_dtype(spec) -> str:
    """The dtype a model of `spec` computes in: NF4's compute dtype, else its own."""
    return spec.quant.compute_dtype if spec.quantize == "nf4" else spec.dtype


def _held_as(model) -> str:
    """How the evaluation holds a model: 'nf4 (bfloat16 compute) + lora', 'float32', ..."""
    bnb = sys.modules.get("bitsandbytes")  # not imported: no quantised layer (and it is an optional extra)
    q = None if bnb is None else next((m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)), None)
    q8 = None if bnb is None else next((m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)), None)
    dtype = str(next(p for p in model.parameters() if p.is_floating_point()).dtype).replace("torch.", "")
    kind = f"nf4 ({str(q.compute_dtype).replace('torch.', '')} compute)" if q is not None else \
        f"int8 (LLM.int8, {dtype} rest)" if q8 is not None else dtype
    adapter = getattr(model, "peft_config", {}).get("default")
    return kind + (f" + {adapter.peft_type.value.lower()}" if adapter is not None else "")


def _disk(path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


def machine() -> str:
    """CPU model, cores, GPU (if any) and the versions that matter, in one line."""
    import platform

    import transformers

    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu}, {os.cpu_count()} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")


# --------------------------------------------------------------------------------------------- report


def write_report(res: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """report.md (plots as PNG files in report_plots/), report.html (plots inlined) and report.json (the
    results) in `out_dir`. Both reports are rendered from one list of blocks; every piece of text (run names,
    model names, generated and held-out text) is escaped for its format, so text can never become markup or
    script. All or nothing: a report that cannot be written whole leaves the previous one as it was."""
    out = Path(out_dir)
    plots = _plots(res)
    blocks = _blocks(res, plots)
    files = {out / "report_plots" / f"{name}.png": png for name, png in plots.items()}
    files[out / "report.md"] = to_markdown(blocks).encode()
    files[out / "report.html"] = to_html(blocks, f"workbench report: {res['main']}", plots).encode()
    files[out / "report.json"] = json.dumps(res, indent=1, default=str).encode()
    rundir.write_together(files, f"the report in {out}")
    return out / "report.md", out / "report.html"


def report(run_dirs: list[str | Path], out_dir: str | Path | None = None, cfg: EvalConfig | None = None,
           device=None) -> tuple[Path, Path]:
    """Evaluate `run_dirs` (the first is the main run) and write the report (default: in the main run)."""
    res = evaluate_runs(run_dirs, cfg, device)
    return write_report(res, out_dir or run_dirs[0])


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}img{max-width:100%}pre{background:#f6f6f6;padding:8px;"
        "overflow-x:auto;white-space:pre-wrap}h1,h2{border-bottom:1px solid #ddd}")


def _fmt_bytes(n) -> str:
    return "-" if not n else f"{n / 2**20:.1f} MiB"


# A report block: ("h1" | "h2" | "h3" | "p" | "code", text), ("table", header, right_aligned, rows) or
# ("img", alt, plot name). Text is plain text: the renderers escape it.


def _blocks(res: dict, plots: dict) -> list[tuple]:
    B: list[tuple] = [("h1", f"Evaluation report: {res['main']}"),
                      ("p", f"{res['date']} on {res['machine']}. Validation data: {res['val_tokens']:,} held-out "
                            "tokens" + ("" if res["same_val_data"] else
                                        " (WARNING: the runs used different validation data)") + "."),
                      ("h2", "Models")]
    rows = []
    for m in res["models"]:
        size = _fmt_bytes(m["disk_bytes"]) + (f" (adapter {_fmt_bytes(m['adapter_bytes'])})" if m.get("adapter_bytes") else "")
        ppl = "-" if m["val_ppl"] is None else f"{m['val_ppl']:.2f}"
        rows.append([m["role"], m["name"], f"{m['params'] / 1e6:.2f}M", size, m["held_as"], ppl])
    B.append(("table", ["role", "model", "parameters", "size on disk", "evaluated in", "validation perplexity"],
              [2, 3, 5], rows))
    B.append(("h2", "Training"))
    rows = []
    for t in res["training"]:
        mem = "-" if t["peak_memory_mib"] is None else f"{t['peak_memory_mib']:.0f} MiB ({t['peak_memory_kind']})"
        rows.append([t["name"], " + ".join(t["losses"]), str(t["steps"]), f"{t['tokens']:,}", f"{t['seconds']:.0f}",
                     f"{t['tokens_per_s']:,.0f}", mem])
    B.append(("table", ["student", "objective", "steps", "tokens", "wall-clock s", "tokens/s", "peak memory"],
              [2, 3, 4, 5, 6], rows))
    if res["tasks"]:
        info = res.get("tasks_info", {})
        B += [("h2", "Task metrics"),
              ("p", f"ROUGE-L: greedy continuations of {info.get('rouge_prompts', 0)} held-out prompts against the "
                    f"true continuations ({res['eval']['max_new_tokens']} tokens). Accuracy: "
                    f"{info.get('choice_task', '-')}, {info.get('choice_items', 0)} items, by mean log-likelihood "
                    "per token."),
              ("table", ["model", "ROUGE-L", "accuracy"], [1, 2],
               [[name, fmt_metric(t.get("rougeL")), fmt_metric(t.get("accuracy"))] for name, t in res["tasks"].items()])]
        per = res.get("rouge_per_prompt", {})
        if res["main"] in per and len(per) > 1:
            diffs = []
            for name, scores in per.items():
                if name != res["main"]:
                    d, lo, hi = paired_interval(scores, per[res["main"]])
                    diffs.append(f"{name} {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            B.append(("p", f"ROUGE-L against {res['main']}, prompt by prompt (mean difference and 95% paired "
                           f"bootstrap interval): " + "; ".join(diffs) + "."))
    if res["speculative"]:
        rows = [[name, str(s["draft_len"]), f"{s['acceptance_rate']:.3f}", f"{s['tokens_per_target_call']:.2f}",
                 f"{s['tokens_per_s']:.1f}", f"{s['teacher_tokens_per_s']:.1f}", f"{s['speedup']:.2f}x",
                 str(s["identical"])] for name, s in res["speculative"].items()]
        B += [("h2", "Speculative decoding"),
              ("p", "Teacher as target, each student as draft, greedy, batch 1, over the same prompts; speed-up "
                    "against the teacher decoding alone (same code, no draft) on this machine."),
              ("table", ["draft", "k", "acceptance rate", "tokens per target call", "tokens/s",
                         "teacher alone tokens/s", "speed-up", "identical tokens"], [1, 2, 3, 4, 5, 6], rows)]
    B.append(("h2", "Plots"))
    titles = {"losses": "Training loss per term", "perplexity": "Validation perplexity",
              "acceptance": "Accepted drafts per verification"}
    B += [("img", titles[name], name) for name in plots]
    if res["samples"]:
        B.append(("h2", "Generation samples"))
        for i, s in enumerate(res["samples"], 1):
            B += [("h3", f"Sample {i}"), ("p", "Prompt:"), ("code", s["prompt"])]
            for name in ["reference", *[k for k in s if k not in ("prompt", "reference")]]:
                B += [("p", f"{'True continuation' if name == 'reference' else name}:"), ("code", s[name])]
    return B


_MD_SPECIAL = re.compile(r"([\\`\[\]|])")  # what could open code, links or table cells


def _md_text(text: str) -> str:
    """Plain text as inline Markdown on one line: &, <, > as entities (no tag can form), the characters that
    open code, links or table cells backslash-escaped."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\r", " ").replace("\n", " ")


def _md_fence(text: str) -> str:
    """A fence longer than any run of backticks in `text`, so the text cannot close it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def to_markdown(blocks: list[tuple]) -> str:
    L: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            L += ["#" * int(kind[1]) + " " + _md_text(b[1]), ""]
        elif kind == "p":
            L += [_md_text(b[1]), ""]
        elif kind == "code":
            fence = _md_fence(b[1])
            L += [fence, b[1].rstrip("\n"), fence, ""]
        elif kind == "table":
            _, header, right, rows = b
            L.append("| " + " | ".join(_md_text(h) for h in header) + " |")
            L.append("| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |")
            L += ["| " + " | ".join(_md_text(c) for c in row) + " |" for row in rows]
            L.append("")
        elif kind == "img":
            L += [f"![{_md_text(b[1])}](report_plots/{b[2]}.png)", ""]
    return "\n".join(L).rstrip() + "\n"


def to_html(blocks: list[tuple], title: str, plots: dict[str, bytes]) -> str:
    from html import escape

    H: list[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            H.append(f"<{kind}>{escape(b[1])}</{kind}>")
        elif kind == "p":
            H.append(f"<p>{escape(b[1])}</p>")
        elif kind == "code":
            H.append(f"<pre><code>{escape(b[1])}</code></pre>")
        elif kind == "table":
            _, header, right, rows = b
            align = lambda i: ' style="text-align:right"' if i in right else ""  # noqa: E731
            H.append("<table><thead><tr>" + "".join(f"<th{align(i)}>{escape(h)}</th>" for i, h in enumerate(header))
                     + "</tr></thead><tbody>")
            H += ["<tr>" + "".join(f"<td{align(i)}>{escape(c)}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows]
            H.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(plots[b[2]]).decode()
            H.append(f'<p><img alt="{escape(b[1])}" src="data:image/png;base64,{data}"></p>')
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            # no script, no remote content: the report is data, whatever the text in it says
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            f"style-src 'unsafe-inline'\"><title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(H) + "\n</body></html>\n")


def fmt_metric(v) -> str:
    """A metric in a table: three decimals, '-' when not measured."""
    return "-" if v is None else f"{v:.3f}"


def _plots(res: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    curves = res["curves"]
    if any(c["loss"] for c in curves.values()):
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
        for ax, (name, c) in zip(axes[0], curves.items()):
            for term, pts in c["loss"].items():
                ax.plot(*zip(*pts), label=term, lw=1.5 if term == "loss" else 1.0)
            ax.set(title=name, xlabel="step", ylabel="loss (per valid token)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        out["losses"] = _png(fig)
    if any(c["val_ppl"] for c in curves.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, c in curves.items():
            if c["val_ppl"]:
                ax.plot(*zip(*c["val_ppl"]), marker="o", label=name)
        teacher = next((m for m in res["models"] if m["role"] == "teacher" and m["val_ppl"]), None)
        if teacher:
            ax.axhline(teacher["val_ppl"], ls="--", color="k", label=f"teacher ({teacher['val_ppl']:.1f})")
        ax.set(xlabel="step", ylabel="validation perplexity", yscale="log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
        out["perplexity"] = _png(fig)
    if res["speculative"]:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        width = 0.8 / len(res["speculative"])
        for i, (name, s) in enumerate(res["speculative"].items()):
            hist = s["accepted_hist"]
            total = max(sum(hist), 1)
            ax.bar([x + i * width for x in range(len(hist))], [h / total for h in hist], width, label=name)
        ax.set(xlabel="drafts accepted per verification", ylabel="share of verifications")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        out["acceptance"] = _png(fig)
    return out


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
