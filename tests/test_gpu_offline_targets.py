"""GPU checks (benchmarks/gpu_check.sh) of the cuda backend of the offline-target losses: topk_distill_loss and
sampled_distill_loss (csrc/cuda/topk_distill_loss.cu, sampled_distill_loss.cu) and their fused linear forms,
against the float64 references: every divergence and tail, dtypes, V = 1271 to 262144, ignored rows, k = V and
k > V, duplicates in either order; and what the kernels do alone: NaN rows for bad ids, determinism, every
output element written. The sampled and fused helpers are imported inside the tests (their modules are new)."""
import os

import pytest
import torch

from fastdistill.ops.topk_distill_loss import topk_distill_loss
from fastdistill.reference.topk_distill_loss import topk_distill_loss_ref
from fastdistill.testing import make_labels, make_logits
from topk_cases import DIVERGENCES, TAILS, check_topk_against_oracle, make_topk

pytestmark = pytest.mark.gpu
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DEV = "cuda"


def sampled_helpers():
    from test_sampled_distill_loss import check_against_oracle, make_sampled
    return check_against_oracle, make_sampled


def run_op(kind, student, lp, ids, labels=None, compute_grad=True, **options):
    """The raw cuda op: (row losses, gradient), with the public functions' defaults."""
    scale = torch.ones(1, device=student.device)
    t, soft, hard = options.get("temperature", 1.0), options.get("soft_weight", 1.0), options.get("hard_weight", 0.0)
    if kind == "topk":
        return torch.ops.fastdistill.topk_distill_loss_cuda(
            student, lp, ids, labels, scale, options.get("tail", 1), options.get("divergence", 0), t, 0.5, soft, hard,
            True, -100, compute_grad)
    return torch.ops.fastdistill.sampled_distill_loss_cuda(student, lp, ids, labels, scale, t, soft, hard, True, -100,
                                                           compute_grad)


# ---- topk_distill_loss ----

@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_every_divergence_and_tail(tail, divergence, seed):
    """V = 1271, k = 37, bf16 student, fp16 cache, int32 ids, ignored rows, hard labels at T = 2, per-row upstream."""
    student = make_logits((9, 1271), dtype=BF16, device=DEV, seed=seed)
    lp, ids = make_topk((9, 1271), 37, temperature=2.0, seed=seed + 1, device=DEV, dtype=F16, index_dtype=torch.int32)
    labels = make_labels((9,), 1271, seed=seed, device=DEV)
    check_topk_against_oracle("cuda", student, lp, ids, labels, seed=seed, tail=tail, divergence=divergence,
                              temperature=2.0, hard_weight=0.3, reduction="none")


@pytest.mark.parametrize("student_dtype", [F32, BF16, F16])
def test_topk_dtypes(student_dtype, seed):
    """Every student x log-prob dtype x id dtype, both tails."""
    student = make_logits((5, 1271), dtype=student_dtype, device=DEV, seed=seed)
    for lp_dtype in (F32, BF16, F16):
        for index_dtype in (torch.int32, torch.int64):
            lp, ids = make_topk((5, 1271), 16, seed=seed + 1, device=DEV, dtype=lp_dtype, index_dtype=index_dtype)
            for tail in TAILS:
                check_topk_against_oracle("cuda", student, lp, ids, seed=seed, tail=tail, divergence="kl",
                                          reduction="sum")


@pytest.mark.parametrize("vocab", [128256, 262144])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("divergence", ["kl", "jsd", "skew_reverse_kl"])
def test_topk_llm_vocab(vocab, tail, divergence, seed):
    student = make_logits((6, vocab), dtype=BF16, device=DEV, seed=seed)
    lp, ids = make_topk((6, vocab), 64, temperature=2.0, seed=seed + 1, device=DEV, dtype=F16,
                        index_dtype=torch.int32)
    labels = make_labels((6,), vocab, seed=seed, device=DEV)
    check_topk_against_oracle("cuda", student, lp, ids, labels, seed=seed, tail=tail, divergence=divergence,
                              temperature=2.0, hard_weight=0.3)


def test_topk_bucket_above_default_shared_memory(seed):
    """V = 500000: the bucket tail's id mask (a bit per token, 62.5 KiB) needs the shared-memory opt-in."""
    student = make_logits((3, 500000), dtype=BF16, device=DEV, seed=seed)
    lp, ids = make_topk((3, 500000), 64, seed=seed + 1, device=DEV, dtype=F16)
    check_topk_against_oracle("cuda", student, lp, ids, seed=seed, tail="bucket", divergence="kl")


@pytest.mark.parametrize("tail", TAILS)
def test_topk_extreme_logits_tiny_rest_and_k_equals_v(tail, seed):
    """+-1e4 spikes (a spike on an id leaves a rest of ~exp(-1e4) that still needs its exact log q_rest),
    -inf holes, and k == V (no rest bucket)."""
    for kind in ("extreme", "neginf"):
        student = make_logits((8, 999), device=DEV, seed=seed, kind=kind)
        lp, ids = make_topk((8, 999), 32, seed=seed + 1, device=DEV)
        student[0, ids[0, 0]] = 1e4
        check_topk_against_oracle("cuda", student, lp, ids, seed=seed, tail=tail, divergence="reverse_kl")
    student = make_logits((4, 50), device=DEV, seed=seed)
    lp, ids = make_topk((4, 50), 50, seed=seed + 1, device=DEV)
    check_topk_against_oracle("cuda", student, lp, ids, seed=seed, tail=tail, divergence="tvd")


def test_topk_strided_views(seed):
    """Row strides above V and above k (the causal-LM slice pattern) are read in place."""
    big = make_logits((7, 1300), dtype=BF16, device=DEV, seed=seed)
    student = big[:, 5:1276]
    lp_big, ids_big = make_topk((7, 1271), 40, seed=seed + 1, device=DEV)
    lp, ids = lp_big[:, :24], ids_big[:, :24]
    assert student.stride(0) == 1300 and lp.stride(0) == 40
    for tail in TAILS:
        check_topk_against_oracle("cuda", student, lp, ids, seed=seed, tail=tail, divergence="jsd", beta=0.3)


def test_topk_bad_ids_give_nan_rows(seed):
    """A kernel cannot raise: an id outside [0, V) (either side) gives its row a NaN loss and gradient row, like
    the triton kernel and the reference; the other rows are unchanged. The bucket tail also marks a repeated id."""
    student = make_logits((5, 300), device=DEV, seed=seed)
    lp, ids = make_topk((5, 300), 8, seed=seed + 1, device=DEV)
    ids[1, 3], ids[3, 0] = 300, -1
    for tail in (0, 1):
        loss, grad = run_op("topk", student, lp, ids, tail=tail)
        ref = topk_distill_loss_ref(student, lp, ids, tail=TAILS[tail], reduction="none")
        assert torch.equal(torch.isnan(loss), torch.isnan(ref)) and torch.isnan(loss[[1, 3]]).all()
        assert torch.isnan(grad[[1, 3]]).all() and torch.isfinite(grad[[0, 2, 4]]).all()
        torch.testing.assert_close(loss[[0, 2, 4]], ref[[0, 2, 4]].float(), rtol=1e-5, atol=1e-6)
    dup = ids.clone()
    dup[2, 1] = dup[2, 0]
    loss, grad = run_op("topk", student, lp, dup, tail=1)
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all() and torch.isfinite(loss[[0, 4]]).all()


def test_topk_nan_rule_matches_reference(seed):
    """NaN in a row's log-probs poisons it; +inf in the student off the ids poisons it only where the loss reads
    the whole row (bucket tail, hard label)."""
    student = make_logits((4, 200), device=DEV, seed=seed)
    lp, ids = make_topk((4, 200), 8, seed=seed + 1, device=DEV)
    lp[0, 2] = float("nan")
    off = next(j for j in range(200) if j not in ids[1].tolist())
    student[1, off] = float("inf")
    for tail in TAILS:
        out = topk_distill_loss(student, lp, ids, tail=tail, reduction="none", backend="cuda")
        ref = topk_distill_loss_ref(student.double(), lp.double(), ids, tail=tail, reduction="none")
        assert torch.equal(torch.isnan(out), torch.isnan(ref)), (tail, out, ref)
        assert torch.isnan(out[0]) and torch.isnan(out[1]) == (tail == "bucket")


def test_topk_outputs_fully_written_and_empty_inputs(seed):
    """Outputs start as NaN (FASTDISTILL_POISON=1): every element is written, ignored rows are exact zeros, loss-only
    calls return an empty gradient; no rows and all-ignored rows give zeros."""
    assert os.environ.get("FASTDISTILL_POISON") == "1"
    student = make_logits((6, 777), dtype=F16, device=DEV, seed=seed)
    lp, ids = make_topk((6, 777), 12, seed=seed + 1, device=DEV)
    labels = torch.tensor([3, -100, 5, -100, 7, 9], device=DEV)
    for tail in (0, 1):
        for hard in (0.0, 0.5):
            loss, grad = run_op("topk", student, lp, ids, labels, tail=tail, hard_weight=hard, temperature=1.5)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            assert torch.all(loss[[1, 3]] == 0) and torch.all(grad[[1, 3]] == 0)
            loss_only, empty = run_op("topk", student, lp, ids, labels, compute_grad=False, tail=tail, hard_weight=hard,
                                      temperature=1.5)
            assert empty.numel() == 0 and torch.equal(loss_only, loss)
    loss, grad = run_op("topk", student[:0], lp[:0], ids[:0])
    assert loss.shape == (0,) and grad.shape == (0, 777)
    s = student.detach().requires_grad_(True)
    out = topk_distill_loss(s, lp, ids, labels=torch.full((6,), -100, device=DEV), tail="bucket", backend="cuda")
    out.backward()
    assert out.item() == 0 and torch.all(s.grad == 0)


def test_topk_deterministic(seed):
    student = make_logits((64, 50257), dtype=BF16, device=DEV, seed=seed)
    lp, ids = make_topk((64, 50257), 64, seed=seed + 1, device=DEV, dtype=F16)
    labels = make_labels((64,), 50257, seed=seed, device=DEV)
    for tail in (0, 1):
        runs = [run_op("topk", student, lp, ids, labels, tail=tail, divergence=2, hard_weight=0.2, temperature=2.0)
                for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_topk_opcheck_and_compile(seed):
    student = make_logits((5, 301), device=DEV, seed=seed).requires_grad_(True)
    lp, ids = make_topk((5, 301), 7, seed=seed + 1, device=DEV)
    scale = torch.full((1,), 0.5, device=DEV)
    torch.library.opcheck(torch.ops.fastdistill.topk_distill_loss_cuda,
                          (student, lp, ids, None, scale, 1, 2, 2.0, 0.5, 1.0, 0.0, True, -100, True))
    fn = torch.compile(lambda s: topk_distill_loss(s, lp, ids, tail="bucket", backend="cuda"), fullgraph=True)
    out = fn(student)
    ref = topk_distill_loss(student, lp, ids, tail="bucket", backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


# ---- sampled_distill_loss ----

@pytest.mark.parametrize("student_dtype", [F32, BF16, F16])
def test_sampled_against_reference(student_dtype, seed):
    """k = 1, k = 24 with duplicates (shuffled: the scan count), k = 1500 > V; every log-prob and id dtype;
    ignored rows, hard labels, T."""
    check, make_sampled = sampled_helpers()
    student = make_logits((9, 1271), dtype=student_dtype, device=DEV, seed=seed)
    labels = make_labels((9,), 1271, seed=seed, device=DEV)
    for k, lp_dtype, index_dtype in ((1, F32, torch.int64), (24, F16, torch.int32), (1500, BF16, torch.int64)):
        lp, ids = make_sampled((9, 1271), k, temperature=1.5, seed=seed + k, device=DEV, dtype=lp_dtype,
                               index_dtype=index_dtype)
        check("cuda", student, lp, ids, labels, seed=seed, temperature=1.5, hard_weight=0.4, reduction="none")
        check("cuda", student, lp, ids, seed=seed, reduction="batchmean")


@pytest.mark.parametrize("vocab", [128256, 262144])
def test_sampled_llm_vocab_sorted_and_shuffled(vocab, seed):
    """The sampler's sorted draws (binary-search count) and the same draws shuffled (scan count) give the same
    gradient bits: each entry's value does not depend on the draws' order."""
    from fastdistill.cache.sampling import sample_teacher_targets

    check, _ = sampled_helpers()
    student = make_logits((6, vocab), dtype=BF16, device=DEV, seed=seed)
    teacher = make_logits((6, vocab), dtype=BF16, device=DEV, seed=seed + 1)
    lp, ids = sample_teacher_targets(teacher, 64, 2.0, generator=torch.Generator(DEV).manual_seed(seed))
    labels = make_labels((6,), vocab, seed=seed, device=DEV)
    _, g_sorted = check("cuda", student, lp, ids, labels, seed=seed, temperature=2.0, hard_weight=0.3)
    order = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)).argsort(-1).to(DEV)
    _, g_shuffled = check("cuda", student, lp.gather(-1, order), ids.gather(-1, order), labels, seed=seed,
                          temperature=2.0, hard_weight=0.3)
    assert torch.equal(g_sorted, g_shuffled)


def test_sampled_bad_inputs_give_nan_rows(seed):
    """Ids outside [0, V) and a -inf log-prob (a drawn token has probability > 0) poison their rows only."""
    from fastdistill.reference.sampled_distill_loss import sampled_distill_loss_ref

    _, make_sampled = sampled_helpers()
    student = make_logits((5, 300), device=DEV, seed=seed)
    lp, ids = make_sampled((5, 300), 16, seed=seed + 1, device=DEV)
    ids[1, 3], ids[3, 0] = 300, -2
    lp[4, 5] = float("-inf")
    loss, grad = run_op("sampled", student, lp, ids)
    ref = sampled_distill_loss_ref(student.double(), lp.double(), ids, reduction="none")
    assert torch.equal(torch.isnan(loss), torch.isnan(ref)) and torch.isnan(loss[[1, 3, 4]]).all()
    assert torch.isnan(grad[[1, 3, 4]]).all() and torch.isfinite(grad[[0, 2]]).all()


def test_sampled_fully_written_and_deterministic(seed):
    """Many duplicates (k = 512 draws over V = 50) add up deterministically; poisoned outputs all written."""
    _, make_sampled = sampled_helpers()
    student = make_logits((40, 50), dtype=BF16, device=DEV, seed=seed)
    lp, ids = make_sampled((40, 50), 512, seed=seed + 1, device=DEV, dtype=F16)
    labels = make_labels((40,), 50, seed=seed, device=DEV)
    runs = [run_op("sampled", student, lp, ids, labels, hard_weight=0.3, temperature=2.0) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert torch.isfinite(runs[0][0]).all() and torch.isfinite(runs[0][1]).all()
    ignored = labels == -100
    assert torch.all(runs[0][0][ignored] == 0) and torch.all(runs[0][1][ignored] == 0)
    scale = torch.full((1,), 0.25, device=DEV)
    torch.library.opcheck(torch.ops.fastdistill.sampled_distill_loss_cuda,
                          (student.float().requires_grad_(True), lp, ids, labels, scale, 2.0, 1.0, 0.3, True, -100,
                           True))


# ---- the fused linear forms (cuBLAS GEMMs + these kernels) ----

@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fused_linear_cuda_matches_materialized(dtype, seed):
    """Both kinds vs the reference loss on materialized float64 logits: loss and d(hidden, weight, bias)."""
    from fused_targets_cases import check, make_problem

    labels = make_labels((19,), 1271, seed=seed, device=DEV)
    p, lp, ids = make_problem(seed, v=1271, k=16, temperature=2.0, dtype=dtype, device=DEV)
    for tail in TAILS:
        check("topk", "cuda", p, lp, ids, labels, seed=seed, tail=tail, divergence="jsd", temperature=2.0,
              hard_weight=0.3, chunk_size=7, softcap=4.0)
    p, lp, ids = make_problem(seed, v=1271, k=48, kind="sampled", temperature=2.0, dtype=dtype, device=DEV)
    check("sampled", "cuda", p, lp, ids, labels, seed=seed, temperature=2.0, hard_weight=0.3, chunk_size=7,
          reduction="none")


def test_fused_linear_cuda_llm_vocab(seed):
    from fused_targets_cases import check, make_problem

    p, lp, ids = make_problem(seed, n=64, h=256, v=128256, k=64, dtype=BF16, device=DEV)
    check("topk", "cuda", p, lp, ids, seed=seed, tail="bucket", divergence="kl", chunk_size=48)
    p, lp, ids = make_problem(seed, n=64, h=256, v=128256, k=64, kind="sampled", dtype=BF16, device=DEV)
    check("sampled", "cuda", p, lp, ids, seed=seed, chunk_size=48)
