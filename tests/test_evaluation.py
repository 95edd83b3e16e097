"""The evaluation report: held-out prompts and multiple-choice items, scoring against a naive reference,
the offline `evaluate` modules, the report written after training and by the CLI (with a baseline), and
the HTML rendered by headless Chromium with its plots."""

from __future__ import annotations

import http.server
import json
import math
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from conftest import fast_recipe, one_error_line
from workbench import evaluation
from workbench.train import run

DOCS = ["import os\nimport sys\n\n\ndef quick_sort(xs):\n    if len(xs) < 2:\n        return xs\n    pivot = xs[0]\n"
        "    return quick_sort([x for x in xs if x < pivot]) + [pivot]\n",
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
        "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n"]


def test_held_out_prompts_end_at_matches_and_hold_at_most_the_context():
    pairs = evaluation.held_out_prompts(DOCS, 4, 40, r"^[ \t]*def \w+\(")
    assert [p.rsplit("def ", 1)[1] for p, _ in pairs] == ["quick_sort(", "__init__(", "push(", "pop("]
    for prompt, ref in pairs:
        assert len(prompt) <= 40 and ref and (prompt + ref) in "".join(DOCS)
    lines = evaluation.held_out_prompts(DOCS, 5, 1000)
    assert all(p.endswith("\n") for p, _ in lines)
    assert lines[0][0] == "import os\n"  # a short context is kept whole, from the document's start
    with pytest.raises(ValueError, match="only 4 prompts"):
        evaluation.held_out_prompts(DOCS, 5, 40, r"def \w+\(")


def test_next_line_items_offer_the_true_line_among_lines_of_the_document():
    items = evaluation.next_line_items(DOCS, 6, 60, seed=1)
    for it in items:
        assert len(it["choices"]) == len(set(it["choices"])) == 4 and it["prompt"].endswith("\n")
        doc = next(d for d in DOCS if it["prompt"] in d)
        truth = it["choices"][it["label"]]
        assert it["prompt"] + truth in doc and all(c in doc for c in it["choices"])
        assert len(it["prompt"]) <= 60


def test_choose_equals_a_naive_one_at_a_time_scoring(tiny_teacher):
    """Batched, right-padded scoring = each prompt + choice scored alone, with the tokens that end after
    the prompt (tokenised together, so a newline merged with the next line's indentation is scored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    items = evaluation.next_line_items(DOCS, 6, 60, seed=2)

    def naive(item):
        scores = []
        for c in item["choices"]:
            full = tok(item["prompt"] + c, add_special_tokens=False).input_ids
            n_ctx = len(tok(item["prompt"], add_special_tokens=False).input_ids)
            while tok.decode(full[:n_ctx]) != item["prompt"][: len(tok.decode(full[:n_ctx]))] or \
                    len(tok.decode(full[:n_ctx])) > len(item["prompt"]):
                n_ctx -= 1  # the seam token belongs to the choice
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([full])).logits[0].float().log_softmax(-1)
            scores.append(float(lp[n_ctx - 1 : -1].gather(-1, torch.tensor(full[n_ctx:])[:, None]).mean()))
        return max(range(len(scores)), key=scores.__getitem__)

    assert evaluation.choose(model, tok, items, batch=5) == [naive(it) for it in items]


def test_metric_modules_load_offline_and_match_rouge_score():
    from rouge_score import rouge_scorer

    preds, refs = ["def f(x): return x + 1", "import os", ""], ["def f(y): return y + 1", "import sys", "pass"]
    got = evaluation._metric("rouge_l").compute(predictions=preds, references=refs)["rougeL"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert got == pytest.approx(sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 3)
    assert evaluation._metric("accuracy").compute(predictions=[0, 1, 2, 3], references=[0, 1, 0, 0])["accuracy"] == 0.5


def test_task_file_is_checked(tmp_path):
    good = tmp_path / "task.jsonl"
    good.write_text(json.dumps({"prompt": "1 + 1 =", "choices": [" 2", " 3"], "label": 0}) + "\n\n")
    assert evaluation.read_task_file(good)[0]["choices"] == [" 2", " 3"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "choices": ["a"], "label": 3}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        evaluation.read_task_file(bad)


REPORT = ["eval.report=true", "eval.prompts=4", "eval.max_new_tokens=8", "eval.samples=2", "eval.choice_items=8",
          "eval.context_chars=120"]


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, tiny_teacher, accelerator):
    """A KD run that writes its report when training ends."""
    out = tmp_path_factory.mktemp("kd_report")
    metrics = run(fast_recipe("kd_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                              *REPORT), accelerator)
    return out, metrics


def test_training_writes_the_report(kd_run):
    out, metrics = kd_run
    md = (out / "report.md").read_text()
    res = json.loads((out / "report.json").read_text())
    for section in ("## Models", "## Training", "## Task metrics", "## Speculative decoding", "## Plots",
                    "## Generation samples"):
        assert section in md
    student = next(m for m in res["models"] if m["role"] == "student")
    assert student["val_ppl"] == metrics["student_val_ppl"] and student["params"] > 0 and student["disk_bytes"] > 0
    assert student["held_as"] == "float32"
    assert f"{metrics['student_val_ppl']:.2f}" in md and f"{metrics['teacher_val_ppl']:.2f}" in md
    assert metrics["peak_memory_mib"] > 0 and metrics["peak_memory_kind"] == "process peak RSS"
    assert set(res["tasks"]) == {"teacher", "kd_tiny"} and 0 <= res["tasks"]["kd_tiny"]["accuracy"] <= 1
    spec = res["speculative"]["kd_tiny"]
    assert spec["identical"] is True and spec["new_tokens"] > 0 and sum(spec["accepted_hist"]) > 0
    assert {p.name for p in (out / "report_plots").iterdir()} == {"losses.png", "perplexity.png", "acceptance.png"}
    assert len(res["samples"]) == 2 and {"prompt", "reference", "teacher", "kd_tiny"} <= set(res["samples"][0])


def test_cli_compares_with_a_baseline_and_refuses_another_tokenizer(kd_run, tmp_path, accelerator, capsys):
    from workbench import evaluate

    kd, _ = kd_run
    base = tmp_path / "sft"
    run(fast_recipe("sft_tiny", base), accelerator)
    out = tmp_path / "report"
    again = tmp_path / "sft_again"  # the same recipe once more: both runs stay in the report
    run(fast_recipe("sft_tiny", again, "train.lr=1e-3"), accelerator)
    assert evaluate.main([str(kd), str(base), str(again), "--out", str(out), "--no-speculative"]) == 0
    printed = capsys.readouterr().out
    assert "kd_tiny" in printed and "sft_tiny" in printed and "report.html" in printed
    res = json.loads((out / "report.json").read_text())
    names = ["kd_tiny", "sft_tiny", "sft_tiny (sft_again)"]
    students = [m for m in res["models"] if m["role"] == "student"]
    assert [m["name"] for m in students] == names and students[1]["val_ppl"] != students[2]["val_ppl"]
    assert res["speculative"] == {} and set(res["tasks"]) == {"teacher", *names}
    assert evaluate.main([str(tmp_path / "nothing")]) == 2
    capsys.readouterr()
    assert evaluate.main([str(kd), str(base), f"{base}/"]) == 2  # one run twice (was evaluated as two)
    assert f"{base}/: the same run as {base}; give each run once" in capsys.readouterr().err
    other = tmp_path / "other"
    run(fast_recipe("sft_tiny", other, "data.vocab_size=300"), accelerator)
    assert evaluate.main([str(kd), str(other), "--out", str(tmp_path / "x")]) == 2
    assert "another tokenizer" in capsys.readouterr().err


def test_cli_refuses_generating_past_the_models_positions(kd_run, tmp_path, capsys):
    """--max-new-tokens beyond max_position_embeddings decoded on into positions no model saw, for
    minutes per prompt; now one line before generating, and no report written."""
    from transformers import AutoConfig

    from workbench import evaluate

    kd, _ = kd_run
    n = AutoConfig.from_pretrained(kd / "model").max_position_embeddings
    code = evaluate.main([str(kd), "--out", str(tmp_path / "r"), "--no-speculative", "--max-new-tokens", str(n)])
    line = one_error_line(code, capsys.readouterr().err)
    assert f"eval.max_new_tokens={n}: the longest prompt (" in line and f"more than the {n} the models" in line
    assert not (tmp_path / "r" / "report.html").exists()


@pytest.mark.parametrize("flag, value, says", [("--max-new-tokens", "0", "--max-new-tokens: must be >= 1"),
                                                ("--prompts", "-2", "--prompts: must be >= 0"),
                                                ("--choice-items", "-1", "--choice-items: must be >= 0"),
                                                ("--task-file", "/", "--task-file /: a directory, not a .jsonl file"),
                                                ("--task-file", "/nonexistent.jsonl",
                                                 "--task-file /nonexistent.jsonl: no such file")])
def test_cli_names_the_flag_given_out_of_range(kd_run, tmp_path, capsys, flag, value, says):
    """A flag out of range is named as given (it was the field's name: "max_new_tokens: and context_chars
    must be >= 1"), before anything is evaluated."""
    from workbench import evaluate

    kd, _ = kd_run
    code = evaluate.main([str(kd), "--out", str(tmp_path / "r"), flag, value])
    assert one_error_line(code, capsys.readouterr().err) == f"error: {says}"
    assert not (tmp_path / "r").exists()


def test_cli_out_of_memory_is_one_line(kd_run, tmp_path, capsys, monkeypatch):
    """The report running out of memory (the allocator's traceback before)."""
    from workbench import evaluate, evaluation

    def report(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes.")

    monkeypatch.setattr(evaluation, "report", report)
    code = evaluate.main([str(kd_run[0]), "--out", str(tmp_path / "r")])
    assert one_error_line(code, capsys.readouterr().err) == (
        "error: out of memory (2.0 GiB asked for): lower --prompts or --max-new-tokens")


def test_cli_on_damaged_runs_says_which_file_in_one_line(kd_run, tmp_path, capsys):
    """A copy of a finished run with its metrics, its recipe or its model's weights damaged: one error line
    naming the file, exit status 2, no traceback (json's, yaml's and safetensors' before)."""
    from workbench import evaluate

    kd, _ = kd_run
    cases = {"final_metrics.json": (b"{not json", "final_metrics.json: not the JSON a finished run writes"),
             "recipe.yaml": (b"name: [\n", "recipe.yaml: invalid YAML at line 2"),
             "model/model.safetensors": (None, "student: cannot load"),
             "model/tokenizer.json": (None, "the tokenizer of a run: cannot load")}  # (json's traceback before)
    (tmp_path / "a_file").write_text("mine")
    assert evaluate.main([str(kd), "--out", str(tmp_path / "a_file")]) == 2  # refused before evaluating
    assert "exists and is not a directory" in capsys.readouterr().err and (tmp_path / "a_file").read_text() == "mine"
    for name, (content, says) in cases.items():
        copy = tmp_path / name.replace("/", "_")
        shutil.copytree(kd, copy)
        target = copy / name
        target.write_bytes(content if content is not None else target.read_bytes()[:500])  # (weights: truncated)
        code = evaluate.main([str(copy), "--out", str(tmp_path / "report"), "--no-speculative"])
        line = one_error_line(code, capsys.readouterr().err)
        assert says in line and str(copy) in line, line


def test_report_of_a_qlora_run_loads_models_as_training_held_them(tiny_teacher, tmp_path, accelerator):
    """A 4-bit teacher and a 4-bit student with its adapter: the report evaluates them in 4-bit (the
    memory the run was sized for), and the adapted student's perplexity is the run's."""
    out = tmp_path / "qlora"
    metrics = run(fast_recipe("qlora_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                              "teacher.quantize=nf4", "teacher.quant={compute_dtype: float32}",
                              "student.recipe=null", f"student.name_or_path={tiny_teacher}", "student.tiny=null",
                              *REPORT), accelerator)
    from safetensors.torch import load_file

    res = json.loads((out / "report.json").read_text())
    teacher, student = res["models"]
    assert teacher["held_as"] == "nf4 (float32 compute)" and student["held_as"] == "nf4 (float32 compute) + lora"
    lora = sum(t.numel() for t in load_file(out / "adapter" / "adapter_model.safetensors").values())
    assert student["params"] == teacher["params"] + lora  # the same base, plus the adapter
    assert student["val_ppl"] == metrics["student_val_ppl"] and student["adapter_bytes"] > 0
    assert res["speculative"]["qlora_tiny"]["identical"] is True


# ----------------------------------------------------------------------------------------- browser


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


PROBE = """<!DOCTYPE html><html><body><pre id="result">pending</pre>
<iframe id="r" style="width:1200px;height:900px"></iframe>
<script>
var frame = document.getElementById('r');
frame.onload = function () {  // an iframe's load event waits for its images
  var d = frame.contentDocument;
  document.getElementById('result').textContent = JSON.stringify({
    title: d.title, h1: Array.from(d.querySelectorAll('h1')).map(function (h) { return h.textContent; }),
    h2: Array.from(d.querySelectorAll('h2')).map(function (h) { return h.textContent; }),
    tables: d.querySelectorAll('table').length,
    cells: Array.from(d.querySelectorAll('td')).map(function (c) { return c.textContent; }),
    pre: Array.from(d.querySelectorAll('pre')).map(function (p) { return p.textContent; }),
    scripts: d.querySelectorAll('script').length,
    handlers: d.querySelectorAll('[onerror],[onload],[onclick]').length,
    pwned: window.pwned || frame.contentWindow.pwned || null,
    images: Array.from(d.images).map(function (i) {
      return {alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, complete: i.complete,
              inline: i.src.indexOf('data:image/png;base64,') === 0}; })});
};
frame.src = 'report.html';
</script></body></html>"""


def _open_in_chromium(report_html: Path, tmp_path: Path) -> dict:
    """Serve `report_html` alone over 127.0.0.1, open it in headless Chromium inside PROBE's iframe and
    return what PROBE read off the rendered page."""
    import html
    import re

    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(report_html, site / "report.html")  # alone: the plots must be inside the file
    (site / "probe.html").write_text(PROBE)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(site), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
               f"http://127.0.0.1:{server.server_address[1]}/probe.html"]
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    finally:
        server.shutdown()
    found = re.search(r'<pre id="result">(.*?)</pre>', dom, flags=re.S)
    assert found and found.group(1) != "pending", dom[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (launch_scripts/test.sh installs it)")
def test_report_html_renders_in_headless_chromium_with_its_plots(kd_run, tmp_path):
    """Served over 127.0.0.1, the report opens in headless Chromium: its sections and tables are there and
    every plot decodes to a real image, inlined (the HTML is self-contained: no report_plots/ beside it)."""
    src, _ = kd_run
    page = _open_in_chromium(src / "report.html", tmp_path)
    assert page["title"] == "workbench report: kd_tiny"
    assert {"Models", "Training", "Task metrics", "Speculative decoding", "Plots", "Generation samples"} <= set(page["h2"])
    assert page["tables"] >= 4
    assert sorted(i["alt"] for i in page["images"]) == ["Accepted drafts per verification", "Training loss per term",
                                                       "Validation perplexity"]
    assert all(i["complete"] and i["inline"] and i["w"] > 300 and i["h"] > 200 for i in page["images"]), page["images"]


HOSTILE = ["```\n<script>window.pwned = 'fence'; parent.pwned = 'fence'</script>\n```",
           "<img src=x onerror=\"parent.pwned='img'\">", "</pre></code><script>parent.pwned='pre'</script>",
           "[link](javascript:parent.pwned='link') & <b>bold</b> | pipe"]


def _hostile_report(kd_run, tmp_path) -> tuple[Path, dict]:
    """The kd run's report rebuilt with hostile text everywhere text from data, models or recipes goes."""
    src, _ = kd_run
    res = json.loads((src / "report.json").read_text())
    bad = "demo<script>parent.pwned='name'</script>"
    res["main"] = bad
    res["machine"] = HOSTILE[1]
    res["models"][0]["name"] = HOSTILE[3]
    res["training"][0]["name"] = bad
    res["tasks"] = {bad: {"rougeL": 0.5, "accuracy": 0.25}}
    res["rouge_per_prompt"] = {bad: [0.5, 0.25], HOSTILE[3]: [0.25, 0.5]}
    res["samples"] = [{"prompt": HOSTILE[0], "reference": HOSTILE[2], bad: HOSTILE[1]}]
    out = tmp_path / "hostile"
    evaluation.write_report(res, out)
    return out, res


def test_report_escapes_hostile_text_in_markdown_and_html(kd_run, tmp_path):
    """Generated or held-out text with a line of three backticks cannot close its fence, and run or model
    names cannot become tags: rendering report.md with a Markdown renderer or reading report.html finds
    no element that was not written by the report itself."""
    import markdown

    out, _ = _hostile_report(kd_run, tmp_path)
    md = (out / "report.md").read_text()
    rendered = markdown.markdown(md, extensions=["tables", "fenced_code"])
    page = (out / "report.html").read_text()
    for doc in (rendered, page):
        low = doc.lower()
        assert "<script" not in low and "<img src=x" not in low and "<b>" not in low and "javascript:" not in low.replace(
            "javascript:parent", "")  # the literal text stays, escaped
    assert "&lt;script&gt;parent.pwned=&#x27;name&#x27;&lt;/script&gt;" in page  # in <title> and <h1>, as text
    assert page.count("<pre>") == 3  # one per code block: none closed early


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (launch_scripts/test.sh installs it)")
def test_report_with_hostile_text_runs_no_script_in_chromium(kd_run, tmp_path):
    out, res = _hostile_report(kd_run, tmp_path)
    page = _open_in_chromium(out / "report.html", tmp_path)
    assert page["pwned"] is None and page["scripts"] == 0 and page["handlers"] == 0, page
    assert page["title"] == f"workbench report: {res['main']}"  # shown as text, exactly
    assert page["h1"] == [f"Evaluation report: {res['main']}"]
    assert page["pre"] == [HOSTILE[0], HOSTILE[2], HOSTILE[1]]
    assert HOSTILE[3] in page["cells"]


def test_the_function_task_reports_rouge_of_completions_and_their_perplexity(tiny_teacher, tmp_path, accelerator):
    """On the embedded instruction task the report's prompts are held-out functions' signatures and
    docstrings, its references their bodies, and the validation perplexity is over completion tokens."""
    from workbench import data as D

    out = tmp_path / "fn"
    metrics = run(fast_recipe("kd_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                              "data.dataset=stdlib_functions", "data.seq_len=128", *REPORT), accelerator)
    res = json.loads((out / "report.json").read_text())
    assert res["samples"] and all(s["prompt"].startswith(D.FUNCTION_PROMPT) for s in res["samples"])
    corpus = D.load_corpus(fast_recipe("kd_tiny", out, "data.dataset=stdlib_functions").data)
    bodies = {c for _, c in corpus.val_rows}
    assert all(any(b.startswith(s["reference"][:20]) for b in bodies) for s in res["samples"])
    assert 0 <= res["tasks"]["kd_tiny"]["rougeL"] <= 1 and math.isfinite(metrics["student_val_ppl"])
    per = res["rouge_per_prompt"]["kd_tiny"]  # kept prompt by prompt, for paired comparisons
    assert len(per) == res["tasks_info"]["rouge_prompts"] and sum(per) / len(per) == pytest.approx(
        res["tasks"]["kd_tiny"]["rougeL"])
    assert res["completions"]["kd_tiny"][0] == res["samples"][0]["kd_tiny"]
    assert "teacher " in (out / "report.md").read_text().split("paired bootstrap interval): ")[1]


def test_run_labels_are_distinct():
    from workbench.evaluation import Run, run_labels

    runs = [Run(Path(p), {"recipe": n}, None, []) for n, p in
            (("kd", "/a/kd"), ("sft", "/a/sft"), ("sft", "/a/seqkd"), ("sft", "/b/seqkd"), ("sft", "/b/seqkd"))]
    assert run_labels(runs) == ["kd", "sft", "sft (seqkd)", "sft (/b/seqkd)", "sft (/b/seqkd) #5"]


def test_paired_bootstrap_interval_of_a_metric_difference():
    from workbench.evaluation import paired_interval

    assert paired_interval([0.2, 0.4, 0.1], [0.2, 0.4, 0.1]) == (0.0, 0.0, 0.0)
    d, lo, hi = paired_interval([0.3, 0.5, 0.2, 0.6], [0.2, 0.4, 0.1, 0.5])  # a constant +0.1
    assert d == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    d, lo, hi = paired_interval([1.0, 0.0] * 20, [0.0, 1.0] * 20)  # +-1 in turn: a wide interval around 0
    assert d == 0.0 and lo < -0.2 and hi > 0.2


def test_runs_are_compared_by_their_validation_blocks_not_their_training_data():
    from workbench.evaluation import Run, same_val_data

    def runs(*finals):
        return [Run(Path(f"/r{i}"), f, None, []) for i, f in enumerate(finals)]

    seqkd = {"data_key": "b", "val_key": "v"}
    assert same_val_data(runs({"data_key": "a", "val_key": "v"}, seqkd))  # sequence KD: other training rows
    assert not same_val_data(runs({"data_key": "a", "val_key": "w"}, seqkd))
    assert not same_val_data(runs({"data_key": "a"}, seqkd))  # a run from before val_key: whole data keys
    assert same_val_data(runs({"data_key": "a"}, {"data_key": "a", "val_key": "v"}))


def test_report_generation_encodes_prompts_as_training_did():
    """Greedy completions and speculative decoding in the report start from the ids training saw: a chat
    prompt with its template's one BOS (not a second one added by the tokenizer), a text prompt with BOS."""
    from test_data import bos_chat_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.data import row_prompt

    tok = bos_chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=tok.eos_token_id))
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    chat = row_prompt(tok, [{"role": "user", "content": "question?"}, {"role": "assistant", "content": "x"}], "chat")[0]
    for prompts, rendered in (([chat], True), (["def f(x):\n"], False)):
        want = tok(prompts[0], add_special_tokens=False).input_ids
        want = want if rendered else [tok.bos_token_id] + want
        seen.clear()
        evaluation._greedy(model, tok, prompts, rendered, 2)
        assert seen[0] == want
        seen.clear()
        evaluation._speculation(model, {"self": model}, tok, prompts, rendered, 2, 2)
        assert seen[0] == want and seen[0].count(tok.bos_token_id) == 1
