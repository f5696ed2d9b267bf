"""One pytest-benchmark per (case, provider) of fastdistill.bench; see conftest.py."""
from __future__ import annotations

import pytest
import torch

from conftest import ROWS, SETTINGS
from fastdistill.bench import harness, runner

_PEAKS: dict[tuple, dict] = {}  # (op, case) -> {provider: peak result}, one memory worker per case


def _peak_mb(case, provider: str) -> float | None:
    if SETTINGS["memory"] == "none":
        return None
    key = (case.op, case.name)
    if key not in _PEAKS:
        names = [p.name for p in case.providers]
        spec = dict(op=case.op, case=case.name, device=SETTINGS["device"], shapes=SETTINGS["shapes"], reps=1,
                    what="memory", providers=names)
        out = harness.run_module_worker(runner.WORKER, spec, exact_rss=SETTINGS["device"] == "cpu")
        _PEAKS[key] = out.get("results") or {}
    return _PEAKS[key].get(provider, {}).get("peak_mb")


def test_op(benchmark, pair):
    case, provider = pair
    device = SETTINGS["device"]
    benchmark.group = f"{case.op} [{case.name}]"
    try:
        fn = case.build(case.params, provider, device)
        for _ in range(2):  # compile, autotune, first touch: outside the measurement
            fn()
    except Exception as e:  # a provider that cannot run here (peer missing, unsupported shape)
        ROWS.append(runner.make_row(case, provider, {"error": f"{type(e).__name__}: {e}"[:300]}))
        pytest.skip(f"{provider}: {type(e).__name__}: {e}"[:300])
    call = fn if device != "cuda" else (lambda: (fn(), torch.cuda.synchronize()))
    benchmark.pedantic(call, rounds=SETTINGS["reps"], warmup_rounds=1, iterations=1)
    times = [t * 1e3 for t in benchmark.stats.stats.data]
    row = runner.make_row(case, provider, {**harness.summarize(times), "peak_mb": _peak_mb(case, provider)})
    ROWS.append(row)
    info = {"peak_mb": row["peak_mb"], "gbps": row["gbps"], "tflops": row["tflops"]}
    for base in ROWS:  # the baselines of this case measured so far in this session (they run first)
        if (base["op"], base["case"]) == (case.op, case.name) and base["kind"] != "fastdistill" and "ms" in base:
            info[f"speedup_vs_{base['provider']}"] = base["ms"] / row["ms"]
    benchmark.extra_info.update({k: v for k, v in info.items() if v is not None})
