"""Vocabulary-parallel losses (tensor parallel on the output head) on 2 gloo ranks against one process.

ONE start of 2 gloo ranks on CPU (vocab_parallel_worker.py) runs every case: each divergence x {distill_loss,
fused_linear_distill_loss, topk_distill_loss with both tails} x {local slices + group=, DTensor Shard} x option
sets (temperature, hard labels, ignore_index rows, reductions, num_items, softcap / logit scales), V = 1271 split
unevenly, float64, loss and this rank's gradient slice vs the single-process reference; the NaN rule across
ranks; bad input that must raise the same error on every rank.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Starts the 2 ranks as 2 plain processes (no launcher process importing torch first) and reads their
    per-case results."""
    out = tmp_path_factory.mktemp("vocab_parallel")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    worker = os.path.join(HERE, "vocab_parallel_worker.py")
    store = str(out / "store")
    procs = [subprocess.Popen([sys.executable, worker, str(out), str(rank), "2", store], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    return {name: [r[name] for r in ranks] for name in ranks[0]}


def _check(results, prefix: str, expected: int):
    cases = {name: errors for name, errors in results.items() if name.startswith(prefix)}
    assert len(cases) == expected, sorted(cases)
    failed = {name: [e for e in errors if e] for name, errors in cases.items() if any(errors)}
    assert not failed, "\n".join(f"{name}:\n{errs[0]}" for name, errs in sorted(failed.items())[:5]) + \
        f"\n{len(failed)} of {len(cases)} cases failed: {sorted(failed)}"


def test_distill_loss_matches_one_process(results):
    _check(results, "distill/", 2 * (7 * 2 + 4 * 2))  # 2 modes x (7 divergences x A, B + 4 x C, D)


def test_fused_linear_distill_loss_matches_one_process(results):
    _check(results, "fused/", 2 * (7 * 2 + 4 * 2))


def test_topk_distill_loss_matches_one_process(results):
    _check(results, "topk/", 2 * 2 * (6 * 2 + 3 * 2))  # 2 modes x 2 tails x (6 divergences x A, B + 3 x C, D)


def test_nan_rule_across_ranks(results):
    _check(results, "nan/", 6)


def test_bad_input_raises_on_every_rank(results):
    _check(results, "bad/", 22)


def test_colwise_parallel_heads(results):
    _check(results, "tp/", 2)


def test_float32_and_bfloat16_inputs(results):
    _check(results, "lowp/", 4)


def test_modules_take_group(results):
    _check(results, "module/", 2)


def test_edge_cases(results):
    """Endpoints of the divergences (jsd at beta 0 / 1, skew 0 / 1), top-k with k = V, no labels, no tokens,
    num_items as a tensor, no_grad."""
    _check(results, "edge/", 13)
