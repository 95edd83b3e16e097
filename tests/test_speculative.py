"""Speculative decoding against plain decoding of the target: greedy gives the target's own greedy tokens
(batch > 1, ragged prompts, EOS, any draft), sampling follows the target's distribution (a chi-square test
that a draft-only sampler fails), and the KV caches with holes compute what a fresh forward computes."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import one_error_line
from workbench.speculative import _KVStream, expected_tokens_per_call, speculative_generate, target_generate

EOS, PAD = 1, 0


def _llama(vocab: int, hidden: int, layers: int, seed: int, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden, pad_token_id=PAD, eos_token_id=EOS,
                      bos_token_id=2, tie_word_embeddings=True, initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def _perturbed(model, scale: float, seed: int) -> LlamaForCausalLM:
    """A draft that agrees with `model` often but not always: rows then accept different numbers of drafts."""
    draft = _llama(model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers, 0)
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return draft


@pytest.fixture(scope="module")
def target():
    return _llama(64, 64, 2, seed=0)


def _ragged_prompts(B: int = 5, P: int = 7, vocab: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, P), generator=g)
    mask = torch.ones_like(ids)
    for row, n_pad in ((1, 3), (3, 1), (4, 5)):
        if row < B:
            ids[row, :n_pad], mask[row, :n_pad] = PAD, 0
    return ids, mask


def _greedy(model, ids, mask, n, eos=EOS):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD)


@pytest.mark.parametrize("draft_kind", ["random", "close", "self", "padded_vocab"])
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_equals_the_targets_own_greedy_generate(target, draft_kind, k):
    ids, mask = _ragged_prompts()
    draft = {"random": lambda: _llama(64, 32, 1, seed=1),
             "close": lambda: _perturbed(target, 0.3, seed=1),
             "self": lambda: target,
             "padded_vocab": lambda: _llama(72, 32, 1, seed=2)}[draft_kind]()  # output layer padded
    ref = _greedy(target, ids, mask, 24)
    out = speculative_generate(target, draft, ids, 24, attention_mask=mask, draft_len=k, eos_token_id=EOS,
                               pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    s = out.stats
    assert s.new_tokens == 5 * 24 and 0 <= s.accepted <= s.proposed
    if draft_kind == "self":
        assert s.acceptance_rate == 1.0 and s.tokens_per_target_call == pytest.approx(k + 1, rel=0.2)
    if draft_kind == "close":  # rows really do accept different numbers of drafts (holes in the caches)
        assert 0.2 < s.acceptance_rate < 1.0 and sum(1 for c in s.accepted_hist if c) >= 2


def test_rows_stop_at_eos_and_are_padded_like_generate(target):
    ids, mask = _ragged_prompts()
    free = _greedy(target, ids, mask, 20, eos=None)
    eos = int(free[0, ids.shape[1] + 4])  # a token row 0 emits early: some rows stop, others go on
    ref = _greedy(target, ids, mask, 20, eos=eos)
    draft = _perturbed(target, 0.3, seed=3)
    for k, adaptive in ((3, False), (2, True)):
        out = speculative_generate(target, draft, ids, 20, attention_mask=mask, draft_len=k, adaptive=adaptive,
                                   eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(out.sequences, ref)
    assert (ref[:, ids.shape[1]:] == PAD).any()  # the case is exercised


def test_target_alone_and_a_4bit_or_adapted_draft_keep_the_output(target, tmp_path):
    """The draft only changes speed: an NF4 draft (bitsandbytes) or an unmerged LoRA draft give the
    target's tokens too."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ids, mask = _ragged_prompts()
    ref = _greedy(target, ids, mask, 16)
    assert torch.equal(target_generate(target, ids, 16, attention_mask=mask, eos_token_id=EOS,
                                       pad_token_id=PAD).sequences, ref)
    _perturbed(target, 0.2, seed=4).save_pretrained(tmp_path / "draft")
    nf4 = AutoModelForCausalLM.from_pretrained(
        tmp_path / "draft", device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    lora = get_peft_model(_perturbed(target, 0.2, seed=5), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    for draft in (nf4, lora):
        out = speculative_generate(target, draft, ids, 16, attention_mask=mask, draft_len=3, eos_token_id=EOS,
                                   pad_token_id=PAD)
        assert torch.equal(out.sequences, ref)
        assert out.stats.acceptance_rate > 0.2


# ----------------------------------------------------------------------------------------- sampling


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square goodness of fit; cells expected < min_expected times are pooled."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat.double() / 2))


def _exact_joint(model, prompt, n_tokens, vocab, **proc):
    """The target's own distribution over every continuation of n_tokens tokens (with the same
    temperature / top-k / top-p processing): [vocab ** n_tokens] probabilities."""
    from workbench.sampling import probs_from_logits

    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=n_tokens)))  # [V^n, n]
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        p = probs_from_logits(model(input_ids=full).logits[:, prompt.shape[1] - 1 : -1], **proc)  # [V^n, n, V]
    return p.gather(-1, seqs[..., None])[..., 0].prod(dim=1)


def _sample_counts(gen, n_rows, prompt, n_tokens, vocab):
    ids = prompt.expand(n_rows, -1).contiguous()
    seqs = gen(ids)[:, prompt.shape[1]:]
    code = (seqs * vocab ** torch.arange(n_tokens - 1, -1, -1)).sum(dim=1)
    return torch.bincount(code, minlength=vocab ** n_tokens).double()


@pytest.mark.parametrize("proc", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_sampling_follows_the_targets_distribution(proc):
    """4,000 rows (one batch) of 3 sampled tokens over a 6-token vocabulary: the joint distribution of the
    216 continuations matches the target's exact one; the draft's own samples do not (the test can fail).
    Larger initial weights make both models peaked, so about half the drafts are rejected and a wrong
    residual (e.g. resampling from p instead of max(0, p - q)) is caught too."""
    V, N, rows = 6, 3, 4000
    target, draft = _llama(V, 32, 2, seed=10, init=0.15), _llama(V, 32, 1, seed=11, init=0.15)
    prompt = torch.tensor([[2, 3, 4]])
    exact = _exact_joint(target, prompt, N, V, **proc)
    g = torch.Generator().manual_seed(0)

    def spec(ids):
        out = speculative_generate(target, draft, ids, N, draft_len=2, generator=g, **proc)
        assert 0.05 < out.stats.acceptance_rate < 0.95  # both accepting and rejecting happen
        return out.sequences

    def draft_only(ids):
        return target_generate(draft, ids, N, generator=g, **proc).sequences

    assert _chi2_pvalue(_sample_counts(spec, rows, prompt, N, V), exact) > 1e-3
    assert _chi2_pvalue(_sample_counts(draft_only, rows, prompt, N, V), exact) < 1e-6


# ----------------------------------------------------------------------------------------- caches


@pytest.mark.parametrize("k", [2, 6])
def test_sampled_drafts_do_not_wait_for_the_device_per_token(target, monkeypatch, k):
    """Sampling (temperature > 0): the k draft draws and the residual draw of a round flag a refused row
    for one check per round (where the round reads its acceptances back anyway), instead of a host read of
    the device per draw: on a GPU that read stalls the queue of the draft's next forward. Counted here on
    the CPU: host reads made from the sampler, per round."""
    import traceback

    draft = _perturbed(target, 0.3, seed=1)
    ids, mask = _ragged_prompts(B=2)
    reads = []
    real = torch.Tensor.__bool__

    def counted(self):
        if traceback.extract_stack(limit=2)[0].filename.endswith("sampling.py"):
            reads.append(1)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counted)
    out = speculative_generate(target, draft, ids, 16, attention_mask=mask, draft_len=k, eos_token_id=EOS,
                               pad_token_id=PAD, temperature=1.0, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert out.stats.target_calls > 1 and len(reads) == out.stats.target_calls


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_ragged_batch_decodes_without_transformers_reading_the_mask_back(target, monkeypatch, attn):
    """Rows with holes (left padding, rejected drafts): under SDPA the cache's mask goes to the model as the
    [B, 1, n, L] mask itself, which transformers uses as it is; given the 2D mask it reads that back from
    the device at every forward (to see whether masking may be skipped): on a GPU a sync per draft step.
    No host read inside the models then; the tokens stay the target's own greedy ones, as with the eager
    attention's 2D mask."""
    import traceback

    import transformers

    draft = _perturbed(target, 0.3, seed=1)
    for m in (target, draft):
        m.set_attn_implementation(attn)
    ids, mask = _ragged_prompts()
    reads = []
    real = torch.Tensor.__bool__
    inside = str(Path(transformers.__file__).parent)

    def counted(self):
        if traceback.extract_stack(limit=2)[0].filename.startswith(inside):
            reads.append(1)
        return real(self)

    try:
        monkeypatch.setattr(torch.Tensor, "__bool__", counted)
        out = speculative_generate(target, draft, ids, 12, attention_mask=mask, draft_len=3, eos_token_id=EOS,
                                   pad_token_id=PAD)
        monkeypatch.undo()
        assert torch.equal(out.sequences, _greedy(target, ids, mask, 12))
        assert attn == "eager" or reads == []
    finally:
        for m in (target, draft):
            m.set_attn_implementation("sdpa")


def test_cache_with_holes_computes_what_a_fresh_forward_computes(target):
    """Feed three rows, drop a different number of each row's last entries (as rejected drafts), feed
    more: every row's logits equal a forward over its real tokens alone, and the cache is compacted to
    the longest row."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (3, 6), generator=g)
    stream = _KVStream(target, ids[:, :2], torch.ones(3, 2, dtype=torch.bool))  # a prefix fed with the first feed
    assert stream.feed(ids[:, 2:]).shape[1] == 4
    stream.keep_last(4, torch.tensor([0, 4, 2]))  # row 0 keeps 2 of its 6 tokens, row 2 keeps 4
    more = torch.randint(3, 64, (3, 3), generator=g)
    logits = stream.feed(more)
    assert stream.mask.shape[1] == 9  # 6 columns for the longest row + 3 new ones, not more
    for row, kept in enumerate([2, 6, 4]):
        alone = torch.cat([ids[row, :kept], more[row]])[None]
        with torch.no_grad():
            ref = target(input_ids=alone).logits[0, -3:]
        torch.testing.assert_close(logits[row], ref, rtol=1e-4, atol=1e-5)
    stream.keep_last(3, torch.tensor([1, 1, 1]))
    stream.select(torch.tensor([0, 2]))  # row 1 finished: the others' holes are compacted away
    assert stream.mask.shape[1] == 4 + 1 and stream.mask.sum(1).tolist() == [3, 5]


def test_expected_tokens_per_call():
    assert expected_tokens_per_call(0.0, 4) == 1.0
    assert expected_tokens_per_call(1.0, 4) == 5.0
    assert expected_tokens_per_call(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


def test_adaptive_draft_length_prices_each_verification_length_as_measured():
    """On a CPU verifying 4 tokens costs far more than 3 (1.54 vs 1.14 target steps, measured on SmolLM2):
    a tuner that prices every verification the same drafts 3 tokens at acceptance 0.6, one that prices
    each length as measured drafts 2. The round that holds the prompt's prefill is not timed."""
    from workbench.speculative import DraftTuner

    verify = {2: 1.07, 3: 1.14, 4: 1.54, 5: 1.59}  # seconds of a verification of n tokens
    draft = 0.1
    tuner = DraftTuner(4, 8)
    # the first round: prefill of a long prompt inside both models' first forward
    assert tuner.update(accepted=0, proposed=0, draft_seconds=5.0, target_seconds=30.0, drafted=4, timed=False) == 4
    assert tuner.verify == {} and tuner.draft is None
    k = 4
    for _ in range(40):  # acceptance 0.6 every round
        k = tuner.update(accepted=round(0.6 * k * 10), proposed=k * 10, draft_seconds=draft * k,
                         target_seconds=verify.get(k + 1, 1.6), drafted=k)
    assert k == 2, (k, tuner.verify)
    assert set(tuner.verify) >= {3, 4, 5}  # the lengths it tried, each priced as measured
    # same acceptance, a verification that costs the same at every length: 3 drafts pay best
    flat = DraftTuner(4, 8)
    for _ in range(40):
        k = flat.update(accepted=round(0.6 * k * 10), proposed=k * 10, draft_seconds=draft * k, target_seconds=1.0,
                        drafted=k)
    assert k == 3


def test_a_tuner_passed_as_adaptive_carries_its_measurements_across_calls(target):
    """adaptive=DraftTuner(...): the second prompt starts from the length and costs the first one measured
    (a fresh tuner per call starts at draft_len again and re-learns k every prompt); output unchanged."""
    from workbench.speculative import DraftTuner

    draft = _perturbed(target, 0.3, seed=1)
    ids, mask = _ragged_prompts()
    ref = target_generate(target, ids[:1, 2:], 16, eos_token_id=EOS, pad_token_id=PAD).sequences
    tuner = DraftTuner(4, 6)
    out = speculative_generate(target, draft, ids[:1, 2:], 16, adaptive=tuner, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    assert tuner.a is not None and tuner.verify  # measured
    seen = dict(tuner.verify)
    tuner.k = k_after_first = 2 if tuner.k != 2 else 3  # not the draft_len it was made with
    out = speculative_generate(target, draft, ids[:1, 2:], 16, adaptive=tuner, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    assert out.stats.draft_lens[0] == k_after_first  # started where the last call ended, not at 4
    assert set(seen) <= set(tuner.verify)


def test_bad_inputs_are_refused(target):
    ids, mask = _ragged_prompts()
    with pytest.raises(ValueError, match="left-padded"):
        speculative_generate(target, target, ids, 4, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="fewer than the target's vocabulary of 64"):
        speculative_generate(target, _llama(56, 32, 1, seed=2), ids, 4, attention_mask=mask)


# ----------------------------------------------------------------------------------------- CLI


def test_cli_decodes_compares_and_reports(tiny_teacher, tmp_path, capsys):
    """speculate.py with a trained tiny teacher and a perturbed copy of it as the draft (with its
    tokenizer): greedy tokens identical to the teacher alone, statistics written as JSON."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench import speculate

    draft_dir = tmp_path / "draft"
    _perturbed(AutoModelForCausalLM.from_pretrained(tiny_teacher), 0.2, seed=6).save_pretrained(draft_dir)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(draft_dir)
    out = tmp_path / "stats.json"
    rc = speculate.main(["--teacher", str(tiny_teacher), "--draft", str(draft_dir), "--prompt", "def quick_sort(",
                         "--prompt", "import os", "--prompt", "class Stack:", "--batch-size", "2",
                         "--max-new-tokens", "12", "--draft-len", "adaptive", "--compare", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "--- 'def quick_sort('" in printed and "speed-up" in printed
    import json

    stats = json.loads(out.read_text())
    assert stats["identical_to_teacher"] is True
    assert stats["speculative"]["new_tokens"] == stats["teacher_alone"]["new_tokens"] > 0
    assert 0 < stats["speculative"]["acceptance_rate"] <= 1 and stats["speculative"]["tokens_per_target_call"] > 1


def test_cli_sampling_from_a_non_finite_draft_is_one_line(tiny_teacher, tmp_path, capsys):
    """A draft whose weights hold NaN, sampled from (temperature 1): one error line naming the models,
    exit status 2, no traceback."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench import speculate

    draft_dir = tmp_path / "draft"
    draft = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with torch.no_grad():
        draft.get_output_embeddings().weight[3, 0] = float("nan")
    draft.save_pretrained(draft_dir)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(draft_dir)
    rc = speculate.main(["--teacher", str(tiny_teacher), "--draft", str(draft_dir), "--prompt", "def quick_sort(",
                         "--max-new-tokens", "6", "--temperature", "1.0"])
    line = one_error_line(rc, capsys.readouterr().err)
    assert "NaN, infinite or all zero" in line and str(draft_dir) in line


def test_cli_draft_over_frequent_tokens(tiny_teacher, tmp_path, capsys, caplog):
    """--draft-vocab: the draft proposes only the most frequent tokens of a recipe's training data; the
    output is still the teacher's own."""
    import json
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench import speculate

    draft_dir = tmp_path / "draft"
    _perturbed(AutoModelForCausalLM.from_pretrained(tiny_teacher), 0.2, seed=6).save_pretrained(draft_dir)
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(draft_dir)
    out = tmp_path / "stats.json"
    with caplog.at_level(logging.INFO, logger="workbench"):
        rc = speculate.main(["--teacher", str(tiny_teacher), "--draft", str(draft_dir), "--prompt", "def quick_sort(",
                             "--max-new-tokens", "12", "--draft-vocab", "300", "--draft-vocab-from", "sft_tiny",
                             "--compare", "--json", str(out)])
    assert rc == 0
    assert "draft proposes 30" in caplog.text and "sft_tiny's training data" in caplog.text
    stats = json.loads(out.read_text())
    assert stats["identical_to_teacher"] is True and stats["speculative"]["acceptance_rate"] > 0
    assert speculate.main(["--draft-vocab", "0"]) == 2
    assert "--draft-vocab must be at least 1" in capsys.readouterr().err
    assert speculate.main(["--draft-vocab", "5", "--draft-vocab-from", "no_such_recipe"]) == 2
    assert "--draft-vocab-from" in capsys.readouterr().err


def test_cli_chat_prompts_are_rendered_by_the_template(tiny_teacher, tmp_path, capsys):
    """--chat: each prompt goes in as a user message of the teacher's chat template, encoded without added
    special tokens; a teacher whose tokenizer has no template is refused in one line."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from workbench import speculate

    assert speculate.main(["--teacher", str(tiny_teacher), "--draft", str(tiny_teacher), "--chat"]) == 2
    assert "--chat: the teacher's tokenizer" in capsys.readouterr().err
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.chat_template = "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}### assistant\n"
    tok.save_pretrained(teacher)
    out = tmp_path / "stats.json"
    assert speculate.main(["--teacher", str(teacher), "--draft", str(teacher), "--chat", "--prompt", "def f(",
                           "--max-new-tokens", "6", "--compare", "--json", str(out)]) == 0
    assert "--- '### user\\ndef f(\\n### assistant'" in capsys.readouterr().out
    assert json.loads(out.read_text())["identical_to_teacher"] is True


def test_cli_errors(tmp_path, capsys):
    from workbench import speculate

    assert speculate.main(["--draft", str(tmp_path / "missing")]) == 2
    assert "no draft model" in capsys.readouterr().err
    assert speculate.main(["--draft-len", "-1"]) == 2
    capsys.readouterr()
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    (tmp_path / "blank").write_text("\n  \n\n")  # ran the default prompt instead
    for argv, says in [(["--draft-len", "abc"], "--draft-len: a number of tokens or 'adaptive', not 'abc'"),
                       (["--prompts-file", str(tmp_path / "binary")], "not UTF-8 text"),
                       (["--prompts-file", str(tmp_path)], f"--prompts-file {tmp_path}: Is a directory"),
                       (["--prompts-file", str(tmp_path / "none")], "none: No such file or directory"),
                       (["--prompts-file", str(tmp_path / "blank")], "blank: no prompts in it"),
                       (["--json", str(tmp_path / "no_dir" / "stats.json")], "not a file in an existing directory"),
                       (["--json", str(tmp_path)], "not a file in an existing directory"),
                       (["--temperature", "-1"], "--temperature must be >= 0 (0 is greedy), not -1.0"),
                       (["--temperature", "nan"], "--temperature must be >= 0"),
                       (["--top-p", "2"], "--top-p must be in (0, 1] (1 keeps every token), not 2.0"),
                       (["--top-p", "0"], "--top-p must be in (0, 1]"),
                       (["--top-k", "-3"], "--top-k must be >= 0 (0 keeps every token), not -3"),
                       (["--draft-len", "adaptive", "--max-draft-len", "0"], "--max-draft-len"),
                       (["--prompt", ""], "--prompt '': an empty prompt gives the models nothing to continue")]:
        assert speculate.main(argv) == 2
        assert says in capsys.readouterr().err


def test_sampling_settings_out_of_range_are_refused_by_the_library():
    """Out of range, probs_from_logits would quietly do something else (a negative temperature ranks the
    least likely token first, top_p > 1 or top_k < 0 filter nothing); speculative_generate refuses them."""
    import torch

    from workbench.sampling import check_sampling, probs_from_logits

    logits = torch.tensor([[3.0, 1.0, 0.0]])
    assert probs_from_logits(logits, temperature=-1.0).argmax() == 2  # what a negative temperature would do
    check_sampling(0.0, 0, 1.0)
    check_sampling(0.7, 5, 0.9)
    for t, k, p in [(-1.0, 0, 1.0), (float("nan"), 0, 1.0), (1.0, -1, 1.0), (1.0, 0, 0.0), (1.0, 0, 1.5)]:
        with pytest.raises(ValueError):
            check_sampling(t, k, p)
    model = object()  # never reached
    with pytest.raises(ValueError, match="top_p"):
        speculative_generate(model, model, torch.zeros(1, 2, dtype=torch.long), 4, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="max_draft_len"):
        speculative_generate(model, model, torch.zeros(1, 2, dtype=torch.long), 4, adaptive=True, max_draft_len=0)


def test_cli_refuses_more_tokens_than_the_models_positions(tiny_teacher, capsys):
    from transformers import AutoConfig

    from workbench import speculate

    positions = AutoConfig.from_pretrained(tiny_teacher).max_position_embeddings
    argv = ["--teacher", str(tiny_teacher), "--draft", str(tiny_teacher), "--prompt", "import os"]
    line = one_error_line(speculate.main([*argv, "--max-new-tokens", str(positions)]), capsys.readouterr().err)
    assert f"--max-new-tokens {positions}: the longest prompt (" in line
    assert f"more than the {positions} the models were made for (max_position_embeddings)" in line


def test_cli_models_that_cannot_be_loaded_are_one_line(tiny_teacher, tmp_path, capsys, monkeypatch):
    """A draft named like a Hub id that is not there (a relative path to nowhere, offline here), and a
    draft with another vocabulary than the teacher's: one error line naming the models, exit status 2."""
    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench import speculate

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    other = tmp_path / "other_vocab"
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    tok.add_tokens(["<an_extra_token>"])
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(other)
    tok.save_pretrained(other)
    for draft, says in [("outputs/no-such-run", "draft: cannot load 'outputs/no-such-run': no such local directory"),
                        (str(other), "vocabularies differ")]:
        rc = speculate.main(["--teacher", str(tiny_teacher), "--draft", draft, "--max-new-tokens", "4"])
        line = one_error_line(rc, capsys.readouterr().err)
        assert says in line and f"--draft {draft}" in line, line


def test_nf4_draft_on_our_triton_kernels(target, tmp_path):
    """A 4-bit draft loaded the way the CLI loads it, its matmuls on our Triton NF4 kernels (Triton's CPU
    interpreter here): still the target's greedy tokens, and the draft agrees with its bnb twin."""
    pytest.importorskip("triton")
    from workbench.kernels.linear import TritonLinear4bit
    from workbench.speculate import load_decoder

    _perturbed(target, 0.2, seed=7).save_pretrained(tmp_path / "draft")
    ids, mask = _ragged_prompts(B=2)
    ref = _greedy(target, ids, mask, 6)
    drafts = {kernel: load_decoder(str(tmp_path / "draft"), "draft", device=torch.device("cpu"), quantize="nf4",
                                   kernel=kernel) for kernel in ("bnb", "triton")}
    assert any(isinstance(m, TritonLinear4bit) for m in drafts["triton"].modules())
    outs = {kernel: speculative_generate(target, d, ids, 6, attention_mask=mask, draft_len=3, eos_token_id=EOS,
                                         pad_token_id=PAD) for kernel, d in drafts.items()}
    for out in outs.values():
        assert torch.equal(out.sequences, ref)
    assert outs["triton"].stats.accepted_hist == outs["bnb"].stats.accepted_hist


def test_an_int8_target_and_draft_decode_the_int8_targets_own_greedy_tokens(target, tmp_path):
    """--target-quant int8 / --draft-quant int8 (LLM.int8): speculative decoding still returns exactly what
    the target, as it is held (int8), decodes alone."""
    import bitsandbytes as bnb

    from workbench.speculate import load_decoder

    target.save_pretrained(tmp_path / "target")
    _perturbed(target, 0.2, seed=7).save_pretrained(tmp_path / "draft")
    cpu = torch.device("cpu")
    t8 = load_decoder(str(tmp_path / "target"), "teacher", device=cpu, quantize="int8")
    d8 = load_decoder(str(tmp_path / "draft"), "draft", device=cpu, quantize="int8")
    assert all(any(isinstance(m, bnb.nn.Linear8bitLt) for m in x.modules()) for x in (t8, d8))
    ids, mask = _ragged_prompts(B=2)
    out = speculative_generate(t8, d8, ids, 6, attention_mask=mask, draft_len=3, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, _greedy(t8, ids, mask, 6))


def test_the_drafts_cache_holds_exactly_the_accepted_tokens_after_every_rejection():
    """Every logit the draft produces during speculative decoding equals a fresh forward of the draft over
    the accepted tokens so far plus the round's own proposals: rejected drafts are rolled out of its cache
    (a cache that kept them still decodes the target's tokens, only with fewer acceptances)."""
    target = _llama(64, 64, 2, seed=12, init=0.15)  # varied text, not one repeated token
    draft = _perturbed(target, 0.3, seed=3)
    seen = []
    real = draft.forward

    def recording(*args, **kw):
        out = real(*args, **kw)
        seen.append(out.logits[0, -1].detach().clone())
        return out

    draft.forward = recording
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(3, 64, (1, 6), generator=g)
    k, new = 4, 40
    res = speculative_generate(target, draft, prompt, new, draft_len=k)
    del draft.forward
    S, P = res.sequences[0].tolist(), prompt.shape[1]
    assert 0 < res.stats.acceptance_rate < 1  # rejections happened, and acceptances
    # replay the rounds (greedy acceptance is deterministic): position p holds `last`, the newest token
    p, calls, rejected_rounds = P - 1, iter(seen), 0
    while p - (P - 1) < new and p + 1 < len(S):
        k_r = max(0, min(k, new - (p - P + 1) - 1))
        proposals = []
        for i in range(k_r):
            got = next(calls)
            with torch.no_grad():
                ref = draft(input_ids=torch.tensor([S[: p + 1] + proposals])).logits[0, -1]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
            proposals.append(int(got.argmax()))
        n = 0
        while n < k_r and p + 1 + n < len(S) and proposals[n] == S[p + 1 + n]:
            n += 1
        rejected_rounds += n < k_r
        p += n + 1
    assert next(calls, None) is None and rejected_rounds >= 2


# ------------------------------------------------------------- drafts restricted to frequent tokens


def _restricted(model, ids):
    from workbench.speculative import restrict_draft_vocab

    draft = _llama(model.config.vocab_size, model.config.hidden_size, model.config.num_hidden_layers, 0)
    draft.load_state_dict(model.state_dict())
    return restrict_draft_vocab(draft, ids)


def test_a_draft_over_frequent_tokens_keeps_the_targets_greedy_output(target):
    """The target itself, proposing only a subset of tokens: every draft is accepted while the target's
    choices lie in the subset; with the target's most used token left out, drafts of it are impossible
    (acceptance drops) and the output is still the target's own."""
    ids, mask = _ragged_prompts()
    ref = _greedy(target, ids, mask, 24)
    emitted = ref[:, ids.shape[1]:]
    subset = torch.unique(torch.cat([emitted.flatten(), torch.tensor([EOS, PAD])]))
    out = speculative_generate(target, _restricted(target, subset), ids, 24, attention_mask=mask, draft_len=4,
                               eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref) and out.stats.acceptance_rate == 1.0
    common = int(torch.mode(emitted.flatten()).values)
    out = speculative_generate(target, _restricted(target, subset[subset != common]), ids, 24, attention_mask=mask,
                               draft_len=4, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(out.sequences, ref) and out.stats.acceptance_rate < 0.9


def test_sampling_with_a_restricted_draft_follows_the_targets_distribution():
    """A draft that can only propose 4 of the 6 tokens: speculative sampling still matches the target's
    exact joint distribution (the residual supplies the 2 tokens the draft never proposes); the draft's own
    samples never contain them."""
    V, N, rows = 6, 3, 4000
    target = _llama(V, 32, 2, seed=10, init=0.15)
    draft = _restricted(_llama(V, 32, 1, seed=11, init=0.15), torch.tensor([0, 1, 2, 3]))
    prompt = torch.tensor([[2, 3, 4]])
    exact = _exact_joint(target, prompt, N, V, temperature=1.0)
    g = torch.Generator().manual_seed(0)

    def spec(ids):
        return speculative_generate(target, draft, ids, N, draft_len=2, generator=g, temperature=1.0).sequences

    counts = _sample_counts(spec, rows, prompt, N, V)
    assert _chi2_pvalue(counts, exact) > 1e-3
    own = target_generate(draft, prompt.expand(500, -1).contiguous(), N, generator=g, temperature=1.0).sequences
    assert int(own[:, prompt.shape[1]:].max()) <= 3


def test_subset_head_and_frequent_tokens():
    from workbench.speculative import SubsetHead, frequent_tokens, restrict_draft_vocab

    full = torch.nn.Linear(8, 10, bias=True)
    head = SubsetHead(full, torch.tensor([7, 2, 2, 5]))
    h = torch.randn(3, 4, 8)
    out, ref = head(h), full(h)
    assert out.shape == (3, 4, 10) and head.ids.tolist() == [2, 5, 7]
    torch.testing.assert_close(out[..., [2, 5, 7]], ref[..., [2, 5, 7]])
    assert torch.isinf(out[..., [0, 1, 3, 4, 6, 8, 9]]).all()
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        SubsetHead(full, torch.tensor([3, 10]))
    # counts 5 x3, 1 x2, 9 x2, 0 x1: the top 2 are 5 and 1 (tie with 9 goes to the smaller id); EOS always
    assert frequent_tokens([[5, 5, 1, 9], [5, 1, 9, 0, 42]], 2, 10, always=[3, None]).tolist() == [1, 3, 5]
    with pytest.raises(ValueError, match="at least 1"):
        frequent_tokens([[1]], 0, 10)
    model = _llama(16, 32, 1, seed=0)
    restrict_draft_vocab(model, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="already restricted"):
        restrict_draft_vocab(model, torch.tensor([1]))


def test_the_speculative_benchmark_measures_its_baseline_twice_and_keeps_the_faster(tiny_teacher, tmp_path,
                                                                                   monkeypatch, capsys):
    """Every speed-up is a ratio to the teacher alone; one slow measurement of it (another process on the
    cores) made every draft look faster. The baseline is measured first and again after the draft rows."""
    import shutil

    from workbench.bench import speculative as SB

    draft = tmp_path / "draft"
    shutil.copytree(tiny_teacher, draft)
    real, seen = SB._hf, []

    def slow_first_baseline(teacher, tok, prompts, rendered, max_new, assistant=None, batch=1, **kw):
        seqs, tokens, sec, calls = real(teacher, tok, prompts, rendered, max_new, assistant, batch, **kw)
        if assistant is None and batch == 1 and len(prompts) > 2:  # not the warm-up
            seen.append(sec)
            if len(seen) == 1:
                sec *= 100.0
        return seqs, tokens, sec, calls

    monkeypatch.setattr(SB, "_hf", slow_first_baseline)
    SB.main(["--teacher", str(tiny_teacher), "--drafts", str(draft), "--baseline", str(draft), "--prompts", "3",
             "--max-new-tokens", "4", "--draft-len", "2,3", "--batch", "3", "--no-record"])
    out = capsys.readouterr().out
    cells = [line.split(" | ") for line in out.splitlines() if line.startswith("| teacher alone, HF generate")]
    rows = {(c[0].strip("| "), c[2]): c for c in cells}  # (method, batch)
    assert len(seen) == 2
    assert rows[("teacher alone, HF generate, again", "1")][4] == "1.00x"
    assert float(rows[("teacher alone, HF generate", "1")][4].rstrip("x")) < 0.1  # the slow one is not the base
    # several draft lengths: a fixed-k row for each (the first also leads the HF and batched rows)
    assert "| ours, k=2 |" in out and "| ours, k=3 |" in out and "| HF assisted, k=2 |" in out
    with pytest.raises(SystemExit):
        SB.main(["--draft-len", "2,x", "--no-record"])


def test_grouped_query_heads_are_not_repeated_on_the_cpu_and_logits_stay_sdpas(target, monkeypatch):
    """On the CPU, verifying several tokens against a cache (a causal mask is always given then) would make
    transformers' SDPA copy every layer's keys and values to all query heads; inside gqa_sdpa_attention
    torch gets the grouped heads as they are: no copy, the same logits, SDPA again afterwards."""
    import transformers.integrations.sdpa_attention as sdpa

    from workbench.speculative import gqa_sdpa_attention

    ids, mask = _ragged_prompts()

    def forwards():
        with torch.no_grad():
            whole = target(input_ids=ids, attention_mask=mask).logits
        stream = _KVStream(target, ids[:, :4], mask[:, :4].bool())
        return whole, stream.feed(ids[:, 4:], mask[:, 4:].bool())  # three tokens over a cache with holes

    ref = forwards()
    copies = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda h, n: copies.append(n) or real(h, n))
    forwards()
    assert copies, "the check below could not fail: transformers no longer repeats KV heads here"
    copies.clear()
    with gqa_sdpa_attention(target, None):
        assert target.config._attn_implementation == "workbench_sdpa_gqa"
        got = forwards()
    assert target.config._attn_implementation == "sdpa"
    assert copies == []
    valid = mask.bool()
    torch.testing.assert_close(got[0][valid], ref[0][valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1][valid[:, 4:]], ref[1][valid[:, 4:]], rtol=1e-5, atol=1e-5)
    # speculative decoding uses it: no copies while it verifies ragged rows, the target's own greedy tokens
    ids, mask = _ragged_prompts(seed=1)
    draft = _perturbed(target, 0.5, seed=1)
    out = speculative_generate(target, draft, ids, 8, attention_mask=mask, draft_len=3, pad_token_id=PAD)
    assert copies == [] and target.config._attn_implementation == "sdpa"
    assert torch.equal(out.sequences, _greedy(target, ids, mask, 8, eos=None))


def test_compiled_decoding_over_a_static_cache_gives_the_eager_tokens():
    """speculate --compile: both models' steps run through torch.compile over a StaticCache. Ragged prompts,
    rows accepting different numbers of drafts (holes, compaction) and rows finishing at EOS before others
    (they stay in the compiled batch): the tokens and every counter equal the eager run's, which equals the
    target's own greedy generate; and graphs were really built (dynamo counters)."""
    from torch._dynamo.utils import counters

    target = _llama(64, 64, 2, seed=0, init=0.1)  # attention far from uniform: misplaced cache entries show
    ids, mask = _ragged_prompts(B=3)
    STOP = 19  # a token row 0 emits after 5 steps (this seeded target), while the other rows go on
    draft = _perturbed(target, 0.1, seed=1)
    ref = _greedy(target, ids, mask, 20, eos=STOP)
    eager = speculative_generate(target, draft, ids, 20, attention_mask=mask, draft_len=2, eos_token_id=STOP,
                                 pad_token_id=PAD)
    graphs = counters["stats"]["unique_graphs"]
    compiled = speculative_generate(target, draft, ids, 20, attention_mask=mask, draft_len=2, eos_token_id=STOP,
                                    pad_token_id=PAD, compile=True)
    assert counters["stats"]["unique_graphs"] >= graphs + 3  # draft steps of 1 and 2 tokens, a 3-token verification
    assert torch.equal(eager.sequences, ref) and torch.equal(compiled.sequences, ref)
    assert compiled.stats.accepted_hist == eager.stats.accepted_hist and sum(1 for c in eager.stats.accepted_hist if c) >= 2
    assert (ref[:, ids.shape[1]:] == STOP).any(dim=1).sum() >= 1  # some row stopped at EOS early (others went on)
    graphs = counters["stats"]["unique_graphs"]
    again = speculative_generate(target, draft, ids[:, 1:], 12, attention_mask=mask[:, 1:], draft_len=2,
                                 eos_token_id=STOP, pad_token_id=PAD, compile=True)  # same batch, cache bucket
    assert counters["stats"]["unique_graphs"] == graphs  # the graphs are reused
    assert torch.equal(again.sequences, _greedy(target, ids[:, 1:], mask[:, 1:], 12, eos=STOP))


def test_the_verification_cost_benchmark_times_each_length(target, tmp_path, capsys):
    """bench.verify_cost: one row per verification length, n = 1 is one target step; bad sizes are refused."""
    from workbench.bench import verify_cost

    target.save_pretrained(tmp_path / "t")
    assert verify_cost.main(["--target", str(tmp_path / "t"), "--max-len", "3", "--reps", "2", "--context", "5",
                             "--no-record"]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and
            line[2].isdigit()]
    assert [r[0] for r in rows] == ["| 1", "| 2", "| 3"]
    assert rows[0][2] == "1.00" and all(float(r[1]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        verify_cost.main(["--max-len", "0", "--no-record"])
    capsys.readouterr()
    assert verify_cost.main(["--target", str(tmp_path / "none"), "--no-record"]) == 2  # one line, no traceback
    assert capsys.readouterr().err.startswith("error: target.name_or_path")


def test_the_draft_acceptance_benchmark_counts_what_speculative_generate_counts(tiny_teacher, tmp_path, capsys):
    """Each draft's tokens per target call is the one speculative_generate's own stats give over the same
    prompts; each pair's ratio divides the two, and several pairs get their mean, sd and minimum."""
    import statistics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workbench.bench import draft_acceptance as DA
    from workbench.bench.speculative import held_out_prompts
    from workbench.speculative import SpecStats, left_padding

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    tok = left_padding(AutoTokenizer.from_pretrained(tiny_teacher))
    drafts = {}
    for name, noise in (("same", 0.0), ("near", 0.02), ("far", 0.2)):
        model = AutoModelForCausalLM.from_pretrained(tiny_teacher)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / name)
        drafts[name] = str(tmp_path / name)
    DA.main(["--teacher", str(tiny_teacher), "--distilled", f"{drafts['same']},{drafts['near']}", "--baseline",
             drafts["far"], "--prompts", "3", "--max-new-tokens", "8", "--modes", "greedy:3,sample:2", "--no-record"])
    out = capsys.readouterr().out
    cells = {line.split(" | ")[0].strip("| *`"): [c.strip(" |*x") for c in line.split(" | ")[1:]]
             for line in out.splitlines() if line.startswith("| ")}
    prompts, rendered = held_out_prompts(3, 300, None, tok)
    want = {}
    for name, path in drafts.items():
        draft = AutoModelForCausalLM.from_pretrained(path).eval()
        for mode, k, temp in (("greedy", 3, 0.0), ("sample", 2, 1.0)):
            st = SpecStats()
            for i, p in enumerate(prompts):
                ids = tok(p, return_tensors="pt").input_ids
                st.add(speculative_generate(teacher, draft, ids, 8, draft_len=k, temperature=temp,
                                            generator=torch.Generator().manual_seed(i), eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id).stats)
            want[name, mode] = st.tokens_per_target_call
    for name, path in drafts.items():
        assert [float(c) for c in cells[path]] == pytest.approx([round(want[name, "greedy"], 3),
                                                                  round(want[name, "sample"], 3)], abs=1e-9)
    assert want["same", "greedy"] > want["far", "greedy"]  # the teacher's own weights draft its tokens
    ratios = [[want[n, m] / want["far", m] for n in ("same", "near")] for m in ("greedy", "sample")]
    assert float(cells[f"{drafts['same']}` / `{drafts['far']}"][0]) == pytest.approx(round(ratios[0][0], 2))
    assert float(cells[f"{drafts['near']}` / `{drafts['far']}"][1]) == pytest.approx(round(ratios[1][1], 2))
    summary = cells["ratio over 2 pairs: mean +- sd (min)"][0]
    assert summary.startswith(f"{statistics.mean(ratios[0]):.2f}x +- {statistics.stdev(ratios[0]):.2f} ")
    for bad in (["--modes", "beam:2"], ["--modes", "greedy:0"], ["--baseline", f"{drafts['far']},{drafts['far']},x"]):
        with pytest.raises(SystemExit):
            DA.main(["--teacher", str(tiny_teacher), "--distilled", f"{drafts['same']},{drafts['near']}",
                     "--baseline", drafts["far"], *bad, "--no-record"])


def test_bench_compiled_rows_run_once_untimed_first(monkeypatch):
    # --compile: the first run of a row compiles its graphs; only a second, warm run is reported
    from workbench.bench import speculative as bench

    calls = []
    monkeypatch.setattr(bench, "_ours_run", lambda *a, **kw: calls.append(kw["compile"]) or (len(calls), kw))
    assert bench._ours(None, None, None, [], False, 4, draft_len=2)[0] == 1 and calls == [False]
    monkeypatch.setattr(bench, "_COMPILE", True)
    calls.clear()
    assert bench._ours(None, None, None, [], False, 4, draft_len=2)[0] == 2 and calls == [True, True]


def test_feeding_a_dense_cache_reads_nothing_back_from_the_device(monkeypatch):
    # bool(tensor) waits for the device; a draft step over a cache without holes needs none
    from transformers import LlamaConfig, LlamaForCausalLM

    from workbench.speculative import _KVStream

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50)).eval()
    ids = torch.randint(0, 50, (2, 6))
    stream = _KVStream(model, ids[:, :-1], torch.ones(2, 5, dtype=torch.bool))
    with torch.no_grad():
        first = stream.feed(ids[:, -1:])  # the prompt: its mask may hold left padding, so it is checked
        reads = []
        real = torch.Tensor.__bool__
        monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real(t))
        nxt = stream.feed(first.argmax(-1))
        monkeypatch.undo()
        assert reads == [] and nxt.shape == (2, 1, 50)
        stream.feed(first.argmax(-1), torch.tensor([[True], [False]]))  # a hole: now it must look
        assert not stream.dense


_CPU_OOM = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 26214400000 bytes. Error code 12 (Cannot allocate memory)")


def test_cli_out_of_memory_is_one_line(tiny_teacher, capsys, monkeypatch):
    """Decoding that runs out of memory (many long prompts in one batch): the allocator's traceback before."""
    from workbench import speculate

    def decode(*a, **k):
        raise _CPU_OOM

    monkeypatch.setattr(speculate, "decode_prompts", decode)
    code = speculate.main(["--teacher", str(tiny_teacher), "--draft", str(tiny_teacher), "--batch-size", "64"])
    assert one_error_line(code, capsys.readouterr().err) == (
        "error: out of memory (24.4 GiB asked for) decoding 1 prompts in batches of 64: lower --batch-size or "
        "--max-new-tokens")


def test_cli_refuses_a_draft_vocabulary_as_large_as_the_vocabulary(tiny_teacher, capsys):
    """--draft-vocab at or above the vocabulary's size restricted nothing, silently."""
    from workbench import speculate

    code = speculate.main(["--teacher", str(tiny_teacher), "--draft", str(tiny_teacher), "--draft-vocab", str(10**9)])
    line = one_error_line(code, capsys.readouterr().err)
    assert line.startswith(f"error: --draft-vocab {10**9}: the vocabulary has ") and "tokens; give fewer" in line, line
