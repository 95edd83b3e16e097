"""Student-generated training data: GKD-style on-policy mixing and MiniLLM.

GKD (Agarwal et al., 2024): with probability lmbda a micro-batch is replaced by the student's own
continuations of prompts (sampled under no_grad with KV caches), and the recipe's logit divergences are
applied on the generated tokens only (cross-entropy against the student's own samples is skipped).

MiniLLM (Gu et al., 2024) minimises the sequence-level reverse KL, KL(q_student || p_teacher), by policy
gradient on sampled continuations. With per-token rewards r_t = log p(y_t | y_<t) - log q(y_t | y_<t):
  * single-step part: the exact reverse KL of every step's next-token distribution, sum_t w_t KL(q_t || p_t)
    (computed over the whole vocabulary, no sampling noise);
  * long-term part: a policy gradient with the future return R_{t+1} = sum_{t' > t} r_t', divided by the
    number of tokens it sums (length normalisation) and whitened, through a PPO-clipped importance ratio;
  * teacher-mixed sampling: tokens are drawn from p~ = a p + (1 - a) q and every term is reweighted by
    w_t = q(y_t) / p~(y_t) (per-step importance weights, as in the paper);
  * the recipe's own losses on the training data are the language-modelling term L_PT.
Samples are kept for `ppo_epochs` optimizer steps; the ratio is taken against the sampling-time policy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import OnPolicyConfig
from workbench.losses import _NEG, ModelOutputs, logit_loss_on, reverse_kl
from workbench.sampling import Samples, probs_from_logits, sample

IGNORE = -100


def generator_for(seed: int, step: int, micro: int, rank: int | None, device) -> torch.Generator:
    """A generator determined by (seed, step, micro-batch[, process]): sampling is reproducible and a
    resumed run draws exactly what the uninterrupted one would have. rank=None gives every process the
    same draws (decisions all processes must agree on, such as whether a micro-batch is generated)."""
    import numpy as np

    key = [seed, step, micro, 0x6F6E] + ([] if rank is None else [rank + 1])
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
    return g


def gkd_generates(seed: int, step: int, micro: int, lmbda: float) -> bool:
    """Whether GKD replaces this micro-batch by student samples (probability lmbda). The coin is drawn on
    the CPU from (seed, step, micro-batch) alone: every process agrees, a resumed run draws the same, and
    nothing is read back from an accelerator each step (a device generator's .item() waits for the GPU)."""
    return torch.rand((), generator=generator_for(seed, step, micro, None, "cpu")).item() < lmbda


def prompts_of(ids: torch.Tensor, target_mask: torch.Tensor | None, n: int) -> torch.Tensor:
    """Equal-length prompts [B, P] for sampling from a micro-batch ids [B, T]: plain text, its first n
    tokens; chat or prompt/completion blocks (target_mask [B, T] marks completion tokens), the last
    P = min(n, shortest prompt) tokens before each row's first completion token, so every row is
    continued where its first completion (the assistant's answer) begins."""
    if target_mask is None:
        return ids[:, : min(n, ids.shape[1] - 1)]
    mask = target_mask.to(ids.device)
    has = mask.any(dim=1)
    start = torch.where(has, mask.float().argmax(dim=1), torch.full_like(has, ids.shape[1] - 1, dtype=torch.long))
    starts = start[start > 0]  # a block cut inside a completion has no prompt of its own: it is not counted
    P = max(1, min(n, int(starts.min()) if len(starts) else 1))
    cols = (start - P).clamp(min=0)[:, None] + torch.arange(P, device=ids.device)[None, :]
    return ids.gather(1, cols)


def generated_targets(s: Samples) -> torch.Tensor:
    """[B, P + G] position-aligned targets: position t predicts ids[t + 1] where that is a valid generated
    token; prompt positions and tokens after EOS are ignored."""
    B, L = s.ids.shape
    labels = torch.full((B, L), IGNORE, dtype=torch.long, device=s.ids.device)
    P = s.prompt_len
    labels[:, P - 1 : L - 1] = torch.where(s.valid, s.ids[:, P:], IGNORE)
    return labels


def gkd_rows(s: Samples) -> dict[str, torch.Tensor]:
    """Rows for the recipe's objective on student-generated sequences: divergences on generated tokens,
    no cross-entropy."""
    labels = generated_targets(s)
    return {"labels": labels, "ce_labels": torch.full_like(labels, IGNORE)}


@torch.no_grad()
def _token_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """[B, L] ids -> [B, L, V] fp32 log-probabilities of the next token at every position."""
    return F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)


@torch.no_grad()
def minillm_rows(student, teacher, s: Samples, cfg: OnPolicyConfig) -> dict[str, torch.Tensor]:
    """Rewards, importance weights, sampling-time log-probs and advantages for sampled sequences,
    position-aligned [B, L] (see the module docstring)."""
    labels = generated_targets(s)
    valid = labels != IGNORE
    y = labels.clamp(min=0).unsqueeze(-1)  # [B, L, 1]
    lq_all = _token_logprobs(student, s.ids)  # [B, L, V]
    lp_all = _token_logprobs(teacher, s.ids)
    lq = lq_all.gather(-1, y).squeeze(-1)  # [B, L] log q(y_t)
    lp = lp_all.gather(-1, y).squeeze(-1)
    # the distribution the tokens were actually drawn from (same processing as sampling)
    mix = probs_from_logits(lq_all, cfg.temperature, cfg.top_k)
    if cfg.teacher_mix > 0:
        mix = cfg.teacher_mix * probs_from_logits(lp_all, cfg.temperature, cfg.top_k) + (1 - cfg.teacher_mix) * mix
    w = lq.exp() / mix.gather(-1, y).squeeze(-1).clamp(min=1e-30)
    r = lp - lq
    if cfg.reward_clip:
        r = r.clamp(-cfg.reward_clip, cfg.reward_clip)
    r = r * valid
    # future return R_{t+1} = sum_{t' > t} r_t' over valid tokens, optionally divided by their count
    rev_cum = r.flip(-1).cumsum(-1).flip(-1)  # sum_{t' >= t}
    future = rev_cum - r
    n_future = valid.flip(-1).cumsum(-1).flip(-1) - valid.long()
    adv = future / n_future.clamp(min=1) if cfg.length_norm else future
    n = valid.sum().clamp(min=1)
    mean = (adv * valid).sum() / n
    std = (((adv - mean) ** 2) * valid).sum().div(n).sqrt()
    adv = torch.where(valid, (adv - mean) / (std + 1e-6), torch.zeros_like(adv))
    return {"labels": labels, "w": torch.where(valid, w, torch.zeros_like(w)), "old_logp": lq, "adv": adv}


class MiniLLMTokenLoss(nn.Module):
    """Per-token MiniLLM terms from the student's logits (chunkable): the PPO-clipped policy gradient
    and the importance-weighted single-step reverse KL. -> (pg + rkl, [pg, rkl]) sums over valid rows."""

    n_parts = 2

    def __init__(self, clip: float):
        super().__init__()
        self.clip = clip

    def forward(self, student_logits, teacher_logits, rows):
        # student_logits, teacher_logits: [c, V]; rows: labels/w/old_logp/adv [c]
        valid = rows["labels"] != IGNORE
        lq = F.log_softmax(student_logits.float(), dim=-1)
        lq_y = lq.gather(-1, rows["labels"].clamp(min=0)[:, None]).squeeze(-1)
        ratio = (lq_y - rows["old_logp"]).exp() * rows["w"]
        adv = rows["adv"]
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - self.clip, 1 + self.clip))
        rkl = rows["w"] * reverse_kl(lq, F.log_softmax(teacher_logits.float(), dim=-1).clamp_(min=_NEG))
        parts = torch.stack([(pg * valid).sum(), (rkl * valid).sum()])
        return parts.sum(), parts


class MiniLLMObjective(nn.Module):
    """The rollout half of MiniLLM on model outputs (fused or not), -> (total, {name: sum})."""

    names = ("minillm_pg", "minillm_reverse_kl")

    def __init__(self, cfg: OnPolicyConfig, vocab: int | None = None, chunk: int = 0):
        super().__init__()
        self.token_loss = MiniLLMTokenLoss(cfg.clip)
        self.vocab, self.chunk = vocab, chunk

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, rows: dict[str, torch.Tensor]):
        total, parts = logit_loss_on(self.token_loss, student, teacher, rows, self.vocab, self.chunk)
        return total, {n: parts[i] for i, n in enumerate(self.names)}


def draw(student, prompts: torch.Tensor, cfg: OnPolicyConfig, generator, eos_id, teacher=None) -> Samples:
    """Continuations of `prompts` from the student (GKD) or the teacher-mixed policy (MiniLLM)."""
    mix = cfg.teacher_mix if cfg.method == "minillm" else 0.0
    return sample(student, prompts, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                  generator=generator, eos_id=eos_id, teacher=teacher if mix else None, teacher_mix=mix)
