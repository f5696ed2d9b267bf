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
