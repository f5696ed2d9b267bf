"""GPU-only checks (run by benchmarks/gpu_check.sh): LLM-scale vocabularies on the triton and cuda backends."""
import pytest
import torch

import fastdistill
from distill_cases import check_against_oracle
from fastdistill.testing import make_labels, make_logits

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["triton", "cuda"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd", "skew_kl", "mse"])
@pytest.mark.parametrize("vocab", [32000, 128256, 262144])
def test_large_vocab_matches_reference(backend, divergence, vocab, seed):
    student = make_logits((6, vocab), dtype=torch.bfloat16, device="cuda", seed=seed)
    teacher = make_logits((6, vocab), dtype=torch.bfloat16, device="cuda", seed=seed + 1)
    labels = make_labels((6,), vocab, seed=seed, device="cuda")
    check_against_oracle(backend, student, teacher, labels, seed=seed, divergence=divergence, temperature=2.0,
                         hard_weight=0.3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_deterministic_and_backends_agree(backend, seed):
    s = make_logits((64, 50257), dtype=torch.bfloat16, device="cuda", seed=seed)
    t = make_logits((64, 50257), dtype=torch.bfloat16, device="cuda", seed=seed + 1)
    outs = []
    for _ in range(2):
        x = s.clone().requires_grad_(True)
        loss = fastdistill.distill_loss(x, t, divergence="jsd", temperature=2.0, backend=backend)
        loss.backward()
        outs.append((loss, x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    other = fastdistill.distill_loss(s, t, divergence="jsd", temperature=2.0, backend="reference")
    torch.testing.assert_close(outs[0][0], other, rtol=1e-5, atol=1e-6)


def test_auto_picks_a_gpu_kernel():
    s = torch.randn(4, 100, device="cuda")
    name = fastdistill.dispatch.select("distill_loss", "auto", s.device, (s.dtype,))
    assert name in GPU_BACKENDS, fastdistill.info()


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fused_linear_on_gpu(backend, dtype, reduction, seed):
    """The CUDA GEMM paths (bf16 with float32 out_dtype, float32 weight-gradient accumulation) vs the oracle."""
    from test_fused_linear_distill_loss import check, make_problem

    problem = make_problem(seed, n=300, h_s=64, h_t=96, v_s=50257, v_t=50000, dtype=dtype, device="cuda")
    labels = make_labels((300,), 50000, seed=seed, device="cuda")
    check(backend, problem, labels, seed=seed, divergence="jsd", temperature=2.0, hard_weight=0.3, softcap=30.0,
          reduction=reduction, chunk_size=128)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_linear_gpu_deterministic(backend, seed):
    from test_fused_linear_distill_loss import make_problem

    p = make_problem(seed, n=1000, h_s=256, h_t=512, v_s=32000, v_t=32000, dtype=torch.bfloat16, device="cuda")
    outs = []
    for _ in range(2):
        inputs = {k: v.detach().requires_grad_(k.startswith("student")) for k, v in p.items()}
        loss = fastdistill.fused_linear_distill_loss(**inputs, divergence="kl", backend=backend)
        loss.backward()
        outs.append([loss, inputs["student_hidden"].grad, inputs["student_weight"].grad])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
def test_topk_large_vocab_triton(tail, divergence, seed):
    from topk_cases import check_topk_against_oracle, make_topk

    student = make_logits((6, 128256), dtype=torch.bfloat16, device="cuda", seed=seed)
    lp, ids = make_topk((6, 128256), 64, temperature=2.0, seed=seed + 1, device="cuda", dtype=torch.float16,
                        index_dtype=torch.int32)
    labels = make_labels((6,), 128256, seed=seed, device="cuda")
    check_topk_against_oracle("triton", student, lp, ids, labels, seed=seed, tail=tail, divergence=divergence,
                              temperature=2.0, hard_weight=0.3)
