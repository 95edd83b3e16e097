"""Cross-tokenizer alignment and losses against written-out computations on hand-made examples."""

import itertools
import json
import math

import pytest
import torch

from workbench import crosstok as X


def test_groups_are_the_shortest_spans_both_tokenisations_agree_on():
    # "hello world": student hel|lo| wor|ld, teacher <s>|hello| w|orld
    s = [(0, 3), (3, 5), (5, 9), (9, 11)]
    t = [(0, 0), (0, 5), (5, 7), (7, 11)]
    assert X.align_groups(s, t) == [([0, 1], [1]), ([2, 3], [2, 3])]
    assert X.align_groups(t, s) == [([1], [0, 1]), ([2, 3], [2, 3])]
    # one side cut off early: the open tail closes no group
    assert X.align_groups(s, [(0, 5), (5, 9), (9, 10)]) == [([0, 1], [0]), ([2], [1])]
    # identical tokenisations: one group per token
    assert X.align_groups(s, s) == [([i], [i]) for i in range(4)]


def _rank_sorted(p):
    return sorted(range(len(p)), key=lambda i: -p[i])


def test_uld_is_the_l1_distance_of_sorted_zero_padded_probabilities_with_its_gradient():
    ps, pt = [0.5, 0.2, 0.3], [0.1, 0.6, 0.2, 0.1]
    s = torch.tensor([ps], dtype=torch.float64).log().requires_grad_()
    t = torch.tensor([pt], dtype=torch.float64).log()
    d = X.uld(s, t)
    # sorted: s .5 .3 .2 0, t .6 .2 .1 .1
    assert float(d.detach()) == pytest.approx(0.1 + 0.1 + 0.1 + 0.1)
    d.sum().backward()
    ts = sorted(pt, reverse=True)
    want = [0.0] * 3
    for rank, i in enumerate(_rank_sorted(ps)):  # d/dlog p_i = p_i * sign(p_i - t_(rank of i))
        want[i] = ps[i] * math.copysign(1.0, ps[i] - ts[rank])
    assert s.grad[0].tolist() == pytest.approx(want)


def test_uld_against_a_top_k_teacher_compares_bucket_for_bucket():
    s = torch.tensor([[0.5, 0.3, 0.2]]).log()
    t = torch.tensor([[0.6, 0.2, 0.2]]).log()  # top-2 and the rest
    assert float(X.uld(s, t, t_topk=True)) == pytest.approx(0.1 + 0.1 + 0.0)
    # k larger than the student's vocabulary: missing buckets are zero
    t4 = torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05]]).log()
    assert float(X.uld(s, t4, t_topk=True)) == pytest.approx(0.1 + 0.0 + 0.0 + 0.05 + 0.05)


def test_a_group_of_tokens_merges_into_the_first_distribution_times_the_later_observed_probabilities():
    logp = torch.randn(4, 5, dtype=torch.float64).log_softmax(-1)
    # group 0: predicted at row 0, later tokens at rows 1 (token 2) and 2 (token 4); group 1: row 3 alone
    got = X.merge_logp(logp, torch.tensor([0, 3]), torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([2, 4]))
    assert torch.allclose(got[0], logp[0] + logp[1, 2] + logp[2, 4])
    assert torch.equal(got[1], logp[3])


def test_span_loss_is_the_divergence_on_shared_tokens_plus_uld_on_the_rest():
    torch.manual_seed(0)
    s = torch.randn(2, 4, dtype=torch.float64).log_softmax(-1).requires_grad_()
    t = torch.randn(2, 5, dtype=torch.float64).log_softmax(-1)
    s_ids, t_ids = torch.tensor([3, 0]), torch.tensor([1, 4])  # student 3 = teacher 1, student 0 = teacher 4
    got = X.span_loss(s, t, s_ids, t_ids, "forward_kl")
    w = 2 / 5
    for g in range(2):
        ps = s[g].exp().tolist()
        pt = t[g].exp().tolist()
        qs = [ps[3], ps[0]]
        qt = [pt[1], pt[4]]
        qs = [x / sum(qs) for x in qs]
        qt = [x / sum(qt) for x in qt]
        kl = sum(b * math.log(b / a) for a, b in zip(qs, qt))
        rs = sorted([ps[1], ps[2]], reverse=True) + [0.0]
        rt = sorted([pt[0], pt[2], pt[3]], reverse=True)
        want = w * kl + (1 - w) * sum(abs(a - b) for a, b in zip(rs, rt))
        assert float(got[g].detach()) == pytest.approx(want, rel=1e-9)
    assert torch.autograd.gradcheck(lambda x: X.span_loss(x, t, s_ids, t_ids, "jsd"), (s.detach().requires_grad_(),))


def test_shared_vocabulary_pairs_tokens_standing_for_the_same_text():
    # token_bytes of two vocabularies: b"" is a special token (<unk>), b"\xe6" the first byte of a character
    s_ids, t_ids = X.shared_vocab([b"", b"def", b"x", b"return", b"\xe6"], [b"return", b"y", b"def", b"", b"\xe6"])
    assert t_ids.tolist() == [0, 2] and s_ids.tolist() == [3, 1]  # neither <unk> nor a piece of a character


TEXT = ("def naïve(x):\n    return 'café — 東京' + x  # ünïcödé\n\n" * 3)


def _bpe(vocab):
    from workbench.data import _train_bpe

    return _train_bpe([TEXT, "print('hello world')\n" * 5], vocab)


def test_token_bytes_of_a_byte_level_tokenizer_rebuild_the_text_exactly():
    tok = _bpe(300)
    tb = X.token_bytes(tok)
    assert b"".join(tb[i] for i in tok(TEXT)["input_ids"]) == TEXT.encode()
    assert tb[tok.eos_token_id] == b""  # special: covers no bytes


def test_token_bytes_refuse_a_tokenizer_without_exact_bytes():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")))
    with pytest.raises(ValueError, match="byte-level BPE"):
        X.token_bytes(tok)


def test_a_batch_aligns_on_groups_that_cover_the_same_bytes_in_both_tokenisations():
    s_tok, t_tok = _bpe(280), _bpe(420)
    sb, tb = X.token_bytes(s_tok), X.token_bytes(t_tok)
    stream = s_tok(TEXT)["input_ids"]
    cut = next(i for i in range(1, len(stream)) if sb[stream[i]][:1] and sb[stream[i]][0] & 0xC0 == 0x80)
    T = 40  # block 0 starts inside a character; block 1 holds the end of one document and a second one
    b0 = stream[cut : cut + T]
    b1 = stream[:20] + [s_tok.eos_token_id] + stream[:T - 21]
    pos1 = list(range(20)) + [20] + list(range(T - 21))
    positions = torch.tensor([list(range(100, 100 + T)), pos1])
    targets = torch.ones(2, T, dtype=torch.bool)
    targets[1, 25] = False  # a token that is not a target starts no group
    al = X.align_batch(torch.tensor([b0, b1]), positions, targets, sb, t_tok, tb, pad_id=t_tok.eos_token_id)
    s_ids, t_ids = torch.tensor([b0, b1]).reshape(-1), al.teacher_ids.reshape(-1)
    Tt = al.teacher_ids.shape[1]
    assert al.teacher_positions[1, 0] == 0 and al.teacher_positions[0, 0] == 100  # restart, or carry on
    G = al.s_first.numel()
    assert G > 20 and al.t_first.numel() == G
    for g in range(G):
        s_rows = [int(al.s_first[g])] + al.s_later[al.s_later_group == g].tolist()
        t_rows = [int(al.t_first[g])] + al.t_later[al.t_later_group == g].tolist()
        assert s_rows == list(range(s_rows[0], s_rows[0] + len(s_rows)))  # consecutive tokens
        s_bytes = b"".join(sb[int(s_ids[r + 1])] for r in s_rows)
        t_bytes = b"".join(tb[int(t_ids[r + 1])] for r in t_rows)
        assert s_bytes == t_bytes and s_bytes  # the same text on both sides
        assert s_rows[0] // T == t_rows[0] // Tt  # in the same block
        assert int(s_ids[s_rows[0] + 1]) != s_tok.eos_token_id
    assert al.s_later_token.tolist() == [int(s_ids[r + 1]) for r in al.s_later.tolist()]
    assert al.t_later_token.tolist() == [int(t_ids[r + 1]) for r in al.t_later.tolist()]
    assert 1 * T + 24 not in al.s_first.tolist()  # row 24 predicts the non-target token 25
    assert 1 * T + 20 not in al.s_first.tolist() and 1 * T + 19 not in al.s_first.tolist()  # no group across documents
    # the teacher reads the same text: its tokens decode to the blocks' valid bytes
    whole0 = b"".join(sb[i] for i in b0)
    lo, hi = X._valid_utf8(whole0)
    assert lo > 0 and t_tok.decode(al.teacher_ids[0][al.teacher_mask[0].bool()]).encode() == whole0[lo:hi]


def _random_batch(student_vocab, teacher_vocab, seed):
    """Two student blocks aligned with the teacher's tokens, random student hidden states and output layer
    (float64, with gradients) and random teacher log-probabilities."""
    s_tok, t_tok = _bpe(student_vocab), _bpe(teacher_vocab)
    sb, tb = X.token_bytes(s_tok), X.token_bytes(t_tok)
    stream = s_tok(TEXT)["input_ids"]
    ids = torch.tensor([stream[:30], stream[10:40]])
    al = X.align_batch(ids, None, None, sb, t_tok, tb, pad_id=t_tok.eos_token_id)
    torch.manual_seed(seed)
    H, Vs, Vt = 8, len(s_tok), len(t_tok)
    hidden = torch.randn(ids.numel(), H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(Vs, H, dtype=torch.float64, requires_grad=True)
    t_logp = (torch.randn(al.teacher_ids.numel(), Vt, dtype=torch.float64) * 2).log_softmax(-1)
    return al, hidden, weight, t_logp, sb, tb, Vt


@pytest.mark.parametrize("kind", ["uld", "span"])
@pytest.mark.parametrize("student_vocab,teacher_vocab", [(280, 420), (420, 280)])  # groups merge on either side
def test_the_chunked_cross_tokenizer_loss_equals_the_dense_computation_in_value_and_gradient(
        kind, student_vocab, teacher_vocab):
    al, hidden, weight, t_logp, sb, tb, Vt = _random_batch(student_vocab, teacher_vocab, 0)
    shared = X.shared_vocab(sb, tb) if kind == "span" else None
    T = 2.0
    got = X.cross_tokenizer_loss(kind, hidden, weight, lambda r: (t_logp[r] / T).log_softmax(-1), al,
                                 temperature=T, shared=shared, chunk=7)
    g_h, g_w = torch.autograd.grad(got, (hidden, weight))
    # dense: every row's logits at once, merged over all groups, summed
    logp = (hidden @ weight.t() / T).log_softmax(-1)
    G = al.s_first.numel()
    s = X.merge_logp(logp, al.s_first, al.s_later, al.s_later_group, al.s_later_token)
    t = X.merge_logp((t_logp / T).log_softmax(-1), al.t_first, al.t_later, al.t_later_group, al.t_later_token)
    want = (X.uld(s, t) if kind == "uld" else X.span_loss(s, t, *shared)).sum()
    w_h, w_w = torch.autograd.grad(want, (hidden, weight))
    assert G > 10 and (al.s_later.numel() if student_vocab < teacher_vocab else al.t_later.numel()) > 10
    # (the chunking wrapper sums in float32, as training does)
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    assert torch.allclose(g_h, w_h, rtol=1e-10, atol=1e-14)
    assert float((g_w - w_w).abs().max()) < 1e-6 * float(w_w.abs().max())  # the output layer's, in float32


@pytest.mark.parametrize("term", ["{name: uld, weight: 0.5}", "{name: span, weight: 0.5, divergence: jsd}"])
def test_a_student_with_its_own_tokenizer_learns_from_a_teacher_reading_in_its_tokens(tmp_path, tiny_teacher,
                                                                                       accelerator, term):
    """The teacher (320-token BPE) and a student with a 448-token BPE of the same corpus: the run
    trains, the term is logged and finite, and the loss falls."""
    from conftest import fast_recipe
    from workbench.train import run

    from workbench.trainer import read_metrics

    out = tmp_path / "run"
    run(fast_recipe("kd_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                    "data.tokenizer=bpe", "data.vocab_size=448", "train.max_steps=8", "train.lr=3e-3",
                    f"distill.losses=[{term}, {{name: cross_entropy, weight: 0.5}}]",
                    "eval.report=true", "eval.prompts=2", "eval.max_new_tokens=4", "eval.choice_items=4"), accelerator)
    res = json.loads((out / "report.json").read_text())  # the students scored; the teacher reads other tokens
    assert [m["role"] for m in res["models"]] == ["student"] and "teacher" not in res["tasks"]
    name = "uld" if "uld" in term else "span"
    recs = [r for r in read_metrics(out) if f"train/{name}" in r]
    assert len(recs) == 8 and all(math.isfinite(r[f"train/{name}"]) and r[f"train/{name}"] > 0 for r in recs)
    assert recs[-1][f"train/{name}"] < recs[0][f"train/{name}"]


def test_a_same_vocabulary_divergence_with_another_tokenizer_says_what_to_use(tmp_path, tiny_teacher, accelerator):
    from conftest import fast_recipe
    from workbench.config import RecipeError
    from workbench.train import run

    with pytest.raises(RecipeError, match="uld or span"):
        run(fast_recipe("kd_tiny", tmp_path / "r", "teacher.recipe=null", f"teacher.name_or_path={tiny_teacher}",
                        "data.tokenizer=bpe", "data.vocab_size=448"), accelerator)
    with pytest.raises(RecipeError, match="use one kind"):
        run(fast_recipe("kd_tiny", tmp_path / "r", "distill.losses=[{name: uld}, {name: forward_kl}]"), accelerator)
    for extra in ("distill.sequence_kd={mode: greedy}", "distill.onpolicy={method: gkd}"):
        with pytest.raises(RecipeError, match="not available with"):
            run(fast_recipe("kd_tiny", tmp_path / "r", "distill.losses=[{name: uld}]", extra), accelerator)


def test_uld_equals_trl_gold_where_the_two_formulations_coincide():
    """TRL's GOLD (trl.experimental.gold.ULDLoss, extended ULD, 'bayesian' positions: row k - 1 predicts
    token k, as ours) and ours agree where every aligned group is one token on both sides: GOLD's value is
    the mean over sequences of our per-sequence sum over groups divided by their number. (With groups of
    several tokens the two merge differently: GOLD 'bayesian' takes the last token's distribution, ours, as
    GOLD 'observed', the first's.)"""
    import types

    gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    tok = _bpe(300)
    tb = X.token_bytes(tok)
    texts = ["def f(x):\n    return x + 1\n", "print('hello world')  # ok\n"]
    T = max(len(tok(t)["input_ids"]) for t in texts)
    ids = torch.tensor([tok(t)["input_ids"] + [tok.eos_token_id] * (T - len(tok(t)["input_ids"])) for t in texts])
    lens = [len(tok(t)["input_ids"]) for t in texts]
    torch.manual_seed(0)
    V = len(tok)
    s_logits = torch.randn(2, T, V, dtype=torch.float64) * 3
    t_logits = torch.randn(2, T, V, dtype=torch.float64) * 3
    start = 3  # the answer: tokens 3 .. len - 1
    labels = torch.full((2, T), -100)
    offsets = torch.zeros(2, T, 2, dtype=torch.long)
    for b, n in enumerate(lens):
        labels[b, start:n] = ids[b, start:n]
        ends = itertools.accumulate(len(tb[i]) for i in ids[b, start:n].tolist())
        for k, e in enumerate(ends):
            offsets[b, start + k] = torch.tensor([e - len(tb[int(ids[b, start + k])]), e])
    cfg = types.SimpleNamespace(uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
                                uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False,
                                use_extended_uld=True, uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=False)
    want = gold.ULDLoss(cfg)(s_logits, t_logits, labels, labels, ids, ids, offsets, offsets)
    ours = []
    for b, n in enumerate(lens):
        targets = torch.zeros(1, T, dtype=torch.bool)
        targets[0, start:n] = True
        al = X.align_batch(ids[b : b + 1], None, targets, tb, tok, tb, pad_id=tok.eos_token_id)
        assert al.s_later.numel() == 0 and al.s_first.numel() == n - start  # one group per answer token
        t_rows = t_logits[b].log_softmax(-1)
        total = X.cross_tokenizer_loss("uld", s_logits[b], None, lambda r: t_rows[r], al)
        ours.append(total / al.s_first.numel())
    assert float(torch.stack(ours).mean()) == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("kind", ["uld", "span"])
@pytest.mark.parametrize("student_vocab,teacher_vocab", [(280, 420), (420, 280)])
def test_a_top_k_teacher_covering_its_vocabulary_equals_the_dense_loss(kind, student_vocab, teacher_vocab):
    """The cache's form of the teacher (merged groups, top-k, the rest and the other shared tokens' mass)
    with k = the teacher's vocabulary gives the dense loss, value and gradient, chunked."""
    al, hidden, weight, t_logp, sb, tb, Vt = _random_batch(student_vocab, teacher_vocab, 1)
    shared = X.shared_vocab(sb, tb)
    t = X.merge_logp(t_logp, al.t_first, al.t_later, al.t_later_group, al.t_later_token)
    groups = X.topk_groups(t, Vt, shared[1])
    opts = dict(shared=shared if kind == "span" else None, chunk=7)
    got = X.cross_tokenizer_loss(kind, hidden, weight, None, al, t_groups=groups, t_vocab=Vt, **opts)
    want = X.cross_tokenizer_loss(kind, hidden, weight, lambda r: t_logp[r], al, **opts)
    g = torch.autograd.grad(got, (hidden, weight))
    w = torch.autograd.grad(want, (hidden, weight))
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
    for a, b in zip(g, w):
        assert float((a - b).abs().max()) < 1e-6 * float(b.abs().max())


def test_span_loss_against_a_top_k_teacher_is_written_out_bucket_by_bucket():
    # teacher vocabulary 6: ids 0, 2, 5 shared (student ids 1, 0, 3); student vocabulary 5 (2, 4 unshared)
    pt = [0.30, 0.25, 0.05, 0.20, 0.12, 0.08]
    ps = [0.10, 0.35, 0.15, 0.25, 0.15]
    s_of_t = torch.tensor([1, -1, 0, -1, -1, 3])
    s_shared = torch.tensor([1, 0, 3])
    t = torch.tensor([pt], dtype=torch.float64).log()
    two = X.topk_groups(t, 2, torch.tensor([0, 2, 5]))  # the 2 largest shared and the 2 largest others
    assert two.indices.tolist() == [[0, 1, 3, 5]]  # in decreasing order
    assert two.logp[0].exp().tolist() == pytest.approx([0.30, 0.25, 0.20, 0.08, 0.17, 0.05])
    # ULD's buckets from it: the 2 largest of all, then the rest (0.08 + 0.17), as a plain top-2 gives
    assert two.ranked()[0].exp().tolist() == pytest.approx([0.30, 0.25, 0.45])
    assert torch.allclose(two.ranked(), X.topk_groups(t, 2, None).ranked())
    # against any kept set: here teacher ids 0, 1, 3 (0 shared, 1 and 3 not), the rest 0.25 (0.13 shared)
    top = X.GroupTopK(torch.tensor([[0, 1, 3]]), torch.tensor([[0.30, 0.25, 0.20, 0.25, 0.13]], dtype=torch.float64).log())
    s = torch.tensor([ps], dtype=torch.float64).log().requires_grad_()
    got = X.span_loss_topk(s, top, s_of_t, s_shared, "forward_kl", matched_weight=0.6)
    # shared buckets: teacher id 0 (student id 1), the other shared (teacher 2 + 5 / student 0 + 3)
    qt = [0.30, 0.13]
    qs = [ps[1], ps[0] + ps[3]]
    qt, qs = [x / sum(qt) for x in qt], [x / sum(qs) for x in qs]
    kl = sum(b * math.log(b / a) for a, b in zip(qs, qt))
    # unshared: teacher's 2 among its top (0.25, 0.20) + rest 0.25 - 0.13 = 0.12; student's unshared
    # (ids 2, 4: 0.15, 0.15): its 2 largest, then nothing
    uld = abs(0.15 - 0.25) + abs(0.15 - 0.20) + abs(0.0 - 0.12)
    assert float(got.detach()) == pytest.approx(0.6 * kl + 0.4 * uld, rel=1e-9)
    assert torch.autograd.gradcheck(lambda x: X.span_loss_topk(x, top, s_of_t, s_shared, "jsd"),
                                    (s.detach().requires_grad_(),))


def _cross_run(tmp_path, name, teacher, accelerator, *extra):
    from conftest import fast_recipe
    from workbench.train import run
    from workbench.trainer import read_metrics

    out = tmp_path / name
    run(fast_recipe("kd_tiny", out, "teacher.recipe=null", f"teacher.name_or_path={teacher}", "data.tokenizer=bpe",
                    "data.vocab_size=448", "train.max_steps=4", "train.lr=3e-3", "train.eval_every=0",
                    "distill.losses=[{name: span, weight: 0.5, temperature: 2.0}, {name: cross_entropy, weight: 0.5}]",
                    *extra), accelerator)
    return [r for r in read_metrics(out) if "train/span" in r]


def test_training_from_the_cache_across_tokenizers_equals_the_live_teacher_and_resumes_a_build(
        tmp_path, tiny_teacher, accelerator, monkeypatch):
    """With k = the teacher's whole vocabulary (float32) the cached run's losses are the live run's; the
    cache holds the blocks the run visits, a longer run adds only the blocks it lacks, and a run whose
    blocks are all cached never loads the teacher."""
    from workbench import teacher_cache as TC
    from workbench.data import cache_root

    live = _cross_run(tmp_path, "live", tiny_teacher, accelerator)
    cached = _cross_run(tmp_path, "cached", tiny_teacher, accelerator,
                        "distill.teacher_cache={top_k: 320, dtype: float32}")
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached):
        assert b["train/span"] == pytest.approx(a["train/span"], rel=1e-4)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
    dirs = [d for d in (cache_root() / "teacher_topk").iterdir() if any(d.glob("shard-*.npz"))]
    assert len(dirs) == 1
    first = {f.name: f.stat().st_mtime_ns for f in dirs[0].glob("shard-*.npz")}
    n4 = len(TC.CrossCache(dirs[0]).where)
    _cross_run(tmp_path, "longer", tiny_teacher, accelerator, "distill.teacher_cache={top_k: 320, dtype: float32}",
               "train.max_steps=6")
    after = {f.name: f.stat().st_mtime_ns for f in dirs[0].glob("shard-*.npz")}
    assert all(after[n] == t for n, t in first.items()) and len(after) > len(first)  # old shards kept
    assert len(TC.CrossCache(dirs[0]).where) > n4
    from workbench import models as M

    roles, load = [], M.load_model
    monkeypatch.setattr(M, "load_model", lambda spec, tok, role, **kw: roles.append(role) or load(spec, tok, role, **kw))
    again = _cross_run(tmp_path, "again", tiny_teacher, accelerator, "distill.teacher_cache={top_k: 320, dtype: float32}")
    assert roles == ["student"] and [r["train/span"] for r in again] == [r["train/span"] for r in cached]


def test_a_cache_that_does_not_match_the_batch_is_refused():
    s_tok, t_tok = _bpe(280), _bpe(420)
    cross = X.CrossTokenizers.build(s_tok, t_tok, need_shared=False)
    stream = s_tok(TEXT)["input_ids"]
    ids = torch.tensor([stream[:30], stream[10:40]])
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    al = cross.align(ids, None, labels)
    counts = torch.bincount(al.s_first // 30, minlength=2).tolist()
    local = al.s_first - torch.repeat_interleave(torch.tensor([0, 30]), torch.tensor(counts))
    groups = X.GroupTopK(torch.zeros(len(local), 4, dtype=torch.long), torch.zeros(len(local), 6))
    got = cross.teacher_for(None, ids, None, labels, cached=(local, counts, {1.0: groups}))
    assert got.groups[1.0] is groups and got.outputs is None
    other = torch.tensor([stream[5:35], stream[10:40]])  # another text in block 0: other groups
    from workbench.config import WorkbenchError

    with pytest.raises(WorkbenchError, match="another tokenizer or data"):  # one line from train.py, no traceback
        cross.teacher_for(None, other, None, labels, cached=(local, counts, {1.0: groups}))


def _two_teacher_run(tmp_path, name, tiny_teacher, accelerator, losses, *extra):
    from conftest import fast_recipe
    from workbench.train import run
    from workbench.trainer import read_metrics

    out = tmp_path / name
    run(fast_recipe("kd_tiny", out, "teacher=null", "data.tokenizer=bpe", "data.vocab_size=448", "train.max_steps=3",
                    "train.lr=3e-3", "train.eval_every=0", f"distill.losses={losses}", *extra), accelerator)
    return [r for r in read_metrics(out) if "train/loss" in r], json.loads((out / "final_metrics.json").read_text())


def test_two_teachers_one_in_its_own_tokens_each_term_against_its_own_live_or_cached(tmp_path, tiny_teacher,
                                                                                     accelerator):
    """Teacher 0: the 320-token-BPE tiny teacher (span, across tokenizers); teacher 1: a random model in
    the student's 448 tokens (forward KL). Each term's first-step value is the one-teacher run's with its
    teacher (same start, same batch); from the cache (k covering both vocabularies, float32) every step's
    losses are the live run's."""
    both = (f"teachers=[{{name_or_path: {tiny_teacher}}}, {{tiny: llama-2layer-64}}]",)
    losses = ("[{name: span, weight: 0.3, temperature: 2.0}, {name: forward_kl, weight: 0.3, teacher: 1}, "
              "{name: cross_entropy, weight: 0.4}]")
    live, final = _two_teacher_run(tmp_path, "two", tiny_teacher, accelerator, losses, *both)
    assert final["teachers"] == [str(tiny_teacher), None]
    alone0, _ = _two_teacher_run(tmp_path, "t0", tiny_teacher, accelerator,
                                 "[{name: span, weight: 0.3, temperature: 2.0}, {name: cross_entropy, weight: 0.4}]",
                                 f"teacher={{name_or_path: {tiny_teacher}}}")
    alone1, _ = _two_teacher_run(tmp_path, "t1", tiny_teacher, accelerator,
                                 "[{name: forward_kl, weight: 0.3}, {name: cross_entropy, weight: 0.4}]",
                                 "teacher={tiny: llama-2layer-64}")
    assert live[0]["train/span"] == pytest.approx(alone0[0]["train/span"], rel=1e-5)
    assert live[0]["train/forward_kl"] == pytest.approx(alone1[0]["train/forward_kl"], rel=1e-5)
    assert live[0]["train/span"] != pytest.approx(live[0]["train/forward_kl"], rel=1e-2)
    cached, _ = _two_teacher_run(tmp_path, "two_cached", tiny_teacher, accelerator, losses, *both,
                                 "distill.teacher_cache={top_k: 448, dtype: float32}")
    for a, b in zip(live, cached):
        for k in ("train/loss", "train/span", "train/forward_kl"):
            assert b[k] == pytest.approx(a[k], rel=1e-4), k


@pytest.mark.parametrize("overrides,match", [
    (["teachers=[{tiny: llama-2layer-64}]"], "two or more"),
    (["teacher={tiny: llama-2layer-64}", "teachers=[{tiny: llama-2layer-64}, {tiny: llama-2layer-64}]"], "choose one"),
    (["distill.losses=[{name: forward_kl, teacher: 2}]"], "there are 2 teachers"),
    (["distill.losses=[{name: forward_kl}]"], "teachers.1: no distill.losses term uses it"),
    (["distill.losses=[{name: forward_kl}, {name: hidden_mse, teacher: 1}]"], "chooses the teacher of a logit"),
    (["distill.losses=[{name: forward_kl}, {name: forward_kl, teacher: 1}]", "distill.onpolicy={method: gkd}"],
     "not with on-policy"),
    (["distill.losses=[{name: forward_kl}, {name: span, teacher: 1}, {name: uld}]"], "use one kind per teacher"),
])
def test_several_teachers_are_checked_without_loading_anything(overrides, match):
    from workbench.config import RecipeError, load_recipe

    base = ["teacher=null", "teachers=[{tiny: llama-2layer-64}, {tiny: llama-2layer-64}]"]
    with pytest.raises(RecipeError, match=match):
        load_recipe("kd_tiny", base + overrides)


def test_a_cache_build_killed_between_shards_resumes_with_the_blocks_it_lacks(tmp_path, tiny_teacher, accelerator,
                                                                            monkeypatch):
    """A build that dies after its first shard leaves that shard complete and nothing else; the next build
    computes only the missing blocks, and the cache equals one built in one go."""
    import numpy as np
    from transformers import AutoTokenizer

    from workbench import models as M
    from workbench import teacher_cache as TC
    from workbench.config import ModelSpec

    s_tok = _bpe(280)
    t_tok = AutoTokenizer.from_pretrained(tiny_teacher)
    teacher = M.load_model(ModelSpec(name_or_path=str(tiny_teacher)), t_tok, "teacher")
    cross = X.CrossTokenizers.build(s_tok, t_tok, need_shared=True)
    stream = s_tok(TEXT * 4)["input_ids"]
    blocks = np.array([stream[i:i + 24] for i in range(0, 6 * 12, 12)], dtype=np.int64)  # 6 blocks of 24
    wanted = np.arange(6)
    build = lambda path: TC.build_cross(teacher, cross, blocks, wanted, path, 8, [1.0], "float32",  # noqa: E731
                                        accelerator, micro_batch_size=2, fused=True, shard_blocks=2)
    save, calls = np.savez, []

    def dies_on_second(path, **arrays):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        save(path, **arrays)

    monkeypatch.setattr(np, "savez", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "c")
    monkeypatch.setattr(np, "savez", save)
    first = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "c").glob("shard-*.npz")}
    assert len(first) == 1 and TC.CrossCache(tmp_path / "c").missing(wanted) == [2, 3, 4, 5]
    (tmp_path / "c" / "shard-000000002-0.npz.tmp.npz").write_bytes(b"half a shard")  # what a kill -9 leaves
    assert TC.CrossCache(tmp_path / "c").missing(wanted) == [2, 3, 4, 5]
    build(tmp_path / "c")
    assert all((tmp_path / "c" / n).stat().st_mtime_ns == t for n, t in first.items())
    build(tmp_path / "whole")
    a, b = TC.CrossCache(tmp_path / "c"), TC.CrossCache(tmp_path / "whole")
    ga, gb = a.batch(wanted, "cpu"), b.batch(wanted, "cpu")
    assert torch.equal(ga[0], gb[0]) and ga[1] == gb[1]
    assert torch.equal(ga[2][1.0].indices, gb[2][1.0].indices) and torch.equal(ga[2][1.0].logp, gb[2][1.0].logp)


@pytest.mark.parametrize("given", [True, False])
def test_the_wider_teacher_vocabulary_sets_the_rows_per_chunk(monkeypatch, given):
    """A teacher with 12x the student's vocabulary holds a [rows, Vt] block per chunk: the rows per chunk
    come from the wider vocabulary (given, or read off the teacher's rows), not the student's."""
    from workbench import losses

    seen = []
    monkeypatch.setattr(losses, "auto_chunk", lambda v, *a: seen.append(v) or 16)
    al, hidden, weight, t_logp, sb, tb, Vt = _random_batch(280, 420, 0)
    X.cross_tokenizer_loss("uld", hidden, weight, lambda r: t_logp[r], al, t_vocab=Vt if given else None)
    assert seen[0] == Vt and Vt > weight.shape[0]  # (chunked_logit_loss asks again, then keeps the bounds)
