"""Runs benchmark cases and turns the timings into result rows.

    plan(ops, device=, shapes=, providers=)  -> the (case, provider) pairs to measure (validates every argument)
    run(ops, device=, shapes=, providers=, reps=, isolate=, progress=) -> {"environment", "device", "shapes",
        "reps", "isolate", "rows"}

Each provider is timed with harness.time_it (median and 20th/80th percentiles over `reps` calls, after the
untimed calls that compile, autotune and first-touch memory); its peak extra memory is harness.PeakMemory over
one more call. isolate says where:
    "case"      (default) one fresh process per case (`python -m fastdistill.bench.worker`) that measures its
                providers in turn. On the CPU a case takes two: one times with glibc's heap as users run it, one
                measures memory with every allocation >= 64 KiB returned to the OS (harness.run_worker's
                exact_rss), so each provider's CPU peak is its own. That setting turns each allocation into
                mmap + page faults + munmap and made sub-millisecond calls 3-4x slower, hence the split. What an
                earlier provider keeps (compiled code) counts in the base, not in the peak.
    "provider"  fresh processes per (case, provider): nothing shared at all (the slowest).
    "none"      this process (fastest; the CPU peak then misses memory that the heap reuses).
A row: op, case, provider, kind, ms, p20_ms, p80_ms, gbps, tflops, peak_mb, and, against the baselines
(eager, compile, peers) measured in the same run: baseline (the fastest), ratio (its ms / this ms: > 1 is
faster than every baseline) and ratios (per baseline); or error, when the provider failed.
"""
from __future__ import annotations

import gc
import math
from typing import Callable, Iterable, Optional

import torch

from fastdistill.bench import harness
from fastdistill.bench.cases import OPS, Case, check_device, find_case, get_cases

DEFAULT_REPS = {"cpu": 5, "cuda": 20}
ISOLATION = ("case", "provider", "none")
WORKER = "fastdistill.bench.worker"
ROW_FIELDS = ("op", "case", "provider", "kind", "ms", "p20_ms", "p80_ms", "gbps", "tflops", "peak_mb", "baseline",
              "ratio", "ratios", "error")


def plan(ops: Optional[Iterable[str]] = None, *, device: str = "cpu", shapes: str = "small",
         providers: Optional[Iterable[str]] = None) -> list[tuple[Case, str]]:
    """The (case, provider name) pairs to measure: every case of `ops` (default: all), every provider that runs on
    `device` (or those named in `providers`: each must belong to some selected case)."""
    check_device(device)
    ops = list(OPS if ops is None else ops)
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise ValueError(f"op: unknown {bad[0]!r}; expected one of {', '.join(OPS)}" if bad else "op: none given")
    selected = [c for op in dict.fromkeys(ops) for c in get_cases(op, device, shapes)]
    every = list(dict.fromkeys(p.name for c in selected for p in c.providers))
    wanted = None if providers is None else list(providers)
    if wanted is not None:
        bad = [p for p in wanted if p not in every]
        if bad or not wanted:
            raise ValueError(f"providers: {bad[0]!r} does not run {', '.join(dict.fromkeys(ops))} on {device}; "
                             f"expected some of {', '.join(every)}" if bad else "providers: none given")
    return [(c, p.name) for c in selected for p in c.providers if wanted is None or p.name in wanted]


MEASURES = ("both", "time", "memory")


def measure(case: Case, provider: str, device: str, reps: int, what: str = "both") -> dict:
    """One provider on one case, in this process: median_ms, p20_ms, p80_ms (what "time" or "both") and
    peak_mb, the peak extra memory of one call (what "memory" or "both")."""
    if what not in MEASURES:
        raise ValueError(f"what: expected one of {MEASURES}, got {what!r}")
    fn = case.build(case.params, provider, device)
    for _ in range(2):  # compile, autotune, first touch: outside the measurement
        fn()
    out = {}
    if what != "memory":
        out.update(harness.summarize(harness.time_it(lambda _: fn(), device=device, warmup=1, reps=reps)))
    if what != "time":
        with harness.PeakMemory(device) as peak:
            fn()
            harness._sync(device)
        out["peak_mb"] = peak.extra / 2**20
    return out


def measure_spec(spec: dict) -> dict:
    """measure() of a JSON spec (what a worker process receives); failures come back as {"error": ...}. A spec
    with "providers" (a list) measures each in turn and returns {"results": {provider: result}}."""
    if spec.get("providers") is not None:
        one = {k: v for k, v in spec.items() if k != "providers"}
        return {"results": {p: measure_spec(dict(one, provider=p)) for p in spec["providers"]}}
    try:
        case = find_case(spec["op"], spec["case"], spec["device"], spec["shapes"])
        return measure(case, spec["provider"], spec["device"], spec["reps"], spec.get("what", "both"))
    except Exception as e:  # a provider that cannot run here (peer missing, unsupported shape): one failed row
        return {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]}
    finally:
        gc.collect()
        if spec.get("device") == "cuda":
            torch.cuda.empty_cache()


def make_row(case: Case, provider: str, result: dict) -> dict:
    kind = case.provider(provider).kind
    row = {"op": case.op, "case": case.name, "provider": provider, "kind": kind}
    if "error" in result:
        return {**row, "error": result["error"]}
    ms = result["median_ms"]
    row.update(ms=ms, p20_ms=result["p20_ms"], p80_ms=result["p80_ms"],
               gbps=case.bytes / ms / 1e6 if case.bytes and ms > 0 else None,
               tflops=case.flops / ms / 1e9 if case.flops and ms > 0 else None, peak_mb=result["peak_mb"])
    return row


def _timed(row: dict) -> bool:
    ms = row.get("ms")
    return isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0


def add_ratios(rows: list[dict]) -> list[dict]:
    """Per (op, case): baseline = the fastest baseline provider (kind != "fastdistill"), ratio = its ms / the row's
    ms (> 1: faster than it), ratios = the same against every baseline. Rows without a time, or cases without a
    timed baseline, get no ratio. Modifies and returns rows."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["case"]), []).append(row)
    for group in groups.values():
        base = {r["provider"]: r["ms"] for r in group if r["kind"] != "fastdistill" and _timed(r)}
        best = min(base, key=base.get) if base else None
        for row in group:
            if best is None or not _timed(row):
                continue
            row["baseline"], row["ratio"] = best, base[best] / row["ms"]
            row["ratios"] = {name: ms / row["ms"] for name, ms in base.items()}
    return rows


def _in_workers(base: dict, names: list[str], isolate: str, *, what: str, exact_rss: bool) -> dict:
    """{provider: result} measured in one worker for the case ("case") or one per provider ("provider")."""
    spec = dict(base, what=what)
    if isolate == "provider":
        return {p: harness.run_module_worker(WORKER, dict(spec, provider=p), exact_rss=exact_rss) for p in names}
    out = harness.run_module_worker(WORKER, dict(spec, providers=names), exact_rss=exact_rss)
    results = out.get("results") or {}
    return {p: results.get(p, out if "error" in out else {"error": "no result"}) for p in names}


def _merge(timed: dict, peak: dict) -> dict:
    """A provider's timing and its memory worker's peak; a failed memory run leaves peak_mb unknown."""
    if "error" in timed:
        return timed
    return {**timed, "peak_mb": peak.get("peak_mb")}


def run(ops: Optional[Iterable[str]] = None, *, device: str = "cpu", shapes: str = "small",
        providers: Optional[Iterable[str]] = None, reps: Optional[int] = None, isolate: str = "case",
        progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Measures plan(...) and returns the run: environment, settings and rows (with ratios)."""
    pairs = plan(ops, device=device, shapes=shapes, providers=providers)
    reps = DEFAULT_REPS[device] if reps is None else reps
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps: expected a positive int, got {reps!r}")
    if isolate not in ISOLATION:
        raise ValueError(f"isolate: expected one of {ISOLATION}, got {isolate!r}")
    groups: dict[tuple, list[str]] = {}  # providers per case, in plan order
    for case, provider in pairs:
        groups.setdefault((case.op, case.name), []).append(provider)
    cases = {(c.op, c.name): c for c, _ in pairs}
    rows = []
    for key, names in groups.items():
        base = dict(op=key[0], case=key[1], device=device, shapes=shapes, reps=reps)
        if isolate == "none":
            results = {p: measure_spec(dict(base, provider=p)) for p in names}
        elif device == "cpu":  # time with the normal heap, memory with exact RSS (see the module doc)
            timed = _in_workers(base, names, isolate, what="time", exact_rss=False)
            peaks = _in_workers(base, names, isolate, what="memory", exact_rss=True)
            results = {p: _merge(timed[p], peaks[p]) for p in names}
        else:  # the CUDA allocator's peak does not depend on the heap
            results = _in_workers(base, names, isolate, what="both", exact_rss=False)
        for p in names:
            rows.append(make_row(cases[key], p, results.get(p, {"error": "no result"})))
            if progress is not None:
                progress(rows[-1])
    return {"environment": harness.environment(device), "device": device, "shapes": shapes, "reps": reps,
            "isolate": isolate, "rows": add_ratios(rows)}
