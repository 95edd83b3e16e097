"""Sampling, GKD and MiniLLM: processors, KV-cache sampling against recomputation (last-position logits
only), teacher-mixed sampling's distribution, MiniLLM's rewards/advantages/weights against a naive loop,
the clipped policy gradient, and MiniLLM lowering the reverse KL of a tiny pair."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_recipe
from workbench import onpolicy, sampling
from workbench.config import OnPolicyConfig


def _llama(seed, hidden=32, layers=2, vocab=40):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)).eval()


def test_probs_from_logits_processors():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    torch.testing.assert_close(sampling.probs_from_logits(logits, 1.0), logits.softmax(-1))
    torch.testing.assert_close(sampling.probs_from_logits(logits, 2.0), (logits / 2).softmax(-1))
    top2 = sampling.probs_from_logits(logits, 1.0, top_k=2)
    torch.testing.assert_close(top2, torch.cat([torch.tensor([[2.0, 1.0]]).softmax(-1), torch.zeros(1, 2)], -1))
    p = logits.softmax(-1)[0]
    nucleus = sampling.probs_from_logits(logits, 1.0, top_p=float(p[0]) + 1e-4)  # needs the top two tokens
    assert (nucleus[0, 2:] == 0).all() and nucleus[0, :2].sum().item() == pytest.approx(1.0)
    assert sampling.probs_from_logits(logits, 0.0).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_draw_tokens_draws_from_the_rows_distributions(monkeypatch):
    """Inverse-transform draws (one uniform per row): each row's frequencies match its probabilities (rows
    unnormalised, with zeros), a one-hot row gives its token, and a token of probability 0 is never drawn,
    even when the uniform lands on the row's total (the rounding edge: here forced). NaN, infinite and
    all-zero rows are refused."""
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 2.0, 0.0, 0.0, 6.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(3)
    n = 40_000
    got = sampling.draw_tokens(probs.repeat(n, 1), g).view(n, 3)
    assert got.shape == (n, 3) and got.dtype == torch.long
    for row in range(3):
        freq = torch.bincount(got[:, row], minlength=5).double() / n
        expect = probs[row].double() / probs[row].sum()
        assert (freq - expect).abs().max().item() < 4 * (0.25 / n) ** 0.5  # 4 sd of the largest variance
        assert (freq[expect == 0] == 0).all()
    real_rand = torch.rand
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: real_rand(*a, **kw).fill_(1.0))
    assert sampling.draw_tokens(probs).view(-1).tolist() == [3, 4, 3]
    for bad in (float("nan"), float("inf"), 0.0):  # a diverged model's row is refused, not drawn from
        with pytest.raises(ValueError, match="NaN, infinite or all zero"):
            sampling.draw_tokens(torch.tensor([[0.5, 0.5], [bad, 0.0 if bad == 0.0 else 1.0]]))


def test_refused_draws_are_flagged_for_one_check_later():
    """Given a flag, draw_tokens sets it for a NaN / infinite / all-zero row instead of raising (and draws
    token 0 there, in range), and leaves it clear for good rows; raise_if_undrawable raises once it is set."""
    flag = torch.zeros((), dtype=torch.bool)
    assert sampling.draw_tokens(torch.tensor([[0.5, 0.5]]), None, flag).item() in (0, 1) and not flag
    for bad in (float("nan"), float("inf"), 0.0):
        flag = torch.zeros((), dtype=torch.bool)
        got = sampling.draw_tokens(torch.tensor([[0.0, 1.0], [bad, 0.0 if bad == 0.0 else 1.0]]), None, flag)
        assert bool(flag) and got[1].item() == 0 and got[0].item() == 1
        with pytest.raises(sampling.UndrawableProbabilities, match="NaN, infinite or all zero"):
            sampling.raise_if_undrawable(flag)


@pytest.mark.parametrize("new_tokens", [3, 12])
def test_sampling_waits_for_the_device_once_not_per_token(monkeypatch, new_tokens):
    """On a GPU every read of a tensor's value on the host (bool(), item(), ...) waits for the device and
    keeps the host from queueing the next token's work; sample() makes one such read per generation (the
    refused-draw check at the end), not one per token. Counted here on the CPU."""
    model = _llama(0)
    reads = []
    for name in ("__bool__", "item", "tolist", "nonzero", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            reads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    out = sampling.sample(model, torch.randint(0, 40, (3, 5)), new_tokens, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert out.ids.shape == (3, 5 + new_tokens) and reads == ["__bool__"]


def test_kv_cache_sampling_equals_recomputing_from_scratch():
    model = _llama(0)
    prompts = torch.randint(0, 40, (3, 5))
    formed = []  # positions of logits each forward forms: the prompt's pass only its last, not [3, 5, V]
    hook = model.register_forward_hook(lambda m, args, out: formed.append(out.logits.shape[1]))
    got = sampling.sample(model, prompts, 6, temperature=1.3, top_k=10, generator=torch.Generator().manual_seed(7))
    hook.remove()
    assert formed == [1] * 6
    # naive: the whole sequence through the model at every step, the same draws
    g = torch.Generator().manual_seed(7)
    ids = prompts
    with torch.no_grad():
        for _ in range(6):
            probs = sampling.probs_from_logits(model(input_ids=ids).logits[:, -1], 1.3, 10)
            ids = torch.cat([ids, sampling.draw_tokens(probs, g)], 1)
    assert torch.equal(got.ids, ids)
    assert got.valid.all() and got.prompt_len == 5


def test_greedy_sampling_matches_generate_and_eos_masks_the_rest():
    model = _llama(1)
    prompts = torch.randint(0, 40, (2, 4))
    s = sampling.sample(model, prompts, 8, temperature=0.0)
    ref = model.generate(prompts, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(s.ids, ref)
    eos = int(s.ids[0, 6])  # pretend the 3rd generated token of row 0 is EOS
    s2 = sampling.sample(model, prompts, 8, temperature=0.0, eos_id=eos)
    first = (s2.ids[:, 4:] == eos).float().argmax(1)
    for row in range(2):
        hit = (s2.ids[row, 4:] == eos).any()
        expect = torch.arange(8) <= first[row] if hit else torch.ones(8, dtype=torch.bool)
        assert torch.equal(s2.valid[row], expect)


def test_teacher_mixed_sampling_draws_from_the_mixture():
    student, teacher = _llama(2, vocab=8), _llama(3, vocab=8)
    prompt = torch.randint(0, 8, (1, 3))
    n, alpha = 6000, 0.3
    s = sampling.sample(student, prompt.expand(n, 3), 1, teacher=teacher, teacher_mix=alpha,
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        q = student(input_ids=prompt).logits[0, -1].softmax(-1)
        p = teacher(input_ids=prompt).logits[0, -1].softmax(-1)
    expected = alpha * p + (1 - alpha) * q
    counts = torch.bincount(s.ids[:, -1], minlength=8).double()
    chi2 = ((counts - n * expected) ** 2 / (n * expected)).sum().item()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001


def test_generated_targets_align_with_positions():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    s = sampling.Samples(ids, torch.tensor([[True, True, False]]), prompt_len=2)
    labels = onpolicy.generated_targets(s)
    assert labels.tolist() == [[-100, 7, 8, -100, -100]]  # position 1 predicts the first generated token
    rows = onpolicy.gkd_rows(s)
    assert (rows["ce_labels"] == -100).all()


def test_minillm_rows_against_a_naive_loop():
    student, teacher = _llama(4), _llama(5)
    cfg = OnPolicyConfig(method="minillm", teacher_mix=0.25, temperature=1.0, reward_clip=0.0)
    s = onpolicy.draw(student, torch.randint(0, 40, (2, 3)), cfg, torch.Generator().manual_seed(1), eos_id=None,
                      teacher=teacher)
    s.valid[1, 3:] = False  # as if row 1 stopped early
    rows = onpolicy.minillm_rows(student, teacher, s, cfg)
    with torch.no_grad():
        lq_all = F.log_softmax(student(input_ids=s.ids).logits.double(), -1)
        lp_all = F.log_softmax(teacher(input_ids=s.ids).logits.double(), -1)
    P = 3
    adv_raw = torch.zeros(2, s.ids.shape[1], dtype=torch.float64)
    for b in range(2):
        n = int(s.valid[b].sum())
        pos = [P - 1 + j for j in range(n)]
        r = [lp_all[b, t, s.ids[b, t + 1]] - lq_all[b, t, s.ids[b, t + 1]] for t in pos]
        for j, t in enumerate(pos):
            y = s.ids[b, t + 1]
            q, p = lq_all[b, t, y].exp(), lp_all[b, t, y].exp()
            assert rows["w"][b, t].item() == pytest.approx((q / (0.25 * p + 0.75 * q)).item(), rel=1e-4)
            assert rows["old_logp"][b, t].item() == pytest.approx(lq_all[b, t, y].item(), abs=1e-5)
            future = r[j + 1:]
            adv_raw[b, t] = sum(future) / len(future) if future else 0.0
    valid = rows["labels"] != -100
    a = adv_raw[valid]
    expected = (a - a.mean()) / (a.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(rows["adv"][valid].double(), expected, rtol=1e-3, atol=1e-4)
    assert (rows["adv"][~valid] == 0).all() and (rows["w"][~valid] == 0).all()


def test_policy_gradient_term_and_clipping():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6)
    labels = torch.tensor([1, 2, 3, -100])
    lq = F.log_softmax(logits.detach(), -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    rows = {"labels": labels, "old_logp": lq, "w": torch.ones(4), "adv": adv}
    loss = onpolicy.MiniLLMTokenLoss(clip=0.2)
    total, parts = loss(logits, teacher, rows)
    (g,) = torch.autograd.grad(parts[0], logits)
    # at ratio 1 the clipped objective's gradient is -A * grad log q(y)
    lq_live = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    (g_ref,) = torch.autograd.grad(-(adv[:3] * lq_live[:3]).sum(), logits)
    torch.testing.assert_close(g, g_ref)
    # far outside the clip range in the direction the advantage favours, the gradient vanishes
    rows_off = {**rows, "old_logp": lq - 1.0}  # ratio e > 1.2
    _, parts_off = loss(logits, teacher, {**rows_off, "adv": torch.tensor([1.0, 1.0, 1.0, 0.0])})
    (g_off,) = torch.autograd.grad(parts_off[0], logits)
    assert g_off.abs().max() == 0
    # the single-step term is the w-weighted reverse KL over valid rows
    rkl = (F.softmax(logits, -1) * (F.log_softmax(logits, -1) - F.log_softmax(teacher, -1))).sum(-1)
    torch.testing.assert_close(parts[1], rkl[:3].sum())


@torch.no_grad()
def _reverse_kl_on_samples(student, teacher, prompts, n_new, seed):
    """Mean per-token KL(q || p) on the student's own continuations: the quantity MiniLLM minimises."""
    s = sampling.sample(student, prompts, n_new, generator=torch.Generator().manual_seed(seed))
    lq = F.log_softmax(student(input_ids=s.ids).logits, -1)[:, s.prompt_len - 1:-1]
    lp = F.log_softmax(teacher(input_ids=s.ids).logits, -1)[:, s.prompt_len - 1:-1]
    return (lq.exp() * (lq - lp)).sum(-1).mean().item()


def test_minillm_lowers_the_reverse_kl_of_a_tiny_pair(tmp_path, tiny_teacher, accelerator):
    from transformers import AutoModelForCausalLM

    from workbench import data, models
    from workbench.train import run
    from workbench.trainer import read_metrics

    overrides = ["teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}", "train.max_steps=25",
                 "train.lr=3e-3", "train.eval_every=0", "train.checkpoint_every=0",
                 "distill.losses=[{name: cross_entropy, weight: 0.0}]",  # the MiniLLM terms alone
                 "distill.onpolicy={method: minillm, prompt_tokens: 8, max_new_tokens: 12}"]
    recipe = fast_recipe("minillm_tiny", tmp_path, *overrides)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    tok = data.load_tokenizer(recipe.data, pretrained=str(tiny_teacher))
    before = models.load_model(recipe.student, tok, "student", seed=recipe.train.seed)
    packed = data.load_packed(recipe.data, tok)
    prompts = torch.from_numpy(packed.val[:16, :8].astype("int64"))
    kl_before = _reverse_kl_on_samples(before, teacher, prompts, 12, seed=0)

    metrics = run(recipe, accelerator)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    kl_after = _reverse_kl_on_samples(after, teacher, prompts, 12, seed=0)
    print("reverse KL before", kl_before, "after", kl_after)
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)
    logged = [r for r in read_metrics(tmp_path) if "train/minillm_pg" in r]
    assert logged and all("train/minillm_reverse_kl" in r for r in logged)
    assert metrics["step"] == 25


def test_prompts_of_completion_blocks_end_where_the_first_answer_begins():
    from workbench.onpolicy import prompts_of

    ids = torch.arange(40).reshape(4, 10)
    assert torch.equal(prompts_of(ids, None, 4), ids[:, :4])
    assert prompts_of(ids, None, 64).shape == (4, 9)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, 6:9] = True  # prompt 0..5, answer 6..8
    mask[1, 3:5] = True  # the shortest prompt: 3 tokens
    mask[1, 8:] = True  # a second row in the block (its own prompt 5..7) does not matter
    mask[2, 7:] = True
    mask[3, :4] = True  # cut inside a completion: no prompt of its own, not counted
    p = prompts_of(ids, mask, 8)
    assert p.tolist() == [[3, 4, 5], [10, 11, 12], [24, 25, 26], [30, 31, 32]]
    assert prompts_of(ids, mask, 2).tolist() == [[4, 5], [11, 12], [25, 26], [30, 31]]


def test_samples_longer_than_the_models_positions_are_refused(tmp_path, tiny_teacher, capsys):
    """prompt_tokens + max_new_tokens past max_position_embeddings sampled on, slowly, into positions
    neither model saw: one line before training."""
    from transformers import AutoConfig

    from conftest import FAST, one_error_line
    from workbench.train import main

    n = AutoConfig.from_pretrained(tiny_teacher).max_position_embeddings
    code = main(["recipe=kd_tiny_gkd", *FAST, f"output.dir={tmp_path}", "teacher.recipe=null",
                 f"teacher.name_or_path={tiny_teacher}", f"distill.onpolicy.max_new_tokens={n}",
                 "distill.onpolicy.prompt_tokens=8"])
    line = one_error_line(code, capsys.readouterr().err)
    assert f"distill.onpolicy.max_new_tokens={n}: samples of prompt_tokens=8 and the new tokens take {n + 8} " \
           f"positions, more than the {n} the models were made for" in line
    assert not (tmp_path / "model").exists()


def test_gkd_coin_is_drawn_on_the_cpu_and_agrees_everywhere():
    """Whether a micro-batch is generated: probability lmbda, the same for a (seed, step, micro-batch) on
    every call, and decided without the run's device (a device generator's .item() waits for the GPU at
    every step): the trainer decides it for a batch on the meta device, where no generator exists."""
    from types import SimpleNamespace

    import numpy as np

    from workbench import trainer

    coins = [onpolicy.gkd_generates(0, step, k, 0.3) for step in range(400) for k in range(2)]
    assert coins == [onpolicy.gkd_generates(0, step, k, 0.3) for step in range(400) for k in range(2)]
    assert 0.25 < sum(coins) / len(coins) < 0.35
    assert not any(onpolicy.gkd_generates(0, s, 0, 0.0) for s in range(50))
    assert all(onpolicy.gkd_generates(0, s, 0, 1.0) for s in range(50))
    data = SimpleNamespace(train=np.arange(32, dtype=np.int32).reshape(4, 8))
    meta = SimpleNamespace(device=torch.device("meta"), process_index=0)
    onp = OnPolicyConfig(method="gkd", lmbda=0.0, prompt_tokens=4, max_new_tokens=4)
    jobs = trainer._micro_batch_jobs(np.array([1, 2]), data, onp, 0, 3, 0, meta, None, None, 0, None)
    assert [j.kind for j in jobs] == ["data"] and jobs[0].ids.device.type == "meta"
