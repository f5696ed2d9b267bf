"""benchmarks/bench_offline_targets.py: its --quick mode runs every target end to end and writes a CSV with
finite numbers, a PNG plot and the markdown table; its sampled targets are those a cache stores."""
import csv
import importlib.util
import math
import os

import pytest
import torch

from fastdistill.cache.sampling import sample_teacher_targets, sequence_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_offline_targets",
                                                  os.path.join(ROOT, "benchmarks", "bench_offline_targets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore:fastdistill.sampled_distill_loss. using the slow reference")
def test_quick_run_writes_csv_plot_and_table(bench, tmp_path):
    threads = torch.get_num_threads()
    try:
        out = bench.main(["--quick", "--csv-dir", str(tmp_path), "--plot", str(tmp_path / "plot.png")])
    finally:
        torch.set_num_threads(threads)  # main() sets its own thread count
    with open(tmp_path / "offline_targets_cpu.csv") as f:
        rows = list(csv.DictReader(f))
    per_seed = [r for r in rows if r["seed"] != "mean"]
    means = [r for r in rows if r["seed"] == "mean"]
    sparse = [(t, k) for t in bench.SPARSE for k in ("4", "8")]
    expected = sorted([("full", ""), ("ce", "")] + sparse)
    assert sorted((r["target"], r["k"]) for r in per_seed) == expected  # quick: one seed
    assert sorted((r["target"], r["k"]) for r in means) == expected
    for r in rows:
        for key in ("heldout_kl", "top1_agreement", "step_ms", "loss_ms"):
            assert math.isfinite(float(r[key])), (r["target"], r["k"], key, r[key])
        assert 0.0 <= float(r["top1_agreement"]) <= 1.0
        assert float(r["heldout_kl"]) >= 0.0
    full = next(r for r in per_seed if r["target"] == "full")
    assert int(full["bytes_per_token"]) == 2 * 512  # fp16 logits, V 512 in quick mode
    assert all(int(r["bytes_per_token"]) == 6 * int(r["k"]) for r in per_seed if r["k"])
    with open(tmp_path / "plot.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "plot.png") > 10_000  # axes, lines and legend, not an empty canvas
    for target in bench.TARGETS:
        assert f"| {target} |" in out["table"]


def test_sampled_targets_are_the_caches_frozen_draws(bench):
    """One draw per position with the cache's per-sequence generator, not a fresh draw per call."""
    torch.manual_seed(0)
    TinyLM = bench.load_tiny_lm()
    teacher = TinyLM(64, dim=16, layers=1, heads=2, head_scale=8.0).eval()
    data = torch.randint(0, 64, (5, 8))
    cache = bench.build_cache(teacher, data, [3, 6], [7], batch=2)
    with torch.no_grad():
        logits = teacher(data).float()
    for k in (3, 6):
        lp, ids = cache["sampled"][(7, k)]
        assert lp.dtype == torch.float16 and ids.dtype == torch.int32 and ids.shape == (5, 8, k)
        for i in range(5):
            gen = torch.Generator().manual_seed(sequence_seed(7, i))
            want_lp, want_ids = sample_teacher_targets(logits[i], k, generator=gen)
            torch.testing.assert_close(ids[i].long(), want_ids, rtol=0, atol=0)
            torch.testing.assert_close(lp[i], want_lp.half(), rtol=0, atol=0)
    top_lp, top_ids = cache["topk"]
    want = torch.log_softmax(logits, -1).topk(6, dim=-1)
    torch.testing.assert_close(top_ids.long(), want.indices, rtol=0, atol=0)
    torch.testing.assert_close(top_lp, want.values.half(), rtol=0, atol=0)
    assert torch.equal(cache["full"], logits.half())
