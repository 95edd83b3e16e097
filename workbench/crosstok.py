"""Distillation across tokenizers: the student and the teacher read the same text in their own tokens.

Alignment works on byte spans. Both tokenisations of one text are grouped into the shortest spans on which
they agree (`align_groups`): walking both, the side whose current token ends first advances; a group closes
where both end at the same byte. The prediction of a group's first token is what the two models are
compared on: the student's next-token distribution at the position before its group, the teacher's at the
position before its own.

Two objectives:
- ULD (Boizard et al. 2024): the two probability vectors sorted, the shorter zero-padded, compared with the
  Wasserstein-1 distance, which for sorted vectors on one support is the L1 distance (`uld`).
- Span alignment (as TRL's GOLD does): a group of several tokens is merged into one distribution, the
  first token's distribution times the probabilities of the group's later (observed) tokens
  (`merge_logp`); on the tokens both vocabularies share, one of the usual divergences between the merged
  distributions renormalised over the shared tokens; on the rest, ULD of the merged masses (`span_loss`).

Everything is per group row: [G, V] log-probabilities in, [G] out (sums over groups are the callers').
A top-k teacher ([G, k + 1]: its k largest probabilities, then the rest's mass) works with ULD as a
(k + 1)-bucket comparison: the student's k largest probabilities, then its rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.losses import DIVERGENCES, _NEG


def align_groups(s_spans, t_spans) -> list[tuple[list[int], list[int]]]:
    """Byte spans [(start, end), ...] of two tokenisations of one text -> [(student token indices, teacher
    token indices), ...], the shortest groups both agree on, in order. Tokens covering no bytes (special
    tokens) belong to no group; text that only one side covers (a cut-off tail) closes no group."""
    s = [i for i, (a, b) in enumerate(s_spans) if b > a]
    t = [j for j, (a, b) in enumerate(t_spans) if b > a]
    groups, gs, gt = [], [], []
    i = j = 0
    while i < len(s) and j < len(t):
        se, te = s_spans[s[i]][1], t_spans[t[j]][1]
        if se <= te:
            gs.append(s[i])
            i += 1
        if te <= se:
            gt.append(t[j])
            j += 1
        if se == te:
            groups.append((gs, gt))
            gs, gt = [], []
    return groups


def merge_logp(logp: torch.Tensor, first: torch.Tensor, later: torch.Tensor, later_group: torch.Tensor,
               later_token: torch.Tensor) -> torch.Tensor:
    """Merged log-probabilities of groups: logp [P, V] (rows: the positions predicting each token),
    first [G] (the row predicting each group's first token), later [E] rows predicting the groups' later
    tokens, later_group [E] their group, later_token [E] the token observed there.
    -> [G, V]: log p_first(v) + sum over the group's later tokens of log p(observed token)."""
    out = logp[first]
    if later.numel():
        extra = logp[later].gather(-1, later_token[:, None])[:, 0]  # [E]
        out = out + torch.zeros(first.shape[0], dtype=out.dtype, device=out.device).index_add(0, later_group,
                                                                                                extra)[:, None]
    return out


def uld(s_logp: torch.Tensor, t_logp: torch.Tensor, t_topk: bool = False) -> torch.Tensor:
    """Wasserstein-1 distance between sorted probability vectors, per row: sum_i |s_(i) - t_(i)|, each side
    sorted in decreasing order and the shorter zero-padded. s_logp [G, Vs], t_logp [G, Vt] (log of
    probabilities or of merged masses; _NEG for zero). With t_topk, t_logp is [G, k + 1]: the teacher's k
    largest probabilities (in decreasing order) and the rest's mass; the student is compared bucket for
    bucket (its k largest, then its rest)."""
    s = _f32(s_logp).exp()
    t = _f32(t_logp).exp()
    if t_topk:
        k = t.shape[-1] - 1
        top = s.topk(min(k, s.shape[-1]), dim=-1).values
        rest = (s.sum(-1, keepdim=True) - top.sum(-1, keepdim=True)).clamp(min=0.0)
        top = F.pad(top, (0, k - top.shape[-1]))
        return (torch.cat([top, rest], -1) - t).abs().sum(-1)
    s = s.sort(dim=-1, descending=True).values
    t = t.sort(dim=-1, descending=True).values
    n = max(s.shape[-1], t.shape[-1])
    return (F.pad(s, (0, n - s.shape[-1])) - F.pad(t, (0, n - t.shape[-1]))).abs().sum(-1)


def span_loss(s_merged: torch.Tensor, t_merged: torch.Tensor, s_shared: torch.Tensor, t_shared: torch.Tensor,
              kind: str = "forward_kl", matched_weight: float | None = None, beta: float = 0.5,
              alpha: float = 0.1) -> torch.Tensor:
    """Span alignment on merged groups: s_merged [G, Vs], t_merged [G, Vt] merged log-masses; s_shared /
    t_shared [S]: the ids of the tokens both vocabularies hold (s_shared[i] is t_shared[i]'s student id).
    -> [G]: w * D(t || s) over the shared tokens (both renormalised there; D one of losses.DIVERGENCES) +
    (1 - w) * ULD of the unshared tokens' masses; w = matched_weight, default the share of the teacher's
    vocabulary both hold (as GOLD)."""
    w = t_shared.numel() / t_merged.shape[-1] if matched_weight is None else matched_weight
    out = torch.zeros(s_merged.shape[0], dtype=_f32(s_merged).dtype, device=s_merged.device)
    if t_shared.numel():
        s_in = F.log_softmax(_f32(s_merged)[:, s_shared], -1).clamp(min=_NEG)
        t_in = F.log_softmax(_f32(t_merged)[:, t_shared], -1).clamp(min=_NEG)
        out = out + w * DIVERGENCES[kind](s_in, t_in, beta=beta, alpha=alpha)
    s_rest = _without(s_merged, s_shared)
    t_rest = _without(t_merged, t_shared)
    if s_rest.shape[-1] and t_rest.shape[-1] and w < 1.0:
        out = out + (1.0 - w) * uld(s_rest, t_rest)
    return out


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays: the gradient checks run in it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _without(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
    keep[cols] = False
    return x[:, keep]


def shared_vocab(s_tok, t_tok) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the tokens that stand for the same text in both tokenizers, in
    teacher-id order. Special tokens and pieces of a character (which decode to U+FFFD) are left out: they
    would match what they do not stand for."""
    def pieces(tok):
        special = set(tok.all_special_ids)
        out = {}
        for i in range(len(tok)):
            text = tok.convert_tokens_to_string([tok.convert_ids_to_tokens(i)])
            if i not in special and text and "\ufffd" not in text:
                out.setdefault(text, i)  # the first id of a duplicated piece
        return out

    s_of = pieces(s_tok)
    pairs = sorted((t, s_of[b]) for b, t in pieces(t_tok).items() if b in s_of)
    return (torch.tensor([s for _, s in pairs], dtype=torch.long), torch.tensor([t for t, _ in pairs], dtype=torch.long))
