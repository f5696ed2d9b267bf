"""The custom ops of the fused linear losses over cached teacher targets (fused_linear_topk_distill_loss,
fused_linear_sampled_distill_loss) and what their public functions share.

Custom ops (one per kernel backend and kind, all running fused_linear_chunks.run_student_chunks):
    fastdistill::fused_linear_{topk,sampled}_distill_loss_cpu     aten GEMMs + the C++ {topk,sampled} kernel
    fastdistill::fused_linear_{topk,sampled}_distill_loss_cuda    cuBLAS GEMMs (aten) + the CUDA kernel
    fastdistill::fused_linear_{topk,sampled}_distill_loss_triton  cuBLAS GEMMs (aten) + the Triton kernel
Per chunk of tokens the student's float32 logits and the chunk's rows of the targets go through the
unfused loss's kernel op ({topk,sampled}_distill_loss_<backend>), which gives the row losses and
d(loss)/d(logits) in one pass. The reference backend is plain PyTorch per chunk under checkpointing
(fastdistill/reference/fused_linear_topk_distill_loss.py). Reductions and autograd: fused_linear_common.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fastdistill import dispatch
from fastdistill.ops.common import native, row_labels
from fastdistill.ops.fused_linear_chunks import CHUNK_BUDGET_BYTES, run_student_chunks
from fastdistill.ops.fused_linear_common import FusedLossOps, check_fused_options, check_head
from fastdistill.ops.loss_common import check_label_values, row_scale
from fastdistill.ops.sampled_distill_loss import sampled_distill_loss_triton
from fastdistill.ops.topk_distill_loss import topk_distill_loss_triton
from fastdistill.reference.fused_linear_topk_distill_loss import fused_linear_targets_loss_chunked_ref

# chunk_size=None: rows per chunk such that the float32 [chunk, V] buffers alive at once fit the two-head op's
# budget. Unlike that op there is no teacher logits buffer: the student's logits, the kernel's gradient of
# them and softcap's chain-rule temporary, so 3 buffers (not 4) per row of V. Measured on the 2-core dev CPU
# at 2048 x 1024 x 32000, fp32, k 64 (benchmarks/results/fused_linear_topk_cpu_chunks.csv, interleaved runs,
# time paired with materialized logits + topk_distill_loss): 80-row chunks 1.64x the time at 0.30x the
# memory, 160 rows 1.14x at 0.34x, 320 rows 0.97x at 0.37x (a loaded shared machine; a quieter run,
# fused_linear_topk_cpu_quiet.csv: 336 rows 1.18x, 1024 rows 1.10x at 0.54x). The memory floor is the float32
# weight and hidden gradients (133 MiB, 0.27x of materialized's 500 MiB), so smaller chunks buy little.
TARGETS_BUDGET_BYTES = CHUNK_BUDGET_BYTES
_LIVE_BUFFERS = 3
_TENSORS = ("Tensor student_hidden, Tensor student_weight, Tensor? student_bias, Tensor teacher_logprobs, "
            "Tensor teacher_indices, Tensor? labels, Tensor scale, Tensor? row_weights")


def targets_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    budget = TARGETS_BUDGET_BYTES.get(device.type, TARGETS_BUDGET_BYTES["cpu"])
    rows = max(budget // (vocab * 4 * _LIVE_BUFFERS), 1)
    if rows >= 16:
        rows -= rows % 16  # GEMM-friendly multiples
    return max(min(rows, n_rows), 1)


@dataclass(frozen=True)
class TopkConfig:
    tail: int
    divergence: int
    temperature: float
    weight: float
    soft_weight: float
    hard_weight: float
    scale_t2: bool
    ignore_index: int
    logit_scale: float
    softcap: float  # 0: none
    chunk_size: int
    reduce: bool
    need_grad_hidden: bool
    need_grad_weight: bool
    need_grad_bias: bool

    def loss_args(self):  # the options of the topk_distill_loss_<backend> ops
        return (self.tail, self.divergence, self.temperature, self.weight, self.soft_weight, self.hard_weight,
                self.scale_t2, self.ignore_index)


@dataclass(frozen=True)
class SampledConfig:
    temperature: float
    soft_weight: float
    hard_weight: float
    scale_t2: bool
    ignore_index: int
    logit_scale: float
    softcap: float  # 0: none
    chunk_size: int
    reduce: bool
    need_grad_hidden: bool
    need_grad_weight: bool
    need_grad_bias: bool

    def loss_args(self):  # the options of the sampled_distill_loss_<backend> ops
        return self.temperature, self.soft_weight, self.hard_weight, self.scale_t2, self.ignore_index


def _kernel_op(kind: str, backend: str):
    if backend != "triton":
        return native(f"{kind}_distill_loss_{backend}")
    return topk_distill_loss_triton if kind == "topk" else sampled_distill_loss_triton


def _rows_of(kind: str):
    def forward_rows(backend: str, tensors: tuple, cfg):
        sh, sw, sb, logprobs, indices, labels, scale, row_weights = tensors
        op, args = _kernel_op(kind, backend), cfg.loss_args()

        def chunk_loss(start, end, s, chunk_labels, want_grad):
            rows, grad = op(s, logprobs[start:end], indices[start:end], chunk_labels, scale, *args, want_grad)
            return rows, (grad if want_grad else None)
        return run_student_chunks(
            sh, sw, sb, labels, row_weights, chunk_loss, logit_scale=cfg.logit_scale, softcap=cfg.softcap,
            chunk_size=cfg.chunk_size, need_grad_hidden=cfg.reduce and cfg.need_grad_hidden,
            need_grad_weight=cfg.reduce and cfg.need_grad_weight, need_grad_bias=cfg.reduce and cfg.need_grad_bias,
            ignore_index=cfg.ignore_index)
    return forward_rows


OPS = {"topk": FusedLossOps("fused_linear_topk_distill_loss", _TENSORS, TopkConfig, _rows_of("topk")),
       "sampled": FusedLossOps("fused_linear_sampled_distill_loss", _TENSORS, SampledConfig, _rows_of("sampled"))}


def check_student(student_hidden, student_weight, student_bias, chunk_size, logit_scale, softcap) -> torch.Tensor:
    """The head and fused options; returns a zero-memory stand-in for the student's (..., V) logits, for the
    unfused loss's target checks (target shapes = the hidden states' leading shape + (k,))."""
    check_head("student", student_hidden, student_weight, student_bias)
    check_fused_options(chunk_size, logit_scale, softcap)
    lead = student_hidden.shape[:-1]
    return student_hidden.new_empty(()).expand(*lead, student_weight.shape[0])


def run_targets_loss(kind: str, student_hidden, student_weight, student_bias, logprobs, indices, labels, *,
                     loss_options: tuple, chunk_size, logit_scale, softcap, ignore_index, reduction, num_items,
                     backend: str, reference_options: dict) -> torch.Tensor:
    """The checked call of a fused targets loss: dispatch, then the op (or the chunked reference).
    loss_options: the config fields before logit_scale; reference_options: the reference loss's options."""
    V = student_weight.shape[0]
    check_label_values(labels, V, int(ignore_index))
    kernel_logprobs = logprobs if logprobs.dtype in dispatch.KERNEL_DTYPES else logprobs.float()
    name = dispatch.select(f"fused_linear_{kind}_distill_loss", backend, student_hidden.device,
                           (student_hidden.dtype, kernel_logprobs.dtype))
    lead = student_hidden.shape[:-1]
    n = math.prod(lead)
    # Targets are small ([tokens, k]): contiguous rows, so every chunk is a plain slice.
    sh = student_hidden.reshape(n, student_hidden.shape[-1])
    sh = sh if sh.stride(-1) == 1 else sh.contiguous()
    k = logprobs.shape[-1]
    lp = (logprobs if name == "reference" else kernel_logprobs).detach().reshape(n, k).contiguous()
    ids = indices.reshape(n, k).contiguous()
    rows_labels = row_labels(labels)
    scale = row_scale(reduction, num_items, rows_labels, n, ignore_index, sh.device)
    rows = int(chunk_size) if chunk_size is not None else targets_chunk_size(n, V, sh.device)
    if name == "reference":
        out = fused_linear_targets_loss_chunked_ref(kind, sh, student_weight, student_bias, lp, ids, rows_labels,
                                                    scale, chunk_size=rows, logit_scale=float(logit_scale),
                                                    softcap=softcap, **reference_options)
        return out.sum() if reduction != "none" else out.view(lead)
    grad_on = torch.is_grad_enabled()
    ops = OPS[kind]
    cfg = ops.config(*loss_options, float(logit_scale), 0.0 if softcap is None else float(softcap), rows,
                     reduction != "none", grad_on and student_hidden.requires_grad,
                     grad_on and student_weight.requires_grad,
                     grad_on and student_bias is not None and student_bias.requires_grad)
    loss = ops.call(name, (sh, student_weight, student_bias, lp, ids, rows_labels, scale, None), cfg)[0]
    return loss if reduction != "none" else loss.view(lead)
