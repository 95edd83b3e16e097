"""Distillation losses. Every loss returns a SUM over valid tokens; the trainer divides once by the number
of valid tokens in the whole gradient-accumulation window (all processes), so results do not depend on how
a step is split into micro-batches.

Shapes: N = tokens (batch * time, aligned so that row i predicts labels[i]), V = vocabulary, H = width.
Softmaxes run in fp32 whatever the logits' dtype.

Logit divergences share one temperature convention: both distributions are softened, p^T = softmax(z / T),
and the divergence is multiplied by T^2 (so gradients keep their scale as T changes, as in Hinton et al.;
TVD, whose gradient shrinks as 1/T only, by T). Rows whose label is ignore_index are selected away, so
whatever the teacher holds there (NaN, inf) cannot reach the value or the gradient.
A teacher is either dense logits [N, V] or a `TopKTeacher` (its k most likely tokens plus one bucket for
the remaining mass, e.g. from a precomputed cache); with a top-k teacher every divergence is computed
between the two (k + 1)-bucket distributions.

`chunked_logit_loss` is the one chunking wrapper: it runs any logit objective over chunks of tokens,
optionally fused with the student's (and teacher's) output layer, so neither [N, V] logits tensor is ever
materialised in full; the gradient is formed chunk by chunk during the forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.config import CROSS_TOKENIZER_LOSSES, LOGIT_DIVERGENCES, TEACHER_LOSSES, LossTerm

_NEG = -1e30  # stands in for log(0): keeps 0 * log(0) terms finite in values and gradients


# --------------------------------------------------------------------------------------------- divergences
# Each takes row-normalised log-probabilities s (student) and t (teacher), [N, K], and returns [N]. They
# must be finite: a zero probability is log p = _NEG, not -inf (callers clamp where -inf can occur, once:
# every clamp is a full pass over [N, V], and the divergences combine their inputs several times).


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from finite log-probabilities; p = 0 (lp = _NEG) contributes 0."""
    return (lp.exp() * (lp - lq)).sum(-1)


def _mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b) from log a, log b."""
    if w <= 0.0:
        return lb
    if w >= 1.0:
        return la
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _log_softmax_at(logits: torch.Tensor, T: float) -> torch.Tensor:
    """fp32 log_softmax(logits / T) over the last dimension; no division (a full pass and a copy) at T = 1."""
    x = logits.float()
    return F.log_softmax(x if T == 1.0 else x / T, dim=-1)


def _owned(x: torch.Tensor, owned: bool) -> torch.Tensor:
    """x as an fp32 tensor this caller may overwrite: x itself when it is fp32 and already the caller's
    (`owned`), else an fp32 copy."""
    if x.dtype != torch.float32:
        return x.float()
    return x if owned else x.clone()


def forward_kl(s, t, **_):
    """KL(teacher || student): mass-covering (Hinton)."""
    return _kl(t, s)


def reverse_kl(s, t, **_):
    """KL(student || teacher): mode-seeking (MiniLLM). Where the teacher rules tokens out (probability 0,
    t = _NEG) the exact KL is infinite whenever the student gives them mass; instead the student is
    compared on the teacher's support, renormalised there (s'), plus -log of the mass it gives that support:
    KL(s' || t) - log sum_support p_s. Finite, >= 0, equal to KL(s || t) when the student stays on the
    support, and its gradient moves the student's mass back onto it."""
    outside = t <= _NEG / 2  # [N, K] bool
    s_in = s.masked_fill(outside, _NEG)
    log_mass = s_in.logsumexp(-1, keepdim=True)  # [N, 1] log of the student's mass on the support (0 if all)
    return _kl((s_in - log_mass).masked_fill(outside, _NEG), t) - log_mass.squeeze(-1)


def jsd(s, t, beta: float = 0.5, **_):
    """Generalised Jensen-Shannon (GKD): beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta t + (1 - beta) s.
    beta = 0 and beta = 1 are defined as forward and reverse KL (the limits of JSD/beta and
    JSD/(1 - beta)), the convention of GKD and TRL."""
    if beta <= 0.0:
        return forward_kl(s, t)
    if beta >= 1.0:
        return reverse_kl(s, t)
    m = _mix(t, s, beta)
    return beta * _kl(t, m) + (1.0 - beta) * _kl(s, m)


def skew_forward_kl(s, t, alpha: float = 0.1, **_):
    """DistiLLM's skew KL: KL(t || alpha t + (1 - alpha) s); alpha = 0 is forward KL."""
    return _kl(t, _mix(t, s, alpha))


def skew_reverse_kl(s, t, alpha: float = 0.1, **_):
    """DistiLLM's skew reverse KL: KL(s || alpha s + (1 - alpha) t); alpha = 0 is reverse KL."""
    return _kl(s, _mix(s, t, alpha))


def tvd(s, t, **_):
    """Total variation distance: 0.5 * sum |p_t - p_s|."""
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
}
assert set(DIVERGENCES) == LOGIT_DIVERGENCES


# --------------------------------------------------------------------------------------------- teachers


@dataclass
class TopKTeacher:
    """A sparse teacher: its k most likely tokens and one bucket for the rest, per token."""

    indices: torch.Tensor  # [N, k] int64 token ids
    logp: torch.Tensor  # [N, k + 1] log-probabilities at the loss's temperature; last column = the rest

    def __getitem__(self, rows) -> "TopKTeacher":
        return TopKTeacher(self.indices[rows], self.logp[rows])

    def __len__(self) -> int:
        return self.indices.shape[0]


def topk_from_logits(logits: torch.Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    """[N, V] logits -> TopKTeacher at `temperature` (what the cache stores)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    top, idx = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    return TopKTeacher(idx, torch.cat([top, rest], dim=-1))


def _bucketise(s_logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Student [N, V] log-probs -> [N, k + 1]: the teacher's top-k tokens, then everything else."""
    rest = s_logp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([s_logp.gather(-1, idx), rest], dim=-1)


# --------------------------------------------------------------------------------------------- logit losses


class CrossEntropy(nn.Module):
    """Next-token cross-entropy against the labels (summed over valid tokens)."""

    needs_teacher = False

    def __init__(self, ignore_index: int = -100, **_):
        super().__init__()
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: torch.Tensor,  # [N, V] any float dtype
        teacher,  # unused
        labels: torch.Tensor,  # [N] int64, ignore_index marks tokens without a target
    ) -> torch.Tensor:  # [] fp32
        return F.cross_entropy(student_logits.float(), labels, ignore_index=self.ignore_index, reduction="sum")

    def value_and_grad(self, z, teacher, labels, want_grad=True, own_z=False, own_t=False):
        """forward() and its gradient with respect to z [N, V] fp32 (softmax - one-hot on valid rows) without
        autograd; with own_z both are formed in z's storage (overwritten). -> (value [], gradient or None)."""
        valid = labels != self.ignore_index
        idx = labels.clamp(min=0)[:, None]
        logp = _log_softmax_(_owned(z, own_z), 1.0)
        value = -torch.where(valid, logp.gather(-1, idx).squeeze(-1), 0.0).sum()
        if not want_grad:
            return value, None
        g = logp.exp_().scatter_add_(-1, idx, torch.full(idx.shape, -1.0, dtype=logp.dtype))
        return value, _zero_rows(g, valid)


class LogitDivergence(nn.Module):
    """T^2 * D(p_teacher^T, p_student^T) summed over valid tokens, D one of DIVERGENCES (T * D for tvd).
    The scale keeps the gradient's size independent of T (Hinton's T^2): a KL's gradient with respect to
    the logits shrinks as 1/T^2, TVD's (a sum of signs times dp/dz) as 1/T."""

    needs_teacher = True

    def __init__(self, kind: str, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                 ignore_index: int = -100, **_):
        super().__init__()
        if kind not in DIVERGENCES:
            raise ValueError(f"unknown divergence '{kind}' (known: {sorted(DIVERGENCES)})")
        self.kind, self.fn = kind, DIVERGENCES[kind]
        self.temperature, self.beta, self.alpha = temperature, beta, alpha
        # forward KL and JSD (0 < beta < 1) against a dense teacher: value and gradient in closed form
        self.closed_form = kind == "forward_kl" or (kind == "jsd" and 0.0 < beta < 1.0)
        self.ignore_index = ignore_index

    def forward(
        self,
        student_logits: torch.Tensor,  # [N, V]
        teacher: torch.Tensor | TopKTeacher,  # [N, V] logits (same vocabulary) or top-k at self.temperature
        labels: torch.Tensor,  # [N] int64; rows with ignore_index do not count
    ) -> torch.Tensor:  # [] fp32
        T = self.temperature
        valid = labels != self.ignore_index  # [N]
        if isinstance(teacher, TopKTeacher):  # an empty bucket is -inf
            s = _log_softmax_at(student_logits, T)  # finite: the student's logits are
            s, t = _bucketise(s, teacher.indices).clamp(min=_NEG), teacher.logp.float().clamp(min=_NEG)
        else:  # a teacher may mask tokens with -inf logits; in place: t needs no gradient
            s = None if self.closed_form else _log_softmax_at(student_logits, T)
            with torch.no_grad():
                t = _log_softmax_at(teacher, T).clamp_(min=_NEG)
        # rows that do not count are selected away, not multiplied by 0: whatever the teacher holds there
        # (NaN, +inf) must not reach the value or, through 0 * NaN, the gradient. A dense teacher's t is
        # this call's own tensor (zeroed in place, on its invalid rows only); a top-k teacher's is not
        if isinstance(teacher, TopKTeacher):
            t = t.masked_fill(~valid[:, None], 0.0)
        else:
            _zero_rows(t, valid)
        if s is None:  # dense teacher, closed form
            return _ClosedFormDivergence.apply(student_logits, t, valid, self.kind, T, self.beta,
                                               torch.is_grad_enabled())
        rows = self.fn(s, t, beta=self.beta, alpha=self.alpha)  # [N]
        scale = T if self.kind == "tvd" else T * T
        return torch.where(valid, rows, 0.0).sum() * scale

    def value_and_grad(self, z, teacher, labels, want_grad=True, own_z=False, own_t=False):
        """forward() and its gradient with respect to z [N, V] fp32, without autograd, for the closed-form
        divergences against a dense teacher [N, V]. own_z / own_t: z / teacher are the caller's to overwrite
        (the log-softmaxes are then formed in place, and the gradient in z's storage), so a chunk needs no
        [N, V] tensor beside its student and teacher logits but the divergence's own one or two."""
        T = self.temperature
        valid = labels != self.ignore_index
        # both sides by the same log-softmax (equal logits give exactly equal log-probabilities)
        s = _log_softmax_(_owned(z, own_z), T)
        t = _zero_rows(_log_softmax_(_owned(teacher, own_t), T).clamp_(min=_NEG), valid)
        return _closed_form(s, t, valid, self.kind, T, self.beta, want_grad)


# Row sums over [N, V] go a block of rows at a time through one reused scratch block (out=): a temporary
# per block (e.g. vecdot's product) is not reused by glibc but page-faulted in anew, so the resident set
# grew by a block per call (measured: +16 MiB per call at V = 128k, 0.5 GB over one chunk).


def _scratch(x: torch.Tensor, n: int = 1, elements: int = 1 << 22) -> torch.Tensor:
    """n scratch blocks [n, rows, V] for x [N, V], of about `elements` elements each (at least one row)."""
    rows = min(x.shape[0], max(1, elements // max(x.shape[-1], 1)))
    return x.new_empty((n, rows, x.shape[-1]), dtype=torch.float32)


def _blocks(x: torch.Tensor, buf: torch.Tensor):
    """(row slice of x, the scratch block's matching rows) for each block of buf's size."""
    step = buf.shape[1]
    for a in range(0, x.shape[0], step):
        n = min(step, x.shape[0] - a)
        yield slice(a, a + n), buf[:, :n]


def _log_softmax_(x: torch.Tensor, T: float) -> torch.Tensor:
    """log_softmax(x / T) over the last dimension, in place in x (fp32, the caller's own): torch's fused
    kernel writing into its own input (each row is read whole before it is written), so no [N, V] output
    beside it; the same values as F.log_softmax (a row of -inf gives NaN). 2.5x faster than the blocked
    max / exp / sum / subtract passes it replaces (4 x [512, 4096]: 6.0 -> 2.4 ms, AMD EPYC)."""
    if T != 1.0:
        x.div_(T)
    return torch.log_softmax(x, -1, out=x)


def _on_host(x: torch.Tensor) -> bool:
    """Whether x's values can be read without waiting for a device (a CPU tensor)."""
    return x.device.type == "cpu"


def _zero_rows(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """x[~valid] = 0 in place. On a CPU, writing those rows only (a boolean-mask assignment is a masked_fill_
    that reads and writes all of x: 0.8 ms per [512, 4096] chunk, twice per chunk); on a GPU one masked_fill_
    (finding the rows, nonzero(), would make the host wait for the device: a sync per block of rows)."""
    if not _on_host(x):
        return x.masked_fill_(~valid[:, None], 0.0)
    bad = (~valid).nonzero()[:, 0]
    if bad.numel():
        x.index_fill_(0, bad, 0.0)
    return x


def _rowdot(x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor | None = None) -> torch.Tensor:
    """sum(x * y, -1) for [N, V] fp32 tensors, a block of rows at a time (torch.linalg.vecdot forms the
    whole product first: one more [N, V] tensor)."""
    out = x.new_empty(x.shape[0], dtype=torch.float32)
    for r, b in _blocks(x, _scratch(x) if buf is None else buf):
        torch.sum(torch.mul(x[r], y[r], out=b[0]), -1, out=out[r])
    return out


def _closed_form(s, t, valid, kind, T, beta, grad_mode):
    """The value and gradient of _ClosedFormDivergence. s [N, V]: the student's fp32 log-probabilities at T,
    t: the teacher's (finite, 0 on invalid rows); both the caller's own: overwritten (the gradient is
    returned in s's storage). -> (sum over valid rows of T^2 * D [], dL/dz [N, V] fp32 or None).
    Every step is a pass over [N, V] (memory-bound on a CPU), so each reuses a buffer in place where it
    can and the row sums go over blocks of rows (_rowdot): at most two [N, V] tensors beside s and t (JSD;
    forward KL one), and two scratch blocks."""
    g, buf = None, _scratch(s, 2)
    if kind == "forward_kl":
        pt = t.exp()
        rows = _rowdot(pt, t.sub_(s), buf)  # sum p_t (t - s)
        if grad_mode:  # (g - p_s sum(g)) T with g = -p_t
            g = s.exp_().mul_(pt.sum(-1, keepdim=True)).sub_(pt)
            if T != 1.0:
                g.mul_(T)
    else:
        ps = s.exp()
        # the mixture m = log(b p_t + (1 - b) p_s) = log b + logaddexp(t, s + log((1 - b) / b)): in log space
        # (exact where both vanish), 5 passes over [N, V] at b = 0.5 where exp, lerp, floor and log took 9
        shift = math.log((1.0 - beta) / beta)
        m = torch.empty_like(s)
        torch.logaddexp(t, torch.add(s, shift, out=m) if shift else s, out=m).add_(math.log(beta))
        # sum p_t (t - m), a few rows at a time: p_t again from t, so no second full-size buffer holds it
        teacher_part = t.new_empty(t.shape[0])
        for r, b in _blocks(t, buf):
            torch.sum(torch.exp(t[r], out=b[0]).mul_(torch.sub(t[r], m[r], out=b[1])), -1, out=teacher_part[r])
        d = s.sub_(m)
        student_part = _rowdot(ps, d, buf)  # sum p_s (s - m)
        rows = beta * teacher_part + (1.0 - beta) * student_part
        if grad_mode:  # g = (1 - b) p_s d, sum(g) = (1 - b) student_part: (g - p_s sum(g)) T
            g = d.sub_(student_part[:, None]).mul_(ps).mul_((1.0 - beta) * T)
    total = torch.where(valid, rows, 0.0).sum() * (T * T)
    if g is not None:
        _zero_rows(g, valid)
    return total, g


class _ClosedFormDivergence(torch.autograd.Function):
    """sum over valid rows of T^2 * D(p_t, p_s), D forward KL or generalised JSD, with the gradient with
    respect to the student's logits z formed in the forward pass from its closed form instead of by autograd
    through the divergence's ~10 elementwise [N, V] operations (and their saved inputs). With s = log p_s,
    t = log p_t, s = log_softmax(z / T) and dL/ds = g:  dL/dz = (g - p_s * sum(g)) / T, where
      forward KL  L = sum p_t (t - s):                          g = -p_t
      JSD         L = b sum p_t (t - m) + (1 - b) sum p_s (s - m),  m = log(b p_t + (1 - b) p_s):
                                                                g = (1 - b) p_s (s - m)
    (for JSD the terms through m cancel). The dense formulas in DIVERGENCES stay the reference (tests)."""

    @staticmethod
    def forward(ctx, z, t, valid, kind, T, beta, grad_mode):
        # z [N, V] student logits (any float dtype); t [N, V] fp32 teacher log-probabilities at T, finite
        # (log 0 = _NEG), 0 on invalid rows, and the caller's own: it is overwritten; valid [N] bool.
        total, g = _closed_form(_log_softmax_at(z, T), t, valid, kind, T, beta, grad_mode)
        if g is not None:
            ctx.save_for_backward(g.to(z.dtype))
        return total

    @staticmethod
    def backward(ctx, g_out):
        (g,) = ctx.saved_tensors
        return g * g_out.to(g.dtype), None, None, None, None, None, None


def build_logit_loss(term: LossTerm, ignore_index: int = -100) -> nn.Module:
    if term.name == "cross_entropy":
        return CrossEntropy(ignore_index)
    return LogitDivergence(term.name, term.temperature, term.beta, term.alpha, ignore_index)


class LogitObjective(nn.Module):
    """sum_i weight_i * loss_i(student_logits, teacher, labels) over the recipe's logit terms."""

    def __init__(self, terms: list[LossTerm], ignore_index: int = -100):
        super().__init__()
        self.weights = [t.weight for t in terms]
        self.losses = nn.ModuleList(build_logit_loss(t, ignore_index) for t in terms)
        self.n_parts = len(self.losses)
        self.needs_teacher = any(m.needs_teacher for m in self.losses)
        self.temperatures = sorted({t.temperature for t in terms if t.name != "cross_entropy"})

    def forward(self, student_logits, teacher, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """student_logits [N, V]; teacher [N, V] logits, a dict temperature -> TopKTeacher, or None;
        rows: {"labels": [N]} (+ "ce_labels": [N] when cross-entropy has other targets than the
        divergences, e.g. none on student-generated tokens). -> (weighted total [], per-term sums)."""
        parts = []
        for loss in self.losses:
            t = teacher
            if isinstance(teacher, dict):  # one top-k teacher per temperature
                t = teacher[loss.temperature] if loss.needs_teacher else None
            parts.append(loss(student_logits, t, self._labels(loss, rows)))
        parts = torch.stack(parts)
        return (parts * parts.new_tensor(self.weights)).sum(), parts

    @staticmethod
    def _labels(loss: nn.Module, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """A term's targets: "ce_labels" for cross-entropy when given, else "labels"."""
        return rows.get("ce_labels", rows["labels"]) if isinstance(loss, CrossEntropy) else rows["labels"]

    def fusable(self, teacher) -> bool:
        """Whether value_and_grad applies: every term is cross-entropy or a closed-form divergence, and
        the teacher (if any term needs one) is dense logits."""
        return all(isinstance(m, CrossEntropy) or m.closed_form for m in self.losses) and (
            not self.needs_teacher or isinstance(teacher, torch.Tensor))

    def value_and_grad(self, z, teacher, rows, want_grad=True, own_z=False, own_t=False):
        """forward() and the gradient of its total with respect to z [N, V] fp32, without autograd (see
        fusable()). own_z / own_t: z / teacher may be overwritten (the last term takes z's storage for its
        gradient; the teacher is only taken when one term reads it). -> (total [], parts, dtotal/dz or None)."""
        parts, grad = [], None
        readers = sum(m.needs_teacher for m in self.losses)
        for i, (w, loss) in enumerate(zip(self.weights, self.losses)):
            last = i == len(self.losses) - 1
            value, g = loss.value_and_grad(z, teacher if loss.needs_teacher else None, self._labels(loss, rows),
                                           want_grad, own_z=own_z and last, own_t=own_t and readers == 1)
            parts.append(value)
            if g is not None:
                grad = g.mul_(w) if grad is None else grad.add_(g, alpha=w)
        parts = torch.stack(parts)
        return (parts * parts.new_tensor(self.weights)).sum(), parts, grad


# --------------------------------------------------------------------------------------------- chunking


def auto_chunk(vocab: int, hidden: int = 0, budget: int = 1 << 21, min_rows: int = 32) -> int:
    """Tokens per chunk: one [chunk, V] fp32 tensor holds about `budget` elements (8 MiB), but at least
    `min_rows` rows, and at least 256 (or hidden / 16 if more) when the output layer [V, hidden] is fused
    into the loss (the chunk then holds the student's and the teacher's logits; the objective's temporaries
    are a block's of auto_chunk(vocab) rows, see _ChunkedLogitLoss). The products want a few hundred rows
    whatever the width: at hidden 576, vocab 49,152 (SmolLM2), 2,048 tokens, JSD forward + gradient took
    6.0 s in chunks of 42 rows (hidden / 16 and the budget's), 3.9 s of 128, 3.7-3.9 s of 256 or 512
    (AMD EPYC, 2 cores). Measured on a 2-core CPU (BENCHMARKS.md,
    "KD step"): blocks of 32 MiB and more are slower, not faster: glibc serves allocations of 32 MiB and up
    with fresh mmap pages, so each temporary is page-faulted in again per block (a 2048 x 4096 loss took
    390 ms in one chunk, 185-210 ms in chunks of 512 rows). The output layer's products want more rows:
    every chunk reads the student's [V, H] output layer twice, the teacher's once and reads and writes the
    fp32 [V, H] gradient, and [rows, 4096] x [4096, 128,256] products ran at 105-117 GFLOP/s with 128 rows,
    140-158 with 256 and 158-169 with 512 (AMD EPYC, 2 cores). At H = 4096, V = 128,256, 3,072 tokens, in
    blocks of 32 rows: 256 rows (hidden / 16) took 0.86x the dense loss's time at 6.7x less memory, 128 rows
    0.96x at 7.1x, 384 rows 0.80x at 6.2x (BENCHMARKS.md, "KD loss", --liger; before blocks, 128 rows took
    1.02x at 6.7x and 256 rows 0.87x at 5.9x)."""
    return max(min_rows, budget // max(vocab, 1), max(256, hidden // 16) if hidden else 0)


_HALF = (torch.float16, torch.bfloat16)
_TORCH = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
_MM_OUT_DTYPE = _TORCH >= (2, 8)
# addmm(c, a, b, out_dtype=float32) with a float32 c and 16-bit a, b: allowed from torch 2.10 (its CUDA library's
# check: "self dtype must match either out_dtype or mat1 dtype"); 2.8's and 2.9's libraries lack that message, and
# the source before it required self's dtype to equal mat2's, so there the product goes through mm instead
_ADDMM_FLOAT32_SELF = _TORCH >= (2, 10)
_GRAD_W_ROWS = 8192  # rows of the weight gradient per float32 product where addmm cannot take a float32 c


def _float32_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm / addmm can multiply 16-bit `dtype` tensors on `device` into float32 (out_dtype=,
    torch >= 2.8 on CUDA sm_80+; CPU builds have no kernel for it): products of 16-bit values are exact in
    float32 and the GEMM accumulates in float32, so nothing is rounded to 16 bits."""
    return (_MM_OUT_DTYPE and device.type == "cuda" and dtype in _HALF
            and torch.cuda.get_device_capability(device)[0] >= 8)


def output_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  reuse: list | None = None) -> torch.Tensor:
    """h [n, H] @ weight[V, H]^T (+ bias): float32 logits from 16-bit operands where a CUDA GEMM can give
    them unrounded (an objective of nearly equal distributions, as JSD, loses its gradient's precision to
    logits rounded to bf16), else F.linear's, in the operands' dtype (the closed form makes its float32
    copy a block of rows at a time).
    reuse: a list holding one buffer (empty at first): the logits are written into its first n rows when it
    has them (else a new buffer is kept there), for callers that need one chunk's logits at a time. On a
    CPU a [256, 49,152] float32 chunk is 48 MiB, which glibc serves with fresh mmap pages, page-faulted in
    again by every chunk (SmolLM2's loss over 2,048 tokens: 175,000 minor faults). Not under autocast (its
    lower-precision products have no out= form)."""
    if h.dtype == weight.dtype and h.device == weight.device and _float32_out(h.device, h.dtype):
        z = torch.mm(h, weight.t(), out_dtype=torch.float32)
        return z if bias is None else z.add_(bias.float())
    if reuse is None or torch.is_autocast_enabled(h.device.type):
        return F.linear(h, weight, bias)
    n = h.shape[0]
    if not reuse or reuse[0].shape[0] < n:  # (one list per caller and loss call: one dtype and device)
        reuse[:] = [F.linear(h, weight, bias)]
        return reuse[0]
    z = reuse[0][:n]
    return torch.mm(h, weight.t(), out=z) if bias is None else torch.addmm(bias, h, weight.t(), out=z)


def _accumulate_grad_w(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w (float32 [V, H]) += g^T @ h for a chunk's gradient rows g [c, V] and inputs h [c, H], in
    place: no [V, H] temporary (a 16-bit product, then its float32 copy, were 3 GB per chunk at V = 128k,
    H = 4096). The sum stays float32 over all chunks: accumulated in bf16 over 32 chunks it was 4x further
    from the exact sum (0.67% vs 0.17% relative error, V 2,048, H 256, 8,192 tokens)."""
    low = h.dtype if h.dtype in _HALF else None  # the 16-bit dtype the product runs in on a GPU
    if low is None and h.is_cuda and torch.is_autocast_enabled("cuda"):  # float32 weights under autocast
        low = torch.get_autocast_dtype("cuda")
    if low is not None and _float32_out(h.device, low):
        gt, hl = g.t().to(low), h.to(low)
        if _ADDMM_FLOAT32_SELF:
            torch.addmm(grad_w, gt, hl, out_dtype=torch.float32, out=grad_w)
        else:  # torch 2.8-2.9: mm's float32 products, a slice of rows at a time (not one [V, H] temporary)
            for a in range(0, grad_w.shape[0], _GRAD_W_ROWS):
                grad_w[a:a + _GRAD_W_ROWS] += torch.mm(gt[a:a + _GRAD_W_ROWS], hl, out_dtype=torch.float32)
    else:  # float32 operands: the [c, V] and [c, H] copies are a chunk's, the product goes straight in
        grad_w.addmm_(g.t().float(), h.float())


def _teacher_block(teacher, r: slice):
    """Rows r of a chunk's teacher rows (logits, TopKTeacher, dict of them, or None)."""
    if isinstance(teacher, dict):
        return {k: v[r] for k, v in teacher.items()}
    return None if teacher is None else teacher[r]


def _block_value_and_grad(fn, z, teacher, rows, want_grad, closed, own_z, own_t, out):
    """One block's (total [], parts [n]) of fn over logits z [n, V], its gradient written into `out` [n, V]
    (None: not wanted), which may be z's own storage: by fn.value_and_grad in place when `closed`, else by
    autograd through fn."""
    if closed:
        if out is not None and not own_z and out.dtype == z.dtype:  # the gradient's buffer as z's working copy
            z, own_z = out.copy_(z), True
        tot, p, g = fn.value_and_grad(z, teacher, rows, want_grad, own_z=own_z, own_t=own_t)
    else:
        with torch.enable_grad():
            z = z.detach().requires_grad_(want_grad)
            tot, p = fn(z, teacher, rows)
            g = torch.autograd.grad(tot, z, allow_unused=True)[0] if want_grad else None
        if want_grad and g is None:  # the objective does not depend on these rows
            g = torch.zeros_like(z)
    if out is not None and g.data_ptr() != out.data_ptr():  # e.g. a multi-term gradient in its own tensor
        out.copy_(g)
    return tot.detach(), p.detach()


class _ChunkedLogitLoss(torch.autograd.Function):
    """Runs `fn` over row chunks of the student's logits (computed per chunk from hidden states and the
    output layer when `weight` is given) and forms the gradient during the forward pass, so only one
    chunk of [rows, V] exists at a time. backward() just scales the stored gradients. Within a chunk the
    objective runs over blocks of rows: the output layer's products want many rows (they are compute-bound
    from a few hundred), the objective's [rows, V] temporaries few."""

    @staticmethod
    def forward(ctx, x, weight, bias, teacher_chunk, fn, rows, chunk, grad_mode, bounds=None, block=0):
        # x: [N, H] student hidden states (weight given) or [N, V] student logits (weight None)
        # weight: [V, H] student output layer; bias: [V] or None
        # teacher_chunk(a, b) -> teacher rows a:b (logits, TopKTeacher, dict of them, or None)
        # rows: dict of per-row tensors [N, ...] (labels, ...), sliced along with x
        # fn(logits [c, V], teacher rows, rows) -> (total [], parts [fn.n_parts]), through autograd; or, when
        # fn.fusable(teacher rows) (cross-entropy and closed-form divergences, dense teacher), fn.value_and_grad
        # (in float32 whatever the logits' dtype), which may overwrite the block's logits, and the teacher's rows
        # when teacher_chunk.fresh says they are the loss's own (not needed after the next call). fn is row-wise:
        # blocks' totals add up
        # bounds: the chunks' row ranges when rows must stay together (a cross-tokenizer group; one block each)
        # block: rows per pass of fn within a chunk (0 or >= the chunk: the whole chunk in one)
        # grad_mode: torch.is_grad_enabled() of the caller (inside forward it is always off). needs_input_grad
        # says whether the inputs require grad, not whether a graph is recorded: under torch.no_grad()
        # (evaluation) no backward will come, so no gradient is formed or stored
        need = [grad_mode and ctx.needs_input_grad[0], grad_mode and weight is not None and ctx.needs_input_grad[1],
                grad_mode and bias is not None and ctx.needs_input_grad[2]]
        want = any(need)
        grad_x = torch.zeros_like(x) if need[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need[2] else None
        total = x.new_zeros((), dtype=torch.float32)
        parts = x.new_zeros(fn.n_parts, dtype=torch.float32)
        reuse = []  # the chunks' logits: one buffer (each chunk's rows are done with before the next)
        fusable = getattr(fn, "fusable", None)  # LogitObjective's closed-form path (other fns: autograd)
        own_t = getattr(teacher_chunk, "fresh", False)
        for a, b in bounds or ((a, min(a + chunk, x.shape[0])) for a in range(0, x.shape[0], chunk)):
            h = x[a:b]  # [c, H] or [c, V]
            with torch.no_grad():
                logits = h if weight is None else output_logits(h, weight, bias, reuse)  # [c, V]
            teacher = teacher_chunk(a, b)
            chunk_rows = {k: v[a:b] for k, v in rows.items()}
            closed = fusable is not None and fusable(teacher)  # (16-bit logits: float32 a block at a time)
            # the gradient's rows: in the chunk's own logits, or straight into grad_x without an output layer
            g = (logits if weight is not None else grad_x[a:b]) if want else None  # (no weight: want is need[0])
            step = b - a if bounds or not 0 < block < b - a else block
            whole = step == b - a  # one block: the chunk's teacher rows and rows as they are, not sliced
            with torch.no_grad():
                for r in (slice(i, min(i + step, b - a)) for i in range(0, b - a, step)):
                    tot, p = _block_value_and_grad(fn, logits[r], teacher if whole else _teacher_block(teacher, r),
                                                   chunk_rows if whole else {k: v[r] for k, v in chunk_rows.items()},
                                                   want, closed, weight is not None, own_t, None if g is None else g[r])
                    total += tot
                    parts += p
            del logits, teacher
            if weight is not None and want:
                if need[0]:
                    if g.dtype == weight.dtype == x.dtype:  # straight into its rows: no [c, H] temporary
                        torch.mm(g, weight, out=grad_x[a:b])
                    else:
                        grad_x[a:b] = (g.to(weight.dtype) @ weight).to(x.dtype)
                if need[1]:
                    _accumulate_grad_w(grad_w, g, h)
                if need[2]:
                    grad_b += g.float().sum(0)
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_x, grad_w, grad_b)))
        ctx.need, ctx.used = need, False
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, g_total, g_parts):
        if ctx.used:  # the stored gradients were scaled in place by the first backward
            raise RuntimeError("the chunked logit loss supports one backward pass (no retain_graph reuse)")
        ctx.used = True
        saved = ctx.saved_tensors  # scaled in place: a second [V, H] gradient would double the peak
        grads = [s.mul_(g_total.to(s.dtype)) if n else None for s, n in zip(saved, ctx.need)]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None, None


def chunked_logit_loss(
    fn: nn.Module,  # (logits [c, V], teacher rows, rows) -> (total [], parts [fn.n_parts])
    x: torch.Tensor,  # [N, H] student hidden states (with weight) or [N, V] student logits
    rows: dict[str, torch.Tensor],  # per-row tensors [N, ...], at least "labels" [N]
    teacher_chunk: Callable[[int, int], object] = lambda a, b: None,
    weight: torch.Tensor | None = None,  # [V, H] student output layer (fused mode)
    bias: torch.Tensor | None = None,  # [V]
    chunk: int = 0,  # rows per chunk (0: auto from V)
    bounds: list[tuple[int, int]] | None = None,  # explicit chunk row ranges instead (covering all rows)
    block: int = 0,  # rows per pass of the objective within a chunk (0: auto_chunk(V) on a CPU, the chunk on a GPU)
) -> tuple[torch.Tensor, torch.Tensor]:  # total [], per-term sums [n_parts]
    if chunk < 0 or block < 0:  # range() with a negative step runs no chunk: a silent zero loss
        raise ValueError(f"chunk ({chunk}) and block ({block}) must be >= 0 (0: automatic)")
    vocab = weight.shape[0] if weight is not None else x.shape[-1]
    chunk = chunk or auto_chunk(vocab, weight.shape[1] if weight is not None else 0)
    # blocks pay on a CPU (small temporaries stay in glibc's heap, the products keep their rows); on a GPU a
    # block costs its ~40 kernel launches, and [256, V] temporaries are small beside its memory
    block = block or (auto_chunk(vocab) if x.device.type == "cpu" else chunk)
    return _ChunkedLogitLoss.apply(x, weight, bias, teacher_chunk, fn, rows, chunk, torch.is_grad_enabled(), bounds,
                                   block)


# --------------------------------------------------------------------------------------------- features


def uniform_layer_map(n_student: int, n_teacher: int) -> list[list[int]]:
    """Student layer i (1-based) -> teacher layer round(i * n_teacher / n_student)."""
    return [[i, (i * n_teacher + n_student // 2) // n_student] for i in range(1, n_student + 1)]


def _check_layer_map(layer_map, n_student: int, n_teacher: int, first: int) -> None:
    for s, t in layer_map:
        if not (first <= s <= n_student and first <= t <= n_teacher):
            raise ValueError(f"layer_map: pair [{s}, {t}] out of range: student layers {first}..{n_student}, "
                             f"teacher layers {first}..{n_teacher}")


class HiddenStateLoss(nn.Module):
    """MSE (mean over the teacher's width; with `normalize`, divided by the teacher state's mean square) or
    1 - cosine between mapped hidden states, summed over valid tokens and averaged over layer pairs. Layer 0
    is the embedding output, layer i the i-th block's. A learned linear projection (student width ->
    teacher width) per pair when the widths differ."""

    needs_teacher = True

    def __init__(self, kind: str, layer_map, student_width: int, teacher_width: int, normalize: bool = False):
        super().__init__()
        self.kind, self.layer_map, self.normalize = kind, [tuple(p) for p in layer_map], normalize
        self.proj = nn.ModuleList(
            nn.Linear(student_width, teacher_width, bias=False) if student_width != teacher_width else nn.Identity()
            for _ in self.layer_map
        )

    def forward(
        self,
        student_hidden: tuple[torch.Tensor, ...],  # L_s + 1 tensors [B, T, H_s]
        teacher_hidden: tuple[torch.Tensor, ...],  # L_t + 1 tensors [B, T, H_t]
        mask: torch.Tensor,  # [B, T] bool: tokens that count
    ) -> torch.Tensor:  # [] fp32
        total = 0.0
        for (s, t), proj in zip(self.layer_map, self.proj):
            hs = proj(student_hidden[s]).float()  # [B, T, H_t]
            ht = teacher_hidden[t].float()
            if self.kind == "hidden_mse":
                per_token = (hs - ht).pow(2).mean(-1)
                if self.normalize:
                    per_token = per_token / ht.pow(2).mean(-1).clamp_min(1e-6)
            else:
                per_token = 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-6)
            total = total + (per_token * mask).sum()
        return total / len(self.layer_map)


def _group_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, T, T] -> [B, heads, T, T] by averaging consecutive groups of H / heads heads."""
    B, H, T, S = x.shape
    return x.reshape(B, heads, H // heads, T, S).mean(2)


class AttentionLoss(nn.Module):
    """Between mapped layers (1-based): 'attention_kl' = KL(A_teacher || A_student) per query row, or
    'attention_logit_mse' = mean squared difference of pre-softmax scores over the causal keys; averaged
    over heads, summed over valid query tokens, averaged over layer pairs. Heads: 'average' compares the
    head-averaged maps; 'map' averages the larger side's heads in groups down to the smaller count."""

    needs_teacher = True

    def __init__(self, kind: str, layer_map, head_map: str, student_heads: int, teacher_heads: int):
        super().__init__()
        self.kind, self.layer_map, self.head_map = kind, [tuple(p) for p in layer_map], head_map
        if head_map == "map":
            lo, hi = sorted((student_heads, teacher_heads))
            if hi % lo:
                raise ValueError(f"head_map=map needs one head count to divide the other "
                                 f"(student {student_heads}, teacher {teacher_heads}); use head_map=average")
        self.heads = 1 if head_map == "average" else min(student_heads, teacher_heads)

    def forward(
        self,
        student_att: dict[int, tuple[torch.Tensor, torch.Tensor]],  # layer -> (scores, probs) [B, H_s, T, T]
        teacher_att: dict[int, tuple[torch.Tensor, torch.Tensor]],  # layer -> (scores, probs) [B, H_t, T, T]
        mask: torch.Tensor,  # [B, T] bool: query tokens that count
    ) -> torch.Tensor:  # [] fp32
        total = 0.0
        for s, t in self.layer_map:
            (ss, sp), (ts, tp) = student_att[s], teacher_att[t]
            T = ss.shape[-1]
            causal = torch.ones(T, T, dtype=torch.bool, device=ss.device).tril()
            if self.kind == "attention_kl":
                a_s, a_t = _group_heads(sp.float(), self.heads), _group_heads(tp.float(), self.heads)
                # masked keys have probability 0 on both sides; the clamp keeps log's gradient finite there
                per_row = _kl(a_t.clamp(min=1e-30).log(), a_s.clamp(min=1e-30).log())  # [B, h, T]
            else:
                z_s = ss.float().masked_fill(~causal, 0.0)
                z_t = ts.float().masked_fill(~causal, 0.0)
                d = (_group_heads(z_s, self.heads) - _group_heads(z_t, self.heads)).pow(2)
                per_row = d.sum(-1) / causal.sum(-1)  # mean over the keys each query sees
            total = total + (per_row.mean(1) * mask).sum()
        return total / len(self.layer_map)


# --------------------------------------------------------------------------------------------- objective


@dataclass
class ModelOutputs:
    """What one model's forward pass gives the objective (teacher side: no gradients)."""

    final_hidden: torch.Tensor | None = None  # [B, T, H] input of the output layer (fused mode)
    head_weight: torch.Tensor | None = None  # [V, H] output layer (fused mode)
    head_bias: torch.Tensor | None = None  # [V]
    logits: torch.Tensor | None = None  # [B, T, V] when not fused
    hidden_states: tuple[torch.Tensor, ...] | None = None  # L + 1 x [B, T, H]
    attention: dict | None = None  # layer -> (scores, probs) [B, heads, T, T]


class Objective(nn.Module):
    """The recipe's weighted sum of loss terms; owns the trainable projections of feature losses.

    forward(...) -> (weighted total [], {term name: sum []}), both sums over valid tokens."""

    def __init__(self, terms: list[LossTerm], student_config=None, teacher_config=None,
                 ignore_index: int = -100, vocab: int | None = None, chunk: int = 0):
        super().__init__()
        self.names = term_names(terms)
        logit_idx = [i for i, t in enumerate(terms) if t.name == "cross_entropy" or t.name in LOGIT_DIVERGENCES]
        cross_idx = [i for i, t in enumerate(terms) if t.name in CROSS_TOKENIZER_LOSSES]
        self.cross = [(self.names[i], terms[i]) for i in cross_idx]  # the teacher in its own tokens
        feat_idx = [i for i in range(len(terms)) if i not in logit_idx and i not in cross_idx]
        # logit terms in groups, one chunked pass over the student's logits each: per teacher (its index,
        # or None: cross-entropy alone), cross-entropy with the first teacher's divergences
        by_teacher: dict = {}
        for i in logit_idx:
            if terms[i].name != "cross_entropy":
                by_teacher.setdefault(terms[i].teacher, []).append(i)
        ce = [i for i in logit_idx if terms[i].name == "cross_entropy"]
        if ce:
            first = min(by_teacher) if by_teacher else None
            by_teacher[first] = sorted(by_teacher.get(first, []) + ce)
        vocabs = vocab if isinstance(vocab, (list, tuple)) else None
        self.logit_groups = [(k, [self.names[i] for i in idx], LogitObjective([terms[i] for i in idx], ignore_index),
                              vocab if vocabs is None else (vocabs[k] if k is not None else None))
                             for k, idx in sorted(by_teacher.items(), key=lambda kv: -1 if kv[0] is None else kv[0])]
        self._logit_modules = nn.ModuleList(g[2] for g in self.logit_groups)
        self.feature_names = [self.names[i] for i in feat_idx]
        self.feature_weights = [terms[i].weight for i in feat_idx]
        self.features = nn.ModuleList(_build_feature(terms[i], student_config, teacher_config) for i in feat_idx)
        self.needs_teacher = any(t.name in TEACHER_LOSSES for t in terms)
        self.hidden_layers = _layers(self.features, HiddenStateLoss)  # (student, teacher) layers to keep
        self.attention_layers = _layers(self.features, AttentionLoss)
        self.ignore_index, self.vocab, self.chunk = ignore_index, vocab, chunk

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | dict | None, rows: dict[str, torch.Tensor]):
        # rows["labels"]: [B, T] targets aligned with positions (already shifted), ignore_index where none;
        # rows["ce_labels"] (optional): other targets for cross-entropy
        labels = rows["labels"]
        total = labels.new_zeros((), dtype=torch.float32)
        parts: dict[str, torch.Tensor] = {}
        teachers = teacher if isinstance(teacher, list) else [teacher]  # several: one per index
        for k, names, fn, vocab in self.logit_groups:
            tot, p = logit_loss_on(fn, student, None if k is None else teachers[k], rows, vocab, self.chunk)
            total = total + tot
            parts.update({n: p[i] for i, n in enumerate(names)})
        if self.cross:
            from workbench import crosstok

            for name, term in self.cross:
                value = crosstok.objective_term(term, student, teachers[term.teacher], self.chunk)
                total = total + term.weight * value
                parts[name] = value.detach()
        mask = labels != self.ignore_index
        for name, w, loss in zip(self.feature_names, self.feature_weights, self.features):
            if isinstance(loss, HiddenStateLoss):
                value = loss(student.hidden_states, teacher.hidden_states, mask)
            else:
                value = loss(student.attention, teacher.attention, mask)
            total = total + w * value
            parts[name] = value.detach()
        return total, parts


def logit_loss_on(fn: nn.Module, student: ModelOutputs, teacher, rows: dict[str, torch.Tensor],
                  vocab: int | None = None, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a logit objective on model outputs: fused with the output layers when the outputs carry hidden
    states, else chunked over the materialised logits; both sides cut to `vocab` columns when given."""
    B, T = rows["labels"].shape
    flat = {k: v.reshape(B * T, *v.shape[2:]) for k, v in rows.items()}
    if student.final_hidden is not None:
        x, w, b = student.final_hidden.reshape(B * T, -1), student.head_weight, student.head_bias
        if vocab is not None and w.shape[0] != vocab:
            w, b = w[:vocab], (b[:vocab] if b is not None else None)
    else:
        x, w, b = student.logits.reshape(B * T, -1), None, None
        if vocab is not None and x.shape[-1] != vocab:
            x = x[:, :vocab]
    return chunked_logit_loss(fn, x, flat, _teacher_rows(teacher, B * T, vocab), w, b, chunk)


def _teacher_rows(teacher, n: int, vocab: int | None) -> Callable[[int, int], object]:
    """A function giving teacher rows a:b in the form the logit losses take."""
    if teacher is None:
        return lambda a, b: None
    if isinstance(teacher, dict):  # temperature -> TopKTeacher
        return lambda a, b: {k: v[a:b] for k, v in teacher.items()}
    if teacher.final_hidden is not None:  # fused: teacher logits for the chunk only
        h = teacher.final_hidden.reshape(n, -1)
        w, bias = teacher.head_weight, teacher.head_bias
        if vocab is not None and w.shape[0] != vocab:
            w, bias = w[:vocab], (bias[:vocab] if bias is not None else None)
        reuse = []
        rows = lambda a, b: output_logits(h[a:b], w, bias, reuse)  # noqa: E731
        rows.fresh = True  # the loss may overwrite the rows: the next call rewrites them (reuse) or a new tensor
        return rows
    logits = teacher.logits.reshape(n, -1)
    if vocab is not None and logits.shape[-1] != vocab:
        logits = logits[:, :vocab]
    return lambda a, b: logits[a:b]


def _build_feature(term: LossTerm, sc, tc) -> nn.Module:
    if sc is None or tc is None:
        raise ValueError(f"{term.name} needs the student's and teacher's model configs")
    if term.name in ("hidden_mse", "hidden_cosine"):
        lm = term.layer_map if term.layer_map is not None else uniform_layer_map(sc.num_hidden_layers, tc.num_hidden_layers)
        _check_layer_map(lm, sc.num_hidden_layers, tc.num_hidden_layers, first=0)
        return HiddenStateLoss(term.name, lm, sc.hidden_size, tc.hidden_size, normalize=term.normalize)
    lm = term.layer_map if term.layer_map is not None else uniform_layer_map(sc.num_hidden_layers, tc.num_hidden_layers)
    _check_layer_map(lm, sc.num_hidden_layers, tc.num_hidden_layers, first=1)
    return AttentionLoss(term.name, lm, term.head_map, sc.num_attention_heads, tc.num_attention_heads)


def _layers(features, cls) -> tuple[set[int], set[int]]:
    s, t = set(), set()
    for f in features:
        if isinstance(f, cls):
            s |= {p[0] for p in f.layer_map}
            t |= {p[1] for p in f.layer_map}
    return s, t


def term_names(terms: list[LossTerm]) -> list[str]:
    """Log names of the terms: the loss name, suffixed with its index when a name repeats."""
    names = [t.name for t in terms]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets: position t predicts label t + 1; the last position of each row has
    no target. Shifting the labels rather than the logits avoids copying [B, T, V]."""
    pad = labels.new_full((labels.shape[0], 1), ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)
