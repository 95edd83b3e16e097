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
A teacher read from the cache (`GroupTopK`, teacher_cache.CrossCache) is its merged distribution's k
largest entries per group, the rest's mass, and the mass of the shared tokens outside those k: ULD becomes
a bucket comparison (the student's k largest, then its rest), span alignment a divergence over the shared
tokens among the k plus one bucket for the other shared ones, and ULD of the unshared ones likewise
(`span_loss_topk`). With k the teacher's whole vocabulary both equal the dense computation.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workbench.config import RecipeError, WorkbenchError
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
    # the longer side beyond the shorter one's length meets zeros: only its largest n values need sorting,
    # the rest adds its mass (a top-k of 4,096 of SmolLM2's 49,152 instead of a full sort)
    n = min(s.shape[-1], t.shape[-1])
    s_top, t_top = s.topk(n, dim=-1).values, t.topk(n, dim=-1).values  # in decreasing order
    tail = (s.sum(-1) - s_top.sum(-1)) + (t.sum(-1) - t_top.sum(-1))  # one of the two is 0
    return (s_top - t_top).abs().sum(-1) + tail.clamp(min=0.0)


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


@dataclass
class GroupTopK:
    """A teacher's merged group distributions, top-k (`topk_groups`): indices [G, n] (teacher ids) and logp
    [G, n + 2]: their log-masses, then the log of the rest's mass, then the log of the mass of the shared
    tokens among the rest (-inf where none)."""

    indices: torch.Tensor
    logp: torch.Tensor
    k: int | None = None  # the entries are in decreasing order; the first k (None: all) are the k largest

    def __getitem__(self, rows) -> "GroupTopK":
        return GroupTopK(self.indices[rows], self.logp[rows], self.k)

    def ranked(self) -> torch.Tensor:
        """[G, k + 1]: the k largest log-masses in decreasing order, then the log of all the rest's mass (ULD
        against a top-k teacher)."""
        n = self.indices.shape[-1]
        k = n if self.k is None else min(self.k, n)
        rest = torch.cat([self.logp[:, k:n], self.logp[:, n:n + 1]], -1).logsumexp(-1, keepdim=True)
        return torch.cat([self.logp[:, :k], rest], -1)


def topk_groups(merged: torch.Tensor, k: int, t_shared: torch.Tensor | None) -> GroupTopK:
    """[G, Vt] merged teacher log-masses -> their GroupTopK: the k largest (t_shared None: for ULD), or the
    k largest among the shared tokens (t_shared: their teacher ids) and the k largest among the others, so
    that both parts of the span loss get their own k."""
    if t_shared is None or not t_shared.numel():
        top, idx = merged.topk(min(k, merged.shape[-1]), dim=-1)
    else:
        is_shared = torch.zeros(merged.shape[-1], dtype=torch.bool, device=merged.device)
        is_shared[t_shared] = True
        n_sh, n_un = int(is_shared.sum()), merged.shape[-1] - int(is_shared.sum())
        a = merged.masked_fill(~is_shared, float("-inf")).topk(min(k, n_sh), dim=-1)
        b = merged.masked_fill(is_shared, float("-inf")).topk(min(k, n_un), dim=-1)
        top, order = torch.cat([a.values, b.values], -1).sort(-1, descending=True)  # the k largest of all first
        idx = torch.cat([a.indices, b.indices], -1).gather(-1, order)
    rest = merged.scatter(-1, idx, float("-inf"))
    cols = [top, rest.logsumexp(-1, keepdim=True)]
    if t_shared is not None and t_shared.numel():
        cols.append(rest[:, t_shared].logsumexp(-1, keepdim=True))
    else:
        cols.append(torch.full_like(cols[1], float("-inf")))
    return GroupTopK(idx, torch.cat(cols, -1), k)


def span_loss_topk(s_merged: torch.Tensor, teacher: GroupTopK, s_of_t: torch.Tensor, s_shared: torch.Tensor,
                   kind: str = "forward_kl", matched_weight: float | None = None, beta: float = 0.5,
                   alpha: float = 0.1) -> torch.Tensor:
    """span_loss against a top-k teacher (any set of its largest shared and unshared tokens, as
    `topk_groups` keeps): s_merged [G, Vs]; s_of_t [Vt] the student id of each teacher token (-1: not
    shared); s_shared [S] the shared tokens' student ids. On the shared tokens, the divergence over buckets:
    each shared token the teacher kept (the student's probability of the same token), then all other shared
    tokens (both renormalised over the shared tokens); on the unshared, ULD bucket by bucket: the teacher's
    k_u kept unshared masses against the student's k_u largest, then the rest of each side (k_u per group).
    Equal to span_loss when the kept tokens cover the teacher's vocabulary."""
    S = s_shared.numel()
    w = S / s_of_t.numel() if matched_weight is None else matched_weight
    s = _f32(s_merged)
    t = _f32(teacher.logp).clamp(min=_NEG)
    G, k = teacher.indices.shape  # (k: the kept tokens, shared and not)
    Vs = s.shape[-1]
    sid = s_of_t[teacher.indices]  # [G, k]
    sh = sid >= 0
    out = torch.zeros(G, dtype=s.dtype, device=s.device)
    if S:
        s_ext = F.pad(s, (0, 1), value=_NEG)  # column Vs stands in for "not shared"
        col = torch.where(sh, sid, Vs)
        s_at = s_ext.gather(-1, col).masked_fill(~sh, _NEG)
        other = torch.zeros(G, Vs + 1, dtype=torch.bool, device=s.device)
        other[:, s_shared] = True
        other.scatter_(1, col, False)
        s_other = s_ext.masked_fill(~other, _NEG).logsumexp(-1, keepdim=True)
        s_in = F.log_softmax(torch.cat([s_at, s_other], -1), -1).clamp(min=_NEG)
        t_in = F.log_softmax(torch.cat([t[:, :k].masked_fill(~sh, _NEG), t[:, k + 1:]], -1), -1).clamp(min=_NEG)
        out = out + w * DIVERGENCES[kind](s_in, t_in, beta=beta, alpha=alpha)
    if w < 1.0 and Vs > S and s_of_t.numel() > S:
        t_un = t[:, :k].masked_fill(sh, _NEG).exp().sort(-1, descending=True).values  # [G, k]
        k_u = (~sh).sum(-1, keepdim=True)  # [G, 1]
        t_rest = (t[:, k:k + 1].exp() - t[:, k + 1:].exp()).clamp(min=0.0)
        p = _without(s, s_shared).exp()
        top = F.pad(p.topk(min(k, p.shape[-1]), dim=-1).values, (0, max(0, k - p.shape[-1])))
        counted = torch.arange(k, device=s.device)[None] < k_u
        top = top * counted
        s_rest = (p.sum(-1, keepdim=True) - top.sum(-1, keepdim=True)).clamp(min=0.0)
        d = ((top - t_un * counted).abs().sum(-1, keepdim=True) + (s_rest - t_rest).abs())[:, 0]
        out = out + (1.0 - w) * d
    return out


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays: the gradient checks run in it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _without(x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device)
    keep[cols] = False
    return x[:, keep]


def shared_vocab(s_bytes: list[bytes], t_bytes: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the tokens that stand for the same text in both tokenizers (their
    `token_bytes`), in teacher-id order. Special tokens (no bytes) and pieces of a character (bytes that
    are no text on their own) are left out: they would match what they do not stand for."""
    def pieces(tb):
        out = {}
        for i, b in enumerate(tb):
            try:
                if b and b.decode("utf-8"):
                    out.setdefault(b, i)  # the first id of a duplicated piece
            except UnicodeDecodeError:
                pass
        return out

    s_of = pieces(s_bytes)
    pairs = sorted((t, s_of[b]) for b, t in pieces(t_bytes).items() if b in s_of)
    return (torch.tensor([s for _, s in pairs], dtype=torch.long), torch.tensor([t for t, _ in pairs], dtype=torch.long))


# --------------------------------------------------------------------------------------------- batches


def token_bytes(tok) -> list[bytes]:
    """The bytes each id of a byte-level BPE tokenizer stands for (special tokens: none), the spans the
    alignment works on. Other tokenizers cannot give exact spans for a block cut from a token stream."""
    import json

    model = json.loads(tok.backend_tokenizer.to_str())
    if (model.get("decoder") or {}).get("type") != "ByteLevel":
        raise RecipeError(f"{getattr(tok, 'name_or_path', tok)}: cross-tokenizer distillation needs byte-level "
                         "BPE tokenizers (GPT-2 / Llama 3 / SmolLM2 style), whose tokens map to exact bytes; "
                         f"this one decodes with {(model.get('decoder') or {}).get('type')}")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_byte = {ch: b for b, ch in bytes_to_unicode().items()}
    special = set(tok.all_special_ids)
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    out = []
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in special or piece is None or (i in added and added[i].special):
            out.append(b"")
        elif i in added:  # added as text, not in the byte alphabet
            out.append(added[i].content.encode("utf-8"))
        else:
            out.append(bytes(to_byte[c] for c in piece))
    return out


@dataclass
class Alignment:
    """A student batch read by the teacher in its own tokens, and the groups both agree on. Flat indices
    are into the [B * T] student rows and the [B * Tt] teacher rows (a row predicts the next token)."""

    teacher_ids: torch.Tensor  # [B, Tt] the teacher's tokens of each block's text (padded at the end)
    teacher_positions: torch.Tensor  # [B, Tt] restarting at each document
    teacher_mask: torch.Tensor  # [B, Tt] 1 for real tokens
    s_first: torch.Tensor  # [G] student row predicting each group's first token
    t_first: torch.Tensor  # [G] teacher row predicting it
    s_later: torch.Tensor  # [Es] student rows predicting the groups' later tokens
    s_later_group: torch.Tensor  # [Es]
    s_later_token: torch.Tensor  # [Es]
    t_later: torch.Tensor  # [Et]
    t_later_group: torch.Tensor  # [Et]
    t_later_token: torch.Tensor  # [Et]


def align_batch(ids, positions, targets, s_bytes: list[bytes], t_tok, t_bytes: list[bytes], pad_id: int) -> Alignment:
    """ids [B, T] student blocks (positions [B, T] restarting at each document, or None; targets [B, T]
    bool, or None: every token) -> the teacher's tokenisation of each document piece of each block (its
    BOS first where a document starts and the tokenizer has one) and the groups (`align_groups`) whose
    first student token is a target and whose first tokens both have a predicting row in the same
    document on both sides."""
    from workbench.data import document_bos

    ids = torch.as_tensor(ids)
    B, T = ids.shape
    pos = torch.arange(T).expand(B, T) if positions is None else torch.as_tensor(positions)
    tgt = torch.ones(B, T, dtype=torch.bool) if targets is None else torch.as_tensor(targets, dtype=torch.bool)
    bos = document_bos(t_tok)
    t_rows, t_pos = [], []
    sf, tf, sl, slg, slt, tl, tlg, tlt = ([] for _ in range(8))
    for b in range(B):
        row = ids[b].tolist()
        starts = [a for a in range(T) if a == 0 or int(pos[b, a]) == 0]
        t_seq, t_p = [], []
        for a, e in zip(starts, starts[1:] + [T]):
            pieces = [s_bytes[i] for i in row[a:e]]
            whole = b"".join(pieces)
            lo, hi = _valid_utf8(whole)
            text = whole[lo:hi].decode("utf-8")
            ends = itertools.accumulate(len(p) for p in pieces)
            s_spans = [(x - len(p) - lo, x - lo) if p and x - len(p) >= lo and x <= hi else (0, 0)
                       for p, x in zip(pieces, ends)]
            t_ids = t_tok(text, add_special_tokens=False)["input_ids"]
            t_pieces = [t_bytes[j] for j in t_ids]
            if b"".join(t_pieces) != whole[lo:hi]:
                raise ValueError(f"{getattr(t_tok, 'name_or_path', 'the teacher tokenizer')} does not tokenise "
                                 f"text into its own bytes (a normalizer?): {text[:60]!r}")
            t_spans = [(x - len(p), x) for p, x in zip(t_pieces, itertools.accumulate(len(p) for p in t_pieces))]
            p0 = int(pos[b, a])  # 0: a document starts here (the teacher's BOS first, if it has one)
            if bos is not None and p0 == 0:
                t_ids, t_spans = [bos] + t_ids, [(0, 0)] + t_spans
            t0 = len(t_seq)
            t_seq += t_ids
            t_p += list(range(p0, p0 + len(t_ids)))
            for gs, gt in align_groups(s_spans, t_spans):
                i, j = a + gs[0], gt[0]
                if i - 1 < a or j - 1 < 0 or not bool(tgt[b, i]):
                    continue
                g = len(sf)
                sf.append(b * T + i - 1)
                tf.append((b, t0 + j - 1))
                for k in gs[1:]:
                    sl.append(b * T + a + k - 1), slg.append(g), slt.append(row[a + k])
                for k in gt[1:]:
                    tl.append((b, t0 + k - 1)), tlg.append(g), tlt.append(t_ids[k])
        t_rows.append(t_seq)
        t_pos.append(t_p)
    Tt = max(1, max(len(r) for r in t_rows))
    t_ids_t = torch.full((B, Tt), pad_id, dtype=torch.long)
    t_pos_t = torch.zeros(B, Tt, dtype=torch.long)
    mask = torch.zeros(B, Tt, dtype=torch.long)
    for b, (r, p) in enumerate(zip(t_rows, t_pos)):
        t_ids_t[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        t_pos_t[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        mask[b, : len(r)] = 1
    flat = lambda pairs: torch.tensor([b * Tt + j for b, j in pairs], dtype=torch.long)  # noqa: E731
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Alignment(t_ids_t, t_pos_t, mask, long(sf), flat(tf), long(sl), long(slg), long(slt), flat(tl),
                     long(tlg), long(tlt))


def _valid_utf8(b: bytes) -> tuple[int, int]:
    """[lo, hi) of `b` without the partial characters a block cut can leave at either end."""
    lo = 0
    while lo < len(b) and (b[lo] & 0xC0) == 0x80:  # continuation bytes of a character begun before
        lo += 1
    hi = len(b)
    for back in range(1, min(4, hi - lo) + 1):  # a character begun at the end but not finished
        c = b[hi - back]
        if c & 0xC0 == 0x80:
            continue
        need = 1 if c < 0x80 else 2 if c >> 5 == 0b110 else 3 if c >> 4 == 0b1110 else 4
        if need > back:
            hi -= back
        break
    return lo, hi


# --------------------------------------------------------------------------------------------- the loss


class _GroupTerm(torch.nn.Module):
    """The per-chunk function of `losses.chunked_logit_loss` for one cross-tokenizer term: the rows of a
    chunk are whole groups (each group's first row, then its later rows)."""

    n_parts = 1

    def __init__(self, kind: str, temperature: float, divergence: str, matched_weight, beta: float, alpha: float,
                 shared, s_of_t=None):
        super().__init__()
        self.kind, self.T, self.divergence = kind, temperature, divergence
        self.matched_weight, self.beta, self.alpha, self.shared = matched_weight, beta, alpha, shared
        self.s_of_t = s_of_t

    def forward(self, logits, teacher, rows):
        # logits [c, Vs]; rows: group [c] (global, consecutive), first [c] bool, token [c] (later rows)
        logp = F.log_softmax(_f32(logits) / self.T, -1)
        g0 = int(rows["group"][0])
        local = rows["group"] - g0
        first = rows["first"]
        later = ~first
        s = merge_logp(logp, first.nonzero()[:, 0], later.nonzero()[:, 0], local[later], rows["token"][later])
        s = s.clamp(min=_NEG)
        opts = dict(kind=self.divergence, matched_weight=self.matched_weight, beta=self.beta, alpha=self.alpha)
        if isinstance(teacher, GroupTopK):  # from the cache
            if self.kind == "uld":
                per = uld(s, teacher.ranked(), t_topk=True)
            else:
                per = span_loss_topk(s, teacher, self.s_of_t, self.shared[0], **opts)
        elif self.kind == "uld":
            per = uld(s, teacher)
        else:
            per = span_loss(s, teacher, *self.shared, **opts)
        total = per.sum()
        return total, total[None]


def teacher_groups(t_logp_rows, al: Alignment, g0: int, g1: int, device) -> torch.Tensor:
    """The teacher's merged distributions [g1 - g0, Vt] of the alignment's groups g0:g1, from
    t_logp_rows(rows) -> its log-probabilities at flat teacher rows."""
    sel = (al.t_later_group >= g0) & (al.t_later_group < g1)
    lp_first = t_logp_rows(al.t_first[g0:g1].to(device))
    lp_later = t_logp_rows(al.t_later[sel].to(device)) if bool(sel.any()) else lp_first[:0]
    n = g1 - g0
    return merge_logp(torch.cat([lp_first, lp_later]), torch.arange(n, device=device),
                      torch.arange(n, n + lp_later.shape[0], device=device), (al.t_later_group[sel] - g0).to(device),
                      al.t_later_token[sel].to(device))


def cross_tokenizer_loss(kind: str, s_hidden: torch.Tensor, s_weight: torch.Tensor, t_logp_rows, al: Alignment,
                         temperature: float = 1.0, divergence: str = "forward_kl", matched_weight=None,
                         beta: float = 0.5, alpha: float = 0.1, shared=None, chunk: int = 0,
                         t_groups: GroupTopK | None = None, t_vocab: int | None = None) -> torch.Tensor:
    """Sum over the aligned groups of ULD (`kind` 'uld') or the span loss ('span', `shared` the
    (student ids, teacher ids) of shared_vocab) between the student's and the teacher's merged group
    distributions, never holding more than `chunk` rows of student logits (whole groups per chunk).
    s_hidden [B * T, H] the student's final hidden states, s_weight [Vs, H] its output layer (or s_hidden
    [B * T, Vs] its logits and s_weight None);
    t_logp_rows(rows) -> the teacher's log-probabilities at flat teacher rows [r, Vt], at `temperature`
    (computed under no_grad by the caller's teacher); or, instead, t_groups: the teacher's merged groups
    top-k at `temperature` (read from the cache; span terms also need t_vocab, the teacher's vocabulary
    size)."""
    from workbench.losses import auto_chunk, chunked_logit_loss

    G = al.s_first.numel()
    if G == 0:
        return s_hidden.sum() * 0.0
    dev = s_hidden.device
    rows = torch.cat([al.s_first, al.s_later]).to(dev)
    group = torch.cat([torch.arange(G), al.s_later_group]).to(dev)
    first = torch.cat([torch.ones(G, dtype=torch.bool), torch.zeros(al.s_later.numel(), dtype=torch.bool)]).to(dev)
    token = torch.cat([torch.zeros(G, dtype=torch.long), al.s_later_token]).to(dev)
    order = torch.argsort(group * 2 + (~first).long(), stable=True)  # group by group, its first row first
    rows, group, first, token = rows[order], group[order], first[order], token[order]
    starts = torch.ones(rows.numel(), dtype=torch.bool, device=dev)
    starts[1:] = group[1:] != group[:-1]
    cuts = starts.nonzero()[:, 0].tolist() + [rows.numel()]
    if not chunk:  # the wider of the two vocabularies sets the rows per chunk (SmolLM2's 49,152 vs 4,096)
        s_vocab = s_weight.shape[0] if s_weight is not None else s_hidden.shape[-1]
        if t_vocab is None and t_groups is None:
            with torch.no_grad():
                t_vocab = t_logp_rows(al.t_first[:1].to(dev)).shape[-1]
        chunk = auto_chunk(max(s_vocab, t_vocab or 0))
    bounds, a = [], 0
    for i in range(1, len(cuts)):  # whole groups per chunk, about `chunk` rows each
        if cuts[i] - a >= chunk or i == len(cuts) - 1:
            bounds.append((a, cuts[i]))
            a = cuts[i]

    def teacher_chunk(a, b):
        g0, g1 = int(group[a]), int(group[b - 1]) + 1
        if t_groups is not None:
            return t_groups[g0:g1]
        with torch.no_grad():
            return teacher_groups(t_logp_rows, al, g0, g1, dev).clamp(min=_NEG)

    if t_groups is not None and t_groups.indices.shape[0] != G:
        raise ValueError(f"the cached teacher has {t_groups.indices.shape[0]} groups for a batch of {G}")
    s_of_t = None
    if t_groups is not None and shared is not None:
        size = max(t_vocab or 0, int(t_groups.indices.max()) + 1 if t_groups.indices.numel() else 0)
        s_of_t = torch.full((size,), -1, dtype=torch.long, device=dev)  # (a model's padded vocabulary: unshared)
        s_of_t[shared[1].to(dev)] = shared[0].to(dev)
    fn = _GroupTerm(kind, temperature, divergence, matched_weight, beta, alpha, shared, s_of_t)
    x = s_hidden[rows]
    total, _ = chunked_logit_loss(fn, x, {"group": group, "first": first, "token": token},
                                  teacher_chunk, s_weight, None, bounds=bounds)
    return total


@dataclass
class CrossTeacher:
    """What the objective gets from a teacher with another tokenizer: its outputs on its own reading of
    the batch (or, from the cache, its merged groups per temperature), the alignment, and the shared
    vocabulary (span terms)."""

    outputs: object  # losses.ModelOutputs of the teacher on alignment.teacher_ids, or None
    alignment: Alignment
    shared: tuple[torch.Tensor, torch.Tensor] | None = None
    groups: dict | None = None  # temperature -> GroupTopK (teacher_cache.CrossCache)
    t_vocab: int | None = None


def teacher_rows(t, temperature: float):
    """The teacher's ModelOutputs -> rows(r): its log-probabilities [r, Vt] at flat rows r, at `temperature`."""
    if t.final_hidden is not None:
        th = t.final_hidden.reshape(-1, t.final_hidden.shape[-1])
        return lambda r: F.log_softmax(_f32(F.linear(th[r], t.head_weight, t.head_bias)) / temperature, -1)
    tl = t.logits.reshape(-1, t.logits.shape[-1])
    return lambda r: F.log_softmax(_f32(tl[r]) / temperature, -1)


def objective_term(term, student, teacher: CrossTeacher, chunk: int = 0) -> torch.Tensor:
    """One uld / span term of the objective (config.LossTerm) from the student's ModelOutputs."""
    if not isinstance(teacher, CrossTeacher):
        raise ValueError(f"{term.name} compares across tokenizers: the teacher must come as a CrossTeacher")
    s, t = student, teacher.outputs
    if s.final_hidden is not None:
        x, w = s.final_hidden.reshape(-1, s.final_hidden.shape[-1]), s.head_weight
    else:
        x, w = s.logits.reshape(-1, s.logits.shape[-1]), None
    T = term.temperature
    rows = None if t is None else teacher_rows(t, T)
    groups = None if teacher.groups is None else teacher.groups[T]
    shared = teacher.shared if term.name == "span" else None
    if term.name == "span" and shared is None:
        raise ValueError("span needs the shared vocabulary (crosstok.shared_vocab)")
    return cross_tokenizer_loss(term.name, x, w, rows, teacher.alignment, T, term.divergence, term.matched_weight,
                                term.beta, term.alpha, shared, chunk, t_groups=groups, t_vocab=teacher.t_vocab)


@dataclass
class CrossTokenizers:
    """The student's and the teacher's tokenizers, prepared once for a run with uld / span terms."""

    teacher_tok: object
    s_bytes: list[bytes]
    t_bytes: list[bytes]
    shared: tuple[torch.Tensor, torch.Tensor] | None
    pad_id: int

    @classmethod
    def build(cls, s_tok, t_tok, need_shared: bool) -> "CrossTokenizers":
        pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else t_tok.eos_token_id
        s_bytes, t_bytes = token_bytes(s_tok), token_bytes(t_tok)
        return cls(t_tok, s_bytes, t_bytes, shared_vocab(s_bytes, t_bytes) if need_shared else None,
                   0 if pad is None else pad)

    def align(self, ids: torch.Tensor, positions, labels: torch.Tensor) -> Alignment:
        """The alignment (on the CPU) of the student batch ids [B, T]; labels [B, T] the shifted targets
        (ignore -100: no target)."""
        targets = torch.zeros(ids.shape, dtype=torch.bool)
        targets[:, 1:] = labels[:, :-1].cpu() != -100
        return align_batch(ids.cpu(), None if positions is None else positions.cpu(), targets, self.s_bytes,
                           self.teacher_tok, self.t_bytes, self.pad_id)

    def teacher_for(self, forward, ids: torch.Tensor, positions, labels: torch.Tensor, cached=None) -> CrossTeacher:
        """`forward(teacher_ids, teacher_positions)` -> the teacher's ModelOutputs, run on the teacher's reading
        of the student batch ids [B, T]; or `cached`, what teacher_cache.CrossCache.batch read for its blocks
        (checked against this batch's alignment)."""
        al = self.align(ids, positions, labels)
        dev = ids.device
        out, groups = None, None
        if cached is not None:
            s_first, counts, groups = cached
            T = ids.shape[1]
            want = s_first + torch.repeat_interleave(torch.arange(len(counts)) * T, torch.tensor(counts))
            if not torch.equal(want, al.s_first):
                raise WorkbenchError("the teacher cache does not match this batch's alignment: it was built with "
                                     "another tokenizer or data than the run's; delete it (its path is logged) to "
                                     "rebuild")
        else:
            out = forward(al.teacher_ids.to(dev), al.teacher_positions.to(dev))
        moved = Alignment(*(getattr(al, f.name).to(dev) for f in dataclasses.fields(al)))
        shared = None if self.shared is None else (self.shared[0].to(dev), self.shared[1].to(dev))
        return CrossTeacher(out, moved, shared, groups, len(self.t_bytes))
