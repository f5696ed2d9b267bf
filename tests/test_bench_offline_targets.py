"""benchmarks/bench_offline_targets.py: its --quick mode runs every target end to end and writes a CSV with
finite numbers, a PNG plot and the markdown table; its sampled targets are those a cache stores."""
import csv
import importlib.util
import math
import os

import pytest
import torch


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
        keys = ("heldout_kl", "top1_agreement", "train_step_ms") + (("step_ms", "loss_ms", "step_x_ce")
                                                                    if r["seed"] == "mean" else ())
        for key in keys:
            assert math.isfinite(float(r[key])) and float(r[key]) >= 0, (r["target"], r["k"], key, r[key])
        assert 0.0 <= float(r["top1_agreement"]) <= 1.0
    full = next(r for r in per_seed if r["target"] == "full")
    assert int(full["bytes_per_token"]) == 2 * 512  # fp16 logits, V 512 in quick mode
    assert all(int(r["bytes_per_token"]) == 6 * int(r["k"]) for r in per_seed if r["k"])
    with open(tmp_path / "plot.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(tmp_path / "plot.png") > 10_000  # axes, lines and legend, not an empty canvas
    for target in bench.TARGETS:
        assert f"| {target} |" in out["table"]


def test_targets_are_those_teacher_cache_stores(bench, tmp_path):
    """The experiment's in-memory cache holds what TeacherCache.build writes: the same fp16 top-k, and for
    sampled targets the same frozen draws (one per position, seeded per sequence), not fresh ones."""
    from fastdistill.cache.dataset import TeacherCache

    torch.manual_seed(0)
    teacher = bench.load_tiny_lm()(64, dim=16, layers=1, heads=2, head_scale=8.0).eval()
    data = torch.randint(0, 64, (5, 8))
    cache = bench.build_cache(teacher, data, [3, 6], [7], batch=2)
    for targets, k in (("topk", 6), ("sampled", 3), ("sampled", 6)):
        built = TeacherCache.build(str(tmp_path / f"{targets}{k}"), teacher, list(data), targets=targets, k=k,
                                   seed=7, batch_size=3, progress=False)
        lp, ids = cache["topk"] if targets == "topk" else cache["sampled"][(7, k)]
        assert lp.dtype == torch.float16 and ids.dtype == torch.int32 and ids.shape == (5, 8, k)
        for i in range(5):
            item = built[i]
            assert torch.equal(ids[i], item[f"{targets}_indices"]), (targets, k, i)
            assert torch.equal(lp[i], item[f"{targets}_logprobs"]), (targets, k, i)
    with torch.no_grad():
        assert torch.equal(cache["full"], teacher(data).float().half())
