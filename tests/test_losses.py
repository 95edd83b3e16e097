"""Losses against naive dense formulas (values and gradients, fp32 and bf16, odd shapes, all-ignored
batches); the chunked/fused path against the dense one; top-k teachers; hidden-state and attention
transfer with differing widths and head counts."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from workbench import config, losses
from workbench.config import LossTerm

KINDS = sorted(losses.DIVERGENCES)


# --------------------------------------------------------------------------------------------- references


def _naive(kind, s, t, labels, temp, beta=0.5, alpha=0.1):
    """Textbook formulas on probabilities, float64: sum over valid rows of T^2 * D."""
    p_s = torch.softmax(s.double() / temp, -1)
    p_t = torch.softmax(t.double() / temp, -1)

    def kl(p, q):
        return (p * (p / q).log()).sum(-1)

    if kind == "forward_kl":
        d = kl(p_t, p_s)
    elif kind == "reverse_kl":
        d = kl(p_s, p_t)
    elif kind == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        d = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    elif kind == "skew_forward_kl":
        d = kl(p_t, alpha * p_t + (1 - alpha) * p_s)
    elif kind == "skew_reverse_kl":
        d = kl(p_s, alpha * p_s + (1 - alpha) * p_t)
    elif kind == "tvd":
        d = 0.5 * (p_t - p_s).abs().sum(-1)
        return (d * (labels != -100)).sum() * temp  # TVD's gradient scales as 1/T, not 1/T^2
    return (d * (labels != -100)).sum() * temp**2


def _data(N=13, V=37, seed=0, dtype=torch.float32, ignore=(1, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignore)] = -100
    return s, t, labels


def test_registries_match_the_recipe_schema():
    names = set(typing.get_args(config.LossName))
    assert set(losses.DIVERGENCES) == config.LOGIT_DIVERGENCES
    assert names == config.LOGIT_DIVERGENCES | config.FEATURE_LOSSES | config.CROSS_TOKENIZER_LOSSES | {"cross_entropy"}
    assert set(typing.get_args(typing.get_type_hints(config.LossTerm)["divergence"])) == config.LOGIT_DIVERGENCES


# --------------------------------------------------------------------------------------------- divergences


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divergence_matches_naive_value_and_gradient(kind, temp, dtype):
    s, t, labels = _data(dtype=dtype)
    s.requires_grad_()
    got = losses.LogitDivergence(kind, temperature=temp, beta=0.3, alpha=0.2)(s, t, labels)
    s64 = s.detach().double().requires_grad_()
    ref = _naive(kind, s64, t, labels, temp, beta=0.3, alpha=0.2)
    assert got.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # bf16 inputs are exact; the math runs in fp32
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    got.backward()
    ref.backward()
    # the gradient comes back in the input dtype: bf16 rounds it to 8 significant bits
    g_tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=g_tol, atol=g_tol)
    assert s.grad.dtype == dtype
    assert s.grad[[1, 5, 6]].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("kind", KINDS)
def test_all_ignored_batch_gives_zero_not_nan(kind):
    s, t, labels = _data(ignore=range(13))
    s.requires_grad_()
    got = losses.LogitDivergence(kind)(s, t, labels)
    got.backward()
    assert got.item() == 0.0 and torch.isfinite(s.grad).all() and s.grad.abs().max() == 0


def test_identical_distributions_have_zero_divergence():
    s, _, labels = _data()
    for kind in KINDS:
        assert losses.LogitDivergence(kind, temperature=1.5)(s, s.clone(), labels).abs().item() < 1e-5, kind


def test_jsd_and_skew_reduce_to_the_kls():
    s, t, labels = _data()
    fwd = losses.LogitDivergence("forward_kl")(s, t, labels)
    rev = losses.LogitDivergence("reverse_kl")(s, t, labels)
    assert losses.LogitDivergence("jsd", beta=0.0)(s, t, labels) == fwd
    assert losses.LogitDivergence("jsd", beta=1.0)(s, t, labels) == rev
    # the convention at beta = 0/1 is the limit of JSD/beta and JSD/(1 - beta); the error is O(beta * chi^2),
    # so check it on gentler logits
    s1, t1, eps = s / 3, t / 3, 1e-3
    fwd1 = losses.LogitDivergence("forward_kl")(s1, t1, labels)
    rev1 = losses.LogitDivergence("reverse_kl")(s1, t1, labels)
    torch.testing.assert_close(losses.LogitDivergence("jsd", beta=eps)(s1, t1, labels) / eps, fwd1, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(losses.LogitDivergence("jsd", beta=1 - eps)(s1, t1, labels) / eps, rev1, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(losses.LogitDivergence("skew_forward_kl", alpha=0.0)(s, t, labels), fwd)
    torch.testing.assert_close(losses.LogitDivergence("skew_reverse_kl", alpha=0.0)(s, t, labels), rev)


def test_temperature_scales_by_t_squared():
    s, t, labels = _data()
    a = losses.LogitDivergence("forward_kl", temperature=2.0)(s, t, labels)
    b = losses.LogitDivergence("forward_kl", temperature=1.0)(s / 2, t / 2, labels)
    torch.testing.assert_close(a, 4 * b)


def test_cross_entropy_is_a_sum_over_valid_tokens():
    s, _, labels = _data()
    got = losses.CrossEntropy()(s, None, labels)
    valid = labels != -100
    ref = -torch.log_softmax(s.double(), -1)[valid.nonzero()[:, 0], labels[valid]].sum()
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- top-k teachers


def _bucketed(p, idx):
    """Dense probabilities -> [N, k + 1]: the top-k tokens, then the rest (float64)."""
    top = p.gather(-1, idx)
    return torch.cat([top, 1 - top.sum(-1, keepdim=True)], -1)


@pytest.mark.parametrize("kind", KINDS)
def test_topk_teacher_is_the_divergence_between_bucketed_distributions(kind):
    s, t, labels = _data()
    temp, k = 1.7, 5
    teacher = losses.topk_from_logits(t, k, temp)
    s.requires_grad_()
    got = losses.LogitDivergence(kind, temperature=temp)(s, teacher, labels)
    # reference: bucket both dense distributions by hand and use the textbook formula on logits of buckets
    p_s = torch.softmax(s.detach().double() / temp, -1)
    p_t = torch.softmax(t.double() / temp, -1)
    ref = _naive(kind, _bucketed(p_s, teacher.indices).log() * temp, _bucketed(p_t, teacher.indices).log() * temp,
                 labels, temp)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # with every token but one kept, the buckets are the full distributions: equal to the dense loss
    full = losses.topk_from_logits(t, t.shape[-1] - 1, temp)
    dense = losses.LogitDivergence(kind, temperature=temp)(s, t, labels)
    torch.testing.assert_close(losses.LogitDivergence(kind, temperature=temp)(s, full, labels), dense,
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- chunking


def _objective(*names):
    return losses.LogitObjective([LossTerm(n, weight=0.3 + 0.1 * i, temperature=1.0 + i) for i, n in enumerate(names)])


def _fused_inputs(seed, N, H, Ht, V):
    """Student hidden states and output layer (weight, bias; trainable), teacher hidden states and layer."""
    torch.manual_seed(seed)
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    b = torch.randn(V, requires_grad=True)
    return h, W, b, torch.randn(N, Ht), torch.randn(V, Ht)


@pytest.mark.parametrize("chunk, block", [(1, 0), (4, 0), (100, 0), (100, 3), (5, 2)])
def test_chunked_fused_equals_dense(chunk, block):
    """Chunks of rows, and blocks of rows within a chunk (the objective's passes; through autograd here, as
    TVD has no closed form), give the dense loss's value and gradients."""
    N, V = 11, 29
    h, W, b, ht, Wt = _fused_inputs(0, N, 6, 9, V)
    labels = torch.randint(0, V, (N,))
    labels[3] = -100
    fn = _objective("cross_entropy", "forward_kl", "jsd", "tvd")

    total, parts = losses.chunked_logit_loss(fn, h, {"labels": labels}, lambda a, z: ht[a:z] @ Wt.T, W, b, chunk,
                                             block=block)
    total.mul(0.7).backward()  # the upstream gradient is honoured
    got = [h.grad.clone(), W.grad.clone(), b.grad.clone()]
    for p in (h, W, b):
        p.grad = None
    ref_total, ref_parts = fn(h @ W.T + b, ht @ Wt.T, {"labels": labels})
    ref_total.mul(0.7).backward()
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts, ref_parts, rtol=1e-5, atol=1e-5)
    for g, p in zip(got, (h, W, b)):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    assert not parts.requires_grad


@pytest.mark.parametrize("block", [0, 2])
def test_chunked_over_logits_and_topk_equal_dense(block):
    torch.manual_seed(1)
    s, t, labels = _data(N=17, V=23)
    s.requires_grad_()
    fn = _objective("forward_kl", "reverse_kl")
    total, _ = losses.chunked_logit_loss(fn, s, {"labels": labels}, lambda a, b: t[a:b], chunk=3, block=block)
    (g,) = torch.autograd.grad(total, s)
    ref, _ = fn(s, t, {"labels": labels})
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(g, g_ref)
    # a dict of top-k teachers (one per temperature) is sliced along with the rows
    topk = {temp: losses.topk_from_logits(t, 4, temp) for temp in fn.temperatures}
    total, _ = losses.chunked_logit_loss(fn, s, {"labels": labels}, lambda a, b: {k: v[a:b] for k, v in topk.items()},
                                         chunk=5, block=block)
    (g,) = torch.autograd.grad(total, s)
    ref, _ = fn(s, topk, {"labels": labels})
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(g, g_ref)


def test_chunked_fused_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(2)
    N, H, V = 32, 16, 64
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    t = torch.randn(N, V)
    labels = torch.randint(0, V, (N,))
    fn = _objective("cross_entropy", "forward_kl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = losses.chunked_logit_loss(fn, h, {"labels": labels}, lambda a, b: t[a:b], W, None, 8)
    total.backward()
    ref, _ = fn(h @ W.T, t, {"labels": labels})
    (gh, gw) = torch.autograd.grad(ref, (h, W))
    torch.testing.assert_close(total, ref, rtol=2e-2, atol=1e-1)
    assert (h.grad - gh).norm() / gh.norm() < 3e-2 and (W.grad - gw).norm() / gw.norm() < 3e-2


def test_no_gradient_work_without_grad():
    h, W = torch.randn(8, 4), torch.randn(10, 4)
    with torch.no_grad():
        total, _ = losses.chunked_logit_loss(_objective("cross_entropy"), h, {"labels": torch.zeros(8, dtype=torch.long)},
                                             weight=W, chunk=3)
    assert not total.requires_grad and total.item() > 0


def test_ce_labels_override_targets_for_cross_entropy_only():
    s, t, labels = _data()
    fn = _objective("cross_entropy", "forward_kl")
    none = torch.full_like(labels, -100)
    _, parts = fn(s, t, {"labels": labels, "ce_labels": none})
    _, ref = fn(s, t, {"labels": labels})
    assert parts[0] == 0 and parts[1] == ref[1]


# --------------------------------------------------------------------------------------------- features


class _Cfg:
    def __init__(self, layers, width, heads):
        self.num_hidden_layers, self.hidden_size, self.num_attention_heads = layers, width, heads


def test_uniform_layer_map():
    assert losses.uniform_layer_map(4, 6) == [[1, 2], [2, 3], [3, 5], [4, 6]]
    assert losses.uniform_layer_map(2, 2) == [[1, 1], [2, 2]]


@pytest.mark.parametrize("kind,normalize", [("hidden_mse", False), ("hidden_mse", True), ("hidden_cosine", False)])
def test_hidden_state_losses_with_a_projection(kind, normalize):
    torch.manual_seed(3)
    B, T, Hs, Ht = 2, 5, 6, 10
    hs = tuple(torch.randn(B, T, Hs, requires_grad=True) for _ in range(3))  # embeddings + 2 layers
    ht = tuple(torch.randn(B, T, Ht) * (1 + torch.arange(T)[:, None]) for _ in range(5))  # embeddings + 4 layers
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, -1] = False
    obj = losses.Objective([LossTerm(kind, weight=0.5, normalize=normalize)], _Cfg(2, Hs, 4), _Cfg(4, Ht, 8))
    (loss,) = obj.features
    assert loss.layer_map == [(1, 2), (2, 4)] and all(isinstance(p, torch.nn.Linear) for p in loss.proj)
    got = loss(hs, ht, mask)
    ref = 0.0
    for (s, t), P in zip(loss.layer_map, loss.proj):
        a, b = hs[s] @ P.weight.T, ht[t]
        if kind == "hidden_mse":
            per = ((a - b) ** 2).sum(-1) / (b**2).sum(-1) if normalize else ((a - b) ** 2).mean(-1)
        else:
            per = 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        ref = ref + (per * mask).sum()
    torch.testing.assert_close(got, ref / 2)
    got.backward()
    assert loss.proj[0].weight.grad is not None and hs[1].grad is not None  # the projection trains
    # equal widths: no projection
    same = losses.HiddenStateLoss(kind, [[0, 0]], 6, 6)
    assert isinstance(same.proj[0], torch.nn.Identity)


def _tiny_llama(heads, kv, layers, hidden=32, vocab=50, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                        num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=48))


def test_recording_attention_equals_transformers_eager():
    from workbench.models import forward_for_losses, use_recording_attention

    m = _tiny_llama(4, 2, 2)
    ids = torch.randint(0, 50, (2, 7))
    m.set_attn_implementation("eager")
    ref = m(input_ids=ids, output_attentions=True)
    use_recording_attention(m)
    out = forward_for_losses(m, ids, fused=True, attention_layers={1, 2})
    for layer in (1, 2):
        scores, probs = out.attention[layer]
        torch.testing.assert_close(probs, ref.attentions[layer - 1])
        masked = scores.masked_fill(~torch.ones(7, 7, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(masked.softmax(-1), probs)  # the scores are the pre-softmax logits
    assert out.logits is None and out.final_hidden.shape == (2, 7, 32)


@pytest.mark.parametrize("head_map", ["average", "map"])
def test_attention_losses_across_head_counts(head_map):
    from workbench.models import forward_for_losses, use_recording_attention

    student, teacher = _tiny_llama(2, 1, 2, seed=1), _tiny_llama(8, 4, 4, hidden=64, seed=2)
    for m in (student, teacher):
        use_recording_attention(m)
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False
    terms = [LossTerm("attention_kl", head_map=head_map), LossTerm("attention_logit_mse", head_map=head_map)]
    obj = losses.Objective(terms, student.config, teacher.config)
    so = forward_for_losses(student, ids, True, attention_layers=obj.attention_layers[0])
    to = forward_for_losses(teacher, ids, True, attention_layers=obj.attention_layers[1])
    kl_loss, mse_loss = obj.features
    assert kl_loss.layer_map == [(1, 2), (2, 4)]
    got_kl = kl_loss(so.attention, to.attention, mask)
    got_mse = mse_loss(so.attention, to.attention, mask)
    # reference: group teacher heads 8 -> 2 (map) or everything -> 1 (average), then the formulas
    g = 2 if head_map == "map" else 1
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    ref_kl = ref_mse = 0.0
    for s, t in kl_loss.layer_map:
        (ss, sp), (ts, tp) = so.attention[s], to.attention[t]
        a_s = sp.reshape(3, g, -1, 6, 6).mean(2).double()
        a_t = tp.reshape(3, g, -1, 6, 6).mean(2).double()
        kl = torch.where(causal, a_t * (a_t / a_s).log(), 0.0).sum(-1).mean(1)  # [B, T]
        ref_kl = ref_kl + (kl * mask).sum()
        z_s = torch.where(causal, ss, 0.0).reshape(3, g, -1, 6, 6).mean(2).double()
        z_t = torch.where(causal, ts, 0.0).reshape(3, g, -1, 6, 6).mean(2).double()
        mse = ((z_s - z_t) ** 2).sum(-1) / causal.sum(-1)
        ref_mse = ref_mse + (mse.mean(1) * mask).sum()
    torch.testing.assert_close(got_kl.double(), ref_kl / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_mse.double(), ref_mse / 2, rtol=1e-4, atol=1e-5)
    (got_kl + got_mse).backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_head_map_needs_divisible_counts():
    with pytest.raises(ValueError, match="head_map=map"):
        losses.AttentionLoss("attention_kl", [[1, 1]], "map", 3, 8)


def test_layer_map_out_of_range_is_reported():
    with pytest.raises(ValueError, match=r"layer_map: pair \[3, 1\] out of range"):
        losses.Objective([LossTerm("hidden_mse", layer_map=[[3, 1]])], _Cfg(2, 4, 2), _Cfg(4, 4, 2))


# --------------------------------------------------------------------------------------------- objective


def test_objective_weights_terms_and_names_repeats():
    from workbench.losses import ModelOutputs

    torch.manual_seed(4)
    B, T, V = 2, 3, 8
    s, t = torch.randn(B, T, V), torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    terms = [LossTerm("forward_kl", 0.3, 2.0), LossTerm("cross_entropy", 0.7), LossTerm("forward_kl", 0.1, 1.0)]
    obj = losses.Objective(terms, vocab=V)
    total, parts = obj(ModelOutputs(logits=s), ModelOutputs(logits=t), {"labels": labels})
    assert list(parts) == ["forward_kl_0", "cross_entropy", "forward_kl_2"]
    flat = labels.reshape(-1)
    s2, t2 = s.reshape(-1, V), t.reshape(-1, V)
    expected = 0.3 * _naive("forward_kl", s2, t2, flat, 2.0) + 0.7 * losses.CrossEntropy()(s2, None, flat).double() \
        + 0.1 * _naive("forward_kl", s2, t2, flat, 1.0)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-5)


def test_vocab_cut_ignores_padded_logits():
    from workbench.losses import ModelOutputs

    s, t, labels = _data(N=6, V=10, ignore=(1,))
    padded_s = torch.cat([s, torch.full((6, 3), 50.0)], -1)  # padding rows that must not count
    obj = losses.Objective([LossTerm("forward_kl")], vocab=10)
    got, _ = obj(ModelOutputs(logits=padded_s[None]), ModelOutputs(logits=t[None]), {"labels": labels[None]})
    torch.testing.assert_close(got.double(), _naive("forward_kl", s, t, labels, 1.0), rtol=1e-5, atol=1e-5)


def test_shift_labels_aligns_targets_without_copying_logits():
    labels = torch.tensor([[1, 2, 3], [4, 5, -100]])
    assert losses.shift_labels(labels).tolist() == [[2, 3, -100], [5, -100, -100]]


def test_in_place_log_softmax_and_row_zeroing():
    """The closed form's helpers: log_softmax(x / T) written into x itself (torch's fused kernel on its own
    input), equal to F.log_softmax, -inf logits included (a row of -inf only gives NaN, as there); and
    zeroing the invalid rows writes those rows alone."""
    torch.manual_seed(5)
    x = torch.randn(6, 50) * 3
    x[1, :7] = float("-inf")
    x[4] = float("-inf")
    for T in (1.0, 2.0):
        y = x.clone()
        out = losses._log_softmax_(y, T)
        assert out.data_ptr() == y.data_ptr()
        torch.testing.assert_close(out, torch.nn.functional.log_softmax(x / T, -1), equal_nan=True)
    z = torch.full((5, 3), float("nan"))
    valid = torch.tensor([True, False, True, False, True])
    assert losses._zero_rows(z, valid) is z
    assert (z[~valid] == 0).all() and z[valid].isnan().all()
    assert losses._zero_rows(torch.ones(2, 2), torch.tensor([True, True])).eq(1).all()


@pytest.mark.parametrize("names", [("jsd", "cross_entropy"), ("forward_kl",), ("reverse_kl",)])
def test_closed_form_chunks_read_nothing_back_from_a_device(names, monkeypatch):
    """On a GPU the fused loss must not make the host wait for the device (nonzero(), item(), bool(), ...):
    a sync per block stalls the kernel queue. Here the CPU plays the device (_on_host says no) with those
    reads forbidden: the loss runs through and still equals the dense reference."""
    N, V = 23, 41
    h, W, b, ht, Wt = _fused_inputs(3, N, 8, 5, V)
    t_all = ht @ Wt.T
    labels = torch.randint(0, V, (N,))
    labels[[4, 9]] = -100
    fn = _objective(*names)
    total_ref, parts_ref = losses.chunked_logit_loss(fn, h, {"labels": labels}, lambda a, z: t_all[a:z], W, b,
                                                     chunk=6, block=4)
    total_ref.backward()
    ref = [h.grad.clone(), W.grad.clone(), b.grad.clone()]
    for p in (h, W, b):
        p.grad = None

    def forbidden(name):
        def read_back(*a, **k):
            raise AssertionError(f"Tensor.{name}: the host waits for the device")
        return read_back

    monkeypatch.setattr(losses, "_on_host", lambda x: False, raising=False)
    for name in ("nonzero", "item", "tolist", "__bool__", "__int__", "__float__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    total, parts = losses.chunked_logit_loss(fn, h, {"labels": labels}, lambda a, z: t_all[a:z], W, b, chunk=6,
                                             block=4)
    total.backward()
    monkeypatch.undo()
    torch.testing.assert_close(total, total_ref)
    torch.testing.assert_close(parts, parts_ref)
    for g, r in zip((h.grad, W.grad, b.grad), ref):
        torch.testing.assert_close(g, r)


def test_auto_chunk_bounds_chunk_memory():
    """8 MiB chunks (under glibc's 32 MiB mmap threshold, so temporaries are reused, not page-faulted in
    anew), never fewer than 32 rows (the output layer's products stay compute-bound)."""
    assert losses.auto_chunk(4096) == 512 and losses.auto_chunk(10**9) == 32
    assert losses.auto_chunk(128_256) == 32 and losses.auto_chunk(128_256) * 128_256 * 4 < 32 << 20
    assert math.isclose(losses.auto_chunk(32_000) * 32_000, 1 << 21, rel_tol=0.01)
    # a fused output layer of width H: at least 256 rows (H / 16 if more), so a chunk's traffic over the
    # [V, H] weights and their gradient is amortised (H = 4096, V = 128,256: 256 rows)
    assert losses.auto_chunk(128_256, 4096) == 256 and losses.auto_chunk(128_256) == 32
    # fused, a narrow output layer (SmolLM2: 576 wide, 49,152 tokens): still a few hundred rows, not 42
    assert losses.auto_chunk(49_152, 576) == 256 and losses.auto_chunk(128_256, 16_384) == 1024
    assert losses.auto_chunk(4096, 4096) == 512


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_equals_trls_generalized_jsd(beta):
    """The objective workbench.bench.vs_trl compares: our jsd (a sum over valid tokens, divided once by
    the caller) equals TRL GKDTrainer's generalized_jsd_loss (normalised by the number of valid tokens),
    values and gradients, with beta meaning the same on both sides."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    s, t, labels = _data(N=13, V=37)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    n = (labels != -100).sum()
    ours = losses.LogitDivergence("jsd", beta=beta)(s1, t, labels) / n
    theirs = gkd.GKDTrainer.generalized_jsd_loss(s2[None], t[None], labels[None], beta=beta, num_items_in_batch=n)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
    ours.backward(), theirs.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_masking_tokens_with_minus_inf(kind):
    """A teacher that masks tokens with -inf logits (probability 0): finite values and gradients equal to
    the naive formula with 0 * log 0 = 0. Reverse KL, infinite there by its definition, is taken on the
    teacher's support with the student renormalised, plus -log of the student's mass on it."""
    s, t, labels = _data(N=9, V=23, ignore=(2,))
    t[:, [0, 5, 7]] = float("-inf")
    s1 = s.clone().requires_grad_()
    got = losses.LogitDivergence(kind, temperature=2.0, beta=0.3, alpha=0.2)(s1, t, labels)
    got.backward()
    s64 = s.double().requires_grad_()
    p_s = torch.softmax(s64 / 2.0, -1)
    p_t = torch.softmax(t.double() / 2.0, -1)  # exact zeros at the masked tokens

    def kl(p, q):  # 0 * log(0 / q) = 0
        return torch.where(p > 0, p * (p.clamp(min=1e-300) / q).log(), torch.zeros_like(p)).sum(-1)

    m = {"jsd": 0.3 * p_t + 0.7 * p_s, "skew_forward_kl": 0.2 * p_t + 0.8 * p_s,
         "skew_reverse_kl": 0.2 * p_s + 0.8 * p_t}.get(kind)
    on = (p_t > 0).all(0)  # the teacher's support: the same columns in every row
    mass = p_s[:, on].sum(-1, keepdim=True)  # the student's mass on it
    d = {"forward_kl": lambda: kl(p_t, p_s),
         "reverse_kl": lambda: kl(p_s[:, on] / mass, p_t[:, on]) - mass.squeeze(-1).log(),
         "jsd": lambda: 0.3 * kl(p_t, m) + 0.7 * kl(p_s, m), "skew_forward_kl": lambda: kl(p_t, m),
         "skew_reverse_kl": lambda: kl(p_s, m), "tvd": lambda: 0.5 * (p_t - p_s).abs().sum(-1)}[kind]()
    ref = (d * (labels != -100)).sum() * (2.0 if kind == "tvd" else 4.0)
    ref.backward()
    assert torch.isfinite(got) and torch.isfinite(s1.grad).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1.grad.double(), s64.grad, rtol=1e-4, atol=1e-5)


def test_reverse_kl_outside_the_support_is_finite_and_pushes_mass_back():
    """A student with most of its mass on tokens the teacher rules out: a loss of about -log(its mass on
    the support), never the 1e30 of a clamped log(0), and gradient descent moves mass onto the support."""
    V = 6
    t = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), float("-inf"), float("-inf")]])
    s = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0, 3.0]], requires_grad=True)
    labels = torch.zeros(1, dtype=torch.long)
    loss = losses.LogitDivergence("reverse_kl")(s, t, labels)
    loss.backward()
    p_s = torch.softmax(s.detach(), -1)
    assert torch.isfinite(loss) and 0 < loss < 10 and s.grad.abs().max() < 1
    assert loss >= -p_s[0, :3].sum().log() - 1e-6
    assert (s.grad[0, 3:] > 0).all()  # descent lowers the ruled-out logits
    s0 = torch.zeros(1, V)  # a student already on the support gets plain KL
    s0[0, 3:] = -1e4
    torch.testing.assert_close(losses.LogitDivergence("reverse_kl")(s0, t, labels),
                               _naive("reverse_kl", s0[:, :3], t[:, :3], labels, 1.0).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_masked_rows_cannot_poison_the_loss(kind, poison):
    """NaN or inf in the teacher's rows that do not count (ignore_index) changes neither value nor
    gradient: the loss equals the one over the valid rows alone."""
    s, t, labels = _data(N=8, V=19, ignore=(2, 5))
    bad = t.clone()
    bad[2] = poison
    bad[5, 3] = poison
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    fn = losses.LogitDivergence(kind, temperature=1.5)
    a = fn(s1, bad, labels)
    a.backward()
    keep = labels != -100
    b = fn(s2[keep], t[keep], labels[keep])
    b.backward()
    torch.testing.assert_close(a, b)
    assert torch.isfinite(s1.grad).all() and (s1.grad[~keep] == 0).all()
    torch.testing.assert_close(s1.grad[keep], s2.grad[keep])


def test_tvd_scales_by_t_so_its_gradient_keeps_its_size():
    """TVD's gradient with respect to the logits shrinks as 1/T (T^2 would blow it up as T grows)."""
    s, t, labels = _data()
    a = losses.LogitDivergence("tvd", temperature=4.0)(s, t, labels)
    b = losses.LogitDivergence("tvd", temperature=1.0)(s / 4, t / 4, labels)
    torch.testing.assert_close(a, 4 * b)


@pytest.mark.parametrize("name", ["cross_entropy", "reverse_kl"])  # closed form / through autograd
def test_chunked_loss_allocates_no_gradient_buffers_under_no_grad(name, monkeypatch):
    """Evaluation (torch.no_grad) with an output layer that requires grad: no [V, H] fp32 gradient buffer
    and no per-chunk gradient pass."""
    h, W, t = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4, requires_grad=True), torch.randn(8, 10)
    fn, teacher, labels = _objective(name), (lambda a, b: t[a:b]), {"labels": torch.zeros(8, dtype=torch.long)}
    calls = []
    real_zeros = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda x, **kw: calls.append(tuple(x.shape)) or real_zeros(x, **kw))
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: calls.append("grad") or real_grad(*a, **kw))
    formed = []
    real_closed = losses._closed_form
    monkeypatch.setattr(losses, "_closed_form", lambda *a: formed.append(a[-1]) or real_closed(*a))
    with torch.no_grad():
        total, _ = losses.chunked_logit_loss(fn, h, labels, teacher, weight=W, chunk=3, block=2)
    assert calls == [] and total.item() > 0
    total, _ = losses.chunked_logit_loss(fn, h, labels, teacher, weight=W, chunk=3, block=2)
    assert (10, 4) in calls  # with grad, the gradient buffer is there
    assert ("grad" in calls) == (name == "reverse_kl")  # and autograd only where no closed form exists


def test_attention_kl_is_teacher_to_student_on_peaked_maps():
    """On peaked attention (scaled random scores; tiny models attend almost uniformly, so both KL
    directions agree there), attention_kl is KL(A_teacher || A_student) row by row, not the reverse."""
    g = torch.Generator().manual_seed(0)
    B, H, T = 2, 2, 7
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def att(scale):
        z = (torch.randn(B, H, T, T, generator=g) * scale).masked_fill(~causal, float("-inf"))
        return z.masked_fill(~causal, 0.0), torch.softmax(z, -1)

    student, teacher = att(1.0), att(6.0)  # a flat student, a peaked teacher
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3] = False
    fn = losses.AttentionLoss("attention_kl", [(1, 1)], "map", H, H)
    got = fn({1: student}, {1: teacher}, mask)
    p_s, p_t = student[1].double(), teacher[1].double()

    def kl(p, q):  # written out, over the keys each query sees
        return torch.where(causal, p * (p.clamp(min=1e-300) / q.clamp(min=1e-300)).log(), 0.0).sum(-1).mean(1)

    want, swapped = (kl(p_t, p_s) * mask).sum(), (kl(p_s, p_t) * mask).sum()
    assert abs(want - swapped) / want > 0.1  # the two directions really differ here
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_a_second_backward_through_the_chunked_loss_is_refused():
    """Its gradients are formed in the forward pass and scaled in place by backward: a second backward
    (retain_graph) would scale them again, so it is refused rather than silently wrong."""
    s, t, labels = _data()
    x = s.clone().requires_grad_()
    fn = losses.LogitObjective([config.LossTerm("forward_kl", 1.0)])
    total, _ = losses.chunked_logit_loss(fn, x, {"labels": labels}, lambda a, b: t[a:b], chunk=4)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        total.backward()


# --------------------------------------------------------------------------------------------- closed-form chunks


@pytest.mark.parametrize("names", [("jsd",), ("forward_kl",), ("cross_entropy",), ("forward_kl", "cross_entropy"),
                                   ("cross_entropy", "jsd", "forward_kl")])
@pytest.mark.parametrize("fused_teacher", [True, False])
@pytest.mark.parametrize("block", [0, 4])
def test_closed_form_chunks_equal_the_dense_reference(names, fused_teacher, block, monkeypatch):
    """Objectives of cross-entropy and closed-form divergences skip autograd inside a chunk (value and
    gradient formed in place, in the chunk's own logits): equal to the dense formula through autograd,
    values and gradients, with masked rows and -inf teacher logits; a teacher given as rows of the
    caller's tensor (not fresh) is left untouched."""
    N, V = 23, 41
    h, W, b, ht, Wt = _fused_inputs(3, N, 8, 5, V)
    t_all = ht @ Wt.T
    t_all[:, 7] = float("-inf")
    t_all[4] = float("nan")  # an ignored row: must not reach value or gradient
    kept = t_all.clone()
    labels = torch.randint(0, V, (N,))
    labels[[4, 9]] = -100
    fn = losses.LogitObjective([LossTerm(n, weight=0.3 + 0.2 * i, temperature=1.0 + 0.5 * i)
                                for i, n in enumerate(names)])
    if fused_teacher:
        def teacher(a, z):
            return t_all[a:z].clone()
        teacher.fresh = True
    else:
        def teacher(a, z):
            return t_all[a:z]
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: calls.append(1) or real_grad(*a, **kw))
    total, parts = losses.chunked_logit_loss(fn, h, {"labels": labels}, teacher, W, b, chunk=6, block=block)
    total.mul(0.7).backward()
    assert calls == []  # no autograd inside the chunks
    got = [h.grad.clone(), W.grad.clone(), b.grad.clone()]
    assert torch.equal(t_all.nan_to_num(), kept.nan_to_num())
    for p in (h, W, b):
        p.grad = None
    keep = labels != -100
    for m in fn.losses:  # the reference: autograd through the textbook formulas
        m.closed_form = False
    ref_total, ref_parts = fn((h @ W.T + b)[keep], t_all[keep], {"labels": labels[keep]})
    ref_total.mul(0.7).backward()
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts, ref_parts, rtol=1e-5, atol=1e-5)
    for g, p in zip(got, (h, W, b)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("names", [("forward_kl", "cross_entropy"), ("jsd",)])
@pytest.mark.parametrize("block", [0, 2])
def test_closed_form_chunks_over_given_logits_leave_them_untouched(names, block):
    """Over materialised logits (no output layer to fuse) the chunk is a view of the caller's tensor: the
    closed form must not overwrite it (in blocks, it works in the gradient's rows instead)."""
    s, t, labels = _data(N=17, V=23)
    x = s.clone().requires_grad_()
    fn = _objective(*names)
    total, _ = losses.chunked_logit_loss(fn, x, {"labels": labels}, lambda a, b: t[a:b], chunk=5, block=block)
    (g,) = torch.autograd.grad(total, x)
    assert torch.equal(x.detach(), s)
    xr = s.clone().requires_grad_()
    ref, _ = fn(xr, t, {"labels": labels})
    (g_ref,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def _peak_live_full_size(run, rows: int, vocab: int, inputs=()) -> int:
    """The most tensors of at least rows x vocab fp32 elements alive at once while `run` executes
    (counted at the dispatcher: every op's outputs, freed when their storage is; views of `inputs`, e.g.
    weight.t(), are not new tensors)."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    live, peak, seen = [0], [0], {t.untyped_storage().data_ptr() for t in inputs}

    def gone(key):
        seen.discard(key)
        live[0] -= 1

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() >= rows * vocab * 4:
                    key = o.untyped_storage().data_ptr()
                    if key not in seen:
                        seen.add(key)
                        live[0] += 1
                        peak[0] = max(peak[0], live[0])
                        weakref.finalize(o.untyped_storage(), gone, key)
            return out

    with Count():
        run()
    return peak[0]


@pytest.mark.parametrize("block, most", [(0, 4), (8, 2)])
def test_a_fused_jsd_chunk_holds_four_full_size_tensors(block, most):
    """Liger's setting in miniature (one chunk of rows x a wide vocabulary): the fused generalised JSD
    holds at most four [rows, V] fp32 tensors at once (student and teacher logits, overwritten by their
    log-probabilities, p_s and the mixture); through autograd it held seven. In blocks of a quarter of the
    chunk's rows, only the two logits are full-size (p_s and the mixture are a block's)."""
    torch.manual_seed(0)
    N, H, V = 32, 4, 1 << 19  # scratch blocks of 8 rows: smaller than a full-size tensor
    h = torch.randn(N, H, requires_grad=True)
    W = torch.randn(V, H, requires_grad=True)
    ht, Wt = torch.randn(N, H), torch.randn(V, H)
    labels = torch.randint(0, V, (N,))
    fn = losses.LogitObjective([LossTerm("jsd", 1.0, beta=0.5)])
    rows = losses._teacher_rows(losses.ModelOutputs(final_hidden=ht, head_weight=Wt), N, None)

    def run():
        total, _ = losses.chunked_logit_loss(fn, h, {"labels": labels}, rows, W, None, chunk=N, block=block)
        total.backward()

    assert _peak_live_full_size(run, N, V) <= most


def test_chunks_write_their_logits_into_one_buffer_each(monkeypatch):
    """The fused loss computes each chunk's student and teacher logits into one buffer per side, reused by
    every chunk (on a CPU, a fresh [256, 49,152] float32 chunk is page-faulted in again each time: 175,000
    minor faults per SmolLM2 loss): two new [chunk, V] products per loss, not two per chunk; a ragged last
    chunk takes the buffer's first rows. Same values and gradients as the dense formula. Under autocast
    (lower-precision products, no out= form) each chunk's logits are new, as before."""
    import torch.nn.functional as F

    N, V = 11, 37
    h, W, b, ht, Wt = _fused_inputs(5, N, 6, 9, V)
    bt = torch.randn(V)
    labels = torch.randint(0, V, (N,))
    labels[2] = -100
    fn = _objective("jsd", "cross_entropy")
    new = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda *a, **kw: new.append(a[0].shape[0]) or real_linear(*a, **kw))

    def loss():
        rows = losses._teacher_rows(losses.ModelOutputs(final_hidden=ht, head_weight=Wt, head_bias=bt), N, None)
        return losses.chunked_logit_loss(fn, h, {"labels": labels}, rows, W, b, chunk=4, block=3)

    total, parts = loss()
    total.backward()
    assert new == [4, 4]  # 3 chunks (4, 4, 3 rows): the first chunk's student and teacher logits only
    got = [h.grad.clone(), W.grad.clone(), b.grad.clone()]
    for p in (h, W, b):
        p.grad = None
    ref_total, ref_parts = fn(h @ W.T + b, ht @ Wt.T + bt, {"labels": labels})
    ref_total.backward()
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts, ref_parts, rtol=1e-5, atol=1e-5)
    for g, p in zip(got, (h, W, b)):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5)
    new.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss()
    assert new == [4, 4, 4, 4, 3, 3]
    # output_logits itself: the same bits as F.linear, into the buffer's rows, a larger call replacing it
    reuse = []
    for n, a in ((4, 0), (3, 4), (6, 2), (2, 9)):
        z = losses.output_logits(ht[a:a + n], Wt, bt, reuse)
        assert torch.equal(z, real_linear(ht[a:a + n], Wt, bt)) and z.data_ptr() == reuse[0].data_ptr()
    assert reuse[0].shape == (6, V)


def _bf16_fused_case(device):
    """A fused JSD + cross-entropy case with bf16 student and teacher output layers and hidden states."""
    torch.manual_seed(4)
    N, H, V = 24, 64, 512
    h = torch.randn(N, H, device=device).bfloat16().requires_grad_()
    W = (torch.randn(V, H, device=device) * 0.1).bfloat16().requires_grad_()
    ht, Wt = torch.randn(N, H, device=device).bfloat16(), (torch.randn(V, H, device=device) * 0.1).bfloat16()
    labels = torch.randint(0, V, (N,), device=device)
    rows = losses._teacher_rows(losses.ModelOutputs(final_hidden=ht, head_weight=Wt), N, None)
    return h, W, ht, Wt, labels, _bf16_objective(), rows


def _bf16_objective():
    return losses.LogitObjective([LossTerm("jsd", 0.7, beta=0.5), LossTerm("cross_entropy", 0.3)])


def _bf16_reference(h, W, ht, Wt, labels):
    """The dense objective through autograd on float64 logits from the same bf16 values (the losses work
    in float32 from there), and its gradients."""
    hd, Wd = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    fn = _bf16_objective()
    for m in fn.losses:
        m.closed_form = False
    ref, _ = fn(hd @ Wd.T, ht.double() @ Wt.double().T, {"labels": labels})
    ref.backward()
    return ref.double(), hd.grad, Wd.grad


def test_bf16_output_layers_take_the_closed_form_without_weight_sized_temporaries(monkeypatch):
    """bf16 output layers (no autocast): the chunk's logits are bf16, the closed form runs on float32 copies
    a block at a time (no autograd), and the weight gradient is accumulated in float32 straight into its
    buffer: no [V, H] temporary beside it (a bf16 product and its float32 copy per chunk before). Values and
    gradients match the dense objective computed in float64 from the same bf16 values."""
    h, W, ht, Wt, labels, fn, rows = _bf16_fused_case("cpu")
    calls = []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **kw: calls.append(1) or real_grad(*a, **kw))

    def forward_only():  # the forward forms every gradient; backward only scales them
        losses.chunked_logit_loss(fn, h, {"labels": labels}, rows, W, None, chunk=8, block=4)

    V, H = W.shape
    assert _peak_live_full_size(forward_only, H // 2, V, (W, Wt)) == 1  # the float32 gradient buffer alone
    total, _ = losses.chunked_logit_loss(fn, h, {"labels": labels}, rows, W, None, chunk=8, block=4)
    total.backward()
    assert calls == [] and h.grad.dtype == W.grad.dtype == torch.bfloat16
    ref, gh, gw = _bf16_reference(h, W, ht, Wt, labels)
    torch.testing.assert_close(total.double(), ref, rtol=2e-2, atol=0.0)
    for g, r in ((h.grad, gh), (W.grad, gw)):
        assert ((g.double() - r).norm() / r.norm()).item() < 2e-2


@pytest.mark.parametrize("addmm_float32_self", [True, False])
def test_weight_gradient_from_16bit_products_on_either_torch_path(monkeypatch, addmm_float32_self):
    """The GPU path's logic on a CPU, with torch.mm / addmm(out_dtype=float32) emulated (CPU builds have no
    such kernel): torch >= 2.10 adds into the float32 buffer by one addmm with out= the buffer; 2.8-2.9
    (whose addmm refuses a float32 self) by mm products of at most _GRAD_W_ROWS rows each (here 5, so the
    last slice is ragged). Either way the gradients match the float64 reference as the GPU's do."""
    real_mm, real_addmm, products = torch.mm, torch.addmm, []

    def mm(a, b, *, out_dtype=None, out=None):
        if out_dtype is None:
            return real_mm(a, b) if out is None else real_mm(a, b, out=out)
        products.append(("mm", *a.shape))
        return real_mm(a.float(), b.float())  # 16-bit products are exact in float32

    def addmm(c, a, b, *, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return real_addmm(c, a, b, **kw) if out is None else real_addmm(c, a, b, out=out, **kw)
        assert out is c and c.dtype == torch.float32 and addmm_float32_self
        products.append(("addmm", *a.shape))
        return c.addmm_(a.float(), b.float())

    monkeypatch.setattr(losses, "_float32_out", lambda device, dtype: dtype in losses._HALF)
    monkeypatch.setattr(losses, "_ADDMM_FLOAT32_SELF", addmm_float32_self)
    monkeypatch.setattr(losses, "_GRAD_W_ROWS", 5)
    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(torch, "addmm", addmm)
    h, W, ht, Wt, labels, fn, rows = _bf16_fused_case("cpu")
    (N, H), V = h.shape, W.shape[0]
    total, _ = losses.chunked_logit_loss(fn, h, {"labels": labels}, rows, W, None, chunk=8)
    total.backward()
    weight = [p for p in products if p[2] != H]  # g^T [rows of V, 8]; the logits' products are h [8, H]
    if addmm_float32_self:
        assert weight == [("addmm", V, 8)] * (N // 8)
    else:  # every row of the gradient once per chunk, at most 5 at a time, the last slice V % 5 = 2 rows
        assert {p[0] for p in weight} == {"mm"} and max(p[1] for p in weight) == 5
        assert sum(p[1] for p in weight) == V * (N // 8) and ("mm", V % 5, 8) in weight
    ref, gh, gw = _bf16_reference(h, W, ht, Wt, labels)
    torch.testing.assert_close(total.double(), ref, rtol=1e-4, atol=0.0)
    for g, r in ((h.grad, gh), (W.grad, gw)):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_output_layers_give_float32_logits_and_match_the_reference():
    """On a CUDA GPU (sm_80+, torch >= 2.8) 16-bit output layers give float32 logits from the GEMM itself
    (out_dtype), unrounded, and the weight gradient is accumulated by a float32-output addmm: closer to
    the float64 reference than bf16 logits allow."""
    h, W, ht, Wt, labels, fn, rows = _bf16_fused_case("cuda")
    z = losses.output_logits(h.detach(), W.detach())
    assert z.dtype == torch.float32
    assert (z.double() - h.detach().double() @ W.detach().double().T).abs().max().item() < 1e-4
    total, _ = losses.chunked_logit_loss(fn, h, {"labels": labels}, rows, W, None, chunk=8)
    total.backward()
    ref, gh, gw = _bf16_reference(h, W, ht, Wt, labels)
    torch.testing.assert_close(total.double(), ref, rtol=1e-4, atol=0.0)
    for g, r in ((h.grad, gh), (W.grad, gw)):
        assert ((g.double() - r).norm() / r.norm()).item() < 1e-2
    # float32 output layers under bf16 autocast (the trainer's mixed precision): bf16 products, float32
    # gradients, close to the same reference
    h32, W32 = h.detach().float().requires_grad_(), W.detach().float().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        total, _ = losses.chunked_logit_loss(_bf16_objective(), h32, {"labels": labels}, rows, W32, None, chunk=8)
    total.backward()
    assert W32.grad.dtype == torch.float32
    torch.testing.assert_close(total.double(), ref, rtol=2e-2, atol=0.0)
    for g, r in ((h32.grad, gh), (W32.grad, gw)):
        assert ((g.double() - r).norm() / r.norm()).item() < 3e-2


def test_kd_loss_memory_bench_compares_equal_losses_and_refuses_gpu_without_one(capsys):
    from workbench.bench import kd_loss_memory as bench

    # sizes it cannot measure end in one line (a negative chunk ran no chunk at all: a zero loss)
    for bad in (["--chunk", "-5"], ["--vocab", "0"], ["--tokens", "0"], ["--reps", "0"]):
        with pytest.raises(SystemExit) as e:
            bench.main([*bad, "--no-record"])
        assert e.value.code == 2 and "must be" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(ValueError, match="must be >= 0"):
        losses.chunked_logit_loss(_objective("cross_entropy"), torch.randn(4, 3), {"labels": torch.zeros(4).long()},
                                  chunk=-2)

    for objective in ("kl_ce", "jsd"):
        dense = bench._one("dense", 512, 64, 32, 48, 1, objective)
        ours = bench._one("ours", 512, 64, 32, 48, 1, objective, chunk=16)
        assert dense["loss"] == pytest.approx(ours["loss"], rel=1e-5), objective
    if not torch.cuda.is_available():
        assert bench.main(["--gpu", "--vocab", "512", "--tokens", "64", "--no-record"]) == 2
        assert capsys.readouterr().err.strip() == "error: --gpu needs a CUDA GPU"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # Liger's masked lanes, interpreted
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_our_fused_jsd_equals_liger_kernels_fused_linear_jsd(beta):
    # Liger-Kernel's LigerFusedLinearJSD (Triton: run by the interpreter on a CPU, compiled on a GPU, where
    # the tensors go to it) on the same hidden states and output layers: same beta convention (0 forward KL,
    # 1 reverse KL), its mean over tokens = our sum / tokens, and the same gradients for the student's
    # hidden states and output layer
    pytest.importorskip("liger_kernel")
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    from workbench.losses import LogitObjective, chunked_logit_loss

    torch.manual_seed(0)
    tokens, vocab, hidden, t_hidden = 24, 200, 16, 24
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h, ht = torch.randn(tokens, hidden).to(dev), torch.randn(tokens, t_hidden).to(dev)
    W, Wt = (torch.randn(vocab, hidden) * 0.3).to(dev), (torch.randn(vocab, t_hidden) * 0.3).to(dev)
    labels = torch.randint(0, vocab, (tokens,)).to(dev)
    x1, W1 = h.clone().requires_grad_(), W.clone().requires_grad_()
    ours, _ = chunked_logit_loss(LogitObjective([LossTerm("jsd", 1.0, beta=beta)]), x1, {"labels": labels},
                                 lambda a, b: ht[a:b] @ Wt.T, W1, None, chunk=8)
    ours.backward()
    x2, W2 = h.clone().requires_grad_(), W.clone().requires_grad_()
    liger = LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0)(x2, W2, ht, Wt, labels)
    liger.backward()
    assert (ours / tokens).item() == pytest.approx(liger.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(x1.grad / tokens, x2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(W1.grad / tokens, W2.grad, rtol=1e-4, atol=1e-7)
