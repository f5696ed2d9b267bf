"""The chunk loop of the fused linear losses (fused_linear_distill_loss, fused_linear_topk_distill_loss,
fused_linear_sampled_distill_loss), shared by every backend: run_student_chunks is the student side,
run_chunks adds a teacher head.

Per chunk of tokens: both heads' logits in float32 (aten GEMMs), each model's logit_scale / softcap in place,
the smaller vocabulary padded with -inf, then one backend's fused loss kernel gives the row losses
and d(loss)/d(logits) in the same pass; that gradient goes back through softcap and the GEMMs into
d(hidden) (rows of this chunk), d(weight) (float32 accumulator) and d(bias). Only [chunk, V]
buffers exist at a time: the full [tokens, V] logits are never materialized.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from fastdistill.reference.fused_linear_distill_loss import pad_vocab
from fastdistill.ops.common import new_output

# chunk_size=None: rows per chunk such that the float32 [chunk, V] buffers alive at once (student and
# teacher logits, the logits' gradient, one temporary) fit this budget. GPU: 512 MiB keeps the extra
# memory of an 8192 x 128256 bf16 problem near 2 GB (the float32 weight-gradient accumulator is 1 GB
# of it) while chunks of ~256 rows still run the GEMMs near peak.
CHUNK_BUDGET_BYTES = {"cuda": 512 << 20, "cpu": 128 << 20}
_LIVE_BUFFERS = 4
# CPU: the loss runs in calls of LOSS_ROWS_CPU rows (default_loss_rows), so the live buffers are the two
# heads' [chunk, V] logits and one call's [LOSS_ROWS_CPU, V] gradient; 96 MiB gives 352-row chunks at
# V = 32000, the memory that three [256, V] buffers took before (fwd+bwd peak ~0.2x the eager version's).
# Each GEMM call streams its whole [V, H] weight (or accumulator) once, so larger chunks run the GEMMs
# faster (dev CPU, one thread: 256-row chunks took up to ~15% more GEMM time than one 1024-row chunk).
CPU_LOGITS_BUDGET_BYTES = 96 << 20
# Rows per loss-kernel call on CPU; GPU kernels take the whole chunk in one call.
LOSS_ROWS_CPU = 64

# loss_fn(student_logits, teacher_logits, labels, want_grad) -> (row losses float32 already times the
# scale, d(sum of rows)/d(student_logits) float32 or None)
LossFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], bool],
                  tuple[torch.Tensor, Optional[torch.Tensor]]]


def auto_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    if device.type == "cpu":
        rows = max((CPU_LOGITS_BUDGET_BYTES // (vocab * 4) - LOSS_ROWS_CPU) // 2, 1)
    else:
        rows = max(CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"]) // (vocab * 4 * _LIVE_BUFFERS), 1)
    if rows >= 16:
        rows -= rows % 16  # GEMM-friendly multiples
    return max(min(rows, n_rows), 1)


def default_loss_rows(chunk_size: int, device: torch.device) -> int:
    return min(chunk_size, LOSS_ROWS_CPU) if device.type == "cpu" else chunk_size


class _Head:
    """One model's output projection, producing float32 logits (float64 for float64 weights).

    CUDA half dtypes use the GEMMs' float32 output (`out_dtype`): the tensor cores' fp32 accumulator
    is never rounded to bf16/fp16. Elsewhere half weights are upcast once per call (CPU has no
    mixed-dtype GEMM); float32 and float64 run as they are.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias
        self.dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.mixed = weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16)
        self.w = weight if self.mixed else weight.to(self.dtype)
        self.b = None if bias is None else bias.to(self.dtype)

    def logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[rows, V] logits; into `out` (a contiguous float32/float64 [rows, V] workspace) when given."""
        if self.mixed:
            logits = torch.mm(hidden, self.weight.t(), out_dtype=torch.float32)
            return logits if self.b is None else logits.add_(self.b)
        h = hidden.to(self.dtype)
        if out is None:
            return h @ self.w.t() if self.b is None else torch.addmm(self.b, h, self.w.t())
        return torch.mm(h, self.w.t(), out=out) if self.b is None else torch.addmm(self.b, h, self.w.t(), out=out)

    def grad_hidden(self, grad_logits: torch.Tensor, out: torch.Tensor) -> None:
        """out (rows of d(hidden), hidden's dtype) = grad_logits · weight."""
        if self.mixed:
            torch.mm(grad_logits.to(self.weight.dtype), self.weight, out=out)
        elif out.dtype == self.dtype:
            torch.mm(grad_logits, self.w, out=out)
        else:
            out.copy_(grad_logits @ self.w)

    def accumulate_grad_weight(self, acc: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor, *,
                               first: bool = False) -> None:
        """acc (float32, float64 for float64 weights) += grad_logitsᵀ · hidden; first: acc = ... (acc's
        contents are ignored, NaN included: beta = 0 never reads them, so acc may come from torch.empty)."""
        if self.mixed:  # (the out_dtype GEMM's beta = 0 is not relied on: untested off CUDA)
            if first:
                acc.zero_()
            torch.addmm(acc, grad_logits.to(hidden.dtype).t(), hidden, out_dtype=torch.float32, out=acc)
        else:
            acc.addmm_(grad_logits.t(), hidden.to(self.dtype), beta=0 if first else 1)


def new_workspace(head: _Head, n_rows: int, chunk_size: int, vocab: int, device) -> Optional[torch.Tensor]:
    """One [chunk, V] logits buffer that every chunk of a call reuses (None: the head allocates per chunk).
    A fresh buffer per chunk pays the kernel's page faults again on CPU, whose allocator returns blocks this
    large to the OS when freed: writing a fresh [256, 32000] buffer took ~6x as long as rewriting one."""
    if head.mixed or n_rows == 0:
        return None
    return torch.empty((min(chunk_size, n_rows), vocab), dtype=head.dtype, device=device)


def _transform_(logits: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor:
    if logit_scale != 1.0:
        logits.mul_(logit_scale)
    if softcap > 0.0:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _chain_(grad: torch.Tensor, capped: torch.Tensor, logit_scale: float, softcap: float) -> torch.Tensor:
    """d(loss)/d(raw logits) from d(loss)/d(transformed logits), in place.
    d/dx softcap·tanh(x / softcap) = 1 - tanh² = 1 - (capped / softcap)²."""
    if softcap > 0.0:
        t2 = (capped / softcap).square_()
        grad.addcmul_(grad, t2, value=-1.0)
    if logit_scale != 1.0:
        grad.mul_(logit_scale)
    return grad


# chunk_loss(start, end, student_logits, labels, want_grad) -> (row losses of rows [start, end), float32
# already times the scale; d(sum of those rows)/d(student_logits) float32 with >= V_s columns, or None).
# student_logits are the chunk's transformed float32 logits [end - start, V_s]; the loss must not modify them
# (softcap's chain rule reads them afterwards) nor keep them: they live in a workspace the next chunk overwrites.
ChunkLossFn = Callable[[int, int, torch.Tensor, Optional[torch.Tensor], bool],
                       tuple[torch.Tensor, Optional[torch.Tensor]]]


def run_student_chunks(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                       student_bias: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                       row_weights: Optional[torch.Tensor], chunk_loss: ChunkLossFn, *, logit_scale: float,
                       softcap: float, chunk_size: int, need_grad_hidden: bool, need_grad_weight: bool,
                       need_grad_bias: bool, ignore_index: int = -100, loss_rows: Optional[int] = None):
    """The student side of every fused linear loss: per chunk of rows the student's logits (GEMM,
    logit_scale, softcap), `chunk_loss` for the rows' losses and d(loss)/d(logits), then that gradient
    back through softcap and the GEMM into the requested gradients of sum(rows · row_weights).

    Returns (rows [N] float32 (float64 for float64 weights), grad_hidden, grad_weight, grad_bias); a
    gradient not requested is None. Gradients come back in their parameter's dtype; the weight and bias
    gradients are accumulated in float32.

    loss_rows: rows per `chunk_loss` call (None: default_loss_rows). Calls smaller than the chunk keep the
    loss's [rows, V] gradient small while the GEMMs still run on whole chunks: each call's gradient goes into
    the chunk's logits rows it has consumed.
    """
    n_rows = student_hidden.shape[0]
    loss_rows = loss_rows or default_loss_rows(chunk_size, student_weight.device)
    v_s = student_weight.shape[0]
    student = _Head(student_weight, student_bias)
    want_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    rows = new_output((n_rows,), like=student_hidden, dtype=student.dtype)
    grad_hidden = new_output(student_hidden.shape, like=student_hidden) if need_grad_hidden else None
    acc = dict(dtype=student.dtype, device=student_weight.device)  # float32 (float64) accumulators
    # The first chunk writes the weight gradient (beta = 0), later ones add to it: no zero-fill pass over [V, H].
    grad_weight = None
    if need_grad_weight:
        grad_weight = (torch.zeros if n_rows == 0 else torch.empty)(student_weight.shape, **acc)
    grad_bias = torch.zeros(v_s, **acc) if need_grad_bias else None
    workspace = new_workspace(student, n_rows, chunk_size, v_s, student_weight.device)
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        h_s = student_hidden[start:end]
        chunk_labels = None if labels is None else labels[start:end]
        if chunk_labels is not None:  # ignored rows may hold anything (NaN padding): 0 · NaN would leak into
            h_s = h_s.masked_fill((chunk_labels == ignore_index).unsqueeze(-1), 0)  # dW and softcap's chain rule
        out = None if workspace is None else workspace[:end - start]
        s = _transform_(student.logits(h_s, out), logit_scale, softcap)
        whole = loss_rows >= end - start  # one loss call: its gradient is the chunk's
        grad = None if whole else s  # several calls: each one's logits rows are spent, its gradient goes there
        for a in range(start, end, loss_rows):
            b = min(a + loss_rows, end)
            s_ab = s[a - start:b - start]
            loss_ab, grad_ab = chunk_loss(a, b, s_ab, None if labels is None else chunk_labels[a - start:b - start],
                                          want_grad)
            rows[a:b] = loss_ab
            if not want_grad:
                continue
            grad_ab = grad_ab[:, :v_s] if grad_ab.shape[-1] != v_s else grad_ab
            if row_weights is not None:
                grad_ab.mul_(row_weights[a:b].unsqueeze(-1))
            _chain_(grad_ab, s_ab, logit_scale, softcap)
            if whole:
                grad = grad_ab
            else:
                s_ab.copy_(grad_ab)
        if not want_grad:
            continue
        if grad_hidden is not None:
            student.grad_hidden(grad, grad_hidden[start:end])
        if grad_weight is not None:
            student.accumulate_grad_weight(grad_weight, grad, h_s, first=start == 0)
        if grad_bias is not None:
            grad_bias.add_(grad.sum(0))
    if grad_weight is not None:
        grad_weight = grad_weight.to(student_weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(student_bias.dtype)
    return rows, grad_hidden, grad_weight, grad_bias


def run_chunks(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
               teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: Optional[torch.Tensor],
               labels: Optional[torch.Tensor], row_weights: Optional[torch.Tensor], loss_fn: LossFn, *,
               logit_scale: float, softcap: float, teacher_logit_scale: float, teacher_softcap: float,
               chunk_size: int, need_grad_hidden: bool,
               need_grad_weight: bool, need_grad_bias: bool, ignore_index: int = -100,
               loss_rows: Optional[int] = None):
    """run_student_chunks with a teacher head: per chunk the teacher's logits (teacher_logit_scale,
    teacher_softcap; softcap 0: none), the smaller vocabulary padded with -inf, then `loss_fn`."""
    vocab = max(student_weight.shape[0], teacher_weight.shape[0])
    teacher = _Head(teacher_weight, teacher_bias)
    workspace = new_workspace(teacher, teacher_hidden.shape[0], chunk_size, teacher_weight.shape[0],
                              teacher_weight.device)

    n_rows = teacher_hidden.shape[0]
    chunk = [-1, None]  # (first row, logits) of the teacher's current chunk, shared by its loss calls

    def chunk_loss(start, end, s, chunk_labels, want_grad):
        first = start - start % chunk_size  # run_student_chunks' chunks start at multiples of chunk_size
        if chunk[0] != first:
            last = min(first + chunk_size, n_rows)
            out = None if workspace is None else workspace[:last - first]
            with torch.no_grad():
                t = teacher.logits(teacher_hidden[first:last], out)
            chunk[:] = first, _transform_(t, teacher_logit_scale, teacher_softcap)
        t = chunk[1][start - first:end - first]
        return loss_fn(pad_vocab(s, vocab), pad_vocab(t, vocab), chunk_labels, want_grad)

    return run_student_chunks(student_hidden, student_weight, student_bias, labels, row_weights, chunk_loss,
                              logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size,
                              need_grad_hidden=need_grad_hidden, need_grad_weight=need_grad_weight,
                              need_grad_bias=need_grad_bias, ignore_index=ignore_index, loss_rows=loss_rows)
