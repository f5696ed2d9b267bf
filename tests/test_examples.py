"""The README's LLM example runs (online fused-linear and offline top-k cache) and lowers the KL."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import distill_tiny_lm  # noqa: E402


def test_distill_tiny_lm_lowers_heldout_kl():
    results = distill_tiny_lm.main(["--steps", "12", "--vocab", "128", "--k", "8"])
    for mode, (before, after) in results.items():
        assert after < 0.9 * before, (mode, before, after)
