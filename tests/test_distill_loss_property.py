"""Property-based: random shapes and options, every kernel backend vs the float64 reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import KERNEL_BACKENDS, backend_device
from distill_cases import DIVERGENCES, check_against_oracle
from fastdistill.testing import make_labels, make_logits

OPTIONS = st.fixed_dictionaries({
    "divergence": st.sampled_from(DIVERGENCES),
    "temperature": st.floats(0.25, 8.0),
    "beta": st.floats(0.0, 1.0),
    "skew": st.floats(0.0, 1.0),
    "soft_weight": st.floats(0.0, 2.0),
    "hard_weight": st.sampled_from([0.0, 0.5, 1.0]),
    "scale_t2": st.booleans(),
    "reduction": st.sampled_from(["batchmean", "sum", "none"]),
})
# The triton interpreter is slow on CPU: fewer examples there (a GPU run takes the full count).
EXAMPLES = {"cpu": 150, "cuda": 150, "triton": 150 if torch.cuda.is_available() else 25}


def _property(backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None)
    @given(lead=st.lists(st.integers(0, 4), min_size=1, max_size=2), vocab=st.integers(1, 300),
           dtype=st.sampled_from([torch.float32, torch.bfloat16]), options=OPTIONS, seed=st.integers(0, 2**30),
           with_labels=st.booleans())
    def case(lead, vocab, dtype, options, seed, with_labels):
        device = backend_device(backend)
        shape = (*lead, vocab)
        student = make_logits(shape, dtype=dtype, device=device, seed=seed)
        teacher = make_logits(shape, dtype=dtype, device=device, seed=seed + 1)
        labels = make_labels(tuple(lead), vocab, seed=seed, device=device) if with_labels else None
        if labels is None:
            options = dict(options, hard_weight=0.0)
        check_against_oracle(backend, student, teacher, labels, seed=seed, **options)

    return case


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_random_shapes_and_options(backend):
    _property(backend)()
