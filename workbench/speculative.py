"""Speculative decoding: a small draft model (the distilled student) proposes tokens, the target (the
teacher) checks them all in one forward pass and keeps what its own distribution allows.

The acceptance rule is the exact one of Leviathan et al. (2023) and Chen et al. (2023): every emitted
token is distributed exactly as if the target had sampled it alone (greedy: the same tokens as greedy
decoding of the target). Both models keep KV caches. Batches of any size work (Hugging Face's assisted
generation refuses batch > 1): rows accept different numbers of drafts, and what a row rejected stays
in its cache as a masked hole until the cache is compacted. `compile=True` runs both models' decoding
steps through torch.compile over a static KV cache (as gpt-fast does): see `_StaticKVStream`.

    out = speculative_generate(teacher, student, input_ids, 64, draft_len=4)
    out.sequences, out.stats.acceptance_rate, out.stats.tokens_per_target_call
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field

import torch

from workbench.sampling import check_sampling, draw_tokens, probs_from_logits, raise_if_undrawable


@dataclass
class SpecStats:
    """Counters of one generate call; rates are derived from them."""

    new_tokens: int = 0  # tokens emitted, summed over rows (up to EOS / max_new_tokens)
    target_calls: int = 0  # forward passes of the target (the prompt goes into the first)
    row_calls: int = 0  # (row, verification) pairs: each emits 1 + its accepted drafts
    proposed: int = 0  # draft tokens proposed, over active rows
    accepted: int = 0  # draft tokens accepted
    draft_seconds: float = 0.0
    target_seconds: float = 0.0
    total_seconds: float = 0.0
    draft_lens: list[int] = field(default_factory=list)  # draft length of every verification
    accepted_hist: list[int] = field(default_factory=list)  # [n] = row verifications accepting n drafts

    @property
    def acceptance_rate(self) -> float:
        """Share of proposed draft tokens the target accepted."""
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_target_call(self) -> float:
        """Tokens a row gains per verification: accepted drafts + the target's own token (1 without drafts)."""
        return self.new_tokens / max(self.row_calls, 1)

    @property
    def mean_draft_len(self) -> float:
        return sum(self.draft_lens) / max(len(self.draft_lens), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.total_seconds, 1e-9)

    def add(self, other: "SpecStats") -> "SpecStats":
        """Accumulate another call's counters into this one (several batches of prompts)."""
        for f in ("new_tokens", "target_calls", "row_calls", "proposed", "accepted", "draft_seconds",
                  "target_seconds", "total_seconds"):
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.draft_lens += other.draft_lens
        n = max(len(self.accepted_hist), len(other.accepted_hist))
        self.accepted_hist = [sum(h[i] for h in (self.accepted_hist, other.accepted_hist) if i < len(h))
                              for i in range(n)]
        return self

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "target_calls": self.target_calls,
                "acceptance_rate": self.acceptance_rate, "tokens_per_target_call": self.tokens_per_target_call,
                "tokens_per_s": self.tokens_per_second, "draft_seconds": self.draft_seconds,
                "target_seconds": self.target_seconds, "total_seconds": self.total_seconds,
                "mean_draft_len": self.mean_draft_len,
                "accepted_hist": list(self.accepted_hist)}


@dataclass
class SpecOutput:
    sequences: torch.Tensor  # [B, P + N] prompt then new tokens, pad_token_id after a row's EOS
    stats: SpecStats


def check_positions(models, positions: int, setting: str, what: str) -> None:
    """RecipeError when `what` (naming `setting`), `positions` long, runs past the positions one of `models`
    was made for (its config's max_position_embeddings): decoding or training there goes on, into positions
    the model never saw (and a pretrained model's outputs there are noise)."""
    from workbench.config import RecipeError

    limits = [p for m in models if m is not None and (p := getattr(m.config, "max_position_embeddings", None))]
    if limits and positions > min(limits):
        raise RecipeError(f"{setting}: {what} take {positions} positions, more than the {min(limits)} the models "
                          "were made for (max_position_embeddings)")


def check_prompts_fit(models, tok, prompts: list[str], rendered: bool, max_new_tokens: int, setting: str) -> None:
    """check_positions for `max_new_tokens` generated after the longest of `prompts`, encoded as generation
    encodes them (data.encode_prompts)."""
    from workbench.data import encode_prompts

    if prompts:
        longest = int(encode_prompts(tok, prompts, rendered=rendered).attention_mask.sum(1).max())
        check_positions(models, longest + max_new_tokens, setting,
                        f"the longest prompt ({longest} tokens) and the new tokens")


@torch.no_grad()
def speculative_generate(target, draft, input_ids: torch.Tensor, max_new_tokens: int, *,
                         attention_mask: torch.Tensor | None = None, draft_len: int = 4,
                         adaptive: "bool | DraftTuner" = False,
                         max_draft_len: int = 12, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                         generator: torch.Generator | None = None, compile: bool = False) -> SpecOutput:
    """Continue `input_ids` [B, P] (left-padded where `attention_mask` [B, P] has zeros) by up to
    `max_new_tokens` tokens of `target`, drafted `draft_len` at a time by `draft`. temperature 0 is greedy;
    temperature/top_k/top_p shape both models' distributions identically. `adaptive` re-picks the draft
    length after every verification from the measured acceptance rate and draft/target cost; a
    `DraftTuner(draft_len, max_draft_len)` passed as `adaptive` carries what it measured from one call to the
    next (one per target/draft pair: prompts decoded one after another need not find k again). draft=None
    (or draft_len=0) decodes with the target alone. On the CPU, models with SDPA attention run with
    grouped-query heads handed to torch as they are (see `gqa_sdpa_attention`) while generating.
    `compile`: every step after each model's first forward runs compiled, on a static cache (the first call
    per shape compiles; later calls with the same batch size and prompt-length bucket reuse the graphs)."""
    check_sampling(temperature, top_k, top_p)
    if draft_len < 0 or (adaptive and max_draft_len < 1):
        raise ValueError(f"draft_len must be >= 0 and max_draft_len >= 1, not {draft_len} and {max_draft_len}")
    with gqa_sdpa_attention(target, draft):
        return _generate(target, draft, input_ids, max_new_tokens, attention_mask=attention_mask,
                         draft_len=draft_len, adaptive=adaptive, max_draft_len=max_draft_len,
                         temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, generator=generator, compile=compile)


def _generate(target, draft, input_ids, max_new_tokens, *, attention_mask, draft_len, adaptive, max_draft_len,
              temperature, top_k, top_p, eos_token_id, pad_token_id, generator, compile) -> SpecOutput:
    tuner = adaptive if isinstance(adaptive, DraftTuner) else DraftTuner(draft_len, max_draft_len) if adaptive else None
    if tuner is not None:  # it carries its own length and bound
        draft_len, max_draft_len = tuner.k, tuner.k_max
    B, P = input_ids.shape
    dev = input_ids.device
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if not bool(mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: attention_mask[:, -1] has zeros")
    if draft_len == 0:
        draft, adaptive, tuner = None, False, None
    V = _vocab(target)
    if draft is not None and draft.get_input_embeddings().weight.shape[0] < V:
        raise ValueError(f"the draft embeds {draft.get_input_embeddings().weight.shape[0]} tokens, fewer than "
                         f"the target's vocabulary of {V}: it could not read every token the target emits")
    stats, clock = SpecStats(accepted_hist=[0] * (max(draft_len, max_draft_len if adaptive else 0) + 1)), _Clock(dev)
    start = clock()

    # all but the last prompt token go into each model's first forward (no separate prefill call)
    if compile:
        k_max = max(draft_len, max_draft_len if adaptive else 0) if draft is not None else 0
        # the longest a cache gets: prompt + new tokens + one round's drafts and lag; a bucket of 128 so
        # that prompts of similar length share the compiled graphs
        max_len = -(-(P + max_new_tokens + k_max + 2) // 128) * 128
        target_sizes = range(1, k_max + 2) if adaptive else [k_max + 1]
        tgt = _StaticKVStream(target, input_ids[:, :-1], mask[:, :-1], max_len, target_sizes)
        drf = None if draft is None else _StaticKVStream(draft, input_ids[:, :-1], mask[:, :-1], max_len, [1, 2])
    else:
        tgt = _KVStream(target, input_ids[:, :-1], mask[:, :-1])
        drf = None if draft is None else _KVStream(draft, input_ids[:, :-1], mask[:, :-1])
    last = input_ids[:, -1:]  # [B, 1] newest token: in neither cache yet
    lag = None  # [B] a draft token the draft model has not seen yet (after a full acceptance), or -1
    rows = torch.arange(B, device=dev)  # batch rows still generating
    out = [[] for _ in range(B)]  # new tokens per row
    k = draft_len
    greedy = temperature == 0
    undrawable = torch.zeros((), dtype=torch.bool, device=dev)  # draws' refusals, checked once per round

    while len(rows):
        left = max_new_tokens - min(len(out[int(r)]) for r in rows)
        # never draft past the longest-living row's budget; `left` only shrinks, so once k is 0 the draft
        # (which is then fed nothing) is never used again
        k = 0 if drf is None else max(0, min(k, left - 1))
        # 1) draft k tokens, one draft forward each; the first forward also feeds `last` (and `lag`)
        t0 = clock()
        x, x_valid = last, None
        if lag is not None and bool((lag >= 0).any()):
            x = torch.cat([lag.clamp(min=0)[:, None], last], dim=1)
            x_valid = torch.stack([lag >= 0, torch.ones_like(lag, dtype=torch.bool)], dim=1)
        fed_draft = x.shape[1]
        drafts, q = [], []
        for i in range(k):
            logits = drf.feed(x, x_valid)[:, -1, :V]  # [B, V] (a padded draft vocabulary is cut to the target's)
            if greedy:  # q_i is one-hot on the argmax
                x = logits.argmax(dim=-1, keepdim=True)
            else:
                q.append(_pad_vocab(probs_from_logits(logits, temperature, top_k, top_p), V))
                x = draw_tokens(q[-1], generator, undrawable)  # [B, 1] d_i ~ q_i
            x_valid = None
            drafts.append(x)
            fed_draft += i < k - 1  # d_k itself is not fed to the draft
        t1 = clock()
        # 2) the target scores [last, d_1..d_k] in one pass: p_1..p_{k+1}
        chunk = torch.cat([last, *drafts], dim=1)  # [B, k + 1]
        logits = tgt.feed(chunk)[:, :, :V]  # [B, k + 1, V]
        # 3) accept d_1..d_n, then one token of the target's: see _accept (greedy: p and q are one-hot, so
        #    d_i is accepted while it is the target's argmax, and the next token is the target's argmax)
        if greedy:
            best = logits.argmax(dim=-1)  # [B, k + 1]
            n = (chunk[:, 1:] == best[:, :k]).long().cumprod(dim=1).sum(dim=1)  # [B] accepted drafts
            nxt = best.gather(1, n[:, None])  # [B, 1]
        else:
            p = probs_from_logits(logits, temperature, top_k, top_p)  # [B, k + 1, V]
            n, nxt = _accept(p, torch.stack(q, dim=1) if k else p[:, :0], chunk[:, 1:], generator, undrawable)
            raise_if_undrawable(undrawable)  # (the round waits for the device here anyway: n.tolist() below)
        t2 = clock()
        # 4) caches keep what was accepted: the target [last, d_1..d_n], the draft also up to d_n (d_k
        #    was never fed to it: after a full acceptance it is fed next round as `lag`)
        tgt.keep_last(chunk.shape[1], n + 1)
        if k:
            drf.keep_last(fed_draft, (fed_draft - k + 1) + n.clamp(max=k - 1))
            lag = torch.where(n == k, chunk[:, -1], -1)
        else:
            drf = None
        last = nxt

        # bookkeeping: emit tokens, stop rows at EOS or max_new_tokens, drop finished rows
        n_host, new = n.tolist(), torch.cat([chunk[:, 1:], nxt], dim=1).tolist()
        keep = []
        for j, r in enumerate(rows.tolist()):
            toks = new[j][: n_host[j]] + [new[j][k]]  # d_1..d_n, then the target's token
            room = max_new_tokens - len(out[r])
            toks = toks[:room]
            stop = next((i for i, t in enumerate(toks) if t in eos), None)
            if stop is not None:
                toks = toks[: stop + 1]
            out[r] += toks
            stats.new_tokens += len(toks)
            stats.accepted += n_host[j]
            stats.accepted_hist[n_host[j]] += 1
            if stop is None and len(out[r]) < max_new_tokens:
                keep.append(j)
        stats.target_calls += 1
        stats.row_calls += len(rows)
        stats.proposed += k * len(rows)
        stats.draft_lens.append(k)
        stats.draft_seconds += t1 - t0
        stats.target_seconds += t2 - t1
        if tuner is not None:
            k = tuner.update(accepted=sum(n_host), proposed=k * len(rows), draft_seconds=t1 - t0,
                             target_seconds=t2 - t1, drafted=k, timed=stats.target_calls > 1)
        if len(keep) < len(rows):  # finished rows leave the batch (and both caches)
            idx = torch.tensor(keep, dtype=torch.long, device=dev)
            rows, last, lag = rows[idx], last[idx], None if lag is None else lag[idx]
            for stream in (tgt, drf):
                if stream is not None:
                    stream.select(idx)

    stats.total_seconds = clock() - start
    width = max(len(o) for o in out)
    seq = torch.full((B, P + width), pad, dtype=input_ids.dtype, device=dev)
    seq[:, :P] = input_ids
    for r, toks in enumerate(out):
        seq[r, P : P + len(toks)] = torch.tensor(toks, dtype=input_ids.dtype, device=dev)
    return SpecOutput(seq, stats)


# --------------------------------------------------------------------------------------------- helpers


def _accept(p: torch.Tensor, q: torch.Tensor, d: torch.Tensor, generator,
            undrawable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rejection rule of Leviathan et al. / Chen et al. p [B, k+1, V]: the target's distributions at
    the k drafts and after them; q [B, k, V]: the draft's; d [B, k]: the drafted tokens (d_i ~ q_i).
    -> n [B] accepted drafts, next token [B, 1]. undrawable: as draw_tokens'."""
    B, k = d.shape
    # accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), stopping at the first rejection
    p_d, q_d = p[:, :k].gather(-1, d[..., None])[..., 0], q.gather(-1, d[..., None])[..., 0]
    u = torch.rand(d.shape, device=d.device, generator=generator)
    n = (u * q_d < p_d).long().cumprod(dim=1).sum(dim=1)  # [B]
    # on a rejection at j, resample from the residual max(0, p_j - q_j), normalised: this is what makes
    # every emitted token exactly target-distributed; after k acceptances, a bonus token from p_{k+1}
    q_ext = torch.cat([q, torch.zeros_like(p[:, :1])], dim=1)  # q_{k+1} = 0: the residual is p_{k+1}
    at = n[:, None, None].expand(-1, 1, p.shape[-1])
    resid = (p.gather(1, at) - q_ext.gather(1, at)).clamp(min=0)[:, 0]  # [B, V]
    resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p.gather(1, at)[:, 0])  # p_j == q_j
    return n, draw_tokens(resid, generator, undrawable)


class _KVStream:
    """A model's KV cache over a batch whose rows may hold holes. `mask` [B, L] marks the cache entries
    that are real tokens; a row's positions count its real tokens only, so holes (left padding, rejected
    drafts) change nothing the model computes. While there are no holes, masks and positions are left
    to transformers."""

    def __init__(self, model, prefix: torch.Tensor, prefix_mask: torch.Tensor):
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache(config=model.config)
        self.pending = (prefix, prefix_mask)  # [B, P0] ids and validity, fed with the first feed()
        self.mask = prefix_mask[:, :0]  # [B, L] of the cache
        self.dense = True  # mask is all True

    def feed(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Append ids [B, n] (valid [B, n]: False marks a hole) to the cache; -> logits [B, n, V] of
        those positions."""
        n = ids.shape[1]
        # no holes by construction: skip reading that back from the device, a sync that would make the host
        # wait for every queued kernel at each draft step instead of queueing the next one
        known_dense = valid is None
        valid = torch.ones_like(ids, dtype=torch.bool) if valid is None else valid
        if self.pending is not None:
            (prefix, prefix_mask), self.pending = self.pending, None
            ids, valid = torch.cat([prefix, ids], dim=1), torch.cat([prefix_mask, valid], dim=1)
            known_dense = False
        self.mask = torch.cat([self.mask, valid], dim=1)
        if self.dense and (known_dense or bool(valid.all())):
            return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=n).logits
        self.dense = False
        positions = (self.mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        return self.model(input_ids=ids, attention_mask=self._attention_mask(ids.shape[1]), position_ids=positions,
                          past_key_values=self.cache, use_cache=True, logits_to_keep=n).logits

    def _attention_mask(self, n: int) -> torch.Tensor:
        """The mask for feeding n tokens over a cache with holes. For SDPA, the [B, 1, n, L] boolean mask
        itself: given a 2D mask, transformers reads it back from the device to decide whether it may skip
        masking (a sync per forward, each draft step's included). Query i (column L - n + i) sees the real
        entries up to itself, and itself even when it is a hole (a row with nothing to attend to would be
        NaN; a hole's output is never used). Other attention implementations take the 2D mask."""
        if getattr(self.model.config, "_attn_implementation", None) not in ("sdpa", _GQA_SDPA):  # (both: SDPA's mask)
            return self.mask.long()
        L = self.mask.shape[1]
        cols = torch.arange(L, device=self.mask.device)
        query = cols[L - n:, None]  # [n, 1] the queries' columns
        return (self.mask[:, None, None, :] & (cols[None, :] <= query)) | (cols[None, :] == query)

    def keep_last(self, fed: int, n_keep: torch.Tensor) -> None:
        """Of the last `fed` entries, keep the first n_keep[b] of row b (their other entries become
        holes); then drop columns no row uses and compact rows so the cache is no longer than its
        longest row."""
        cols = torch.arange(fed, device=self.mask.device)
        self.mask[:, -fed:] &= cols[None, :] < n_keep[:, None]
        self._compact()

    def select(self, idx: torch.Tensor) -> None:
        """Keep only batch rows `idx`."""
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self._compact()

    def _compact(self) -> None:
        L, drop, order = _compaction_plan(self.mask)
        if L < self.mask.shape[1]:  # columns rejected by every row: a plain crop
            self.cache.crop(L - self.mask.shape[1])
            self.mask = self.mask[:, :L]
        if drop:  # every row has holes: move each row's real entries right (order kept), cut `drop` columns
            self.mask = self.mask.gather(1, order)
            for layer in self.cache.layers:
                if not hasattr(layer, "keys") or getattr(layer, "is_sliding", False):
                    raise NotImplementedError("speculative decoding needs a full-attention DynamicCache")
                idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys, layer.values = layer.keys.gather(2, idx), layer.values.gather(2, idx)
        self.dense = bool(self.mask.all())


def _compaction_plan(mask: torch.Tensor) -> tuple[int, int, torch.Tensor | None]:
    """How to drop the holes of a KV cache whose real entries are `mask` [B, S]: (L, drop, order). L:
    the columns in use (past the last one any row uses, nothing is real); drop: the fewest holes a row
    has among them (0: some row has none); order [B, L - drop] (None when drop is 0): each row's column
    indices with `drop` of its holes left out, holes first and real entries in their order."""
    used = mask.any(dim=0).nonzero()
    L = int(used[-1]) + 1 if len(used) else 0
    drop = int((~mask[:, :L]).sum(dim=1).min()) if L else 0
    order = torch.sort(mask[:, :L].int(), dim=1, stable=True).indices[:, drop:] if drop else None
    return L, drop, order


class _StaticKVStream:
    """_KVStream for compiled decoding: the cache is a transformers StaticCache of fixed shape [B, heads,
    max_len, head_dim] and `mask` [B, max_len] marks its real entries (columns from `self.length` on are
    free). So that the compiled forward sees few shapes, the first feed runs eagerly (the prompt) and every
    later one is padded with holes to the smallest of `sizes` that fits (the padding is dropped right
    after), and rows that finish stay in the batch, fed holes, so the batch size never changes. Rejected
    entries are dropped by moving the cache's write position back (a trailing crop) or, when every row has
    holes, by moving each row's real entries left in place, as _KVStream does with its dynamic cache."""

    def __init__(self, model, prefix: torch.Tensor, prefix_mask: torch.Tensor, max_len: int, sizes):
        from transformers import StaticCache

        self.cache = StaticCache(config=model.config, max_cache_len=max_len)  # allocated on the first feed
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise NotImplementedError("compiled speculative decoding needs full attention in every layer")
        self.model, self.sizes = model, sorted(set(sizes))
        self.forward = _compiled_forward(model)
        self.pending = (prefix, prefix_mask)
        B = prefix.shape[0]
        self.mask = torch.zeros(B, max_len, dtype=torch.bool, device=prefix.device)
        self.length = 0  # columns in use
        self.alive = torch.arange(B, device=prefix.device)  # the rows the caller still feeds, in its order

    def feed(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        n = ids.shape[1]
        B, dev = self.mask.shape[0], self.mask.device
        full_ids = torch.zeros(B, n, dtype=ids.dtype, device=dev)
        full_valid = torch.zeros(B, n, dtype=torch.bool, device=dev)
        full_ids[self.alive] = ids
        full_valid[self.alive] = True if valid is None else valid
        if self.pending is not None:  # the prompt: eager, its length is the caller's
            (prefix, prefix_mask), self.pending = self.pending, None
            full_ids = torch.cat([prefix, full_ids], dim=1)
            full_valid = torch.cat([prefix_mask, full_valid], dim=1)
            forward, pad = self.model, 0
        else:
            size = next((s for s in self.sizes if s >= n), n)
            forward, pad = self.forward, size - n
            full_ids = torch.nn.functional.pad(full_ids, (0, pad))
            full_valid = torch.nn.functional.pad(full_valid, (0, pad))
        L, m = self.length, full_ids.shape[1]
        if L + m > self.mask.shape[1]:
            raise RuntimeError(f"static KV cache of {self.mask.shape[1]} entries is full")
        self.mask[:, L : L + m] = full_valid
        positions = (self.mask.long().cumsum(dim=1) - 1).clamp(min=0)[:, L : L + m]
        logits = forward(input_ids=full_ids, attention_mask=self.mask, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=n + pad).logits
        self.length = L + m
        if pad:  # the padding columns are the last ones: crop them
            self.mask[:, self.length - pad : self.length] = False
            self._set_length(self.length - pad)
        return logits[self.alive, :n]

    def keep_last(self, fed: int, n_keep: torch.Tensor) -> None:
        keep = torch.zeros(self.mask.shape[0], dtype=n_keep.dtype, device=n_keep.device)
        keep[self.alive] = n_keep
        cols = torch.arange(fed, device=self.mask.device)
        self.mask[:, self.length - fed : self.length] &= cols[None, :] < keep[:, None]
        self._compact()

    def select(self, idx: torch.Tensor) -> None:
        self.alive = self.alive[idx]  # the others stay in the cache, fed holes from now on

    def _set_length(self, length: int) -> None:
        self.length = length
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    def _compact(self) -> None:
        L, drop, order = _compaction_plan(self.mask[:, : self.length])  # columns from L on: a plain crop
        if drop:  # every row has holes: its real entries move left (order kept) into columns [0, L - drop)
            self.mask[:, : L - drop] = self.mask[:, :L].gather(1, order)
            for layer in self.cache.layers:
                idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
                layer.keys[:, :, : L - drop] = layer.keys[:, :, :L].gather(2, idx)
                layer.values[:, :, : L - drop] = layer.values[:, :, :L].gather(2, idx)
            L -= drop
        self.mask[:, L:] = False
        self._set_length(L)


_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cuda_graphs(model) -> bool:
    """Whether compiled decoding of `model` replays CUDA graphs: on a GPU with WORKBENCH_CUDA_GRAPHS=1 (at
    batch 1 a step is bound by kernel launches and Python: H200, 2026-12-04, 4.25 ms per step of an
    8M-parameter 2-layer draft, 11.7 ms for 16 layers). Opt-in until a GPU run has checked its tokens
    against eager decoding."""
    return next(model.parameters()).is_cuda and os.environ.get("WORKBENCH_CUDA_GRAPHS") == "1"


def _compiled_forward(model):
    """model.forward through torch.compile (static shapes), built once per model and kept while it lives."""
    if model not in _COMPILED:
        import torch._dynamo

        # one graph per (batch size, cache bucket, step length) and per model: more than dynamo's default 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[model] = torch.compile(model.forward, dynamic=False,
                                         mode="reduce-overhead" if cuda_graphs(model) else None)
    return _COMPILED[model]


class DraftTuner:
    """Adaptive draft length. With per-token acceptance rate a, drafting k tokens yields
    (1 - a^(k+1)) / (1 - a) tokens per round (Leviathan et al., 2023, eq. 1) at a cost of k draft forwards
    and one verification of k + 1 tokens; pick the k maximising their ratio. a, the time of a draft forward
    and the time of a verification of each length are exponential moving averages of what was measured.
    A verification is not assumed to cost the same at every length: on a CPU, 4 tokens cost about 1.5 target
    steps where 3 cost 1.15 (matrix-multiply kernels change with the row count), so a length never measured
    is priced optimistically (as the longest measured one below it; in proportion to the shortest one
    measured when none is below), so it gets tried once and is then priced as measured."""

    def __init__(self, k: int, k_max: int, momentum: float = 0.8):
        self.k, self.k_max, self.m = k, k_max, momentum
        self.a, self.draft = None, None  # acceptance rate, seconds per draft forward
        self.verify: dict[int, float] = {}  # tokens verified -> seconds

    def _ema(self, old, new):
        return new if old is None else self.m * old + (1 - self.m) * new

    def update(self, accepted: int, proposed: int, draft_seconds: float, target_seconds: float, drafted: int,
               timed: bool = True) -> int:
        """One round: `drafted` draft forwards took draft_seconds, a verification of drafted + 1 tokens
        target_seconds. timed=False: the times include something else (the prompt's prefill) and are
        not used."""
        if proposed:
            self.a = self._ema(self.a, accepted / proposed)
        if timed and target_seconds > 0:
            self.verify[drafted + 1] = self._ema(self.verify.get(drafted + 1), target_seconds)
            if drafted:
                self.draft = self._ema(self.draft, draft_seconds / drafted)
        if self.a is None or self.draft is None:
            return max(self.k, 1)
        a = min(self.a, 0.999)
        self.k = max(range(1, self.k_max + 1), key=lambda k: expected_tokens_per_call(a, k) / self.cost(k))
        return self.k

    def cost(self, k: int) -> float:
        """Seconds of a round drafting k tokens, as far as measured."""
        n = k + 1
        below = [m for m in self.verify if m <= n]
        if below:  # as measured, or as the longest measured below (costs only grow with n)
            verify = self.verify[max(below)]
        else:  # shorter than any measured: priced as if cost were proportional to n (a lower bound)
            m = min(self.verify)
            verify = self.verify[m] * n / m
        return k * self.draft + verify


class _Clock:
    """Seconds, synchronising the device first so GPU work is counted where it happens."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _pad_vocab(probs: torch.Tensor, V: int) -> torch.Tensor:
    """A draft distribution over the target's V tokens (zero beyond the draft's own vocabulary)."""
    return probs if probs.shape[-1] == V else torch.nn.functional.pad(probs, (0, V - probs.shape[-1]))


@torch.no_grad()
def target_generate(target, input_ids: torch.Tensor, max_new_tokens: int, *, attention_mask=None,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_token_id=None,
                    pad_token_id=None, generator: torch.Generator | None = None, compile: bool = False) -> SpecOutput:
    """The target alone, token by token with its KV cache and the same sampling code: the baseline
    speculative decoding is measured against (speculative_generate with no draft tokens)."""
    return speculative_generate(target, None, input_ids, max_new_tokens, attention_mask=attention_mask,
                                draft_len=0, temperature=temperature, top_k=top_k, top_p=top_p,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator,
                                compile=compile)


def left_padding(tok):
    """`tok` set up for batched generation: prompts padded on the left, EOS as padding if it has none."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def expected_tokens_per_call(acceptance: float, k: int) -> float:
    """(1 - a^(k+1)) / (1 - a): tokens per verification for i.i.d. per-token acceptance a."""
    return k + 1.0 if acceptance >= 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)


# --------------------------------------------------- grouped-query attention without copying the cache

_GQA_SDPA = "workbench_sdpa_gqa"


def _sdpa_gqa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """transformers' SDPA attention, except that grouped-query key/value heads go to torch's
    scaled_dot_product_attention as they are (enable_gqa) when a mask is given too. transformers does that
    only without a mask (CUDA's fused kernels need none) and otherwise repeats every layer's keys and values
    to all query heads: a copy of the whole KV cache per layer per call, which on the CPU is what a
    verification of several tokens, whose causal mask over the cache is never None, spends much of its time
    on (SmolLM2-135M, 9 query / 3 KV heads, after 300 tokens: the copies were about 20 ms of a 5-token
    verification in torch.profiler; medians over 40 interleaved runs 108 -> 101 ms, a 1-token step 73 ms).
    Everything else (one query token, softcap, position bias, a paged cache) is left to transformers' own
    function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
    if (getattr(module, "num_key_value_groups", 1) == 1 or query.shape[2] == 1 or query.device.type != "cpu"
            or (causal and key.shape[2] != query.shape[2]) or kwargs.get("softcap") is not None
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                           dropout_p=dropout, scale=scaling, is_causal=causal,
                                                           enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


class gqa_sdpa_attention:
    """Context manager: the CPU models among `models` that use SDPA attention use `_sdpa_gqa` inside it, and
    SDPA again when it exits. Models on a GPU, with another attention, or None are left alone."""

    def __init__(self, *models):
        self.models = [m for m in models if m is not None]
        self.swapped = []

    def __enter__(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(_GQA_SDPA, _sdpa_gqa)
        AttentionMaskInterface.register(_GQA_SDPA, sdpa_mask)
        for m in self.models:
            config = getattr(m, "config", None)
            if (config is None or getattr(config, "_attn_implementation", None) != "sdpa"
                    or next(m.parameters()).device.type != "cpu" or not hasattr(m, "set_attn_implementation")):
                continue
            m.set_attn_implementation(_GQA_SDPA)
            self.swapped.append(m)
        return self

    def __exit__(self, *exc):
        for m in self.swapped:
            m.set_attn_implementation("sdpa")
        self.swapped = []
        return False


# ------------------------------------------------------------------- a draft over frequent tokens only


class SubsetHead(torch.nn.Module):
    """A draft's output layer restricted to `token_ids` (as FR-Spec, Zhao et al. 2025, does): logits are
    computed for those rows of the full layer only and placed into a [..., vocab] tensor that is -inf
    elsewhere. The draft then proposes only frequent tokens while the target still verifies against its
    full vocabulary, so greedy output stays the target's own and sampling stays exactly target-distributed
    (the acceptance rule is exact for any draft distribution)."""

    def __init__(self, full: torch.nn.Linear, token_ids: torch.Tensor):
        super().__init__()
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=full.weight.device).unique(sorted=True)
        if ids.numel() == 0 or int(ids[0]) < 0 or int(ids[-1]) >= full.weight.shape[0]:
            raise ValueError(f"draft vocabulary: token ids must lie in [0, {full.weight.shape[0]})")
        self.vocab = full.weight.shape[0]
        self.register_buffer("ids", ids, persistent=False)
        self.weight = torch.nn.Parameter(full.weight.detach()[ids].clone(), requires_grad=False)
        self.bias = None if full.bias is None else torch.nn.Parameter(full.bias.detach()[ids].clone(),
                                                                       requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        sub = torch.nn.functional.linear(h, self.weight, self.bias)
        out = sub.new_full((*sub.shape[:-1], self.vocab), float("-inf"))
        return out.index_copy_(-1, self.ids, sub)


def restrict_draft_vocab(draft, token_ids) -> torch.nn.Module:
    """Replace `draft`'s output layer (in place) by a SubsetHead over `token_ids`; returns the draft. The
    input embeddings stay whole (the draft reads every token the target emits)."""
    head = draft.get_output_embeddings()
    if isinstance(head, SubsetHead):
        raise ValueError("the draft's vocabulary is already restricted")
    draft.config.tie_word_embeddings = False  # the head is no longer the embedding matrix
    draft.set_output_embeddings(SubsetHead(head, token_ids))
    return draft


def frequent_tokens(token_ids, n: int, vocab: int, always=()) -> torch.Tensor:
    """The `n` most frequent ids of `token_ids` (an iterable of id arrays), plus the ids in `always` (EOS
    and other special tokens a draft must be able to propose), sorted. Ties go to the smaller id."""
    import numpy as np

    if n < 1:
        raise ValueError(f"draft vocabulary size must be at least 1, got {n}")
    counts = np.zeros(vocab, dtype=np.int64)
    for ids in token_ids:
        a = np.asarray(ids, dtype=np.int64).ravel()
        counts += np.bincount(a[(a >= 0) & (a < vocab)], minlength=vocab)
    order = np.lexsort((np.arange(vocab), -counts))  # by count, descending, then id
    keep = set(order[: min(n, vocab)].tolist()) | {int(t) for t in always if t is not None and 0 <= int(t) < vocab}
    return torch.tensor(sorted(keep), dtype=torch.long)


__all__ = ["DraftTuner", "SpecOutput", "SpecStats", "SubsetHead", "expected_tokens_per_call", "frequent_tokens",
           "gqa_sdpa_attention", "left_padding", "restrict_draft_vocab", "speculative_generate", "target_generate"]
